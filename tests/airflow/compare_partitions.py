"""Run with the JOB's Python (.venv): compare one run date of two output roots, print a JSON verdict.

    .venv/bin/python tests/airflow/compare_partitions.py OUT_A OUT_B RUN_DATE

Both partitions must be complete (_SUCCESS in tags and errors); rows compare equal less the run-specific
columns (run_id, tagged_at). Used by the Airflow test, which runs in .venv-airflow without the job's stack.
"""

from __future__ import annotations

import json
import sys

import polars as pl

from tagger.tag.writers import read_complete_partition

RUN_SPECIFIC = ("run_id", "tagged_at")


def load(out: str, table: str, date: str) -> pl.DataFrame:
    frame = pl.from_arrow(read_complete_partition(f"{out}/{table}/run_date={date}"))
    return frame.drop(*RUN_SPECIFIC, strict=False).sort("product_id")


def main(a: str, b: str, date: str) -> dict:
    verdict: dict = {}
    for table in ("tags", "errors"):
        left, right = load(a, table, date), load(b, table, date)
        verdict[table] = {
            "rows": [len(left), len(right)],
            "columns_equal": left.columns == right.columns,
            "equal": left.columns == right.columns and left.equals(right),
        }
        if table == "tags" and not verdict[table]["equal"] and left.columns == right.columns:
            labels = [c for c in left.columns if not c.endswith("_score")]
            verdict[table]["labels_equal"] = left.select(labels).equals(right.select(labels))
    return verdict


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
