"""``evaluate(config)``: a model bundle + its kind of data (Kaggle folders, labelled manifests; + the bundle's split) -> an :class:`Evaluation`.

The rows: the sources read by retrain's own loader (:mod:`tagger.data.labelled`: `styles.csv` folders, labelled manifests), rows without an
image dropped (as in training), then the split's rows by id from the bundle's ``split.parquet``
(``split="all"``: every row, so any Kaggle-layout folder serves as an external test set). Labels become
targets as retrain made them (:func:`tagger.data.labels.encode_labels`), the images go through the tag
job's reader and Predictor (:mod:`tagger.model.scoring`), and :mod:`.metrics` does the arithmetic
retrain does. :func:`tagger.evaluation.report.write_report` turns the result into files.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import storage
from ..model.bundle import ModelBundle, load_bundle
from ..data.decode import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS
from ..model.settings import DEVICES, PRECISIONS, RUNTIMES
from ..data.labels import UNKNOWN_LABEL_POLICIES, LabelMapping, encode_labels
from ..data.split import SPLIT_FILE
from . import EvaluationError
from ..model.sinks import ModelOutputs

log = logging.getLogger(__name__)

SPLIT_CHOICES: tuple[str, ...] = ("test", "val", "train", "all")

MAJORITY_FROM_TRAINING = "training facts"
MAJORITY_FROM_TRAIN_ROWS = "train split rows"
MAJORITY_FROM_EVALUATED = "evaluated rows"
MAJORITY_SOURCES = {
    MAJORITY_FROM_TRAINING: "the bundle's train split (model.json training facts)",
    MAJORITY_FROM_TRAIN_ROWS: "the rows of --data in the bundle's train split (the bundle records no majority label)",
    MAJORITY_FROM_EVALUATED: "the evaluated rows themselves (no training facts or train split to take it from; "
    "optimistic: the best constant answer for this very set)",
}


@dataclass
class EvaluateConfig:
    model: str  # bundle folder, local or s3://
    data: str | list[str]  # Kaggle folders and/or labelled manifests, local or s3://, as retrain reads them (tagger.data.labelled)
    split: str = "test"  # test | val | train | all
    out: str | None = None  # report folder; None: out/evaluate/<model_version>-<split>
    batch_size: int = 64
    workers: int = 0
    device: str = "auto"
    precision: str = "auto"  # as the tag job's --precision: evaluate measures what the catalog gets
    runtime: str = "auto"  # as the tag job's --runtime, for the same reason
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    storage_options: dict[str, Any] = field(default_factory=dict)
    unknown_labels: str = "exclude"  # labels the bundle does not know: exclude | other
    max_confusion_classes: int = 20  # confusion matrices only for attributes with at most this many classes
    plots: bool = True
    corrections: list[str] = field(default_factory=list)  # as retrain's --corrections
    id_column: str = "product_id"  # labelled manifests' columns, as retrain's
    image_column: str = "image"
    data_format: str | None = None
    # http(s):// images in a labelled manifest: read only from these hosts, as the tag job's --allow-host
    allow_hosts: tuple[str, ...] = ()
    allow_private_addresses: bool = False
    allow_plain_http: bool = False
    http_deadline: float = 120.0
    text_columns: tuple[str, ...] = ()  # --text-column: also score the bundle's text model and fusion (inputs.by_inputs)
    baseline: str | None = None  # another bundle scored on the same rows; the report compares the two (compare.py)
    split_from: str | None = None  # whose split.parquet picks the rows; None: --model's (the baseline takes --model's)

    @property
    def data_text(self) -> str:
        return self.data if isinstance(self.data, str) else " + ".join(self.data)

    def validate(self) -> EvaluateConfig:
        if not self.model:
            raise EvaluationError("--model is required: a bundle folder (model.json + model.safetensors)")
        if not self.data:
            raise EvaluationError("--data is required: a folder with styles.csv and images/")
        if self.split not in SPLIT_CHOICES:
            raise EvaluationError(f"--split must be one of {', '.join(SPLIT_CHOICES)}, got {self.split!r}")
        if self.batch_size < 1 or self.workers < 0 or self.max_confusion_classes < 0:
            raise EvaluationError("--batch-size must be >= 1, --workers and --max-confusion-classes >= 0")
        if self.device not in DEVICES:
            raise EvaluationError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise EvaluationError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.runtime not in RUNTIMES:
            raise EvaluationError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.max_image_bytes < 1 or self.max_image_pixels < 1:
            raise EvaluationError("--max-image-bytes and --max-image-pixels must be >= 1")
        if self.unknown_labels not in UNKNOWN_LABEL_POLICIES:
            raise EvaluationError(f"--unknown-labels must be one of {', '.join(UNKNOWN_LABEL_POLICIES)}, got {self.unknown_labels!r}")
        try:
            self.http_policy()
        except ValueError as exc:
            raise EvaluationError(str(exc)) from None
        return self

    def http_policy(self):
        return self.image_settings().http

    def image_settings(self):
        """How the split's photos are read: the tag job's caps, http policy and storage options."""
        from ..data.reader import image_settings_of

        return image_settings_of(self)


@dataclass
class AttributeEvaluation:
    name: str
    labels: tuple[str, ...]
    metrics: dict[str, Any]  # see tagger.metrics.attribute_metrics, plus majority_label/_source
    classes: list[dict[str, Any]]  # per class: label, precision, recall, f1, support, predicted
    confusion: np.ndarray  # counts, rows true, columns predicted
    mapping: LabelMapping


@dataclass
class Evaluation:
    config: EvaluateConfig
    bundle: ModelBundle
    split: str
    attributes: list[AttributeEvaluation]
    ids: list[str]  # evaluated rows (the split's rows of --data with an image), in styles.csv order
    urls: list[str]
    ok: np.ndarray  # decoded and predicted
    errors: dict[int, tuple[str, str]]  # row -> (error_type, message)
    raw_labels: dict[str, list[str | None]]  # attr -> styles.csv cells of the evaluated rows
    targets: np.ndarray  # (n, n_attr), -1 excluded
    top_index: dict[str, np.ndarray]
    top_score: dict[str, np.ndarray]
    data_fingerprint: str
    data_rows: dict[str, Any]  # retrain's DataReport of --data (parsed, missing images, ...)
    notes: list[str]
    seconds: float
    device: str
    computed: str = ""  # the runtime that ran the model, and its precision where auto chose that too
    comparison: Any = None  # with --baseline: a tagger.evaluation.compare.Comparison
    by_inputs: Any = None  # with --text-column: per attribute photos / text / both (tagger.evaluation.inputs)

    @property
    def out(self) -> str:
        return self.config.out or default_out(self.bundle.model_version, self.split)

    @property
    def n_rows(self) -> int:
        return len(self.ids)

    @property
    def n_unreadable(self) -> int:
        return len(self.errors)


def default_out(model_version: str, split: str) -> str:
    return f"out/evaluate/{model_version}-{split}"


def evaluate(config: EvaluateConfig) -> Evaluation:
    """Run the bundle on the split's rows and score it; raises :class:`EvaluationError` (or the bundle's /
    the data's own ``BundleError`` / ``DataError``) for input that cannot be evaluated, before the model runs."""
    import time

    from ..data.labelled import load_training_data

    config.validate()
    started = time.monotonic()
    options = config.storage_options
    bundle = load_bundle(config.model, options)
    try:  # the report's folder, checked now rather than when the report is written after the model has run
        storage.check_output_location(config.out or default_out(bundle.model_version, config.split), options)
    except storage.OutputLocationError as exc:
        raise EvaluationError(str(exc)) from None
    split_url = storage.join(config.split_from or config.model, SPLIT_FILE)
    split_map = _read_split(split_url, options) if storage.exists(split_url, options) else None
    if split_map is None and config.split != "all":
        raise EvaluationError(
            f"{config.model} has no {SPLIT_FILE}, so its {config.split} rows are unknown (bundles written by "
            "`tagger retrain` carry one). Use --split all to evaluate every row of --data, e.g. an external test set."
        )
    inference = _inference(config, bundle)

    # The bundle's attributes are the label columns to read: whatever it was trained on, not the Kaggle seven.
    kaggle = load_training_data(config.data, bundle.attribute_names, options, corrections=config.corrections,
                                id_column=config.id_column, image_column=config.image_column, fmt=config.data_format,
                                text_columns=config.text_columns)
    table = kaggle.table
    notes: list[str] = []
    trained_on = (bundle.training.get("data") or {}).get("fingerprint") if isinstance(bundle.training.get("data"), Mapping) else None
    if trained_on and trained_on != kaggle.fingerprint:
        notes.append(
            "--data is not byte-identical to the data the bundle was trained on (styles.csv or the images/ listing "
            "differ); rows are matched to the split by id."
        )
    all_ids = table["id"].to_list()
    keep = _select_rows(config, all_ids, split_map, split_url, notes)

    import polars as pl

    selected = table.filter(pl.Series(keep))
    vocab = {a.name: list(a.labels) for a in bundle.attributes}
    raw = {a: (selected[a].to_list() if a in selected.columns else [None] * selected.height) for a in vocab}
    targets, mappings = encode_labels(raw, vocab, bundle.training, config.unknown_labels)

    part = None
    if config.text_columns:  # checked before the model runs
        from .inputs import text_part

        part = text_part(bundle, selected, config.text_columns, options)
    ids = selected["id"].to_list()
    urls = selected["image"].to_list()
    log.info("evaluating %s on %d %s rows of %s (%s)", config.model, len(ids), config.split, config.data_text, inference.device)
    from ..model.scoring import progress_logger, run_model

    outputs = run_model(
        bundle, urls, inference=inference, batch_size=config.batch_size, workers=config.workers,
        images=config.image_settings(), on_batch=progress_logger("evaluate"),
    )
    if not outputs.ok.any():
        raise EvaluationError(f"none of the {len(ids)} images could be decoded; first error: {next(iter(outputs.errors.values()))[1]}")
    majority = _majorities(bundle, table, all_ids, split_map, targets[outputs.ok], vocab, config.unknown_labels)
    if outputs.errors:
        notes.append(f"{len(outputs.errors)} image(s) could not be decoded and are not scored (listed under Unreadable images).")

    attributes = [
        _score(spec, targets[:, j], outputs, majority[spec.name], mappings[spec.name]) for j, spec in enumerate(bundle.attributes)
    ]
    evaluation = Evaluation(
        config=config, bundle=bundle, split=config.split, attributes=attributes, ids=[str(i) for i in ids], urls=urls,
        ok=outputs.ok, errors=outputs.errors, raw_labels=raw, targets=targets, top_index=outputs.top_index,
        top_score=outputs.top_score, data_fingerprint=kaggle.fingerprint, data_rows=kaggle.report.to_dict(), notes=notes,
        seconds=time.monotonic() - started, device=str(inference.device), computed=inference.computed,
    )
    if part is not None:
        from .inputs import by_inputs

        evaluation.by_inputs = by_inputs(bundle, part, selected, config.text_columns, outputs.probs, outputs.ok, targets)
    if config.baseline:
        from dataclasses import replace

        from .compare import compare

        # The same rows: the baseline's are picked by this model's split.parquet, from the same --data.
        log.info("--baseline %s: scoring it on the same %d rows", config.baseline, len(ids))
        base = evaluate(replace(config, model=config.baseline, baseline=None, split_from=config.split_from or config.model, plots=False))
        evaluation.comparison = compare(evaluation, base)
    return evaluation


def _select_rows(config: EvaluateConfig, all_ids: list[str], split_map: dict[str, str] | None, split_url: str,
                 notes: list[str]) -> np.ndarray:
    """Which rows of --data to evaluate (bool per row), with notes on what that choice means for the numbers."""
    if config.split == "all":
        keep = np.ones(len(all_ids), dtype=bool)
        if split_map is not None:
            seen = [split_map.get(i) for i in all_ids]
            for name in ("train", "val"):
                count = sum(s == name for s in seen)
                if count:
                    notes.append(
                        f"{count} of the evaluated rows are in the bundle's {name} split"
                        + (": the model was fitted on them, so these numbers are optimistic." if name == "train" else
                           " (used to choose the checkpoint and the review thresholds).")
                    )
    else:
        keep = np.asarray([split_map.get(i) == config.split for i in all_ids], dtype=bool)
        wanted = sum(1 for s in split_map.values() if s == config.split)
        if not keep.any():
            raise EvaluationError(
                f"none of the {wanted} {config.split} ids in {split_url} is a row with an image in {config.data_text}; "
                "--data must be the folder the bundle was trained on (or use --split all for other data)"
            )
        if keep.sum() < wanted:
            notes.append(
                f"{wanted - int(keep.sum())} of the {wanted} {config.split} ids in {SPLIT_FILE} have no row with an "
                "image in --data; they are not evaluated."
            )
    return keep


def _score(spec, target: np.ndarray, outputs: ModelOutputs, majority: tuple[str | None, str], mapping: LabelMapping) -> AttributeEvaluation:
    """One attribute's numbers over the rows with a decoded image and a target, from the tag job's top labels."""
    from ..metrics import accuracy_se, attribute_metrics, confusion, per_class

    index, score = outputs.top(spec.name)
    # A decoded row with index -1 got a null tag: out of the attribute's scope (applies_when), as tag writes it. Its
    # label, if it has one, is not scored (there is no guess to score) but counted (n_out_of_scope).
    tagged = outputs.ok & (index >= 0)
    scored = tagged & (target >= 0)
    y_true, y_pred = target[scored], index[scored]
    label, source = majority
    metrics = attribute_metrics(
        y_true, y_pred, len(spec.labels),
        scores=score[scored], all_scores=score[tagged], threshold=spec.threshold,
        majority=spec.labels.index(label) if label is not None else None,
    )
    metrics["majority_label"] = label
    metrics["majority_source"] = source
    metrics["accuracy_se"] = accuracy_se(metrics["accuracy"], metrics["n"])
    metrics["applies_when"] = spec.applies_when.describe() if spec.applies_when is not None else None
    metrics["n_out_of_scope"] = int((outputs.ok & (index < 0)).sum())
    metrics["n_labelled_out_of_scope"] = int((outputs.ok & (index < 0) & (target >= 0)).sum())
    return AttributeEvaluation(
        spec.name, spec.labels, metrics, per_class(y_true, y_pred, spec.labels), confusion(y_true, y_pred, len(spec.labels)), mapping
    )


def _read_split(url: str, options: Mapping[str, Any]) -> dict[str, str]:
    from ..data.split import read_split

    try:
        return read_split(url, options)
    except Exception as exc:
        if storage.is_unavailable(exc):
            raise
        raise EvaluationError(f"{url}: not a readable split file ({type(exc).__name__}: {exc})") from None


def _inference(config: EvaluateConfig, bundle: ModelBundle):
    """The device, runtime and precision, checked against each other (fp16 is for CUDA, ONNX Runtime is fp32)
    and against what is installed, before any image is read: the tag job's resolution with ``measure="checked"``.

    ``auto``: the first installed of ONNX Runtime, OpenVINO, PyTorch in fp32, as retrain's scoring picks it,
    so that evaluate reproduces retrain's recorded metrics exactly; tag's measured fp32 choice may be another
    fp32 runtime, equal within float jitter. Where the bundle passed a precision check in a reduced precision
    this CPU computes natively, tag may choose that, and its tags differ by more than jitter: then evaluate
    takes tag's own measured choice (cached per model_version and CPU), to score what tag writes."""
    from ..model.inference import InferenceSpec, resolve

    try:
        return resolve(InferenceSpec(config.device, config.runtime, config.precision), bundle, measure="checked")
    except (RuntimeError, ValueError) as exc:
        raise EvaluationError(str(exc)) from None


def _majorities(bundle, table, all_ids, split_map, targets, vocab, unknown_labels) -> dict[str, tuple[str | None, str]]:
    """``{attr: (majority label, source)}``: training facts, else the train split's rows of --data, else the evaluated rows."""
    facts = ((bundle.training.get("metrics") or {}).get("test") or {}) if isinstance(bundle.training.get("metrics"), Mapping) else {}
    train_targets = None
    if split_map is not None:
        if any(split_map.get(row_id) == "train" for row_id in all_ids):
            import polars as pl

            train = table.filter(pl.Series([split_map.get(row_id) == "train" for row_id in all_ids]))
            columns = {a: (train[a].to_list() if a in train.columns else [None] * train.height) for a in vocab}
            train_targets, _ = encode_labels(columns, vocab, bundle.training, unknown_labels)
    from ..metrics import majority_index

    out: dict[str, tuple[str | None, str]] = {}
    for j, (attr, labels) in enumerate(vocab.items()):
        fact = facts.get(attr, {}).get("majority_label") if isinstance(facts.get(attr), Mapping) else None
        if isinstance(fact, str) and fact in labels:
            out[attr] = (fact, MAJORITY_FROM_TRAINING)
            continue
        if train_targets is not None:
            index = majority_index(train_targets[:, j], len(labels))
            if index is not None:
                out[attr] = (labels[index], MAJORITY_FROM_TRAIN_ROWS)
                continue
        index = majority_index(targets[:, j], len(labels))
        out[attr] = (labels[index] if index is not None else None, MAJORITY_FROM_EVALUATED)
    return out
