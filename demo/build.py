"""How demo/ was made: real photos from the shipped model's own test split, plus two broken rows.

    .venv/bin/python demo/build.py --model models/fashion-lite0 \
        --data ../shared/data/fashion-sample --data ../shared/data/fashion-more --n 150

Run once by the maintainers (the Kaggle photos are not in a user's clone; the 150 picked here are
committed). The products come only from the bundle's ``split.parquet`` rows marked ``test``: the model
never trained or calibrated on them, so ``make tag`` + ``tagger demo-check`` measure it honestly.
"""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

import numpy as np

ATTRIBUTES = ("gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "usage")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", action="append", required=True)
    parser.add_argument("--n", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent))
    args = parser.parse_args()

    from tagger.data.kaggle import load_kaggle
    from tagger.data.split import read_split

    split = read_split(str(Path(args.model, "split.parquet")))
    test_ids = sorted(i for i, name in split.items() if name == "test")
    data = load_kaggle(args.data)
    rows = {r["id"]: r for r in data.table.iter_rows(named=True)}
    rng = np.random.default_rng(args.seed)
    picked = sorted(rng.choice([i for i in test_ids if i in rows], size=args.n, replace=False).tolist(), key=int)

    out = Path(args.out)
    images = out / "images"
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir(parents=True)
    with open(out / "catalog.csv", "w", newline="", encoding="utf-8") as catalog, open(out / "truth.csv", "w", newline="", encoding="utf-8") as truth:
        catalog_writer, truth_writer = csv.writer(catalog), csv.writer(truth)
        # The catalog carries the data set's own labels, as a retailer's does: `tagger report` scores the tags
        # against them (truth.csv holds the same labels for demo-check).
        # ... and its own titles (productDisplayName), which `make tag` reads with --text-column title.
        catalog_writer.writerow(["product_id", "image", *ATTRIBUTES, "title"])
        truth_writer.writerow(["product_id", *ATTRIBUTES])
        for product_id in picked:
            source = Path(rows[product_id]["image"])
            shutil.copyfile(source, images / f"{product_id}.jpg")
            catalog_writer.writerow([product_id, f"images/{product_id}.jpg", *[rows[product_id][a] or "" for a in ATTRIBUTES],
                                     rows[product_id].get("productDisplayName") or ""])
            truth_writer.writerow([product_id, *[rows[product_id][a] or "" for a in ATTRIBUTES]])
        # The deliberately broken rows: the errors table shows what happens to them. The corrupt photo keeps the
        # title of the product it was cut from: with --text-column title it is tagged from its text.
        catalog_writer.writerow(["broken-missing", "images/no-such-photo.jpg", *[""] * len(ATTRIBUTES), ""])
        catalog_writer.writerow(["broken-corrupt", "images/corrupt.jpg", *[""] * len(ATTRIBUTES),
                                 rows[picked[0]].get("productDisplayName") or ""])
    good = (images / f"{picked[0]}.jpg").read_bytes()
    (images / "corrupt.jpg").write_bytes(good[: len(good) // 3])  # a JPEG cut off mid-scan
    print(f"{len(picked)} test-split products + 2 broken rows -> {out}")


if __name__ == "__main__":
    main()
