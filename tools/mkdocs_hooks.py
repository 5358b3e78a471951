"""MkDocs hooks of `make docs`: pages whose source lives outside docs/ join the site from where they are."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
# site path -> the file it is built from (kept where it belongs: the card travels with the model's weights).
OUTSIDE = {"model-card.md": REPO / "models" / "fashion-lite0" / "MODEL_CARD.md"}
LINK = re.compile(r"\[([^\]]+)\]\(([^)#\s]+)(#[^)\s]*)?\)")


def on_files(files, config):
    from mkdocs.structure.files import File  # here, so that the tests import the link rewriting without MkDocs

    for uri, source in OUTSIDE.items():
        files.append(File.generated(config, uri, abs_src_path=str(source)))
    return files


def on_page_markdown(markdown, page, config, files):
    """An outside page's relative links: into docs/, rewritten for the site; elsewhere in the repository, the
    repository path as text (the site serves only docs/). A docs page links to an outside page where it lives
    (`../models/fashion-lite0/MODEL_CARD.md`, which works on GitHub too): rewritten to its site path."""
    source = OUTSIDE.get(page.file.src_uri)
    if source is None:
        return to_site(markdown, page.file.src_uri)

    def relink(match: re.Match) -> str:
        text, target, anchor = match.group(1), match.group(2), match.group(3) or ""
        if "://" in target:
            return match.group(0)
        path = (source.parent / target).resolve()
        if path.is_relative_to(DOCS):
            return f"[{text}]({path.relative_to(DOCS).as_posix()}{anchor})"
        return f"{text} (`{path.relative_to(REPO).as_posix()}`)"

    return LINK.sub(relink, markdown)


def to_site(markdown: str, uri: str) -> str:
    """Links of the docs page ``uri`` to an outside page's source file, made links to its site path."""
    import posixpath

    sites = {source.resolve(): site for site, source in OUTSIDE.items()}
    folder = DOCS / posixpath.dirname(uri)

    def relink(match: re.Match) -> str:
        text, target, anchor = match.group(1), match.group(2), match.group(3) or ""
        site = None if "://" in target else sites.get((folder / target).resolve())
        if site is None:
            return match.group(0)
        return f"[{text}]({posixpath.relpath(site, posixpath.dirname(uri) or '.')}{anchor})"

    return LINK.sub(relink, markdown)
