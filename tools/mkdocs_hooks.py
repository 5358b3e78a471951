"""MkDocs hooks of `make docs`: pages whose source lives outside docs/ join the site from where they are."""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
# site path -> the file it is built from (kept where it belongs: the card travels with the model's weights).
OUTSIDE = {"model-card.md": REPO / "models" / "fashion-lite0" / "MODEL_CARD.md"}
LINK = re.compile(r"\[([^\]]+)\]\(([^)#\s]+)(#[^)\s]*)?\)")


def on_files(files, config):
    for uri, source in OUTSIDE.items():
        files.append(File.generated(config, uri, abs_src_path=str(source)))
    return files


def on_page_markdown(markdown, page, config, files):
    """An outside page's relative links: into docs/, rewritten for the site; elsewhere in the repository, the
    repository path as text (the site serves only docs/)."""
    source = OUTSIDE.get(page.file.src_uri)
    if source is None:
        return markdown

    def relink(match: re.Match) -> str:
        text, target, anchor = match.group(1), match.group(2), match.group(3) or ""
        if "://" in target:
            return match.group(0)
        path = (source.parent / target).resolve()
        if path.is_relative_to(DOCS):
            return f"[{text}]({path.relative_to(DOCS).as_posix()}{anchor})"
        return f"{text} (`{path.relative_to(REPO).as_posix()}`)"

    return LINK.sub(relink, markdown)
