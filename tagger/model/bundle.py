"""The model bundle: everything the tag job needs to run a trained model, and nothing executable.

A bundle is a folder (local or ``s3://``) with two files:

- ``model.safetensors``: the weights (safetensors: tensors only, no pickle, nothing runs on load);
- ``model.json``: backbone name, input size, mean/std, attributes with their label vocabularies and
  review thresholds, training facts, and ``model_version``, a hash of everything that determines the
  predictions (weights + the prediction-relevant fields of ``model.json``).

:func:`load_bundle` validates all of it and refuses a bundle that does not add up, saying why.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch

from .. import storage
from ..attributes import attribute_name_problem
from .network import DataConfig, TaggerNet
from .scope import Scope, scope_problem

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
MAX_LABELS = 100_000  # a vocabulary larger than this is a broken model.json, not a catalog
class BundleError(ValueError):
    """A model bundle that cannot be used, with the reason and what to do."""


@dataclass(frozen=True)
class AttributeSpec:
    name: str
    labels: tuple[str, ...]
    # Under this top-label score a tag should go to human review (calibrated on validation data).
    threshold: float = 0.0
    # Where the attribute applies (tagger.model.scope); None: everywhere. Out of it the tag is null.
    applies_when: Scope | None = None


@dataclass(frozen=True)
class ModelBundle:
    path: str
    backbone: str
    data_config: DataConfig
    attributes: tuple[AttributeSpec, ...]
    model_version: str
    training: Mapping[str, Any] = field(default_factory=dict)
    weights: bytes = field(default=b"", repr=False)
    # "runtime precision" (e.g. "openvino bf16") -> the record of `tagger evaluate --check-precision`: the split
    # scored both in fp32 and in that arithmetic, per attribute, and whether every attribute stayed within the
    # tolerance. Not part of model_version: a check says how the same model behaves, it changes no prediction.
    precision_checks: Mapping[str, Any] = field(default_factory=dict)
    # What the network computes in fp32 on the deterministic check images (tagger.model.check_images.trial_images):
    # per attribute, the softmax probabilities, with a hash of the images. A cached ONNX export that reproduces
    # them is this model's, checked without building the PyTorch network (timm's import alone is ~2.5 s of
    # every run's start). Written by save_bundle; not part of model_version (it follows from the weights).
    reference_outputs: Mapping[str, Any] = field(default_factory=dict)
    # The network built by check_weights(), handed to the next build_net() call instead of a second build.
    _checked_net: list = field(default_factory=list, repr=False, compare=False)

    @property
    def input_size(self) -> int:
        return self.data_config.input_size

    @property
    def attribute_names(self) -> list[str]:
        return [a.name for a in self.attributes]

    @property
    def scopes(self) -> dict[str, Scope]:
        """Per scoped attribute, where it applies (attributes tagged everywhere are not listed)."""
        return {a.name: a.applies_when for a in self.attributes if a.applies_when is not None}

    @property
    def review_thresholds(self) -> dict[str, float]:
        """Per attribute, the top-label score under which a tag should go to a person (0: never)."""
        return {a.name: a.threshold for a in self.attributes}

    def label_counts(self) -> dict[str, int]:
        return {a.name: len(a.labels) for a in self.attributes}

    def validated(self, runtime: str, precision: str) -> bool:
        """Whether ``runtime`` computing in ``precision`` passed this bundle's precision check: on a test split,
        no attribute's accuracy more than the check's tolerance below fp32's (tagger.evaluation.precision_check)."""
        record = self.precision_checks.get(f"{runtime} {precision}")
        return isinstance(record, Mapping) and record.get("passed") is True

    def check_weights(self) -> None:
        """Build the network and load the weights into it now, so that weights that do not fit (or hold NaN)
        are refused before a run changes anything; the next :meth:`build_net` returns this network."""
        if not self._checked_net:
            self._checked_net.append(self._build())

    def build_net(self) -> TaggerNet:
        """The network with the bundle's weights, in eval mode, on the CPU (a fresh one for each caller)."""
        if self._checked_net:
            return self._checked_net.pop()
        return self._build()

    def _build(self) -> TaggerNet:
        from safetensors.torch import load as load_safetensors

        from .network import create_backbone

        try:
            net = TaggerNet(create_backbone(self.backbone), self.label_counts(), self.data_config)
        except ValueError as exc:  # an unknown timm name
            raise BundleError(f"{self.path}: {exc}") from None
        try:
            state = load_safetensors(self.weights)
        except Exception as exc:  # safetensors' own error type
            raise BundleError(f"{self.path}: {WEIGHTS_FILE} cannot be read as safetensors: {exc}") from None
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise BundleError(f"{self.path}: weights do not fit backbone {self.backbone!r} and its heads: {exc}") from None
        broken = [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
        if broken:
            shown = ", ".join(broken[:5]) + (", ..." if len(broken) > 5 else "")
            raise BundleError(f"{self.path}: {WEIGHTS_FILE} holds NaN or infinite values in {len(broken)} tensor(s) "
                              f"({shown}); the training diverged or the file is damaged. Retrain or re-export.")
        return net.eval()


def _prediction_spec(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of model.json that change what the model predicts (not training facts)."""
    return {k: meta[k] for k in ("format_version", "backbone", "input_size", "mean", "std", "attributes")}


def compute_model_version(weights: bytes, meta: Mapping[str, Any]) -> str:
    digest = hashlib.sha256(weights)
    digest.update(json.dumps(_prediction_spec(meta), sort_keys=True).encode())
    return digest.hexdigest()[:16]


def save_bundle(
    net: TaggerNet,
    out: str,
    *,
    backbone: str,
    labels: Mapping[str, Sequence[str]],
    thresholds: Mapping[str, float] | None = None,
    training: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    scopes: Mapping[str, Scope] | None = None,
) -> ModelBundle:
    weights, meta = _content(out, net, backbone=backbone, labels=labels, thresholds=thresholds, training=training, scopes=scopes)
    # Weights first, model.json last: a folder with a model.json is a finished bundle.
    storage.write_bytes(storage.join(out, WEIGHTS_FILE), weights, storage_options)
    storage.write_bytes(storage.join(out, META_FILE), json.dumps(meta, indent=2).encode(), storage_options)
    return _from_meta(out, meta, weights)


def unsaved_bundle(net: TaggerNet, *, backbone: str, labels: Mapping[str, Sequence[str]],
                   scopes: Mapping[str, Scope] | None = None) -> ModelBundle:
    """``net`` as a bundle that exists only in memory (no thresholds, no training facts, path ``<unsaved>``):
    retrain scores its val/test splits through it, so that they run on the runtime and at the precision
    that tag and evaluate pick for the saved bundle (an exported runtime needs a bundle to export)."""
    weights, meta = _content("<unsaved>", net, backbone=backbone, labels=labels, thresholds=None, training=None, scopes=scopes)
    return _from_meta("<unsaved>", meta, weights)


def _content(out: str, net: TaggerNet, *, backbone: str, labels: Mapping[str, Sequence[str]], thresholds: Mapping[str, float] | None,
             training: Mapping[str, Any] | None, scopes: Mapping[str, Scope] | None = None) -> tuple[bytes, dict[str, Any]]:
    from safetensors.torch import save as save_safetensors

    problem = attribute_name_problem(list(labels)) or scope_problem(scopes or {}, labels)
    if problem:
        raise BundleError(f"{out}: {problem}")
    state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    weights = save_safetensors(state)
    thresholds = thresholds or {}
    config = net.data_config
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "backbone": backbone,
        "input_size": config.input_size,
        "mean": list(config.mean),
        "std": list(config.std),
        "attributes": [
            # applies_when only where set: a bundle without scopes keeps the model_version it always had.
            {"name": name, "labels": list(values), "threshold": float(thresholds.get(name, 0.0)),
             **({"applies_when": scopes[name].to_json()} if scopes and name in scopes else {})}
            for name, values in labels.items()
        ],
        "training": {"created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **(training or {})},
    }
    meta["model_version"] = compute_model_version(weights, meta)
    meta["reference_outputs"] = reference_outputs(net, list(labels))
    return weights, meta


def load_bundle(path: str, storage_options: Mapping[str, Any] | None = None) -> ModelBundle:
    meta_url, weights_url = storage.join(path, META_FILE), storage.join(path, WEIGHTS_FILE)
    try:
        raw = storage.read_bytes(meta_url, storage_options)
    except (FileNotFoundError, NotADirectoryError):
        if _is_file(path, storage_options):
            raise BundleError(_file_not_folder(path, storage_options)) from None
        raise BundleError(
            f"{path}: not a model bundle (no {META_FILE}). Give the folder that holds {META_FILE} and "
            f"{WEIGHTS_FILE}: the shipped models/fashion-lite0, or one written by `tagger retrain`."
        ) from None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BundleError(f"{meta_url}: invalid JSON ({exc})") from None
    try:
        weights = storage.read_bytes(weights_url, storage_options)
    except FileNotFoundError:
        raise BundleError(f"{path}: {WEIGHTS_FILE} is missing; the bundle is incomplete, retrain or copy it again") from None
    _validate(meta, meta_url)
    _check_safetensors(weights, weights_url)
    expected = compute_model_version(weights, meta)
    if meta["model_version"] != expected:
        raise BundleError(
            f"{path}: model_version {meta['model_version']} does not match its content ({expected}); the weights "
            "or model.json were changed after the bundle was written. Re-export the bundle."
        )
    return _from_meta(path, meta, weights)


def _is_file(path: str, storage_options: Mapping[str, Any] | None) -> bool:
    # Asked only once model.json was not found, so a good bundle costs no extra request.
    try:
        fs, inner = storage.filesystem(path, storage_options)
        return bool(fs.isfile(inner))
    except Exception:  # the one-line error below is still right, only less precise
        return False


def _file_not_folder(path: str, storage_options: Mapping[str, Any] | None) -> str:
    """The message for ``--model`` naming a file: a bundle is a folder, and which folder was likely meant."""
    folder = path.rstrip("/").rsplit("/", 1)[0] if storage.is_remote(path) else (os.path.dirname(path) or ".")
    if storage.exists(storage.join(folder, META_FILE), storage_options):
        hint = f"did you mean {folder}?"
    else:
        hint = "give the folder that holds them: the shipped models/fashion-lite0, or one written by `tagger retrain`"
    return f"{path} is a file; a model bundle is a folder holding {META_FILE} and {WEIGHTS_FILE}: {hint}"


def _validate(meta: Any, where: str) -> None:
    if not isinstance(meta, dict):
        raise BundleError(f"{where}: expected a JSON object")
    missing = [k for k in ("format_version", "backbone", "input_size", "mean", "std", "attributes", "model_version") if k not in meta]
    if missing:
        raise BundleError(f"{where}: missing field(s) {', '.join(missing)}")
    if meta["format_version"] != FORMAT_VERSION:
        raise BundleError(f"{where}: format_version {meta['format_version']} is not supported (this build reads {FORMAT_VERSION})")
    if not isinstance(meta["backbone"], str) or not meta["backbone"]:
        raise BundleError(f"{where}: backbone must be a timm model name, got {meta['backbone']!r}")
    if not _is_int(meta["input_size"]) or not 16 <= meta["input_size"] <= 2048:
        raise BundleError(f"{where}: input_size must be an integer in [16, 2048], got {meta['input_size']!r}")
    # JSON as Python reads it accepts NaN and Infinity: every number is checked to be finite and in range.
    for key in ("mean", "std"):
        values = meta[key]
        if not (isinstance(values, list) and len(values) == 3 and all(_is_finite(v) for v in values)):
            raise BundleError(f"{where}: {key} must be 3 finite numbers, got {values!r}")
    if not all(0.0 <= v <= 1.0 for v in meta["mean"]):
        raise BundleError(f"{where}: mean must be in [0, 1] (pixel values scaled to 0-1), got {meta['mean']!r}")
    if not all(1e-3 <= v <= 10.0 for v in meta["std"]):
        raise BundleError(f"{where}: std must be in [0.001, 10] (pixel values scaled to 0-1), got {meta['std']!r}")
    attributes = meta["attributes"]
    if not isinstance(attributes, list) or not attributes:
        raise BundleError(f"{where}: attributes must be a non-empty list")
    seen: set[str] = set()
    for spec in attributes:
        name = spec.get("name") if isinstance(spec, dict) else None
        if not isinstance(name, str) or not name or name in seen:
            raise BundleError(f"{where}: attribute names must be unique non-empty strings, got {name!r}")
        seen.add(name)
        labels = spec.get("labels")
        if not isinstance(labels, list) or len(labels) < 1 or not all(isinstance(v, str) and v for v in labels):
            raise BundleError(f"{where}: attribute {name!r} needs a list of non-empty label strings")
        if len(labels) > MAX_LABELS:
            raise BundleError(f"{where}: attribute {name!r} has {len(labels)} labels, more than {MAX_LABELS}")
        if len(set(labels)) != len(labels):
            raise BundleError(f"{where}: attribute {name!r} has duplicate labels")
        threshold = spec.get("threshold", 0.0)
        if not _is_finite(threshold) or not 0.0 <= threshold <= 1.0:
            raise BundleError(f"{where}: attribute {name!r} threshold must be in [0, 1], got {threshold!r}")
    problem = attribute_name_problem([spec["name"] for spec in attributes])
    if problem:
        raise BundleError(f"{where}: {problem}. The tag job writes one column and one _score column per attribute.")
    scopes = {}
    for spec in attributes:
        scope = spec.get("applies_when")
        if scope is None:
            continue
        values = scope.get("values") if isinstance(scope, dict) else None
        if not (isinstance(scope, dict) and isinstance(scope.get("attribute"), str) and isinstance(values, list) and values
                and all(isinstance(v, str) and v for v in values)):
            raise BundleError(f"{where}: attribute {spec['name']!r} applies_when must be {{\"attribute\": NAME, \"values\": [LABEL, ...]}}, got {scope!r}")
        scopes[spec["name"]] = Scope(scope["attribute"], tuple(values))
    problem = scope_problem(scopes, {spec["name"]: spec["labels"] for spec in attributes})
    if problem:
        raise BundleError(f"{where}: applies_when of {problem}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_safetensors(weights: bytes, where: str) -> None:
    """Refuse anything but a safetensors file, from its header, before anything is deserialised.

    A pickle (a torch checkpoint) can run code when loaded; the tag job never loads one, whatever its name.
    """
    problem = None
    size = int.from_bytes(weights[:8], "little") if len(weights) >= 8 else -1
    if size < 2 or size > len(weights) - 8:
        problem = "no safetensors header"
    else:
        try:
            header = json.loads(weights[8 : 8 + size])
        except ValueError:
            problem = "its header is not JSON"
        else:
            if not isinstance(header, dict):
                problem = "its header is not a JSON object"
    if problem:
        looks = ""
        if weights[:1] == b"\x80" or weights[:2] == b"PK":
            looks = "; it looks like a pickle or torch checkpoint, which the tag job never loads: pickles can run code"
        raise BundleError(f"{where}: not a safetensors file: {problem}{looks}. Export the bundle with save_bundle or `tagger retrain`.")


def _from_meta(path: str, meta: Mapping[str, Any], weights: bytes) -> ModelBundle:
    return ModelBundle(
        path=path,
        backbone=meta["backbone"],
        data_config=DataConfig(int(meta["input_size"]), tuple(meta["mean"]), tuple(meta["std"])),
        attributes=tuple(
            AttributeSpec(a["name"], tuple(a["labels"]), float(a.get("threshold", 0.0)),
                          Scope(a["applies_when"]["attribute"], tuple(a["applies_when"]["values"])) if a.get("applies_when") else None)
            for a in meta["attributes"]
        ),
        model_version=meta["model_version"],
        training=meta.get("training", {}),
        weights=weights,
        precision_checks=meta.get("precision_checks") if isinstance(meta.get("precision_checks"), Mapping) else {},
        reference_outputs=meta.get("reference_outputs") if isinstance(meta.get("reference_outputs"), Mapping) else {},
    )


def reference_outputs(net: TaggerNet, names: Sequence[str]) -> dict[str, Any]:
    """``net``'s fp32 probabilities on the check images, as model.json's ``reference_outputs`` holds them."""
    from .check_images import check_images_digest, trial_images

    images = trial_images(int(net.data_config.input_size), 2)
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode():
            logits = net(images.to(next(net.parameters()).device))
    finally:
        net.train(was_training)
    return {"images": check_images_digest(images), "probabilities": {
        name: logits[name].float().softmax(1).cpu().tolist() for name in names}}


def record_reference_outputs(path: str, storage_options: Mapping[str, Any] | None = None) -> ModelBundle:
    """Add ``reference_outputs`` to a bundle written before save_bundle recorded them (the network is built once)."""
    bundle = load_bundle(path, storage_options)
    meta_url = storage.join(path, META_FILE)
    meta = json.loads(storage.read_bytes(meta_url, storage_options))
    meta["reference_outputs"] = reference_outputs(bundle.build_net(), bundle.attribute_names)
    storage.write_bytes(meta_url, json.dumps(meta, indent=2).encode(), storage_options)
    return load_bundle(path, storage_options)


def record_precision_check(path: str, record: Mapping[str, Any], storage_options: Mapping[str, Any] | None = None) -> ModelBundle:
    """Add (or replace) one precision check in the bundle's model.json, written whole or not at all. The
    bundle must be the one the check scored: same model_version, so a check never lands on another model."""
    meta_url = storage.join(path, META_FILE)
    meta = json.loads(storage.read_bytes(meta_url, storage_options))
    if meta.get("model_version") != record.get("model_version"):
        raise BundleError(f"{path}: model_version {meta.get('model_version')} is not the checked one ({record.get('model_version')}); "
                          "the bundle changed during the check, run it again")
    checks = dict(meta.get("precision_checks") or {})
    checks[str(record["candidate"])] = dict(record)
    meta["precision_checks"] = checks
    storage.write_bytes(meta_url, json.dumps(meta, indent=2).encode(), storage_options)
    return load_bundle(path, storage_options)


def state_dict_from_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """Tensors from a Lightning/torch checkpoint, loaded with ``weights_only=True`` (no pickle code runs)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return checkpoint.get("state_dict", checkpoint)
