"""``tagger retrain``: Kaggle folders and/or labelled manifests -> a model bundle. Options -> RetrainConfig -> retrain()."""

from __future__ import annotations

from dataclasses import fields

import click

from tagger.training.config import CACHE_MODES, DEVICES, ConfigError, RetrainConfig, check_data_exists

from tagger.data.http import split_hosts

from .options import CommandError, FiniteFloatRange, image_options, parse_storage_options, storage_option

D = {f.name: f.default for f in fields(RetrainConfig)}


class MinLabelCount(click.ParamType):
    name = "auto|N"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or str(value).strip().lower() == "auto":
            return value if isinstance(value, int) else "auto"
        try:
            number = int(str(value))
        except ValueError:
            self.fail(f"expected 'auto' or a positive integer, got {value!r}", param, ctx)
        if number < 1:
            self.fail(f"must be at least 1, got {number}", param, ctx)
        return number


def _flag(option: str) -> str:
    names = {"storage_options": "--storage-option", "attributes": "--attribute", "applies_when": "--applies-when",
             "text_columns": "--text-column"}
    return names.get(option) or "--" + option.replace("_", "-")


@click.command("retrain")
@click.option("--data", required=True, multiple=True,
              help="A Kaggle-layout folder (styles.csv + images/) or a labelled manifest, local or s3://. Repeat it: one "
                   "data set, matched by id.")
@click.option("--attribute", "attributes", multiple=True,
              help="An attribute (label column) to train, in the tags table's order; repeatable. Default: the seven "
                   "Kaggle ones.")
@click.option("--applies-when", "applies_when", multiple=True, metavar="ATTR:OTHER=VALUE[,VALUE]",
              help="ATTR is tagged only where OTHER's tag is one of the values, null elsewhere; e.g. "
                   "pattern:masterCategory=Apparel. Repeatable.")
@click.option("--text-column", "text_columns", multiple=True, metavar="COLUMN",
              help="Also train a text model on this column and its fusion with the photos (Kaggle: productDisplayName; "
                   "a manifest: any of its columns).")
@click.option("--corrections", multiple=True,
              help="Reviewers' corrections (id, attribute, label; any manifest format) replace the data's labels. Repeatable.")
@click.option("--id-column", default=D["id_column"], show_default=True, help="Labelled manifests' and corrections' product-id column.")
@click.option("--image-column", default=D["image_column"], show_default=True, help="Labelled manifests' image column.")
@click.option("--data-format", type=click.Choice(["csv", "parquet", "jsonl"]), default=None, show_default="from the name",
              help="Labelled manifests' and corrections' format.")
@click.option("--keep-labels/--no-keep-labels", default=False, show_default=True,
              help="With --init-weights BUNDLE: its attributes keep its labels, so that their heads carry over.")
@click.option("--split-from", default=None,
              help="A bundle (or its split.parquet) whose rows keep their train/val/test split, so its test rows stay "
                   "unseen.")
@click.option("--out", required=True, help="Bundle folder to write (model.json, model.safetensors, split.parquet), local or s3://.")
@click.option("--backbone", default=D["backbone"], show_default=True, help="Any timm model name.")
@click.option("--pretrained/--no-pretrained", default=D["pretrained"], show_default=True,
              help="Start from ImageNet weights: timm's (Hugging Face hub or its cache), else the installed package for "
                   "lite0/1/2. Never a silent random init.")
@click.option("--init-weights", type=click.Path(exists=True), default=None,
              help="Local weights to start from: a safetensors file or state dict for --backbone, or a tagger bundle "
                   "(its folder).")
@click.option("--input-size", type=click.IntRange(16, 2048), default=None, show_default="the backbone's", help="Square input side in pixels.")
@click.option("--batch-size", type=click.IntRange(min=1), default=D["batch_size"], show_default=True,
              help="Photos per training step; a GPU takes 64-256, a CPU is fine at 32-64.")
@click.option("--workers", type=click.IntRange(min=0), default=None, show_default="0 on CPU with cached images, else min(8, cores-1)",
              help="DataLoader worker processes.")
@click.option("--lr", type=FiniteFloatRange(min=0, min_open=True), default=D["lr"], show_default=True, help="Peak AdamW learning rate.")
@click.option("--weight-decay", type=FiniteFloatRange(min=0), default=D["weight_decay"], show_default=True,
              help="AdamW weight decay.")
@click.option("--warmup-epochs", type=FiniteFloatRange(min=0), default=D["warmup_epochs"], show_default=True,
              help="Epochs of linear learning-rate warm-up before the cosine decay.")
@click.option("--label-smoothing", type=FiniteFloatRange(0, 1, max_open=True), default=D["label_smoothing"], show_default=True,
              help="Label smoothing of each head's cross-entropy.")
@click.option("--max-epochs", type=click.IntRange(min=1), default=D["max_epochs"], show_default=True,
              help="At most this many epochs (--patience and --max-minutes may stop it sooner).")
@click.option("--max-minutes", type=FiniteFloatRange(min=0, min_open=True), default=None,
              help="Wall-clock limit up to the bundle written; said at once when it cannot hold, else ends with the best "
                   "model so far (see docs/train.md).")
@click.option("--patience", type=click.IntRange(min=1), default=D["patience"], show_default=True, help="Epochs without a better val/score before stopping.")
@click.option("--freeze-backbone-epochs", type=click.IntRange(min=0), default=D["freeze_backbone_epochs"], show_default=True,
              help="Train only the heads for this many epochs first.")
@click.option("--freeze-stages", type=click.IntRange(min=0), default=D["freeze_stages"], show_default=True,
              help="Freeze the first N block stages (EfficientNet), their output cached once. 0: train all; 7 "
                   "(lite0's all): the whole backbone, only heads train.")
@click.option("--freeze-carried-heads/--train-carried-heads", default=D["freeze_carried_heads"], show_default=True,
              help="With --init-weights BUNDLE: its carried-over heads are not trained (with the whole backbone frozen "
                   "their tags stay the bundle's).")
@click.option("--cache-mirror/--no-cache-mirror", default=D["cache_mirror"], show_default=True,
              help="With --freeze-stages: also cache each photo's mirror image (flip augmentation; twice the one-off pass).")
@click.option("--feature-cache-gb", type=FiniteFloatRange(min=0), default=None,
              show_default="$TAGGER_FEATURE_CACHE_GB, else 5",
              help="With --freeze-stages: keep trunk features in $TAGGER_CACHE/trunk-features up to this size, so a "
                   "re-run skips the pass on the same photos. 0: off.")
@click.option("--grad-clip", type=FiniteFloatRange(min=0), default=D["grad_clip"], show_default=True, help="Max gradient norm; 0 = off.")
@click.option("--seed", type=click.IntRange(min=0), default=D["seed"], show_default=True,
              help="Seed of the split, the initialisation, the shuffling and the augmentation.")
@click.option("--val-fraction", type=FiniteFloatRange(0, 1, min_open=True, max_open=True), default=D["val_fraction"], show_default=True,
              help="Share of rows held out for validation (early stopping, thresholds, the text fusion).")
@click.option("--test-fraction", type=FiniteFloatRange(0, 1, min_open=True, max_open=True), default=D["test_fraction"], show_default=True,
              help="Share of rows held out for the test figures, never trained or tuned on.")
@click.option("--min-label-count", type=MinLabelCount(), default=D["min_label_count"], show_default=True,
              help="Labels with fewer rows are folded into 'Other'; auto = 500 x rows / 44,424, at least 5.")
@click.option("--cache-images", type=click.Choice(CACHE_MODES), default=D["cache_images"], show_default=True,
              help="Decode every image once into memory; auto: when it fits in --cache-max-gb.")
@click.option("--cache-max-gb", type=FiniteFloatRange(min=0, min_open=True), default=D["cache_max_gb"], show_default=True,
              help="Memory the decoded-image cache may take (see --cache-images).")
@click.option("--target-precision", type=FiniteFloatRange(0, 1, min_open=True), default=D["target_precision"], show_default=True,
              help="Review thresholds keep the top-label precision of auto-accepted tags at this level (on val).")
@click.option("--device", type=click.Choice(DEVICES), default=D["device"], show_default=True,
              help="auto: CUDA when a GPU is visible, else the CPU (said in the log); cuda without a GPU is an error.")
@click.option("--threads", type=click.IntRange(min=1), default=None, show_default="all cores",
              help="CPU threads for PyTorch; 1 is steadier on a machine shared with other jobs.")
@click.option("--resume", type=click.Path(exists=True, dir_okay=False), default=None, help="Lightning checkpoint to continue from (e.g. .../checkpoints/last.ckpt).")
@click.option("--log-dir", default=None, show_default="<out>.logs, beside the bundle",
              help="TensorBoard logs and checkpoints (local); never inside the bundle folder by default.")
@click.option("--progress/--no-progress", default=D["progress"], show_default=True, help="Lightning's progress bar (on stderr).")
@image_options
@storage_option
def retrain(storage_options: tuple[str, ...], **options) -> None:
    """Train a tagger on Kaggle folders and/or labelled manifests and write a model bundle to --out.

    Exit codes: 0 the bundle is written (also when --max-minutes ended training early, or ran out during the
    frozen-trunk pass: the heads are then trained on the photos it reached; the log and the summary say so); 2 invalid
    input (the data, an option, a budget that cannot hold: nothing is written); 4 storage unavailable (run it again
    later); 1 anything else, ImageNet weights that cannot be had included.
    """
    from tagger.model.pretrained import InitWeightsError, PretrainedWeightsUnavailable
    from tagger.data.kaggle import DataError

    options["data"] = options["data"][0] if len(options["data"]) == 1 else list(options["data"])
    options["attributes"] = list(options["attributes"]) or None
    options["corrections"] = list(options["corrections"])
    options["applies_when"] = list(options["applies_when"])
    options["text_columns"] = list(options["text_columns"])
    options["allow_hosts"] = split_hosts(options["allow_hosts"])
    config = RetrainConfig(**options, storage_options=parse_storage_options(storage_options))
    try:
        check_data_exists(config)  # first: it costs no import of torch (several seconds)
        config.validate()
    except ConfigError as exc:
        raise CommandError("retrain", f"invalid input: {_flag(exc.option)}: {exc.message}") from None
    except Exception as exc:
        _storage_failure(exc)
        raise

    import logging

    # Importing Lightning resets its logger to INFO, undoing the level the `tagger` group chose (-q/-v).
    lightning_log = logging.getLogger("pytorch_lightning")
    level = lightning_log.level
    from tagger.training.summary import format_summary
    from tagger.training.train import retrain as run

    lightning_log.setLevel(level)

    try:
        bundle = run(config)
    except ConfigError as exc:  # found only once the data or the machine is seen (device, resume labels)
        raise CommandError("retrain", f"invalid input: {_flag(exc.option)}: {exc.message}") from None
    except DataError as exc:
        raise CommandError("retrain", f"invalid input: --data: {exc}") from None
    except InitWeightsError as exc:  # its message starts with --init-weights
        raise CommandError("retrain", f"invalid input: {exc}") from None
    except PretrainedWeightsUnavailable as exc:
        raise CommandError("retrain", f"failed: {exc}", exit_code=1) from None
    except Exception as exc:
        _storage_failure(exc)
        raise
    click.echo(format_summary(bundle))


def _storage_failure(exc: Exception) -> None:
    """Storage trouble as the other commands say it, in one line: a setting no retry fixes (missing credentials,
    a malformed endpoint) is exit 2, a store that is down or silent exit 4; anything else is left to raise."""
    from tagger import storage
    from tagger.data.reader import StorageUnavailable

    if storage.is_permanent(exc):
        raise CommandError("retrain", f"invalid input: storage configuration: {type(exc).__name__}: "
                           f"{' '.join(str(exc).split())}") from None
    if isinstance(exc, StorageUnavailable) or storage.is_unavailable(exc):
        # A DataLoader worker's exception carries the worker's traceback as its text: its last line says it.
        text = [line for line in str(exc).splitlines() if line.strip()] or [""]
        said = text[-1] if "Traceback" in str(exc) else " ".join(text)
        what = storage.describe_unavailable(exc) if type(exc).__name__ == "FSTimeoutError" else f"{type(exc).__name__}: {said}"
        raise CommandError("retrain", f"storage unavailable: {what}; nothing was written, run it again later",
                           exit_code=4) from None

