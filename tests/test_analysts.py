"""Issue 23, analysts: each table's ``_partitions.json`` names the complete nights and their files, and the
recipes of docs/tables.md (run here as written) read only those: every night, the latest, a range; never a night
still being written."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from jobs.cli import cli
from tagger.tag.writers import INDEX_FILE, read_complete_partition, read_complete_table

TABLES_PAGE = Path(__file__).resolve().parents[1] / "docs" / "tables.md"
COMPLETE = ["2026-10-31", "2026-11-26", "2026-11-27"]
PARTIAL = "2026-11-28"


def tag(*args: str):
    return CliRunner().invoke(cli, ["tag", "--workers", "0", "--progress", "none", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def out(demo, tiny_bundle, tmp_path_factory) -> Path:
    """Three complete nights, and a fourth whose part file exists without its _SUCCESS (a run in progress)."""
    out = tmp_path_factory.mktemp("analysts") / "out"
    for date in COMPLETE:
        result = tag("--catalog", str(demo.catalog), "--model", tiny_bundle, "--out", str(out), "--run-date", date,
                     "--since", str(out))
        assert result.exit_code == 0, result.output
    partial = out / "tags" / f"run_date={PARTIAL}"
    partial.mkdir()
    shutil.copy(out / "tags" / f"run_date={COMPLETE[-1]}" / "part-00000.parquet", partial / "part-00000.parquet")
    return out


def recipes() -> dict[str, str]:
    """The code blocks of docs/tables.md's "Reading the tables", by their first comment line's first word."""
    text = TABLES_PAGE.read_text()
    section = text[text.index("## Reading the tables"):]
    section = section[:section.index("\n## ", 1)] if "\n## " in section[1:] else section
    blocks = re.findall(r"```(python|sql)\n(.*?)```", section, re.S)
    return {re.match(r"(?:#|--) (\w+)", body).group(1): body for _, body in blocks}


def rows_per_night(out: Path) -> int:
    return json.loads((out / "tags" / INDEX_FILE).read_text())["partitions"][0]["rows"]


def test_the_index_names_complete_nights_only(out):
    index = json.loads((out / "tags" / INDEX_FILE).read_text())
    assert index["run_dates"] == COMPLETE and index["latest"] == COMPLETE[-1]
    assert PARTIAL not in index["run_dates"] and not any(PARTIAL in f for f in index["files"])
    assert index["files"] == [f"run_date={d}/part-00000.parquet" for d in COMPLETE]
    for entry in index["partitions"]:
        success = json.loads((out / "tags" / f"run_date={entry['run_date']}" / "_SUCCESS").read_text())
        assert entry["rows"] == success["rows"] and entry["run_id"] == success["run_id"]
    errors = json.loads((out / "errors" / INDEX_FILE).read_text())
    assert errors["table"] == "errors" and errors["run_dates"] == COMPLETE


def test_the_polars_recipe_reads_complete_nights_the_latest_and_a_range(out):
    import polars as pl

    names: dict = {}
    exec(recipes()["polars"].replace("out/demo", str(out)), names)
    per_night = rows_per_night(out)
    nights = names["tags"].select(pl.col("run_date").cast(pl.Utf8)).collect()["run_date"].to_list()
    assert sorted(set(nights)) == COMPLETE and len(nights) == 3 * per_night
    assert names["latest"].height == per_night
    assert sorted(set(names["november"]["run_date"].cast(pl.Utf8))) == COMPLETE[1:]


def test_the_pandas_recipe_reads_complete_nights_the_latest_and_a_range(out):
    names: dict = {}
    exec(recipes()["pandas"].replace("out/demo", str(out)), names)
    per_night = rows_per_night(out)
    assert names["tags"].count_rows() == 3 * per_night
    assert len(names["latest"]) == per_night and set(names["latest"]["run_date"]) == {COMPLETE[-1]}
    assert sorted(set(names["november"]["run_date"])) == COMPLETE[1:]


def test_the_duckdb_recipe_reads_complete_nights_the_latest_and_a_range(out):
    duckdb = pytest.importorskip("duckdb", reason="DuckDB is in the test extra; install it to check its recipe")
    con = duckdb.connect()
    statements = [s.strip() for s in recipes()["DuckDB"].replace("out/demo", str(out)).split(";") if s.strip()]
    results = [con.sql(s) for s in statements]
    per_night = rows_per_night(out)
    counts = results[1].fetchall()
    assert [str(d) for d, _ in counts] == COMPLETE and all(n == per_night for _, n in counts)
    # As Arrow: tagged_at is a timestamp with a time zone, which DuckDB's Python rows want pytz for.
    latest, november = results[2].to_arrow_table(), results[3].to_arrow_table()
    assert latest.num_rows == per_night and {str(d) for d in latest.column("run_date").to_pylist()} == {COMPLETE[-1]}
    assert sorted({str(d) for d in november.column("run_date").to_pylist()}) == COMPLETE[1:]


def test_read_complete_partition_takes_the_table_root_and_says_what_it_found(out, caplog):
    caplog.set_level(logging.INFO, logger="tagger.tag.writers")
    table = read_complete_partition(str(out / "tags"))
    assert sorted(set(table.column("run_date").to_pylist())) == COMPLETE
    assert "3 complete partition(s) (2026-10-31 .. 2026-11-27), 1 incomplete skipped (2026-11-28)" in caplog.text
    latest = read_complete_table(str(out / "tags"), latest=True)
    assert set(latest.column("run_date").to_pylist()) == {COMPLETE[-1]}
    with pytest.raises(FileNotFoundError, match="looks like an output root: name a table"):
        read_complete_partition(str(out))
    with pytest.raises(FileNotFoundError, match="no complete partition .none of 2026-11-28.*without _SUCCESS"):
        read_complete_table(str(out / "tags"), run_dates=[PARTIAL])


def test_a_night_being_replaced_stays_in_the_index_as_it_was_until_its_replacement_commits(demo, tiny_bundle, tmp_path):
    import polars as pl

    out = tmp_path / "out"
    base = ("--catalog", str(demo.catalog), "--model", tiny_bundle, "--out", str(out))
    for date in COMPLETE[1:]:
        assert tag(*base, "--run-date", date).exit_code == 0

    def latest() -> pl.DataFrame:  # the polars recipe, as written, for the latest night
        names: dict = {}
        exec(recipes()["polars"].replace("out/demo", str(out)), names)
        return names["latest"].sort("product_id")

    before, index_before = latest(), json.loads((out / "tags" / INDEX_FILE).read_text())
    # The re-run of the latest night fails its error-rate gate: the night it was to replace is still the index's,
    # with its own files, and the recipe reads the same rows (never the failed run's parts beside them).
    failed = tag(*base, "--run-date", COMPLETE[-1], "--max-error-rate", "0", "--shard-size", "20")
    assert failed.exit_code == 3, failed.output
    index = json.loads((out / "tags" / INDEX_FILE).read_text())
    assert index["run_dates"] == COMPLETE[1:] and index["latest"] == COMPLETE[-1]
    assert index["partitions"] == index_before["partitions"] and latest().equals(before)
    # Committed: the index names the new run's files only, and they are all the night has.
    assert tag(*base, "--run-date", COMPLETE[-1], "--shard-size", "20").exit_code == 0
    index = json.loads((out / "tags" / INDEX_FILE).read_text())
    night = [p for p in index["partitions"] if p["run_date"] == COMPLETE[-1]][0]
    assert night["run_id"] != index_before["partitions"][-1]["run_id"] and len(night["files"]) == 3
    on_disk = sorted(f"run_date={COMPLETE[-1]}/{p.name}" for p in (out / "tags" / f"run_date={COMPLETE[-1]}").glob("*.parquet"))
    assert sorted(night["files"]) == on_disk
    assert latest().drop("run_id", "tagged_at").equals(before.drop("run_id", "tagged_at"))
