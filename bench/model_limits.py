"""What limits a bundle's accuracy: the cheap fixes tried on its own val/test rows, and where its errors lie.

    .venv/bin/python -m bench.model_limits --model models/fashion-lite0 \
        --data ../shared/data/fashion-sample --data ../shared/data/fashion-more [--other OTHER_BUNDLE]

Each model runs once over the val and test rows, on the photo and on its mirror image, pixels prepared as
the tag job prepares them. From those probabilities, with no further training, it scores accuracy over every
row with a known label (a label folded into ``Other`` counts as ``Other``, as in evaluate's accuracy):

- ``shipped``: the top label, what ``tagger tag`` writes;
- ``mirror TTA``: the mean of the photo's and the mirror's probabilities;
- ``ensemble`` (with ``--other``: a second bundle with the same vocabularies): the mean of both models';
- ``logit adjustment``: log-probabilities minus tau x log(train prior), which favours rare labels;
- ``hierarchy``: articleType chosen jointly with the subCategory and masterCategory it implies (train
  co-occurrence), and subCategory read from that articleType;

and breaks the shipped model's errors down by how many train photos the true label had, and by source folder,
both as delivered and reshaped to the other folder's shape (a 3:4 photo squeezed to a square, a square one
stretched back to 3:4 and letterboxed): whether a folder scores lower for its photos' shape or its products.
"""

from __future__ import annotations

import argparse
import collections
import io
import json

import numpy as np
import torch

PARTS = ("val", "test")
BUCKETS = ((0, 30), (30, 100), (100, 300), (300, None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--other", help="a second bundle (same vocabularies) for the ensemble row")
    parser.add_argument("--data", action="append", required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import polars as pl

    from tagger.data.kaggle import load_kaggle
    from tagger.data.labels import encode_labels
    from tagger.data.reader import load_image
    from tagger.model.bundle import load_bundle
    from tagger.data.split import read_split

    bundle = load_bundle(args.model)
    vocab = {a.name: list(a.labels) for a in bundle.attributes}
    attrs = list(vocab)
    split = read_split(f"{args.model}/split.parquet")
    table = load_kaggle(args.data).table
    which = np.array([split.get(i, "") for i in table["id"].to_list()])
    rows = {part: table.filter(pl.Series(which == part)) for part in ("train", *PARTS)}
    targets = {
        part: encode_labels({a: rows[part][a].to_list() for a in attrs}, vocab, bundle.training, "exclude")[0]
        for part in ("train", *PARTS)
    }
    size = bundle.data_config.input_size
    pixels = {part: np.stack([load_image(u, size) for u in rows[part]["image"].to_list()]) for part in PARTS}
    reshaped = {part: np.stack([_reshaped(u, size) for u in rows[part]["image"].to_list()]) for part in PARTS}

    models = [bundle] + ([load_bundle(args.other)] if args.other else [])
    for other in models[1:]:
        if {a.name: list(a.labels) for a in other.attributes} != vocab:
            parser.error(f"--other {args.other}: its label vocabularies differ from --model's; an ensemble needs the same ones")
    # probs[part][(model, mirrored)][attr] -> (n, n_labels)
    probs = {part: {(m, v): _probabilities(b, pixels[part], v, args.batch_size) for m, b in enumerate(models) for v in (False, True)}
             for part in PARTS}
    reshaped_probs = {part: _probabilities(bundle, reshaped[part], False, args.batch_size) for part in PARTS}

    def accuracy(part: str, attr: str, predicted: np.ndarray) -> float:
        target = targets[part][:, attrs.index(attr)]
        known = target >= 0
        return round(float((predicted[known] == target[known]).mean()), 3)

    def mean_of(part: str, keys) -> dict[str, np.ndarray]:
        return {a: sum(probs[part][k][a] for k in keys) / len(keys) for a in attrs}

    variants = {"shipped": [(0, False)], "mirror TTA": [(0, False), (0, True)]}
    if args.other:
        variants |= {"other model": [(1, False)], "ensemble": [(0, False), (1, False)],
                     "ensemble + mirror TTA": [(m, v) for m in (0, 1) for v in (False, True)]}
    results: dict[str, dict] = {}
    for name, keys in variants.items():
        results[name] = {part: {a: accuracy(part, a, p.argmax(1)) for a, p in mean_of(part, keys).items()} for part in PARTS}

    train = targets["train"]
    for tau in (0.25, 0.5):
        results[f"logit adjustment tau {tau}"] = {part: {} for part in PARTS}
        for j, attr in enumerate(attrs):
            prior = np.bincount(train[train[:, j] >= 0, j], minlength=len(vocab[attr])) + 1.0
            for part in PARTS:
                adjusted = np.log(probs[part][(0, False)][attr] + 1e-9) - tau * np.log(prior / prior.sum())
                results[f"logit adjustment tau {tau}"][part][attr] = accuracy(part, attr, adjusted.argmax(1))

    a_, s_, m_ = attrs.index("articleType"), attrs.index("subCategory"), attrs.index("masterCategory")
    implies_sub, implies_master = _conditional(train, a_, s_, vocab), _conditional(train, a_, m_, vocab)
    results["hierarchy"] = {}
    for part in PARTS:
        p = probs[part][(0, False)]
        joint = (np.log(p["articleType"] + 1e-9) + np.log(p["subCategory"] @ implies_sub.T + 1e-9)
                 + np.log(p["masterCategory"] @ implies_master.T + 1e-9))
        article = joint.argmax(1)
        results["hierarchy"][part] = {"articleType": accuracy(part, "articleType", article),
                                      "subCategory": accuracy(part, "subCategory", implies_sub[article].argmax(1))}

    folders = {}
    for part in PARTS:
        source = np.array([u.rsplit("/images/", 1)[0].rstrip("/").rsplit("/", 1)[-1] for u in rows[part]["image"].to_list()])
        for folder in sorted(set(source)):
            mask = source == folder
            for shape, p in (("as delivered", probs[part][(0, False)]), ("reshaped", reshaped_probs[part])):
                folders.setdefault(f"{folder}, {shape}", {})[part] = {
                    "rows": int(mask.sum()),
                    **{a: _masked_accuracy(p[a].argmax(1), targets[part][:, j], mask) for j, a in enumerate(attrs)},
                }

    by_support = {}
    for attr in ("articleType", "subCategory"):
        j = attrs.index(attr)
        support = np.bincount(train[train[:, j] >= 0, j], minlength=len(vocab[attr]))
        for part in PARTS:
            target = targets[part][:, j]
            label_support = np.where(target >= 0, support[np.maximum(target, 0)], -1)
            predicted = probs[part][(0, False)][attr].argmax(1)
            for low, high in BUCKETS:
                mask = (label_support >= low) & ((label_support < high) if high else True)
                key = f"{low}-{high - 1}" if high else f"{low}+"
                by_support.setdefault(attr, {}).setdefault(key, {})[part] = {
                    "rows": int(mask.sum()), "accuracy": _masked_accuracy(predicted, target, mask)}

    report = {"model": args.model, "other": args.other, "rows": {p: int(len(rows[p])) for p in ("train", *PARTS)},
              "accuracy": results, "by_source_folder": folders, "by_train_photos_of_true_label": by_support}
    print(json.dumps(report, indent=2))
    print(_markdown(results, attrs))


def _probabilities(bundle, pixels: np.ndarray, mirrored: bool, batch_size: int) -> dict[str, np.ndarray]:
    net = bundle.build_net().eval()
    out = collections.defaultdict(list)
    with torch.inference_mode():
        for begin in range(0, len(pixels), batch_size):
            images = torch.from_numpy(pixels[begin : begin + batch_size]).permute(0, 3, 1, 2)
            if mirrored:
                images = images.flip(3)
            for attr, logits in net(images.contiguous(memory_format=torch.channels_last)).items():
                out[attr].append(logits.float().softmax(1).numpy())
    return {attr: np.concatenate(chunks) for attr, chunks in out.items()}


def _reshaped(location: str, size: int) -> np.ndarray:
    """The photo as the other folder delivers it: 3:4 squeezed to a square, a square stretched to 3:4."""
    from PIL import Image

    from tagger.data.decode import decode_image

    with Image.open(location) as image:
        image = image.convert("RGB")
        square = abs(image.width - image.height) <= 2
        image = image.resize((image.width * 3 // 4, image.height) if square else (image.width, image.width), Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    return decode_image(buffer.getvalue(), size)


def _conditional(train: np.ndarray, parent: int, child: int, vocab: dict[str, list[str]]) -> np.ndarray:
    """P(child label | parent label) from the train rows' co-occurrence, lightly smoothed."""
    names = list(vocab)
    counts = np.full((len(vocab[names[parent]]), len(vocab[names[child]])), 1e-3)
    both = (train[:, parent] >= 0) & (train[:, child] >= 0)
    np.add.at(counts, (train[both, parent], train[both, child]), 1.0)
    return counts / counts.sum(1, keepdims=True)


def _masked_accuracy(predicted: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float | None:
    keep = mask & (target >= 0)
    return round(float((predicted[keep] == target[keep]).mean()), 3) if keep.any() else None


def _markdown(results: dict, attrs: list[str]) -> str:
    lines = ["| variant | " + " | ".join(attrs) + " |", "|---" * (len(attrs) + 1) + "|"]
    for name, parts in results.items():
        cells = [f"{parts['val'][a]:.3f}/{parts['test'][a]:.3f}" if a in parts["val"] else "" for a in attrs]
        lines.append(f"| {name} (val/test) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
