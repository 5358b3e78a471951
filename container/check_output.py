"""`make image-test`, run with the job's .venv on the host: check what the image wrote into the mounted folder.

    .venv/bin/python container/check_output.py --catalog CATALOG --out OUT --run-date D

Both tables committed (_SUCCESS), every manifest row in exactly one of them, the run summary succeeded,
every tag row has all its labels and finite scores. Prints one line; exits 1 on the first broken promise.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from tagger.data.manifest import read_manifest
from tagger.tag.writers import read_complete_partition


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--catalog", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--run-date", required=True)
    args = parser.parse_args()

    problems: list[str] = []
    for table in ("tags", "errors"):
        if not (Path(args.out) / table / f"run_date={args.run_date}" / "_SUCCESS").is_file():
            problems.append(f"{table}/run_date={args.run_date}/_SUCCESS missing")
    if problems:
        print("image-test FAILED: " + "; ".join(problems), file=sys.stderr)
        return 1
    tags = read_complete_partition(f"{args.out}/tags/run_date={args.run_date}").to_pylist()
    errors = read_complete_partition(f"{args.out}/errors/run_date={args.run_date}").to_pylist()
    rows = read_manifest(args.catalog).num_rows
    summary = json.loads((Path(args.out) / "_runs" / f"run_date={args.run_date}" / "summary.json").read_text())

    ids = [r["product_id"] for r in tags] + [r["product_id"] for r in errors]
    if len(ids) != rows:
        problems.append(f"{len(tags)} tag rows + {len(errors)} error rows != {rows} manifest rows")
    if len(set(ids)) != len(ids):
        problems.append("a product id appears twice")
    if summary.get("status") != "succeeded" or summary.get("rows") != rows:
        problems.append(f"summary: status {summary.get('status')!r}, rows {summary.get('rows')}")
    attributes = [k[: -len("_score")] for k in (tags[0] if tags else {}) if k.endswith("_score")]
    if not tags or not attributes:
        problems.append("no tags")
    for row in tags:
        if any(not row[a] or not math.isfinite(row[f"{a}_score"]) for a in attributes):
            problems.append(f"product {row['product_id']}: a missing label or a non-finite score")
            break
    if problems:
        print("image-test FAILED: " + "; ".join(problems), file=sys.stderr)
        return 1
    print(f"image-test OK: {rows} manifest rows -> {len(tags)} tags + {len(errors)} errors "
          f"({', '.join(sorted({r['error_type'] for r in errors})) or 'none'}), both tables committed, "
          f"device {summary.get('this_process', {}).get('device', '?')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
