"""``tagger evaluate``: how good a model bundle is on a split of its data (Kaggle folders, labelled manifests), as a report folder."""

from __future__ import annotations

import logging
import sys

import click

from tagger.data.http import split_hosts
from tagger.tag.config import default_workers

from .options import (
    device_option,
    http_options,
    max_image_bytes_option,
    max_image_pixels_option,
    parse_storage_options,
    precision_option,
    runtime_option,
    storage_option,
)

log = logging.getLogger("tagger.evaluate")

EXIT_OK, EXIT_CRASH, EXIT_INVALID_INPUT, EXIT_STORAGE = 0, 1, 2, 4


@click.command("evaluate")
@click.option("--model", required=True, envvar="TAGGER_MODEL", help="Model bundle folder (model.json + model.safetensors [+ split.parquet]), local or s3://.")
@click.option("--data", required=True, multiple=True,
              help="Kaggle-layout folder or labelled manifest, local or s3://, as `tagger retrain` takes it; repeatable.")
@click.option("--corrections", multiple=True, help="Reviewers' corrections (id, attribute, label) over the data's labels, as in retrain.")
@click.option("--id-column", default="product_id", show_default=True, help="Labelled manifests' product-id column.")
@click.option("--image-column", default="image", show_default=True, help="Labelled manifests' image column.")
@click.option("--data-format", type=click.Choice(["csv", "parquet", "jsonl"]), default=None, show_default="from the name",
              help="Labelled manifests' format.")
@click.option("--split", type=click.Choice(["test", "val", "train", "all"]), default="test", show_default=True,
              help="Rows to evaluate, by id from the bundle's split.parquet; 'all': every row of --data with an image "
              "(an external test set; needs no split.parquet).")
@click.option("--out", default=None, show_default="out/evaluate/<model_version>-<split>",
              help="Report folder (metrics.parquet, per_class.parquet, report.md, plots/), local or s3://.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Images per model call.")
@click.option("--workers", type=click.IntRange(min=0), default=default_workers, show_default="min(8, CPUs)",
              help="Image reading/decoding processes; 0 decodes in the main process.")
@device_option
@precision_option
@runtime_option
@max_image_bytes_option
@max_image_pixels_option
@click.option("--unknown-labels", type=click.Choice(["exclude", "other"]), default="exclude", show_default=True,
              help="Labels the model never saw: left out of the metrics, or scored as 'Other' where it has that class.")
@click.option("--max-confusion-classes", type=click.IntRange(min=0), default=20, show_default=True,
              help="Draw confusion matrices for attributes with at most this many classes.")
@click.option("--plots/--no-plots", default=True, show_default=True, help="Write the PNG figures.")
@http_options
@click.option("--text-column", "text_columns", multiple=True, metavar="COLUMN",
              help="Also score the bundle's text model and fusion on this column (Kaggle: productDisplayName; "
                   "a manifest: any of its columns).")
@click.option("--baseline", default=None,
              help="Another bundle scored on the same rows: per attribute the difference with its paired SE and the rows "
                   "that changed.")
@click.option("--check-precision", is_flag=True,
              help="Score the split in fp32 and in --precision with --runtime; record in model.json whether every attribute "
              "stayed within 0.5 point.")
@storage_option
def evaluate(**options) -> None:
    """Score a model bundle on labelled data (Kaggle folders or labelled manifests) and write a report.

    The rows are a split of the data by the bundle's split.parquet (or all of it): accuracy with its standard error,
    F1, majority baseline and review coverage per attribute, per-class figures; with --baseline, the paired
    difference to another bundle on the same rows. Prints the summary table.

    Exit codes: 0 done; 2 invalid input (bundle, data, split, options), found before the model runs;
    4 storage unavailable; 1 any other failure.
    """
    from tagger.evaluation.evaluate import EvaluateConfig

    options["storage_options"] = parse_storage_options(options["storage_options"])
    options["data"] = options["data"][0] if len(options["data"]) == 1 else list(options["data"])
    options["corrections"] = list(options["corrections"])
    options["allow_hosts"] = split_hosts(options["allow_hosts"])
    options["text_columns"] = tuple(options["text_columns"])
    check = options.pop("check_precision")
    config = EvaluateConfig(**options)
    sys.exit(execute_check(config) if check else execute(config))


def execute(config) -> int:
    from tagger.evaluation.evaluate import evaluate as run
    from tagger.evaluation.report import summary_text, write_report

    def work():
        evaluation = run(config)
        return evaluation, write_report(evaluation)

    done, code = _guarded(work, "evaluation")
    if done is None:
        return code
    evaluation, written = done
    click.echo(summary_text(evaluation))
    click.echo(f"report: {written['report.md']} ({len(written)} files)", err=True)
    return EXIT_OK


def execute_check(config) -> int:
    """--check-precision: both scorings, the table, the record written into the bundle."""
    import os

    from tagger import storage
    from tagger.evaluation.precision_check import check_precision, check_text
    from tagger.model.bundle import record_precision_check

    meta = storage.join(config.model, "model.json")
    if "://" not in config.model and os.path.isfile(meta) and not (os.access(meta, os.W_OK) and os.access(config.model, os.W_OK)):
        # found now, not after minutes of scoring: the verdict is written into the bundle
        return _fail(EXIT_INVALID_INPUT, f"invalid input: {meta} is not writable, and the check records its verdict there; "
                     "copy the bundle to a folder you can write and check that copy")

    def work():
        record, _, _ = check_precision(config)
        record_precision_check(config.model, record, config.storage_options)
        return record

    record, code = _guarded(work, "precision check")
    if record is None:
        return code
    click.echo(check_text(record))
    click.echo(f"recorded in {meta} (precision_checks)", err=True)
    return EXIT_OK


def _guarded(work, what: str):
    """``work()`` -> (its result, None), or (None, the exit code) with the reason said: 2 invalid input, 4 storage
    unavailable, 1 anything else."""
    from tagger import storage
    from tagger.data.kaggle import DataError
    from tagger.data.reader import StorageUnavailable
    from tagger.evaluation import EvaluationError
    from tagger.model.bundle import BundleError
    from tagger.model.scorer import NonFiniteScores

    try:
        return work(), None
    except (EvaluationError, BundleError, DataError) as exc:
        return None, _fail(EXIT_INVALID_INPUT, f"invalid input: {exc}")
    except NonFiniteScores as exc:  # says which images and what to try: no traceback, as the tag job
        return None, _fail(EXIT_CRASH, f"failed: {exc}")
    except Exception as exc:
        if isinstance(exc, StorageUnavailable) or storage.is_unavailable(exc):
            return None, _fail(EXIT_STORAGE, f"storage unavailable: {type(exc).__name__}: {exc}")
        log.exception("%s failed", what)
        return None, _fail(EXIT_CRASH, f"failed: {type(exc).__name__}: {exc}")


def _fail(code: int, message: str) -> int:
    click.echo(f"tagger evaluate: {message}", err=True)
    return code
