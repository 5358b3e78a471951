"""A labelled manifest with an attribute Kaggle lacks: ``pattern``, read from the product names.

    .venv/bin/python -m bench.pattern_manifest --data ../shared/data/fashion-sample --data ../shared/data/fashion-more \
        --out out/pattern/catalog.csv [--split-from models/fashion-lite0 --drop-unlabelled-train] [--limit-pattern N --seed 0]

Kaggle's ``styles.csv`` has no pattern column, but ``productDisplayName`` often says it: "Solid", "Printed" or
"Print", "Check" or "Checked", "Striped" or "Stripes". A product whose name holds the words of exactly one of
those four gets that pattern (Solid, Printed, Checked, Striped); any other product (none of them, or two:
"Solid Printed") is left unlabelled, which is what a catalog labelled by hand for part of its products looks
like. The seven Kaggle attributes are written beside it, so that one manifest trains all eight heads.

``--limit-pattern N`` keeps the pattern label on only N products of the train rows (a learning curve); the
val and test rows of ``--split-from`` keep theirs, so that every point of the curve is scored on the same rows.
This is a worked example (docs/real-data.md), not part of the library.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
from collections import Counter

PATTERNS = {"Solid": ("solid",), "Printed": ("printed", "print"), "Checked": ("check", "checked"), "Striped": ("striped", "stripes")}
WORD = re.compile(r"[a-z]+")


def pattern_of(name: str | None) -> str | None:
    """The pattern the name states, when it states exactly one."""
    words = set(WORD.findall((name or "").lower()))
    found = [label for label, spellings in PATTERNS.items() if words & set(spellings)]
    return found[0] if len(found) == 1 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", required=True, help="Kaggle-layout folder(s) (styles.csv + images/)")
    parser.add_argument("--out", required=True, help="the manifest to write (.csv)")
    parser.add_argument("--limit-pattern", type=int, default=None, help="keep pattern labels on only N train rows")
    parser.add_argument("--split-from", default=None, help="bundle whose split.parquet decides train rows (with --limit-pattern)")
    parser.add_argument("--drop-unlabelled-train", action="store_true",
                        help="leave out the train rows of --split-from without a pattern: they would only retrain the "
                             "seven heads on what they already learnt, and cost a pass through the trunk each")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from tagger.attributes import ATTRIBUTES
    from tagger.data.kaggle import load_kaggle

    data = load_kaggle(args.data, attributes=[*ATTRIBUTES, "productDisplayName"], require_attributes=False)
    rows = data.table.to_dicts()
    patterns = [pattern_of(r.get("productDisplayName")) for r in rows]
    split: dict[str, str] = {}
    if args.limit_pattern is not None or args.drop_unlabelled_train:
        from tagger.data.split import read_split

        if not args.split_from:
            parser.error("--limit-pattern and --drop-unlabelled-train need --split-from (they act on that split's train rows)")
        split = read_split(os.path.join(args.split_from, "split.parquet"))
    if args.limit_pattern is not None:
        import numpy as np

        train = [i for i, r in enumerate(rows) if patterns[i] and split.get(r["id"]) == "train"]
        keep = set(np.random.default_rng(args.seed).permutation(train)[: args.limit_pattern].tolist())
        patterns = [p if (i in keep or split.get(r["id"]) != "train") else None for i, (r, p) in enumerate(zip(rows, patterns))]
    if args.drop_unlabelled_train:
        kept = [(r, p) for r, p in zip(rows, patterns) if p or split.get(r["id"]) != "train"]
        rows, patterns = [r for r, _ in kept], [p for _, p in kept]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["product_id", "image", *ATTRIBUTES, "pattern"])
        for r, p in zip(rows, patterns):
            writer.writerow([r["id"], os.path.abspath(r["image"]), *(r[a] or "" for a in ATTRIBUTES), p or ""])
    counts = Counter(p for p in patterns if p)
    print(f"{args.out}: {len(rows)} products, pattern on {sum(counts.values())}: "
          + ", ".join(f"{k} {v}" for k, v in counts.most_common()))


if __name__ == "__main__":
    main()
