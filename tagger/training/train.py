"""``retrain(config)``: a Kaggle folder in, a model bundle (plus its split.parquet) out."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict
from datetime import timedelta
from typing import Any

import torch

from .. import storage
from ..model.bundle import ModelBundle, save_bundle
from ..model.scoring import predict_batches
from ..evaluation.metrics import calibrate_thresholds, coverage, majority_baseline, split_metrics
from ..model.network import TaggerNet, create_backbone_with_source, resolve_data_config
from .config import ConfigError, RetrainConfig, check_data_exists
from .datamodule import FashionDataModule
from .module import LABELS_KEY, SCORE_METRIC, TaggerModule
from .split import SPLIT_FILE, write_split

log = logging.getLogger(__name__)

THRESHOLD_RULE = (
    "per attribute, the lowest validation top-label score t such that the predictions scoring >= t "
    "have a top-label precision >= target_precision; tags under t go to review (1.0 = review all)"
)


def resolve_device(requested: str) -> str:
    """The tag job's device rule (``auto`` says which it picked), as a ``--device`` error here."""
    from ..model.predictor import resolve_device as resolve_torch_device

    try:
        return resolve_torch_device(requested).type
    except RuntimeError as exc:
        raise ConfigError("device", str(exc)) from None


def resolve_workers(requested: int | None, device: str, cached: bool) -> int:
    """Loader processes. With decoded images in memory and training on the CPU, a worker would only
    compete with the model for the same cores; anywhere else decoding/augmenting must keep up."""
    if requested is not None:
        return requested
    if cached and device == "cpu":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def resolve_log_dir(config: RetrainConfig) -> str:
    if config.log_dir:
        return config.log_dir
    if storage.is_remote(config.out):
        # TensorBoard and checkpoints need a local folder; the bundle itself still goes to `out`.
        return tempfile.mkdtemp(prefix="tagger-retrain-")
    # Beside the bundle, not in it: checkpoints (5x the bundle's size) and TensorBoard files are not the bundle.
    return config.out.rstrip("/" + os.sep) + ".logs"


def fit_budget_s(config: RetrainConfig, started: float) -> float | None:
    """What is left of ``--max-minutes`` for fitting once the weights, the data and the frozen-trunk pass are
    ready: the option bounds the command, not only its epochs. None: no limit."""
    if not config.max_minutes:
        return None
    spent = time.monotonic() - started
    left = config.max_minutes * 60 - spent
    if left < 1:
        raise ConfigError("max_minutes", f"--max-minutes {config.max_minutes:g} was spent before the first epoch (loading "
                          f"weights, reading the data and any frozen-trunk pass took {spent / 60:.1f} min); raise it")
    log.info("--max-minutes %g: %.1f min spent getting ready, %.1f min left for fitting", config.max_minutes, spent / 60, left / 60)
    return left


def _stderr_progress_bar():
    from pytorch_lightning.callbacks import TQDMProgressBar

    class StderrProgressBar(TQDMProgressBar):
        """Lightning's bar on stderr, like every command's progress: stdout keeps the summary alone, so
        `> log.txt` is not thousands of bar frames. Lightning hard-codes sys.stdout as each bar's file; it
        is read while the bar is made, so each is made with stdout pointing at stderr."""

        def init_sanity_tqdm(self):
            with contextlib.redirect_stdout(sys.stderr):
                return super().init_sanity_tqdm()

        def init_train_tqdm(self):
            with contextlib.redirect_stdout(sys.stderr):
                return super().init_train_tqdm()

        def init_validation_tqdm(self):
            with contextlib.redirect_stdout(sys.stderr):
                return super().init_validation_tqdm()

        def init_predict_tqdm(self):
            with contextlib.redirect_stdout(sys.stderr):
                return super().init_predict_tqdm()

        def init_test_tqdm(self):
            with contextlib.redirect_stdout(sys.stderr):
                return super().init_test_tqdm()

    return StderrProgressBar()


def check_resume(path: str, labels: dict[str, list[str]]) -> None:
    """Refuse a checkpoint whose heads were trained for other labels (the data changed since)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError("resume", f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    saved = checkpoint.get(LABELS_KEY)
    if saved is None:
        raise ConfigError("resume", f"{path}: not a checkpoint written by `tagger retrain` (no {LABELS_KEY} entry)")
    if saved != labels:
        changed = [a for a in labels if saved.get(a) != labels[a]]
        raise ConfigError(
            "resume",
            f"{path}: its label vocabularies differ from this data's for {', '.join(changed) or 'the attribute set'} "
            "(styles.csv or --min-label-count changed). Start a fresh run without --resume.",
        )


def check_net(net: TaggerNet, backbone: str) -> None:
    """One forward pass on a blank image, so that a backbone whose pooled features do not match
    its heads fails here, with its name, before the data is read, not in the first validation step."""
    size = net.data_config.input_size
    was_training = net.training
    try:
        with torch.no_grad():
            net.eval()(torch.full((1, 3, size, size), 255, dtype=torch.uint8))
    except RuntimeError as exc:
        raise ConfigError(
            "backbone",
            f"backbone {backbone!r} does not run at input size {size}: {exc}. Try a larger --input-size "
            "or another backbone.",
        ) from None
    finally:
        net.train(was_training)


def scoring_predictor(net: TaggerNet, backbone: str, labels: dict[str, list[str]], device: str, export_cache: str):
    """The Predictor that scores val and test: the trained weights as an unsaved bundle, on the runtime and
    precision that ``tagger evaluate`` picks at ``auto`` here (:func:`tagger.evaluation.evaluate._device`: on a
    CPU the first installed of ONNX Runtime, OpenVINO, PyTorch, not measured; an ONNX export is made into
    ``export_cache``, as its model_version is not the saved bundle's, whose thresholds are not known yet).
    An export that cannot be made or does not match PyTorch (tag would refuse it too) is not worth the
    training: PyTorch at auto precision scores instead, with a warning, and the bundle records which scored."""
    from ..model.bundle import unsaved_bundle
    from ..model.predictor import Predictor
    from ..model.runtimes import choose_runtime

    bundle = unsaved_bundle(net, backbone=backbone, labels=labels)
    try:
        # No bundle given: the order of preference, as evaluate decides, not a measurement that may pick another
        # runtime or precision (and other scores) on another try.
        choice = choose_runtime("auto", torch.device(device), "auto")
        return Predictor(bundle, torch.device(device), precision="auto", runtime=choice, runtime_cache=export_cache)
    except (RuntimeError, OSError, ValueError) as exc:
        log.warning("val/test scoring: the runtime evaluate would pick failed (%s); scoring with PyTorch instead, "
                    "whose numbers tag writes with --runtime torch", exc)
        return Predictor(bundle, torch.device(device), precision="auto", runtime="torch")


def retrain(config: RetrainConfig) -> ModelBundle:
    """Train on ``config.data`` and write the bundle to ``config.out``; returns the saved bundle.

    Facts about the run (data fingerprint, row accounting, folded labels, split sizes, val and test
    metrics against the majority baseline, thresholds, timing, config) go into ``bundle.training``.
    """
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint, Timer
    from pytorch_lightning.loggers import TensorBoardLogger

    config.validate()
    started = time.monotonic()  # --max-minutes counts from here: weights, data, trunk pass and fitting
    check_data_exists(config)
    device = resolve_device(config.device)
    if config.threads:
        # On a shared machine fewer threads than cores avoids OpenMP spin-waiting on descheduled peers,
        # which can make every step several times slower.
        torch.set_num_threads(config.threads)
    pl.seed_everything(config.seed, workers=True, verbose=False)
    # Backbone before data: an unreachable weights hub should fail in seconds, not after decoding.
    backbone, weights_source = create_backbone_with_source(config.backbone, pretrained=config.pretrained, init_weights=config.init_weights)
    data_config = resolve_data_config(config.backbone, config.input_size)
    probe = TaggerNet(backbone, {attr: 2 for attr in config.attribute_names}, data_config)
    check_net(probe, config.backbone)
    if config.freeze_stages:
        try:
            stages = probe.stage_count()
        except ValueError as exc:
            raise ConfigError("freeze_stages", str(exc)) from None
        if config.freeze_stages >= stages:
            raise ConfigError("freeze_stages", f"{config.backbone} has {stages} block stages; --freeze-stages must leave at least one to train (0-{stages - 1})")

    datamodule = FashionDataModule(
        config.data,
        input_size=data_config.input_size,
        batch_size=config.batch_size,
        workers=0,
        seed=config.seed,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        min_label_count=config.min_label_count,
        cache_images=config.cache_images,
        cache_max_gb=config.cache_max_gb,
        storage_options=config.storage_options,
        attributes=config.attribute_names,
        pin_memory=device == "cuda",
        corrections=config.corrections,
        id_column=config.id_column,
        image_column=config.image_column,
        data_format=config.data_format,
        split_from=config.split_from,
        **_kept_labels(config),
    )
    datamodule.setup()
    datamodule.workers = resolve_workers(config.workers, device, datamodule.cached)
    labels = datamodule.vocab
    log.info(
        "data: %d rows used (%s), labels per attribute %s",
        datamodule.report.used,
        ", ".join(f"{k} {v}" for k, v in datamodule.split_sizes.items()),
        datamodule.label_counts,
    )
    if config.resume:
        check_resume(config.resume, labels)

    net = TaggerNet(backbone, datamodule.label_counts, data_config, drop_rate=config.drop_rate)
    heads_init = {attr: "new" for attr in labels}
    if config.init_weights:
        from ..model.pretrained import reuse_bundle_heads

        heads_init = reuse_bundle_heads(net, labels, config.init_weights)
        if any(v == "bundle" for v in heads_init.values()) and not config.split_from:
            log.warning("starting from the bundle %s without --split-from: rows it was trained on may land in this run's "
                        "val/test split and flatter its figures; pass --split-from %s when the data overlap",
                        config.init_weights, config.init_weights)
    if config.freeze_stages:
        net.eval()
        datamodule.cache_trunk(
            lambda images: net.trunk(images, config.freeze_stages),
            mirror=config.cache_mirror,
            autocast_dtype=None,  # fp32 like the rest of CPU training (bf16 autocast without native bf16 is emulated: ~4x slower here)
        )
        net.train()
    module = TaggerModule(
        net,
        labels,
        lr=config.lr,
        weight_decay=config.weight_decay,
        warmup_epochs=config.warmup_epochs,
        label_smoothing=config.label_smoothing,
        freeze_backbone_epochs=config.freeze_backbone_epochs,
        freeze_stages=config.freeze_stages,
        time_budget_s=fit_budget_s(config, started),
    )

    log_dir = resolve_log_dir(config)
    logger = TensorBoardLogger(save_dir=log_dir, name="", default_hp_metric=False)
    best = ModelCheckpoint(monitor=SCORE_METRIC, mode="max", save_top_k=1, save_last=True, filename="best-{epoch:03d}", auto_insert_metric_name=False)
    stopper = EarlyStopping(monitor=SCORE_METRIC, mode="max", patience=config.patience)
    callbacks: list[pl.Callback] = [best, stopper, LearningRateMonitor(logging_interval="step")]
    precision = "32-true"
    if device == "cuda":
        precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        torch.set_float32_matmul_precision("high")
    steps_per_epoch = max(1, len(datamodule.rows("train")) // max(1, min(config.batch_size, len(datamodule.rows("train")))))
    if config.progress:
        callbacks.append(_stderr_progress_bar())
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        precision=precision,
        max_epochs=config.max_epochs,
        max_time=timedelta(seconds=module.time_budget_s) if module.time_budget_s else None,
        gradient_clip_val=config.grad_clip or None,
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=max(1, min(50, steps_per_epoch)),
        enable_progress_bar=config.progress,
        enable_model_summary=config.progress,
        num_sanity_val_steps=1,
    )
    fit_started = time.monotonic()
    with warnings.catch_warnings():
        # Workers are chosen on purpose (resolve_workers); Lightning's hint assumes a GPU to feed.
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*(number of training batches|log_every_n_steps).*")
        trainer.fit(module, datamodule=datamodule, ckpt_path=config.resume, weights_only=True if config.resume else None)
    fit_seconds = time.monotonic() - fit_started

    if trainer.interrupted:
        raise KeyboardInterrupt("training interrupted; no bundle written")
    best_epoch = None
    if best.best_model_path:
        # weights_only: a checkpoint is a pickle, and only tensors and plain values may come out of it.
        checkpoint = torch.load(best.best_model_path, map_location="cpu", weights_only=True)
        module.load_state_dict(checkpoint["state_dict"])
        best_epoch = int(checkpoint.get("epoch", -1))
    else:
        log.warning("no validation epoch finished (time limit?); saving the last weights, not a validated best")

    # Through the tag job's Predictor on the runtime and precision evaluate picks at auto on this machine: the
    # thresholds fit, and the test metrics are, the scores that evaluate reproduces.
    with tempfile.TemporaryDirectory(prefix="tagger-retrain-export-") as export_cache:
        scorer = scoring_predictor(net, config.backbone, labels, device, export_cache)
        val_probs, val_targets = predict_batches(scorer, datamodule.loader("val"), device)
        test_probs, test_targets = predict_batches(scorer, datamodule.loader("test"), device)
        scored_with = {"runtime": scorer.runtime.name, "precision": scorer.precision_name, "reason": scorer.runtime.reason}
        del scorer
    net.cpu()
    val_metrics = split_metrics(val_probs, val_targets)
    test_metrics = split_metrics(test_probs, test_targets)
    baseline = majority_baseline(datamodule.targets[datamodule.rows("train")], test_targets, labels)
    thresholds = calibrate_thresholds(val_probs, val_targets, config.target_precision)
    for attr, values in test_metrics.items():
        values["majority_accuracy"] = baseline[attr]["accuracy"]
        values["majority_label"] = baseline[attr]["label"]
    logger.log_metrics(
        {f"final_test/{attr}/{k}": v for attr, m in test_metrics.items() for k, v in m.items() if isinstance(v, float)},
        step=trainer.global_step,
    )
    logger.finalize("success")

    unreadable = datamodule.unreadable_ids()
    if unreadable:
        datamodule.report.note_unreadable(unreadable)
    stopped_by = "max_epochs"
    if stopper.stopped_epoch > 0:
        stopped_by = "early_stopping"
    elif any(isinstance(cb, Timer) and cb.time_remaining() is not None and cb.time_remaining() <= 0 for cb in trainer.callbacks):
        stopped_by = "max_time"

    def mean(metric: dict, key: str) -> float:
        values = [m[key] for m in metric.values() if not math.isnan(m[key])]
        return float(sum(values) / len(values)) if values else float("nan")

    training = {
        "data": {
            "source": config.data,
            "fingerprint": datamodule.fingerprint,
            "rows": datamodule.report.to_dict(),
            "min_label_count": datamodule.min_label_count,
            "folded": datamodule.folded,
            "folded_into": datamodule.folded_into,
            "label_counts": datamodule.label_stats,
            "kept_labels": datamodule.kept_labels or None,
            "images_cached": datamodule.cached,
        },
        "split": {
            "file": SPLIT_FILE,
            "seed": config.seed,
            "fractions": {"train": 1 - config.val_fraction - config.test_fraction, "val": config.val_fraction, "test": config.test_fraction},
            "sizes": datamodule.split_sizes,
            "stratified_on": list(labels),
            "reused": datamodule.split_reused,
        },
        "metrics": {
            "monitor": SCORE_METRIC,
            "val_score": mean(val_metrics, "macro_f1"),
            "test_score": mean(test_metrics, "macro_f1"),
            "val": val_metrics,
            "test": test_metrics,
        },
        "thresholds": {
            "rule": THRESHOLD_RULE,
            "target_precision": config.target_precision,
            "val_coverage": coverage(val_probs, thresholds),
        },
        "backbone": config.backbone,
        "weights_init": weights_source.describe(),
        "heads_init": heads_init,
        "freeze_stages": config.freeze_stages,
        "cache_mirror": config.cache_mirror if config.freeze_stages else None,
        "input_size": data_config.input_size,
        "epochs": int(trainer.current_epoch),
        "best_epoch": best_epoch,
        "global_steps": int(trainer.global_step),
        "stopped_by": stopped_by,
        "duration_s": round(time.monotonic() - started, 1),
        "fit_duration_s": round(fit_seconds, 1),
        "seed": config.seed,
        "device": device,
        "precision": precision,
        "scored_with": scored_with,
        "log_dir": logger.log_dir,
        "best_checkpoint": best.best_model_path or None,
        "versions": _versions(),
        "config": storage.redact(asdict(config)),
    }
    # The split first, model.json (inside save_bundle) last: a folder with a model.json is complete.
    write_split(storage.join(config.out, SPLIT_FILE), datamodule.ids, datamodule.assignment, config.storage_options)
    bundle = save_bundle(
        net,
        config.out,
        backbone=config.backbone,
        labels=labels,
        thresholds=thresholds,
        training=_json_safe(training),
        storage_options=config.storage_options,
    )
    log.info("wrote bundle %s (model_version %s) in %.0fs", config.out, bundle.model_version, time.monotonic() - started)
    return bundle


def _kept_labels(config: RetrainConfig) -> dict[str, Any]:
    """``--keep-labels``: the starting bundle's vocabularies (and its folding facts) for the attributes it shares."""
    if not config.keep_labels:
        return {}
    import json

    meta = json.loads(open(os.path.join(config.init_weights, "model.json"), encoding="utf-8").read())
    labels = {a["name"]: list(a["labels"]) for a in meta.get("attributes", []) if a.get("name") in config.attribute_names}
    return {"keep_labels": labels, "keep_labels_training": meta.get("training") or {}}


def _versions() -> dict[str, str]:
    import pytorch_lightning as pl
    import timm

    return {"torch": torch.__version__, "timm": timm.__version__, "pytorch_lightning": pl.__version__}


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None (JSON has no NaN), numpy scalars -> Python numbers."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value

