"""``retrain(config)``: labelled data in, a model bundle (plus its split.parquet) out, in four named steps:

- :func:`prepare`: weights, data, split, the network, and with ``--freeze-stages`` the trunk features (cached);
- :func:`fit`: Lightning fits within what ``--max-minutes`` leaves; the best checkpoint is loaded back;
- :func:`score`: val and test through the tag job's Predictor; metrics, review thresholds;
- :func:`record`: the training facts, split.parquet, then the bundle.

``--max-minutes`` bounds all four (:mod:`.budget`); each phase talks every 30 s (:mod:`.progress`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from .. import storage
from ..model.bundle import ModelBundle, save_bundle
from ..model.scope import in_scope
from ..model.scoring import predict_batches
from ..metrics import calibrate_thresholds, coverage, majority_baseline, split_metrics
from ..model.network import TaggerNet, create_backbone_with_source, resolve_data_config
from .budget import FIT_SHARE, Budget, minutes
from .config import ConfigError, RetrainConfig, check_data_exists
from .datamodule import FashionDataModule
from .features import FeatureStore, trunk_features, trunk_key
from .module import LABELS_KEY, SCORE_METRIC, TaggerModule
from ..data.split import SPLIT_FILE, write_split
from .progress import Ticker, epoch_reporter, ticking

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


def check_net(net: TaggerNet, backbone: str) -> float:
    """One forward pass on a blank image, so that a backbone whose pooled features do not match its heads fails here,
    with its name, before the data is read, not in the first validation step. Then a timed batch of 8: the seconds
    per image of a forward pass, from which --max-minutes keeps time to score val and test."""
    size = net.data_config.input_size
    was_training = net.training
    try:
        with torch.no_grad():
            net.eval()(torch.full((1, 3, size, size), 255, dtype=torch.uint8))
            started = time.monotonic()
            net(torch.full((8, 3, size, size), 255, dtype=torch.uint8))
            return (time.monotonic() - started) / 8
    except RuntimeError as exc:
        raise ConfigError(
            "backbone",
            f"backbone {backbone!r} does not run at input size {size}: {exc}. Try a larger --input-size "
            "or another backbone.",
        ) from None
    finally:
        net.train(was_training)


def scoring_predictor(net: TaggerNet, backbone: str, labels: dict[str, list[str]], device: str, export_cache: str):
    """The Predictor that scores val and test: the trained weights as an unsaved bundle, resolved as ``tagger
    evaluate`` resolves ``auto`` here (:func:`tagger.model.inference.resolve`; on a CPU the first installed of ONNX
    Runtime, OpenVINO, PyTorch, not measured: another try must not pick another runtime or precision, and other
    scores); an ONNX export is made into ``export_cache``, as its model_version is not the saved bundle's, whose
    thresholds are not known yet. An export that cannot be made or does not match PyTorch (tag would refuse it
    too) is not worth the training: PyTorch at auto precision scores instead, with a warning, and the bundle
    records which scored."""
    from ..model.bundle import unsaved_bundle
    from ..model.inference import InferenceSpec, resolve

    bundle = unsaved_bundle(net, backbone=backbone, labels=labels)
    inference = resolve(InferenceSpec(device), bundle, device=torch.device(device), measure="never",
                        cache_dir=export_cache, fallback_to_torch=True)
    return inference.predictor()


# Seconds kept for scoring, beyond the measured forward pass and decoding: the export, the loader, the bundle.
SCORING_OVERHEAD_S = 10.0


def scoring_reserve(forward_s: float, images: int, *, decode_s: float = 0.0, workers: int = 0) -> float:
    """What scoring ``images`` val/test photos and writing the bundle will take (x1.5): the measured forward pass, and,
    where the photos are not in memory, decoding them again (``decode_s`` a photo, spread over the loader's workers)."""
    return SCORING_OVERHEAD_S + 1.5 * images * (forward_s + decode_s / max(1, workers))


@dataclass
class Prepared:
    """What :func:`prepare` made ready for fitting."""

    config: RetrainConfig
    budget: Budget
    device: str
    weights_source: Any
    data_config: Any
    datamodule: FashionDataModule
    net: TaggerNet
    heads_init: dict[str, str]
    forward_s: float  # measured seconds of one image through the whole network in eval mode
    decode_s: float = 0.0  # measured seconds to decode one photo where scoring decodes them again (not cached)
    feature_cache: dict[str, Any] | None = None
    # Set when --max-minutes ran out during the trunk pass: the train (and val) photos it reached, of how many.
    trunk_cut: dict[str, int] | None = None
    phases_s: dict[str, float] = field(default_factory=dict)  # wall: prepare (of which trunk_pass), fit, score; cpu

    @property
    def labels(self) -> dict[str, list[str]]:
        return self.datamodule.vocab

    def scoring_reserve_s(self) -> float:
        """What scoring val and test and writing the bundle will take (:func:`scoring_reserve`)."""
        dm = self.datamodule
        return scoring_reserve(self.forward_s, len(dm.rows("val")) + len(dm.rows("test")), decode_s=self.decode_s,
                               workers=dm.workers)


@dataclass
class Fitted:
    """What :func:`fit` leaves: the module with the best weights loaded, and how the fit ended."""

    module: TaggerModule
    trainer: Any
    logger: Any
    best_checkpoint: str | None
    best_epoch: int | None
    stopped_by: str
    seconds: float
    precision: str


@dataclass
class Scores:
    val_probs: dict[str, np.ndarray]
    val_targets: np.ndarray
    test_probs: dict[str, np.ndarray]
    test_targets: np.ndarray
    val_metrics: dict[str, dict]
    test_metrics: dict[str, dict]
    thresholds: dict[str, float]
    scored_with: dict[str, Any]
    val_coverage: dict[str, float]


def retrain(config: RetrainConfig, *, budget: Budget | None = None) -> ModelBundle:
    """Train on ``config.data`` and write the bundle to ``config.out``; returns the saved bundle.

    Facts about the run (data fingerprint, row accounting, folded labels, split sizes, val and test metrics against
    the majority baseline, thresholds, timing, the feature cache, config) go into ``bundle.training``. ``budget``:
    the clock ``--max-minutes`` counts on (tests give a faster one); by default it starts now.
    """
    config.validate()
    budget = budget or Budget(config.max_minutes)
    cpu_started = time.process_time()
    with _log_file(config):
        prepared = prepare(config, budget)
        prepared.phases_s["prepare"] = budget.spent()
        fitted = fit(prepared)
        prepared.phases_s["fit"] = fitted.seconds
        started = budget.clock()
        scores = score(prepared, fitted)
        prepared.phases_s["score"] = budget.clock() - started
        # The CPU seconds of the whole process (all its threads): on a shared machine the wall clock says little.
        prepared.phases_s["cpu"] = time.process_time() - cpu_started
        bundle = record(prepared, fitted, scores)
        if config.text_columns:
            from .fusion import add_text_part

            bundle = add_text_part(prepared.config, prepared.datamodule, bundle, scores)
        return bundle


def prepare(config: RetrainConfig, budget: Budget) -> Prepared:
    """Weights, data, split and network; the frozen-trunk features with ``--freeze-stages``. Raises ConfigError
    (exit 2) for settings that cannot work here, including a budget the trunk pass would not leave room in."""
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
    forward_s = check_net(probe, config.backbone)
    if config.freeze_stages:
        try:
            stages = probe.stage_count()
        except ValueError as exc:
            raise ConfigError("freeze_stages", str(exc)) from None
        if config.freeze_stages > stages:
            raise ConfigError("freeze_stages", f"{config.backbone} has {stages} block stages; --freeze-stages takes 0-{stages} "
                              f"({stages}: the whole backbone frozen, only the heads train)")


    def check_decoding(ticker: Ticker) -> None:
        # Decoding is timed on its first photos like the trunk pass: at 1800x2400 or from a slow store it can be most of
        # the run. What follows is at least scoring val and test (the trunk pass is timed itself: its features may be cached).
        budget.require(
            "decoding the photos", ticker.eta(),
            after_s=scoring_reserve(forward_s, round(ticker.total * (config.val_fraction + config.test_fraction))),
            basis=f"{ticker.done} of {ticker.total} photos in {ticker.elapsed:.0f}s, {ticker.rate():.1f}/s",
            fix="fewer photos, or photos that read faster (a local copy instead of s3:// or https://)",
        )

    datamodule = FashionDataModule(config, input_size=data_config.input_size, pin_memory=device == "cuda",
                                   on_decode_estimate=check_decoding if budget.limit_s is not None else None, clock=budget.clock)
    datamodule.setup()
    datamodule.workers = resolve_workers(config.workers, device, datamodule.cached)
    decode_s = 0.0 if datamodule.cached or budget.limit_s is None else time_decoding(datamodule, budget.clock)
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
        if config.freeze_carried_heads and not any(v == "bundle" for v in heads_init.values()):
            raise ConfigError("freeze_carried_heads", f"no head of {config.init_weights} carries over to this run's labels "
                              "(its attributes' label lists differ: add --keep-labels), so there is nothing to keep")
        if any(v == "bundle" for v in heads_init.values()) and not config.split_from:
            log.warning("starting from the bundle %s without --split-from: rows it was trained on may land in this run's "
                        "val/test split and flatter its figures; pass --split-from %s when the data overlap",
                        config.init_weights, config.init_weights)
    prepared = Prepared(config, budget, device, weights_source, data_config, datamodule, net, heads_init, forward_s, decode_s)
    if config.freeze_stages:
        cache_trunk_features(prepared)
    return prepared


def time_decoding(dm: FashionDataModule, clock, photos: int = 4) -> float:
    """Seconds to decode one photo, on a few val photos: without the image cache, scoring decodes every val and test
    photo again, which --max-minutes must keep time for."""
    urls = [str(u) for u in dm.urls[dm.rows("val")[:photos]]]
    started = clock()
    for url in urls:
        try:
            dm.images.load(url, dm.input_size)
        except Exception:  # noqa: BLE001 - an unreadable photo is dropped (and said) where it is scored; here it is timed
            pass
    return (clock() - started) / max(1, len(urls))


def cache_trunk_features(prepared: Prepared) -> None:
    """The frozen-trunk pass (:mod:`.features`), estimated after its first batches against ``--max-minutes``."""
    config, dm, net = prepared.config, prepared.datamodule, prepared.net
    if dm.cache is None:
        raise ConfigError("freeze_stages", "cached trunk features need the decoded images in memory: use --cache-images on "
                          "(or auto with enough --cache-max-gb)")
    store = FeatureStore.open(trunk_key(config.backbone, net, config.freeze_stages), config.feature_cache_gb)
    views = 2 if config.cache_mirror else 1

    budget = prepared.budget
    # Fitting keeps a share of the budget while the pass runs: a pass slower than its estimate stops there, and the
    # heads are trained on the photos it reached (val rows first, so that the run still validates; test rows last,
    # as scoring reads their pixels, not their features).
    reserve = prepared.scoring_reserve_s() + budget.reserve_for_fitting()

    def check_budget(ticker) -> None:
        fix = "fewer photos"
        if config.cache_mirror:
            fix = "--no-cache-mirror (half the pass), " + fix
        budget.require(
            "the frozen-trunk pass", ticker.eta(), after_s=reserve,
            basis=f"{ticker.done} of {ticker.total} photo views in {ticker.elapsed:.0f}s, {ticker.rate():.1f}/s; "
                  f"{store.reused} found in the cache",
            fix=fix + " (its features done so far are kept in the cache: a re-run skips them)",
            after=f"to fit ({FIT_SHARE:.0%} of the budget), score val/test and write the bundle",
        )

    net.eval()
    started = budget.clock()
    order = np.concatenate([dm.rows("val"), dm.rows("train"), dm.rows("test")])
    limited = budget.limit_s is not None
    dm.trunk_features, have = trunk_features(
        dm.cache, lambda images: net.trunk(images, config.freeze_stages), store, views=views,
        on_estimate=check_budget if limited else None, clock=budget.clock, order=order,
        stop=(lambda: budget.left() <= reserve) if limited else None,
    )
    net.train()
    prepared.phases_s["trunk_pass"] = budget.clock() - started
    prepared.feature_cache = {"folder": str(store.folder) if store.folder else None, "reused": store.reused,
                              "computed": store.computed, "limit_gb": config.feature_cache_gb}
    if not have.all():
        train_rows = dm.rows("train")
        used = int(have[train_rows].sum())
        if used == 0:
            raise ConfigError(
                "max_minutes",
                f"--max-minutes {config.max_minutes:g} ran out during the frozen-trunk pass before any train photo was "
                f"reached ({minutes(budget.spent())} spent); raise it. The features computed so far are kept in the cache: "
                "a re-run skips them.",
            )
        dm.trunk_have = have
        prepared.trunk_cut = {"train_photos": used, "train_total": int(len(train_rows)),
                              "val_photos": int(have[dm.rows("val")].sum()), "val_total": int(len(dm.rows("val")))}
        log.warning("--max-minutes %g ran out during the frozen-trunk pass (slower than its first batches said): the heads "
                    "are trained on %d of %d train photos, the rest not used; their features so far are kept in the cache, "
                    "so a re-run with a larger budget computes only the rest", config.max_minutes, used, len(train_rows))


def fit(prepared: Prepared) -> Fitted:
    """Lightning fits within what the budget leaves (less the scoring reserve): stopped by the limit, even mid-epoch,
    it validates and keeps its best checkpoint, which is loaded back into the network."""
    from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
    from pytorch_lightning.loggers import TensorBoardLogger

    config, datamodule, net, labels = prepared.config, prepared.datamodule, prepared.net, prepared.labels
    reserve = prepared.scoring_reserve_s()
    fit_s = prepared.budget.for_fitting(reserve)
    if fit_s is not None:
        log.info("--max-minutes %g: %s spent getting ready, %s kept to score val/test and write the bundle, %s left for fitting",
                 config.max_minutes, minutes(prepared.budget.spent()), minutes(reserve), minutes(fit_s))
    module = TaggerModule(
        net,
        labels,
        lr=config.lr,
        weight_decay=config.weight_decay,
        warmup_epochs=config.warmup_epochs,
        label_smoothing=config.label_smoothing,
        freeze_backbone_epochs=config.freeze_backbone_epochs,
        freeze_stages=config.freeze_stages,
        time_budget_s=fit_s,
        frozen_heads=[a for a, v in prepared.heads_init.items() if v == "bundle"] if config.freeze_carried_heads else (),
    )
    log_dir = resolve_log_dir(config)
    logger = TensorBoardLogger(save_dir=log_dir, name="", default_hp_metric=False)
    best = ModelCheckpoint(monitor=SCORE_METRIC, mode="max", save_top_k=1, save_last=True, filename="best-{epoch:03d}", auto_insert_metric_name=False)
    stopper = EarlyStopping(monitor=SCORE_METRIC, mode="max", patience=config.patience)
    callbacks: list[pl.Callback] = [best, stopper, LearningRateMonitor(logging_interval="step"), epoch_reporter(list(labels), SCORE_METRIC)]
    budget_stop = BudgetStop(prepared.budget, reserve) if fit_s is not None else None
    if budget_stop is not None:
        callbacks.append(budget_stop)
    precision = "32-true"
    if prepared.device == "cuda":
        precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        torch.set_float32_matmul_precision("high")
    steps_per_epoch = max(1, len(datamodule.rows("train")) // max(1, min(config.batch_size, len(datamodule.rows("train")))))
    if config.progress:
        callbacks.append(_stderr_progress_bar())
    trainer = pl.Trainer(
        accelerator="gpu" if prepared.device == "cuda" else "cpu",
        devices=1,
        precision=precision,
        max_epochs=config.max_epochs,
        gradient_clip_val=config.grad_clip or None,
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=max(1, min(50, steps_per_epoch)),
        enable_progress_bar=config.progress,
        enable_model_summary=config.progress,
        num_sanity_val_steps=1,
    )
    if config.freeze_stages:
        log.info("the frozen trunk (%s) stays in eval mode on purpose: its BatchNorm statistics made the cached features",
                 "the whole backbone" if config.freeze_stages >= prepared.net.stage_count() else f"stem + {config.freeze_stages} stages")
    started = time.monotonic()
    with warnings.catch_warnings():
        # Workers are chosen on purpose (resolve_workers); Lightning's hint assumes a GPU to feed.
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*(number of training batches|log_every_n_steps).*")
        # The frozen trunk (and, with --freeze-backbone-epochs, the backbone) is in eval mode by design (said above).
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
        # Lightning's own use of a torch API it has not caught up with: nothing a user can act on.
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
        trainer.fit(module, datamodule=datamodule, ckpt_path=config.resume, weights_only=True if config.resume else None)
    seconds = time.monotonic() - started
    if trainer.interrupted:
        raise KeyboardInterrupt("training interrupted; no bundle written")
    best_epoch = None
    if best.best_model_path:
        # weights_only: a checkpoint is a pickle, and only tensors and plain values may come out of it.
        checkpoint = torch.load(best.best_model_path, map_location="cpu", weights_only=True)
        module.load_state_dict(checkpoint["state_dict"])
        best_epoch = int(checkpoint.get("epoch", -1))
    else:
        log.warning("no validation epoch finished; saving the last weights, not a validated best")
    stopped_by = "max_epochs"
    if prepared.trunk_cut is not None:
        stopped_by = "max_minutes"  # during the trunk pass (training.trunk_pass_cut says how far it got)
    elif stopper.stopped_epoch > 0:
        stopped_by = "early_stopping"
    elif budget_stop is not None and budget_stop.stopped:
        stopped_by = "max_minutes"
        log.warning("--max-minutes %g reached during epoch %d: training stopped there; the bundle holds the best model so "
                    "far (epoch %s, val score %.4f)", config.max_minutes, budget_stop.epoch + 1,
                    "?" if best_epoch is None else best_epoch + 1, float(best.best_model_score or float("nan")))
    return Fitted(module, trainer, logger, best.best_model_path or None, best_epoch, stopped_by, seconds, precision)


def score(prepared: Prepared, fitted: Fitted) -> Scores:
    """Val and test through the tag job's Predictor on the runtime and precision evaluate picks at auto on this
    machine: the thresholds fit, and the test metrics are, the scores that evaluate reproduces."""
    dm, net, labels = prepared.datamodule, prepared.net, prepared.labels
    with tempfile.TemporaryDirectory(prefix="tagger-retrain-export-") as export_cache:
        scorer = scoring_predictor(net, prepared.config.backbone, labels, prepared.device, export_cache)
        probs, targets = {}, {}
        for split in ("val", "test"):
            ticker = Ticker(f"scoring {split}", len(dm.rows(split)))
            probs[split], targets[split] = predict_batches(
                scorer, ticking(dm.loader(split), ticker, lambda batch: int(batch[0].shape[0])), prepared.device)
        scored_with = {"runtime": scorer.runtime.name, "precision": scorer.precision_name, "reason": scorer.runtime.reason}
        del scorer
    net.cpu()
    # A scoped attribute is scored, and its threshold fitted, where the tag job would tag it: its labelled rows whose
    # predicted scope attribute is outside the scope get a null tag there, so they are counted, not scored.
    out_of_scope = {split: _out_of_scope(prepared.config.scopes, labels, probs[split], targets[split]) for split in probs}
    val_metrics = split_metrics(probs["val"], targets["val"])
    test_metrics = split_metrics(probs["test"], targets["test"])
    for split, metrics in (("val", val_metrics), ("test", test_metrics)):
        for attr, count in out_of_scope[split].items():
            metrics[attr]["n_labelled_out_of_scope"] = count
    baseline = majority_baseline(dm.targets[dm.rows("train")], targets["test"], labels)
    for attr, values in test_metrics.items():
        values["majority_accuracy"] = baseline[attr]["accuracy"]
        values["majority_label"] = baseline[attr]["label"]
    thresholds = calibrate_thresholds(probs["val"], targets["val"], prepared.config.target_precision)
    val_coverage = coverage(probs["val"], thresholds)
    scopes = prepared.config.scopes
    if scopes:
        inside = in_scope(scopes, labels, {a: p.argmax(axis=1) for a, p in probs["val"].items()})
        val_coverage.update(coverage({a: probs["val"][a][m] for a, m in inside.items()}, thresholds))
    fitted.logger.log_metrics(
        {f"final_test/{attr}/{k}": v for attr, m in test_metrics.items() for k, v in m.items() if isinstance(v, float)},
        step=fitted.trainer.global_step,
    )
    fitted.logger.finalize("success")
    return Scores(probs["val"], targets["val"], probs["test"], targets["test"], val_metrics, test_metrics, thresholds, scored_with,
                  val_coverage)


def record(prepared: Prepared, fitted: Fitted, scores: Scores) -> ModelBundle:
    """The run's facts into ``bundle.training``; split.parquet, then the bundle (model.json last)."""
    config, dm, labels = prepared.config, prepared.datamodule, prepared.labels
    unreadable = dm.unreadable_ids()
    if unreadable:
        dm.report.note_unreadable(unreadable)

    def mean(metric: dict, key: str) -> float:
        values = [m[key] for m in metric.values() if not math.isnan(m[key])]
        return float(sum(values) / len(values)) if values else float("nan")

    training = {
        "data": {
            "source": config.data,
            "fingerprint": dm.fingerprint,
            "rows": dm.report.to_dict(),
            "min_label_count": dm.min_label_count,
            "folded": dm.folded,
            "folded_into": dm.folded_into,
            "label_counts": dm.label_stats,
            "kept_labels": dm.kept_labels or None,
            "applies_when": {a: s.describe() for a, s in config.scopes.items()} or None,
            "labelled_out_of_scope": dm.out_of_scope or None,
            "narrow_labels": [{"attribute": a, "other": o, "value": v, "share": sh, "labelled": n, "overall": ov}
                              for a, o, v, sh, n, ov in dm.narrow] or None,
            "images_cached": dm.cached,
        },
        "split": {
            "file": SPLIT_FILE,
            "seed": config.seed,
            "fractions": {"train": 1 - config.val_fraction - config.test_fraction, "val": config.val_fraction, "test": config.test_fraction},
            "sizes": dm.split_sizes,
            "stratified_on": list(labels),
            "reused": dm.split_reused,
        },
        "metrics": {
            "monitor": SCORE_METRIC,
            "val_score": mean(scores.val_metrics, "macro_f1"),
            "test_score": mean(scores.test_metrics, "macro_f1"),
            "val": scores.val_metrics,
            "test": scores.test_metrics,
        },
        "thresholds": {
            "rule": THRESHOLD_RULE,
            "target_precision": config.target_precision,
            "val_coverage": scores.val_coverage,
        },
        "backbone": config.backbone,
        "weights_init": prepared.weights_source.describe(),
        "heads_init": prepared.heads_init,
        "freeze_stages": config.freeze_stages,
        "cache_mirror": config.cache_mirror if config.freeze_stages else None,
        "frozen_heads": [a for a, v in prepared.heads_init.items() if v == "bundle"] if config.freeze_carried_heads else None,
        "feature_cache": prepared.feature_cache,
        "trunk_pass_cut": prepared.trunk_cut,
        "input_size": prepared.data_config.input_size,
        "epochs": int(fitted.trainer.current_epoch),
        "best_epoch": fitted.best_epoch,
        "global_steps": int(fitted.trainer.global_step),
        "stopped_by": fitted.stopped_by,
        "max_minutes": config.max_minutes,
        "duration_s": round(prepared.budget.spent(), 1),
        "fit_duration_s": round(fitted.seconds, 1),
        "phases_s": {k: round(v, 1) for k, v in prepared.phases_s.items()},
        "seed": config.seed,
        "device": prepared.device,
        "precision": fitted.precision,
        "scored_with": scores.scored_with,
        "log_dir": fitted.logger.log_dir,
        "best_checkpoint": fitted.best_checkpoint,
        "versions": _versions(),
        "config": storage.redact(asdict(config)),
    }
    # The split first, model.json (inside save_bundle) last: a folder with a model.json is complete.
    write_split(storage.join(config.out, SPLIT_FILE), dm.ids, dm.assignment, config.storage_options)
    bundle = save_bundle(
        prepared.net,
        config.out,
        backbone=config.backbone,
        labels=labels,
        thresholds=scores.thresholds,
        training=_json_safe(training),
        storage_options=config.storage_options,
        scopes=config.scopes,
    )
    log.info("wrote bundle %s (model_version %s) in %s%s", config.out, bundle.model_version, minutes(prepared.budget.spent()),
             f" of --max-minutes {config.max_minutes:g}" if config.max_minutes else "")
    return bundle


class BudgetStop(pl.Callback):
    """Lightning's ``max_time`` on the retrain's own clock: once what is left of ``--max-minutes`` is the scoring
    reserve plus one validation pass (as long as the last one took), training stops after the current batch, mid-epoch
    too; Lightning then validates and the checkpoint callback keeps the best model so far."""

    def __init__(self, budget: Budget, reserve_s: float):
        self.budget, self.reserve_s = budget, reserve_s
        self.stopped = False
        self.epoch: int | None = None  # 0-based epoch the limit was reached in
        self.validation_s = 0.0
        self._validation_started: float | None = None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        left = self.budget.left()
        if left is not None and not self.stopped and left <= self.reserve_s + self.validation_s:
            self.stopped, self.epoch = True, trainer.current_epoch
            trainer.should_stop = True

    def on_validation_epoch_start(self, trainer, module):
        self._validation_started = self.budget.clock()

    def on_validation_epoch_end(self, trainer, module):
        if self._validation_started is not None and not trainer.sanity_checking:
            self.validation_s = self.budget.clock() - self._validation_started


@contextlib.contextmanager
def _log_file(config: RetrainConfig):
    """The run's log lines also go to ``<log dir>/retrain.log``: the same lines as the terminal, beside the checkpoints."""
    folder = resolve_log_dir(config)
    try:
        os.makedirs(folder, exist_ok=True)
        handler = logging.FileHandler(os.path.join(folder, "retrain.log"), encoding="utf-8")
    except OSError as exc:
        log.warning("cannot write %s/retrain.log (%s); the log goes to stderr only", folder, exc)
        yield
        return
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger("tagger")
    previous = root.level
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
        handler.close()


def _out_of_scope(scopes, labels, probs: dict[str, np.ndarray], targets: np.ndarray) -> dict[str, int]:
    """Per scoped attribute: its labelled rows whose predicted scope attribute is outside the scope get target -1 (in
    place: not scored, not used for its threshold, as the tag job would give them a null tag); returns their counts."""
    if not scopes:
        return {}
    names = list(labels)
    counted = {}
    for attr, inside in in_scope(scopes, labels, {a: p.argmax(axis=1) for a, p in probs.items()}).items():
        j = names.index(attr)
        outside = (targets[:, j] >= 0) & ~inside
        targets[outside, j] = -1
        counted[attr] = int(outside.sum())
    return counted


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

