"""How many labelled photos a new attribute needs: a learning curve for ``pattern`` on the shipped model's features.

    .venv/bin/python -m bench.pattern_curve --model models/fashion-lite0 --manifest out/pattern/catalog.csv \
        [--sizes 250,500,1000,all --repeats 3 --threads 1 --out out/pattern/curve.json]

The photos with a pattern label (``bench.pattern_manifest``) go once through the bundle's network up to the
pooled features its heads read (the tag job's decoding, letterboxed at the bundle's input size); then, for
each size, that many of the bundle's *train* rows fit a logistic regression (a new head on a frozen model) and
the bundle's *test* rows score it: accuracy and macro-F1, mean and spread over ``--repeats`` draws, beside
the majority baseline. A frozen-feature head is the cheap end of the recipe in docs/real-data.md (which also
trains the last block); the curve says how the answer grows with labels, not what the recipe reaches.
"""

from __future__ import annotations

import argparse
import csv
import json
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--attribute", default="pattern")
    parser.add_argument("--sizes", default="250,500,1000,all")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import StandardScaler

    from tagger.data.reader import load_image
    from tagger.model.bundle import load_bundle
    from tagger.data.split import read_split

    bundle = load_bundle(args.model)
    split = read_split(f"{args.model}/split.parquet")
    with open(args.manifest, newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r[args.attribute] and split.get(r["product_id"]) in ("train", "test")]
    net = bundle.build_net()
    started = time.monotonic()
    features = []
    with torch.no_grad():
        for begin in range(0, len(rows), args.batch_size):
            batch = np.stack([load_image(r["image"], bundle.input_size) for r in rows[begin : begin + args.batch_size]])
            features.append(net.backbone(net.normalise(torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous())).numpy())
    x = np.concatenate(features)
    seconds = time.monotonic() - started
    labels = sorted({r[args.attribute] for r in rows})
    y = np.asarray([labels.index(r[args.attribute]) for r in rows])
    train = np.asarray([split[r["product_id"]] == "train" for r in rows])
    test = ~train
    majority = np.bincount(y[train]).argmax()
    result = {"model": args.model, "attribute": args.attribute, "labels": labels, "train_labelled": int(train.sum()),
              "test_labelled": int(test.sum()), "feature_seconds": round(seconds, 1),
              "majority": {"label": labels[majority], "accuracy": float(np.mean(y[test] == majority))}, "curve": []}
    rng = np.random.default_rng(0)
    pool = np.flatnonzero(train)
    for size in args.sizes.split(","):
        n = len(pool) if size == "all" else int(size)
        accs, f1s = [], []
        for _ in range(1 if n >= len(pool) else args.repeats):
            chosen = rng.choice(pool, size=min(n, len(pool)), replace=False)
            scaler = StandardScaler().fit(x[chosen])
            clf = LogisticRegression(max_iter=3000, C=0.5).fit(scaler.transform(x[chosen]), y[chosen])
            predicted = clf.predict(scaler.transform(x[test]))
            accs.append(float(np.mean(predicted == y[test])))
            f1s.append(float(f1_score(y[test], predicted, average="macro", labels=range(len(labels)), zero_division=0)))
        result["curve"].append({"train_labels": int(min(n, len(pool))), "accuracy": float(np.mean(accs)), "accuracy_sd": float(np.std(accs)),
                                "macro_f1": float(np.mean(f1s)), "draws": len(accs)})
        print(f"{min(n, len(pool)):>5} labelled: accuracy {np.mean(accs):.3f} (sd {np.std(accs):.3f}), macro-F1 {np.mean(f1s):.3f}", flush=True)
    print(f"majority baseline ({labels[majority]}): {result['majority']['accuracy']:.3f} on {int(test.sum())} test photos; "
          f"features of {len(rows)} photos in {seconds:.0f}s")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
