"""The floor the shipped model must beat, on the shipped model's own split: frozen ImageNet features
of the same backbone + one logistic regression per attribute, fitted on the train rows, scored on test.

    .venv/bin/python -m bench.frozen_baseline --model models/fashion-lite0 \
        --data ../shared/data/fashion-sample --data ../shared/data/fashion-more

Pixels are prepared exactly as the tag job prepares them (letterboxed on white at the bundle's input
size); the backbone starts from the same ImageNet weights the bundle started from. Accuracy counts every
test row with a known label; a label outside the train rows' vocabulary is a miss, as in evaluate.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", action="append", required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from sklearn.linear_model import LogisticRegression

    from tagger.attributes import ATTRIBUTES
    from tagger.model.bundle import load_bundle
    from tagger.model.network import TaggerNet, create_backbone
    from tagger.data.reader import load_image
    from tagger.data.kaggle import load_kaggle
    from tagger.data.split import read_split

    bundle = load_bundle(args.model)
    split = read_split(f"{args.model}/split.parquet")
    data = load_kaggle(args.data)
    ids = [i for i in data.table["id"].to_list() if i in split]
    table = data.table.filter(data.table["id"].is_in(ids))
    backbone = create_backbone(bundle.backbone, pretrained=True).eval()
    net = TaggerNet(backbone, {"none": 1}, bundle.data_config).eval()

    started = time.monotonic()
    urls = table["image"].to_list()
    features = np.empty((len(urls), backbone.num_features), dtype=np.float32)
    with torch.inference_mode():
        for begin in range(0, len(urls), args.batch_size):
            pixels = np.stack([load_image(u, bundle.data_config.input_size) for u in urls[begin : begin + args.batch_size]])
            images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
            features[begin : begin + len(pixels)] = backbone(net.normalise(images)).numpy()
    extract_s = time.monotonic() - started

    which = np.array([split[i] for i in table["id"].to_list()])
    train, test = which == "train", which == "test"
    results = {}
    fit_started = time.monotonic()
    for attr in ATTRIBUTES:
        labels = np.array([v if v is not None else "" for v in table[attr].to_list()], dtype=object)
        fit_rows = train & (labels != "")
        model = LogisticRegression(max_iter=2000, C=1.0)
        model.fit(features[fit_rows], labels[fit_rows])
        score_rows = test & (labels != "")
        predicted = model.predict(features[score_rows])
        results[attr] = round(float((predicted == labels[score_rows]).mean()), 4)
    report = {
        "backbone": bundle.backbone,
        "input_size": bundle.data_config.input_size,
        "rows": {"train": int(train.sum()), "test": int(test.sum())},
        "test_accuracy": results,
        "extract_s": round(extract_s, 1),
        "fit_s": round(time.monotonic() - fit_started, 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
