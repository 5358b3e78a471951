"""What a retrain costs per 1,000 photos on this CPU, by phase: the documented fast recipe, cold and then with the
trunk features cached (a second attribute set, a re-run or --corrections on the same photos).

    FASHION_SAMPLE_DIR=/work/shared/data/fashion-sample taskset -c 1 nice \
        .venv/bin/python -m bench.retrain_cost --photos 400 --out out/retrain-cost

The first N photos of the folder (sorted by id) become a Kaggle-layout folder of links beside the full styles.csv;
retrain runs on them twice with `--freeze-stages 6 --no-cache-mirror --max-epochs 4 --threads 1` and a fresh
$TAGGER_CACHE: once cold, once again (the features reused). The phases come from the bundles' training facts
(training.phases_s: wall seconds per phase, and the process's CPU seconds); the table scales them to 1,000 photos
(each epoch and the scoring see 80 % and 20 % of them). On a shared machine read the CPU line: the wall clock is what
the core was given.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def subset(source: Path, n: int, into: Path) -> Path:
    (into / "images").mkdir(parents=True)
    (into / "styles.csv").symlink_to(source / "styles.csv")
    for image in sorted((source / "images").glob("*.jpg"), key=lambda p: int(p.stem) if p.stem.isdigit() else p.stem)[:n]:
        (into / "images" / image.name).symlink_to(image)
    return into


def run(data: Path, out: Path, attributes: list[str] | None) -> dict:
    from tagger.training import RetrainConfig, retrain

    started = time.monotonic()
    bundle = retrain(RetrainConfig(data=str(data), out=str(out), attributes=attributes, backbone="tf_efficientnet_lite0",
                                   freeze_stages=6, cache_mirror=False, max_epochs=4, threads=1, workers=0, progress=False,
                                   min_label_count=5, seed=0))
    t = bundle.training
    return {"wall_s": time.monotonic() - started, "phases_s": t["phases_s"], "rows": t["data"]["rows"]["used"],
            "feature_cache": t["feature_cache"], "epochs": t["epochs"], "test": t["metrics"]["test"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=400)
    parser.add_argument("--out", default="out/retrain-cost")
    args = parser.parse_args()
    source = Path(os.environ.get("FASHION_SAMPLE_DIR", "../shared/data/fashion-sample"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="retrain-cost-") as tmp:
        os.environ["TAGGER_CACHE"] = str(Path(tmp) / "cache")
        data = subset(source, args.photos, Path(tmp) / "data")
        cold = run(data, out / "cold", None)
        warm = run(data, out / "warm", ["gender", "masterCategory", "subCategory", "articleType"])
    results = {"photos": cold["rows"], "cold": cold, "warm": warm, "command": f"bench.retrain_cost --photos {args.photos}"}
    (out / "retrain-cost.json").write_text(json.dumps(results, indent=2))
    per = 1000 / cold["rows"]
    print(f"{cold['rows']} photos, one core; seconds per 1,000 photos (x{per:.2f})")
    print(f"{'phase':<34}{'cold':>8}{'cached':>8}")
    for label, key in [("weights, data, decode", None), ("frozen-trunk pass", "trunk_pass"), ("4 epochs of the tail", "fit"),
                       ("scoring val + test", "score")]:
        def value(r):
            p = r["phases_s"]
            return p["prepare"] - p.get("trunk_pass", 0) if key is None else p.get(key, 0)
        print(f"{label:<34}{value(cold) * per:>8.0f}{value(warm) * per:>8.0f}")
    print(f"{'whole command':<34}{cold['wall_s'] * per:>8.0f}{warm['wall_s'] * per:>8.0f}")
    print(f"{'whole command, CPU seconds':<34}{cold['phases_s']['cpu'] * per:>8.0f}{warm['phases_s']['cpu'] * per:>8.0f}")
    print(f"features reused: cold {cold['feature_cache']['reused']}, cached {warm['feature_cache']['reused']} of {cold['rows']}")


if __name__ == "__main__":
    main()
