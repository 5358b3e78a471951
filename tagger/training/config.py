"""RetrainConfig: every retrain setting, typed, with its default, validated before any work starts.

Kept free of heavy imports so that the CLI can read the defaults without loading torch or Lightning.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from ..data.decode import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS
from ..model.settings import DEVICES  # one list of device names for every command

CACHE_MODES: tuple[str, ...] = ("auto", "on", "off")
DEFAULT_FEATURE_CACHE_GB = 5.0


class ConfigError(ValueError):
    """A setting that cannot work; ``option`` names the config field (the CLI maps it to its flag)."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option
        self.message = message


@dataclass
class RetrainConfig:
    """Every retrain setting with its default. :meth:`validate` checks them all before any work starts."""

    data: str | list[str]  # Kaggle folders (styles.csv + images/) and/or labelled manifests, local or s3://; see tagger.data.labelled
    out: str  # bundle folder (model.json, model.safetensors, split.parquet), local or s3://
    attributes: list[str] | None = None  # None: the Kaggle seven (tagger.attributes.ATTRIBUTES); else these, in this order
    # ATTR:OTHER=VALUE[,VALUE]: ATTR applies only where OTHER (another attribute) is one of the values (tagger.model.scope);
    # out of it the tag is null. Its labelled rows out of the scope are not learnt; its threshold is fitted in it.
    applies_when: list[str] = field(default_factory=list)
    # --text-column: train the bundle's text model (tagger.model.text) on these columns of --data (a Kaggle folder:
    # productDisplayName) and its fusion with the photos on the val rows (tagger.training.fusion); () : photos only
    text_columns: list[str] = field(default_factory=list)
    corrections: list[str] = field(default_factory=list)  # files of (product id, attribute, label) that override the data's labels
    id_column: str = "product_id"  # labelled manifests' and corrections' columns, as the tag job's --id-column ...
    image_column: str = "image"  # ... and --image-column
    data_format: str | None = None  # labelled manifests' format; None: from each name (as the tag job's --catalog-format)
    split_from: str | None = None  # a bundle (or its split.parquet) whose rows keep their split; None: a fresh split
    keep_labels: bool = False  # with --init-weights BUNDLE: its attributes keep its label vocabulary (and so their heads)
    # Any timm model name. The default is the shipped model's, whose ImageNet weights the install carries
    # (the weights extra): a first retrain needs no hub.
    backbone: str = "tf_efficientnet_lite0"
    pretrained: bool = True  # ImageNet weights (tagger.model.pretrained: hub, its cache, installed packages); never silently replaced
    init_weights: str | None = None  # local weights file instead of the hub
    input_size: int | None = None  # None: the backbone's own (224 for tf_efficientnet_lite0, 300 for efficientnet_b3)
    batch_size: int = 64
    workers: int | None = None  # None: 0 when images are cached and training on CPU, else min(8, cores - 1)
    lr: float = 5e-4  # AdamW peak LR, reached after warm-up; suits fine-tuning all layers
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    drop_rate: float = 0.2
    max_epochs: int = 30
    max_minutes: float | None = None  # wall-clock limit from the start of retrain() to the bundle written (tagger.training.budget)
    patience: int = 5  # epochs without a better val/score before early stopping
    freeze_backbone_epochs: int = 0  # train only the heads for this many epochs first
    # keep stem + this many block stages frozen; their features are cached once (CPU recipe). The backbone's stage count
    # (7 for lite0) freezes the whole backbone: only the heads train.
    freeze_stages: int = 0
    # With --init-weights BUNDLE: the heads carried over from it are not trained (with the whole backbone frozen, their
    # attributes' scores stay the bundle's; an attribute is added without moving the others)
    freeze_carried_heads: bool = False
    cache_mirror: bool = True  # with freeze_stages: also cache the mirror image's features (flip augmentation, 2x the pass)
    # With freeze_stages: the disk cache of trunk features (tagger.training.features), in GB; None: $TAGGER_FEATURE_CACHE_GB,
    # else 5. 0: no cache.
    feature_cache_gb: float | None = None
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    seed: int = 0  # split, init, shuffling, augmentation
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    min_label_count: int | str = "auto"  # see tagger.data.labels.resolve_min_label_count
    cache_images: str = "auto"  # auto: decode once into memory when it fits in cache_max_gb
    cache_max_gb: float = 4.0
    target_precision: float = 0.9  # for the review thresholds (THRESHOLD_RULE)
    device: str = "auto"
    threads: int | None = None  # CPU threads for torch; None: torch's default (all cores)
    resume: str | None = None  # a Lightning checkpoint (e.g. <log-dir>/version_N/checkpoints/last.ckpt)
    log_dir: str | None = None  # None: <out>.logs beside the bundle, or a temporary folder when out is remote
    storage_options: dict[str, Any] = field(default_factory=dict)
    progress: bool = True  # Lightning's progress bar and model summary
    # How the photos are read, as the tag job reads them (tagger.data.reader.ImageSettings): size caps, and
    # http(s):// photos only from the hosts named (none by default), private addresses and plain HTTP when asked.
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    allow_hosts: tuple[str, ...] = ()
    allow_private_addresses: bool = False
    allow_plain_http: bool = False
    http_deadline: float = 120.0

    def image_settings(self):
        """How every photo is read: the tag job's one source (:class:`tagger.data.reader.ImageSettings`)."""
        from ..data.reader import image_settings_of

        return image_settings_of(self)

    @property
    def scopes(self) -> dict[str, Any]:
        """``applies_when`` parsed: {attribute: tagger.model.scope.Scope}."""
        from ..model.scope import parse_applies_when

        return dict(parse_applies_when(text) for text in self.applies_when or [])

    @property
    def attribute_names(self) -> list[str]:
        from ..attributes import ATTRIBUTES

        return list(self.attributes) if self.attributes else list(ATTRIBUTES)

    def validate(self) -> RetrainConfig:
        def need(ok: bool, option: str, message: str) -> None:
            if not ok:
                raise ConfigError(option, message)

        if isinstance(self.data, (list, tuple)):
            self.data = list(self.data)
            need(bool(self.data) and all(isinstance(d, str) and d.strip() for d in self.data), "data", "data is required: the folder(s) with styles.csv and images/")
        else:
            need(bool(self.data and str(self.data).strip()), "data", "data is required: the folder with styles.csv and images/")
        need(bool(self.out and str(self.out).strip()), "out", "out is required: the folder the bundle is written to")
        from ..attributes import attribute_name_problem

        if self.attributes is not None:
            self.attributes = list(self.attributes)
            problem = attribute_name_problem(self.attributes)
            need(problem is None, "attributes", f"{problem}")
        self.applies_when = list(self.applies_when or [])
        try:
            scopes = self.scopes
        except ValueError as exc:
            raise ConfigError("applies_when", str(exc)) from None
        need(len(scopes) == len(self.applies_when), "applies_when", "one --applies-when per attribute (list several values after '=')")
        names = self.attribute_names
        for attr, scope in scopes.items():
            need(attr in names, "applies_when", f"{attr}: not one of the attributes trained ({', '.join(names)})")
            need(scope.attribute in names and scope.attribute != attr, "applies_when",
                 f"{attr}: its scope must name another attribute trained ({', '.join(a for a in names if a != attr)}), got {scope.attribute!r}")
            need(scope.attribute not in scopes, "applies_when", f"{attr}: {scope.attribute} is scoped itself; scope by an attribute tagged everywhere")
        self.corrections = list(self.corrections or [])
        need(all(isinstance(c, str) and c.strip() for c in self.corrections), "corrections", "corrections must be file names")
        need(bool(self.id_column) and bool(self.image_column) and self.id_column != self.image_column, "id_column",
             "id_column and image_column must be two different column names")
        need(not self.keep_labels or (self.init_weights is not None and os.path.isfile(os.path.join(self.init_weights, "model.json"))),
             "keep_labels", "--keep-labels needs --init-weights naming a tagger bundle's folder (its model.json holds the labels)")
        need(self.data_format in (None, "csv", "parquet", "jsonl"), "data_format", f"data_format must be csv, parquet or jsonl, got {self.data_format!r}")
        need(bool(self.backbone), "backbone", "backbone is required (a timm model name, e.g. efficientnet_b3)")
        import timm

        if not timm.is_model(self.backbone.split(".")[0]):
            close = timm.list_models(f"*{self.backbone.split('.')[0][:6]}*")[:8]
            raise ConfigError("backbone", f"unknown timm backbone {self.backbone!r}; similar names: {', '.join(close) or 'none'}")
        if self.init_weights is not None:
            need(os.path.isfile(self.init_weights) or os.path.isfile(os.path.join(self.init_weights, "model.json")), "init_weights",
                 f"{self.init_weights}: no such file (a local .safetensors or torch state dict, or a tagger bundle's folder)")
            if os.path.isfile(self.init_weights):
                problem = weights_file_problem(self.init_weights)
                need(problem is None, "init_weights", f"{self.init_weights}: {problem}")
        need(self.input_size is None or (isinstance(self.input_size, int) and 16 <= self.input_size <= 2048), "input_size", f"input_size must be an integer in [16, 2048], got {self.input_size!r}")
        need(_int(self.batch_size) and self.batch_size >= 1, "batch_size", f"batch_size must be >= 1, got {self.batch_size!r}")
        need(self.workers is None or (_int(self.workers) and self.workers >= 0), "workers", f"workers must be >= 0, got {self.workers!r}")
        need(_finite(self.lr) and self.lr > 0, "lr", f"lr must be a positive number, got {self.lr!r}")
        need(_finite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", f"weight_decay must be >= 0, got {self.weight_decay!r}")
        need(_finite(self.warmup_epochs) and self.warmup_epochs >= 0, "warmup_epochs", f"warmup_epochs must be >= 0, got {self.warmup_epochs!r}")
        need(_finite(self.label_smoothing) and 0 <= self.label_smoothing < 1, "label_smoothing", f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        need(_finite(self.drop_rate) and 0 <= self.drop_rate < 1, "drop_rate", f"drop_rate must be in [0, 1), got {self.drop_rate!r}")
        need(_int(self.max_epochs) and self.max_epochs >= 1, "max_epochs", f"max_epochs must be >= 1, got {self.max_epochs!r}")
        need(self.max_minutes is None or (_finite(self.max_minutes) and self.max_minutes > 0), "max_minutes", f"max_minutes must be > 0, got {self.max_minutes!r}")
        need(_int(self.patience) and self.patience >= 1, "patience", f"patience must be >= 1, got {self.patience!r}")
        need(_int(self.freeze_backbone_epochs) and self.freeze_backbone_epochs >= 0, "freeze_backbone_epochs", f"freeze_backbone_epochs must be >= 0, got {self.freeze_backbone_epochs!r}")
        need(_int(self.freeze_stages) and self.freeze_stages >= 0, "freeze_stages", f"freeze_stages must be >= 0, got {self.freeze_stages!r}")
        need(not self.freeze_carried_heads or self.init_weights is not None, "freeze_carried_heads",
             "--freeze-carried-heads keeps the heads that --init-weights BUNDLE carries over: give --init-weights "
             "(with --keep-labels), or leave the option out")
        need(not (self.freeze_stages and self.resume), "freeze_stages", "--freeze-stages cannot be combined with --resume (the cached features are not in the checkpoint)")
        if self.feature_cache_gb is None:
            env = os.environ.get("TAGGER_FEATURE_CACHE_GB", "").strip()
            try:
                self.feature_cache_gb = float(env) if env else DEFAULT_FEATURE_CACHE_GB
            except ValueError:
                raise ConfigError("feature_cache_gb", f"TAGGER_FEATURE_CACHE_GB={env!r} is not a number of GB") from None
        need(_finite(self.feature_cache_gb) and self.feature_cache_gb >= 0, "feature_cache_gb",
             f"feature_cache_gb must be >= 0 (0 = no cache), got {self.feature_cache_gb!r}")
        need(_finite(self.grad_clip) and self.grad_clip >= 0, "grad_clip", f"grad_clip must be >= 0 (0 = off), got {self.grad_clip!r}")
        need(_int(self.seed) and self.seed >= 0, "seed", f"seed must be an integer >= 0, got {self.seed!r}")
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            need(_finite(value) and 0 < value < 1, name, f"{name} must be in (0, 1), got {value!r}")
        need(self.val_fraction + self.test_fraction < 1, "val_fraction", f"val_fraction + test_fraction must leave rows to train on, got {self.val_fraction} + {self.test_fraction}")
        from ..data.labels import resolve_min_label_count

        try:
            resolve_min_label_count(self.min_label_count, 1)
        except ValueError as exc:
            raise ConfigError("min_label_count", str(exc)) from None
        need(self.cache_images in CACHE_MODES, "cache_images", f"cache_images must be one of {', '.join(CACHE_MODES)}, got {self.cache_images!r}")
        need(_finite(self.cache_max_gb) and self.cache_max_gb > 0, "cache_max_gb", f"cache_max_gb must be > 0, got {self.cache_max_gb!r}")
        need(_finite(self.target_precision) and 0 < self.target_precision <= 1, "target_precision", f"target_precision must be in (0, 1], got {self.target_precision!r}")
        need(self.device in DEVICES, "device", f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        need(self.threads is None or (_int(self.threads) and self.threads >= 1), "threads", f"threads must be >= 1, got {self.threads!r}")
        if self.resume is not None:
            need(os.path.isfile(self.resume), "resume", f"{self.resume}: no such checkpoint file (look under <log-dir>/version_N/checkpoints/)")
        need(isinstance(self.storage_options, dict), "storage_options", "storage_options must be a dict")
        need(_int(self.max_image_bytes) and self.max_image_bytes >= 1, "max_image_bytes", "max_image_bytes must be >= 1")
        need(_int(self.max_image_pixels) and self.max_image_pixels >= 1, "max_image_pixels", "max_image_pixels must be >= 1")
        try:
            self.image_settings()
        except ValueError as exc:
            raise ConfigError("allow_host", str(exc)) from None
        return self


def check_data_exists(config: RetrainConfig) -> None:
    """A mistyped --data is said first, before the weights are looked for or Lightning is imported."""
    from .. import storage

    for root in [config.data] if isinstance(config.data, str) else config.data:
        if not storage.exists(root, config.storage_options):
            raise ConfigError("data", f"{root}: no such folder or file")
    for path in config.corrections or []:
        if not storage.exists(path, config.storage_options):
            raise ConfigError("corrections", f"{path}: no such file")


def weights_file_problem(path: str) -> str | None:
    """Why ``path`` cannot be a weights file, from its first bytes (None: it may be one), so that a CSV given
    as ``--init-weights`` is refused with the options, not by torch's unpickler after the backbone is built."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch.save: a zip archive, or a bare pickle (older torch)
        return None
    size = int.from_bytes(head[:8], "little") if len(head) >= 9 else 0
    if 2 <= size <= os.path.getsize(path) - 8 and head[8:9] == b"{":  # safetensors: header length, then its JSON
        return None
    return (f"not a weights file (neither safetensors nor a torch state dict; it begins {head!r}): give a .safetensors "
            "file, a torch.save()d state dict, or a tagger bundle's folder such as models/fashion-lite0")


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
