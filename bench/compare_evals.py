"""Two `tagger evaluate` reports of the same rows, attribute by attribute: did the second model get worse?

    .venv/bin/python -m bench.compare_evals out/evaluate/OLD-test out/evaluate/NEW-test

For reports already written. `tagger evaluate --model NEW --baseline OLD` does the same in one run (and lists the
changed rows); the maths is tagger.metrics.paired_difference, shared by both.
"""

from __future__ import annotations

import sys


def main() -> None:
    import polars as pl

    from tagger.metrics import accuracy_se, paired_difference

    old, new = (pl.read_parquet(f"{folder}/predictions.parquet") for folder in sys.argv[1:3])
    joined = old.join(new, on="id", suffix="_new")
    print(f"{'attribute':<16}{'n':>5}{'first':>8}{'second':>8}{'diff':>8}{'SE':>7}{'paired SE':>10}")
    for column in old.columns:
        if not column.endswith("_target") or f"{column}_new" not in joined.columns:
            continue
        attr = column[: -len("_target")]
        rows = joined.filter(pl.col(column).is_not_null() & pl.col(f"{column}_new").is_not_null())
        a = (rows[f"{attr}_pred"] == rows[column]).fill_null(False).to_numpy()
        b = (rows[f"{attr}_pred_new"] == rows[f"{column}_new"]).fill_null(False).to_numpy()
        d = paired_difference(a, b)
        n = d["n"]
        print(f"{attr:<16}{n:>5}{100 * d['accuracy_first']:>7.1f}%{100 * d['accuracy_second']:>7.1f}%{100 * d['difference']:>+7.1f}"
              f"{100 * accuracy_se(d['accuracy_first'], n):>7.2f}{100 * d['paired_se']:>10.2f}")


if __name__ == "__main__":
    main()
