"""Several photos per product on real photos: are a product's tags from two photos at least as right as from one?

    python -m bench.multi_photo [--model models/fashion-lite0] [--workers 2]

The shipped model's test split (``split.parquet`` in the bundle: products it never trained or calibrated on),
photos from ``$FASHION_SAMPLE_DIR`` and ``$FASHION_MORE_DIR`` (default ``../shared/data/fashion-sample`` and
``fashion-more``). Each product is tagged three ways by the real job (:class:`tagger.tag.runner.TagRunner`):
its photo alone; its photo and the photo's mirror image (``--image-separator ';'``: the mean of the two
photos' probabilities); and the same with a third, missing photo (tagged from the two that can be read). The
mirror image stands in for a second shot of the same item (the model trained on flips, so it is a view it
knows, not a new one). Accuracy is against styles.csv's labels, every label of the full vocabulary counted.
Prints a Markdown table for docs/real-data.md; nothing is written to the repository.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    import polars as pl
    import pyarrow.parquet as pq
    from PIL import Image

    from tagger.attributes import ATTRIBUTES
    from tagger.data.kaggle import load_kaggle
    from tagger.tag.config import TagConfig
    from tagger.tag.runner import TagRunner
    from tagger.tag.writers import read_complete_partition

    parser = argparse.ArgumentParser(prog="python -m bench.multi_photo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "fashion-lite0"))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    command = "python -m bench.multi_photo " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    data = ROOT.parent / "shared" / "data"
    roots = [os.environ.get("FASHION_SAMPLE_DIR", str(data / "fashion-sample")), os.environ.get("FASHION_MORE_DIR", str(data / "fashion-more"))]
    roots = [r for r in roots if Path(r, "images").is_dir()]
    if not roots:
        print("bench.multi_photo: no Kaggle photos found (FASHION_SAMPLE_DIR / FASHION_MORE_DIR); skipped.", file=sys.stderr)
        return 0
    test_ids = set(pq.read_table(Path(args.model) / "split.parquet").to_pandas().query("split == 'test'")["id"])
    kaggle = load_kaggle(roots)
    table = kaggle.table.filter(pl.col("id").is_in(list(test_ids)))
    work = Path(tempfile.mkdtemp(prefix="multi-photo-"))
    (work / "mirror").mkdir()
    rows = []
    for product, image in zip(table["id"], table["image"]):
        mirror = work / "mirror" / f"{product}.jpg"
        with Image.open(image) as photo:
            photo.convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirror, "JPEG", quality=95)
        rows.append((product, image, str(mirror)))
    truth = work / "truth.csv"
    table.select(pl.col("id").alias("product_id"), *ATTRIBUTES).write_csv(truth)
    variants = {
        "one photo": [(p, i) for p, i, _ in rows],
        "photo + its mirror image": [(p, f"{i};{m}") for p, i, m in rows],
        "photo + mirror + a missing photo": [(p, f"{i};{m};{work}/gone/{p}.jpg") for p, i, m in rows],
    }
    results = {}
    for name, catalog_rows in variants.items():
        catalog = work / f"{len(results)}.csv"
        pl.DataFrame({"product_id": [p for p, _ in catalog_rows], "image": [i for _, i in catalog_rows]}).write_csv(catalog)
        out = work / f"out{len(results)}"
        config = TagConfig(catalog=str(catalog), model=args.model, out=str(out), run_date="2026-01-01", device="cpu",
                           workers=args.workers, progress="none", max_error_rate=1.0,
                           image_separator=";" if ";" in catalog_rows[0][1] else None)
        started = time.time()
        result = TagRunner(config).run()
        if result.exit_code != 0:
            raise SystemExit(f"{name}: exit {result.exit_code}")
        tags = pl.from_arrow(read_complete_partition(str(out / "tags" / "run_date=2026-01-01")))
        from tagger.demo.drawn import score_against_truth

        results[name] = {"scores": score_against_truth(tags, truth), "tagged": tags.height,
                         "images_used": tags["images_used"].value_counts().sort("images_used").rows(),
                         "wall_s": round(time.time() - started, 1)}
        print(f"  {name}: {results[name]}", file=sys.stderr, flush=True)
    names = list(results)
    lines = [f"Command: `{command.strip()}`; {len(rows)} test-split products ({', '.join(roots)})", "",
             "| photos per product | " + " | ".join(ATTRIBUTES) + " | all | tagged | images_used |",
             "|---|" + "---|" * (len(ATTRIBUTES) + 3)]
    for name in names:
        s = results[name]["scores"]
        used = ", ".join(f"{n}: {c}" for n, c in results[name]["images_used"])
        lines.append(f"| {name} | " + " | ".join(f"{100 * s[a]:.1f} %" for a in ATTRIBUTES)
                     + f" | {100 * s['all']:.1f} % | {results[name]['tagged']} | {used} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
