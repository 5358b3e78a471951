"""Issue 32, the documentation: a short README whose links all land, reference pages generated from the code
and current (every option of every command, every column of every table), option help one or two lines.
`make docs` builds the site itself with --strict (tests here need no MkDocs)."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import click

from jobs.cli import cli
from tools import docs_reference

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
LINK = re.compile(r"\[[^\]]+\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """Python-Markdown's toc slugify, as MkDocs makes heading anchors."""
    text = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(m.group(1).replace("`", "")) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def test_the_readme_is_short():
    assert len(README.read_text().splitlines()) <= 300


def test_every_link_of_the_readme_lands_on_a_file_and_an_anchor_that_exist():
    for target in LINK.findall(README.read_text()):
        if "://" in target:
            continue
        path, _, anchor = target.partition("#")
        file = (REPO / path).resolve()
        assert file.exists(), f"README links to {target}: no such file"
        if anchor:
            assert anchor in _anchors(file), f"README links to {target}: no such heading in {path}"


def test_the_generated_reference_pages_are_current():
    for path, text in docs_reference.pages().items():
        assert path.read_text() == text, f"{path.relative_to(REPO)} is stale: run `python -m tools.docs_reference`"


def test_every_option_of_every_command_is_in_the_reference():
    page = docs_reference.OPTIONS_PAGE.read_text()
    for name, command in cli.commands.items():
        section = page[page.index(f"\n## tagger {name}\n"):]
        section = section[:section.find("\n## ", 1)] if "\n## " in section[1:] else section
        for param in command.params:
            if isinstance(param, click.Option):
                for opt in param.opts + param.secondary_opts:
                    assert f"`{opt}`" in section, f"tagger {name} {opt} is not in docs/reference/options.md"


def test_every_column_has_a_note():
    for table, (_, schema) in docs_reference._schemas().items():
        assert set(schema.names) == set(docs_reference.COLUMN_NOTES[table]), table


def test_option_help_is_one_or_two_lines():
    for name, command in [("", cli), *cli.commands.items()]:
        for param in command.params:
            if isinstance(param, click.Option) and param.help:
                assert len(param.help) <= 150, f"tagger {name} {param.opts[0]}: explain it in the docs, not in --help"


def test_the_checker_names_a_stale_page(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "options.md"
    stale.write_text("old")
    monkeypatch.setattr(docs_reference, "pages", lambda: {stale: "new", tmp_path / "columns.md": "x"})
    monkeypatch.setattr(docs_reference, "REPO", tmp_path)
    assert docs_reference.main(["--check"]) == 1
    assert "options.md" in capsys.readouterr().err and stale.read_text() == "old"


def test_every_relative_link_of_the_docs_lands_on_a_file_where_the_pages_are_read_as_they_are():
    """`make docs` checks the site, where a hook serves pages from outside docs/; the pages are read as they
    are too (GitHub, an editor), so each relative link must also land on a file of the repository."""
    broken = []
    for page in sorted((REPO / "docs").rglob("*.md")):
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in LINK.findall(text):
            path = target.partition("#")[0]
            if "://" in target or target.startswith(("#", "mailto:")) or not path:
                continue
            if not (page.parent / path).resolve().exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert broken == []


def test_the_site_hook_turns_a_link_to_the_model_card_into_its_site_page():
    from tools.mkdocs_hooks import to_site

    assert to_site("[card](../models/fashion-lite0/MODEL_CARD.md#data)", "real-data.md") == "[card](model-card.md#data)"
    assert to_site("[card](../../models/fashion-lite0/MODEL_CARD.md)", "deploy/airflow.md") == "[card](../model-card.md)"
    assert to_site("[other](train.md)", "real-data.md") == "[other](train.md)"


def test_the_drift_thresholds_help_says_they_cross_only_past_the_noise_floor():
    # `report --max-drift 0.05` on two 30-row nights with a distance of 0.26 is quiet (below the floor of 0.44):
    # the help must not promise exit 6 for any distance over the option.
    for name in ("report", "tag"):
        params = {p.opts[0]: p for p in cli.commands[name].params}
        for option in ("--max-drift", "--max-psi"):
            assert "noise floor" in params[option].help, f"{name} {option}"
