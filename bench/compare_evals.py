"""Two `tagger evaluate` reports of the same rows, attribute by attribute: did the second model get worse?

    .venv/bin/python -m bench.compare_evals out/evaluate/OLD-test out/evaluate/NEW-test

Per attribute both have a target for: accuracy of each, the difference, the standard error of an accuracy
(sqrt(p(1-p)/n), of the first) and the paired standard error of the difference (the rows are the same:
sqrt(b + c - (b - c)^2 / n) / n, with b and c the rows only one of the two got right).
"""

from __future__ import annotations

import math
import sys


def main() -> None:
    import polars as pl

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
        n = len(a)
        p1, p2 = a.mean(), b.mean()
        only1, only2 = int((a & ~b).sum()), int((~a & b).sum())
        paired = math.sqrt(max(only1 + only2 - (only1 - only2) ** 2 / n, 0)) / n
        print(f"{attr:<16}{n:>5}{100 * p1:>7.1f}%{100 * p2:>7.1f}%{100 * (p2 - p1):>+7.1f}{100 * math.sqrt(p1 * (1 - p1) / n):>7.2f}{100 * paired:>10.2f}")


if __name__ == "__main__":
    main()
