"""The shipped bundle learns to read titles: a text model and a per-attribute fusion with its photos, on its own split.

    FASHION_SAMPLE_DIR=../shared/data/fashion-sample FASHION_MORE_DIR=../shared/data/fashion-more \\
        taskset -c 1 nice .venv/bin/python -m bench.text_fusion --model models/fashion-lite0 [--write]

- the rows: both Kaggle folders read as retrain reads them, the bundle's ``split.parquet`` (train / val / test),
  labels encoded as the bundle folded them; the text is ``productDisplayName``;
- the photos: the shipped image model's probabilities on the val and test photos, through the tag job's own
  reader and Predictor (``tagger.model.scoring.run_model``, fp32, the first installed runtime as evaluate
  picks it), cached under ``bench/work/`` (a few CPU minutes the first time);
- the text model: fitted on the train rows only (``tagger.model.text.fit_text_model``);
- the fusion: fitted on the val rows only (``tagger.model.fusion.fit_fusion``), with the review thresholds per
  input mode and the conflict levels;
- printed per attribute on the test rows: photos only, text only, both (the fused tags), and the conflicts
  counted on the test rows with their own titles and with titles shifted onto other products.

``--write`` adds the text model and the fusion to the bundle (``text.safetensors`` and model.json's ``text``
section); ``model.safetensors`` and every other byte of model.json stay as they were.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

WORK = Path(__file__).resolve().parent / "work"
TEXT_FIELD = "productDisplayName"


def data_folders(given: list[str] | None) -> list[str]:
    if given:
        return given
    sample = os.environ.get("FASHION_SAMPLE_DIR") or "../shared/data/fashion-sample"
    more = os.environ.get("FASHION_MORE_DIR") or str(Path(sample).parent / "fashion-more")
    folders = [f for f in (sample, more) if Path(f, "styles.csv").exists()]
    if not folders:
        raise SystemExit(f"no Kaggle folder at {sample} (set FASHION_SAMPLE_DIR, or pass --data): nothing to fit on")
    return folders


def load_rows(model: str, folders: list[str]):
    """(ids, image urls, titles, targets (n, n_attr), split names, bundle) for the split's rows of ``folders``."""
    from tagger.data.labelled import load_training_data
    from tagger.data.labels import encode_labels
    from tagger.model.bundle import load_bundle
    from tagger.data.split import SPLIT_FILE, read_split

    bundle = load_bundle(model)
    split = read_split(f"{model}/{SPLIT_FILE}")
    data = load_training_data(folders, bundle.attribute_names)
    table = data.table.filter(data.table["id"].is_in(list(split)))
    if TEXT_FIELD not in table.columns:
        raise SystemExit(f"{', '.join(folders)}: no {TEXT_FIELD} column in styles.csv")
    vocab = {a.name: list(a.labels) for a in bundle.attributes}
    targets, _ = encode_labels({a: table[a].to_list() for a in vocab}, vocab, bundle.training, "exclude")
    ids = [str(i) for i in table["id"].to_list()]
    return ids, table["image"].to_list(), [t or "" for t in table[TEXT_FIELD].to_list()], targets, np.array([split[i] for i in ids]), bundle


def image_probabilities(bundle, ids: list[str], urls: list[str]) -> dict[str, np.ndarray]:
    """The image model's probabilities per attribute for ``urls``, as evaluate computes them (cached by model_version and ids)."""
    key = hashlib.sha256((bundle.model_version + "\n" + "\n".join(ids)).encode()).hexdigest()[:16]
    cache = WORK / f"text_fusion_image_probs_{key}.npz"
    if cache.exists():
        with np.load(cache) as stored:
            return {a: stored[a] for a in bundle.attribute_names}
    from tagger.model.inference import InferenceSpec, resolve
    from tagger.model.scoring import progress_logger, run_model

    started = time.monotonic()
    inference = resolve(InferenceSpec("cpu", "auto", "fp32"), bundle, measure="never")
    outputs = run_model(bundle, urls, inference=inference, batch_size=32, on_batch=progress_logger("image model"))
    if outputs.errors:
        raise SystemExit(f"{len(outputs.errors)} photos could not be read, e.g. {next(iter(outputs.errors.values()))}")
    print(f"image model on {len(urls)} photos ({inference.runtime.name} fp32): {time.monotonic() - started:.0f} s")
    WORK.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **outputs.probs)
    return outputs.probs


def text_model(featurizer, texts, targets, attributes, c: float, seed: int):
    """The text model fitted on the train rows (cached under bench/work by its inputs: ~2 CPU minutes)."""
    from tagger.model.text import TextModel, fit_text_model

    key = hashlib.sha256(json.dumps([featurizer.to_json(), texts, targets.tolist(), attributes, c, seed]).encode()).hexdigest()[:16]
    cache = WORK / f"text_fusion_text_model_{key}"
    if cache.with_suffix(".json").exists():
        spec = json.loads(cache.with_suffix(".json").read_text())
        return TextModel.from_bundle_files(spec, cache.with_suffix(".safetensors").read_bytes(), attributes, str(cache))
    model = fit_text_model(texts, targets, attributes, featurizer, c=c, seed=seed).stored()  # the figures are the stored weights'
    weights = model.to_bytes()
    WORK.mkdir(parents=True, exist_ok=True)
    cache.with_suffix(".safetensors").write_bytes(weights)
    cache.with_suffix(".json").write_text(json.dumps(model.spec(weights)))
    return model


def accuracy(probs: np.ndarray, target: np.ndarray) -> float:
    known = target >= 0
    return float((probs[known].argmax(1) == target[known]).mean())


def test_table(names, photo, text, fused, targets) -> list[dict]:
    rows = []
    for j, name in enumerate(names):
        rows.append({"attribute": name, "n": int((targets[:, j] >= 0).sum()), "photos": accuracy(photo[name], targets[:, j]),
                     "text": accuracy(text[name], targets[:, j]), "both": accuracy(fused.probs[name], targets[:, j])})
    return rows


def review_shares(part, bundle, fused, targets) -> dict:
    """Per attribute and mode on the test rows: share under the threshold, accuracy above it."""
    out = {}
    for j, spec in enumerate(bundle.attributes):
        probs = fused.probs[spec.name]
        threshold = part.fusion.threshold(spec.name, "both", spec.threshold)
        known = targets[:, j] >= 0
        top = probs.max(1)
        above = top >= threshold
        out[spec.name] = {"threshold_both": round(threshold, 4), "coverage": round(float(above.mean()), 4),
                          "accuracy_above": round(float((probs[above & known].argmax(1) == targets[above & known, j]).mean()), 4)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/fashion-lite0")
    parser.add_argument("--data", action="append", help="Kaggle folders (default: FASHION_SAMPLE_DIR and fashion-more beside it)")
    parser.add_argument("--write", action="store_true", help="add the text model and fusion to --model")
    parser.add_argument("--images-only", action="store_true", help="compute (cache) the image probabilities and stop")
    parser.add_argument("--c", type=float, default=10.0, help="the text model's inverse L2 strength")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--conflict-precision", type=float, default=0.99,
                        help="each modality's validation precision above which it is confident enough to call a conflict")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    from tagger.model.fusion import Fusion
    from tagger.model.text import TEXT_WEIGHTS_FILE, TextFeaturizer, TextPart, write_text_part
    from tagger.training.fusion import fit_fusion, label_prior

    torch.set_num_threads(1)
    ids, urls, titles, targets, which, bundle = load_rows(args.model, data_folders(args.data))
    scored = np.isin(which, ["val", "test"])
    image = image_probabilities(bundle, [i for i, s in zip(ids, scored) if s], [u for u, s in zip(urls, scored) if s])
    if args.images_only:
        return
    names = bundle.attribute_names
    attributes = [(a.name, len(a.labels)) for a in bundle.attributes]
    featurizer = TextFeaturizer((TEXT_FIELD,))
    texts = featurizer.rows_text({TEXT_FIELD: titles}, len(titles))
    train = which == "train"
    model = text_model(featurizer, [t for t, k in zip(texts, train) if k], targets[train], attributes, args.c, args.seed)  # every figure below is the shipped float16 weights'
    print(f"text model: {model.facts}")

    sub = {s: which[scored] == s for s in ("val", "test")}
    texts_scored = [t for t, k in zip(texts, scored) if k]
    model.probabilities(texts_scored[:8])  # imports and first-call costs are start-up, not per row
    started = time.process_time()
    text_probs, present = model.probabilities(texts_scored)
    text_ms = (time.process_time() - started) / len(texts_scored) * 1e3
    targets_scored = targets[scored]
    val, test = sub["val"], sub["test"]
    priors = {name: label_prior(targets[train, j], k) for j, (name, k) in enumerate(attributes)}
    both_val = val & present
    fusion, fusion_facts = fit_fusion({a: image[a][both_val] for a in names}, {a: text_probs[a][both_val] for a in names},
                                      targets_scored[both_val], priors, conflict_precision=args.conflict_precision,
                                      target_precision=float(bundle.training.get("target_precision") or (bundle.training.get("thresholds") or {}).get("target_precision") or 0.9))
    part = TextPart(model, fusion, "")
    ok = np.ones(int(test.sum()), bool)
    photo_test = {a: image[a][test] for a in names}
    text_test = {a: text_probs[a][test] for a in names}
    fused = fusion.combine(photo_test, ok, text_test, present[test])
    table = test_table(names, photo_test, text_test, fused, targets_scored[test])

    # Conflicts: the test rows with their own titles, and with every title moved to the next product (a title
    # pasted on the wrong product; rows whose neighbour has the same label cannot conflict on that attribute).
    own = {a: int(fused.conflict[a].sum()) for a in names}
    rows_own = int(np.any([fused.conflict[a] for a in names], axis=0).sum())
    shifted = fusion.combine(photo_test, ok, {a: np.roll(text_test[a], 1, axis=0) for a in names}, np.roll(present[test], 1))
    moved_targets = np.roll(targets_scored[test], 1, axis=0)
    differs = {a: (moved_targets[:, j] != targets_scored[test][:, j]) & (targets_scored[test][:, j] >= 0) for j, a in enumerate(names)}
    caught = {a: f"{int((shifted.conflict[a] & differs[a]).sum())}/{int(differs[a].sum())}" for a in names}
    rows_shifted = int(np.any([shifted.conflict[a] for a in names], axis=0).sum())

    print(f"\nper attribute on the {int(test.sum())} test rows (accuracy; fusion fitted on the {int(both_val.sum())} val rows):")
    print("| attribute | n | photos only | text only | both | rule (val) | weights photo/text/prior |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row, spec in zip(table, fusion.attributes):
        best = max(row["photos"], row["text"])
        mark = "" if row["both"] >= best - 1e-9 else " (below)"
        print(f"| {row['attribute']} | {row['n']} | {row['photos']:.3f} | {row['text']:.3f} | **{row['both']:.3f}**{mark} | {spec.rule} | "
              f"{spec.photo_weight:g}/{spec.text_weight:g}/{spec.prior_weight:g} |")
    print(f"\nconflicts on test with own titles: {rows_own} rows; per attribute {own}")
    print(f"titles moved to the next product: {rows_shifted} of {int(test.sum())} rows flagged; caught per attribute "
          f"(flagged / rows whose label differs): {caught}")
    print(f"text model: {text_ms:.3f} CPU ms per row (featurise + score), {len(model.columns)} columns")
    review = review_shares(part, bundle, fused, targets_scored[test])
    print(f"review on test rows with both: {review}")
    if not args.write:
        return
    metrics = {"test": {r["attribute"]: {k: round(r[k], 4) for k in ("n", "photos", "text", "both")} for r in table},
               "test_conflicts": {"own_titles_rows": rows_own, "own_titles": own, "moved_titles_rows": rows_shifted,
                                  "moved_titles_caught": caught},
               "test_review_both": review, "text_cpu_ms_per_row": round(text_ms, 3)}
    version = write_text_part(args.model, model, fusion, fusion_training=fusion_facts, metrics=metrics,
                              made_by="python -m bench.text_fusion --model " + args.model + " --write")
    print(f"wrote {args.model}/{TEXT_WEIGHTS_FILE} ({len(model.to_bytes()) / 1e6:.1f} MB) and model.json's text section "
          f"(text_version {version}); model.safetensors untouched")


if __name__ == "__main__":
    main()
