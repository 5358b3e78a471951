"""``tagger tag``: the nightly job. Options -> TagConfig -> TagRunner; exit codes are the contract."""

from __future__ import annotations

import logging
import sys

import click

from tagger.tag.config import ENGINES, PROGRESS_MODES, START_METHODS, TagConfig, default_workers, parse_shard, today_utc
from tagger.data.http import split_hosts

from .options import (FiniteFloatRange, catalog_format_option, device_option, http_options, id_column_option, image_column_option,
                      max_image_bytes_option, max_image_pixels_option, parse_storage_options, precision_option, runtime_option,
                      storage_option, text_column_option)
from .report import TAG_REPORT_OPTIONS, report_options

log = logging.getLogger("tagger.tag")


def _shard(ctx: click.Context, param: click.Parameter, value: str | None):
    if value is None:
        return None
    try:
        return parse_shard(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _run_date(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from datetime import datetime

    try:
        datetime.strptime(value, "%Y-%m-%d")
    except ValueError:
        raise click.BadParameter(f"expected YYYY-MM-DD, got {value!r}") from None
    return value


def _engine(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """``--engine ray`` without Ray Data installed is a bad option (exit 2), said before any model work."""
    if value == "ray":
        from tagger.tag.ray import ray_missing  # finds the package without importing it

        problem = ray_missing()
        if problem:
            raise click.BadParameter(problem)
    return value


def common_output_options(function):
    function = click.option("--out", required=True, envvar="TAGGER_OUT", help="Output root, local folder or s3://bucket/prefix.")(function)
    function = click.option("--run-date", default=today_utc, show_default="today, UTC", callback=_run_date,
                            help="The partition to write: run_date=YYYY-MM-DD.")(function)
    return storage_option(function)


@click.command("tag")
@click.option("--catalog", required=True, envvar="TAGGER_CATALOG",
              help="Manifest (CSV, Parquet or JSONL, optionally .gz), local path or s3:// URL.")
@click.option("--model", required=True, envvar="TAGGER_MODEL", help="Model bundle folder (model.json + model.safetensors), local or s3://.")
@common_output_options
@id_column_option
@image_column_option
@click.option("--image-separator", default=None, metavar="SEP",
              help="CSV image cells hold several photos separated by SEP (e.g. ';'); the tags come from all of them. "
              "Default: one image per cell.")
@catalog_format_option
@text_column_option
@device_option
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Images per model call.")
@click.option("--workers", type=click.IntRange(min=0), default=default_workers, show_default="min(8, CPUs)",
              help="Image reading/decoding processes; 0 decodes in the main process.")
@click.option("--worker-start-method", type=click.Choice(START_METHODS), default="auto", show_default=True,
              help="auto: fork for local data, forkserver when S3 is involved (s3fs is not fork-safe).")
@click.option("--max-error-rate", type=FiniteFloatRange(0.0, 1.0), default=0.05, show_default=True,
              help="Fail (exit 3, no _SUCCESS) when a larger share of the rows end as errors.")
@click.option("--shard-size", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Rows per committed shard: the unit of resume after a crash.")
@click.option("--shard", "fanout", callback=_shard, metavar="I/N", default=None,
              help="Run only shards I, I+N, I+2N... of the plan (fan-out over tasks or machines); needs a --plan-only run first.")
@click.option("--plan-only", is_flag=True, help="Start a new run for the date (replacing its partition) and stop: the first step of a fan-out.")
@click.option("--since", default=None, metavar="PREVIOUS",
              help="Incremental run: reuse the tags of unchanged images from PREVIOUS (an output root or one partition); "
              "only new and changed images are read.")
@click.option("--since-missing-ok", is_flag=True,
              help="A --since that does not exist (yet) tags every row instead of exiting 2 (not needed when it is --out).")
@click.option("--run-id", default=None, help="Run identifier stored in every row (default: date + random suffix).")
@max_image_bytes_option
@max_image_pixels_option
@click.option("--draft-decode/--no-draft-decode", default=True, show_default=True,
              help="Decode JPEGs at reduced scale (libjpeg DCT scaling) before resizing.")
@precision_option
@runtime_option
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default="0: torch's default, one per core",
              help="The model's CPU threads (--engine ray: per model actor, 0: up to 4). On a shared machine, fewer than the "
              "cores.")
@click.option("--progress", type=click.Choice(PROGRESS_MODES), default="auto", show_default=True,
              help="auto: a bar on an interactive terminal, a log line every 30 s otherwise. ray: Ray Data's own bars "
              "(--engine ray).")
@click.option("--lease-ttl", type=FiniteFloatRange(1, 86_400), default=120.0, show_default=True,
              help="Seconds after its last heartbeat that a run which died on another machine may be taken over.")
@click.option("--lease-wait", type=FiniteFloatRange(0, 86_400), default=0.0, show_default=True,
              help="Seconds to wait for another live run that owns the date to end, before exiting 5.")
@click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True, callback=_engine,
              help="What tags the images: local (this process and its --workers) or ray (a Ray cluster; the extra "
              "fashion-tagger[ray]). Same tables either way.")
@click.option("--ray-address", default=None, metavar="ADDR",
              help="--engine ray: the cluster to join (host:6379). Default: RAY_ADDRESS, else a Ray started for the run.")
@click.option("--report", "write_report", is_flag=True,
              help="Once the partition is complete, write its morning report, with the report options below (a failed run "
              "says it wrote none). The tag's exit code stands.")
@report_options(within_tag=True)
@http_options
def tag(**options) -> None:
    """Tag every product of a catalog manifest and write the date's Parquet partitions.

    Exit codes: 0 success; 2 invalid input (manifest, model, output location, storage settings, options),
    checked before anything under --out changes; 3 too many error rows; 4 storage unavailable (transient);
    5 another run owns the date's partition; 1 any other failure; 143 stopped by SIGTERM/SIGINT.
    """
    write_report = options.pop("write_report")
    report = {k: options.pop(k) for k in TAG_REPORT_OPTIONS}
    options["storage_options"] = parse_storage_options(options["storage_options"])
    options["allow_hosts"] = split_hosts(options["allow_hosts"])
    options["text_columns"] = tuple(options["text_columns"])
    try:
        config = TagConfig(**options)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    code = execute(config)
    if write_report and code == 0 and not config.plan_only:
        _report(config, report)
    elif write_report and code != 2 and not config.plan_only:
        # said, so that a night without a page is not taken for a page lost (exit 2, invalid input, has its own line)
        click.echo(f"tagger tag --report: no report: the run ended with exit {code} before the partition was committed; "
                   "`tagger report` writes it once a run of the date has succeeded", err=True)
    sys.exit(code)


def _report(config: TagConfig, options: dict) -> None:
    """The tag job's last step behind --report: the partition is committed, so a report that fails, or one whose
    thresholds are crossed (said on stderr), leaves the tags as they are and the tag's exit code as it is (the
    DAG's own report task is where exit 6 acts). The catalog's labels come from the tagged manifest."""
    from tagger.tag.partition import Partition

    from .report import execute, report_config

    if Partition(config.out, config.run_date, config.storage_options).is_complete():  # a --shard task's may not be yet
        execute(report_config(config.out, config.run_date, config.storage_options,
                              {**options, "id_column": config.id_column, "catalog_format": config.catalog_format}),
                prefix="tagger tag --report")


@click.command("finalize")
@common_output_options
@click.option("--max-error-rate", type=FiniteFloatRange(0.0, 1.0), default=0.05, show_default=True,
              help="Fail (exit 3, no _SUCCESS) when a larger share of the date's rows ended as errors, as in tag.")
def finalize(out: str, run_date: str, storage_options: tuple[str, ...], max_error_rate: float) -> None:
    """Commit a fanned-out run date once every shard is done: run summary, then _SUCCESS.

    Exit codes: 0 committed (or already committed); 2 invalid input (no plan for the date, shards not done, a
    committed part lost); 3 too many error rows; 4 storage unavailable (transient); 5 another run owns the date's
    partition; 1 any other failure.
    """
    config = TagConfig(catalog="", model="", out=out, run_date=run_date, max_error_rate=max_error_rate,
                       storage_options=parse_storage_options(storage_options))
    sys.exit(execute(config, finalize_only=True))


def execute(config: TagConfig, *, finalize_only: bool = False) -> int:
    """Run and turn every outcome into an exit code and one line on stderr."""
    from tagger.tag.runner import EXIT_INTERRUPTED, Interrupted, StopFlag

    global RAN
    RAN = True
    stop = StopFlag()
    stop.install()
    command = "tagger finalize" if finalize_only else "tagger tag"
    try:
        return _execute(config, stop, finalize_only, command)
    except Interrupted as exc:  # a stop that arrived while an outcome was being reported
        return _fail(EXIT_INTERRUPTED, f"interrupted: {exc}; committed shards are kept, the same command resumes", command)
    finally:
        stop.restore()


# Set once a tag or finalize job ran in this process: jobs.cli.main then ends the process with os._exit,
# so that no native thread (oneDNN/OpenMP pools, s3fs's event loop) can turn the exit code into 134.
RAN = False


def _execute(config, stop, finalize_only: bool, command: str) -> int:
    import time

    from tagger.model.bundle import BundleError
    from tagger.tag.incremental import SinceError
    from tagger.tag.lease import LeaseHeld, LeaseLost
    from tagger.data.manifest import ManifestError
    from tagger.data.reader import StorageUnavailable
    from tagger.model.settings import RuntimeSettingError
    from tagger.tag.runner import (EXIT_CRASH, EXIT_INTERRUPTED, EXIT_INVALID_INPUT, EXIT_PARTITION_BUSY, EXIT_STORAGE,
                               Interrupted, NonFiniteScores, PlanMismatch, TagRunner, WorkerFailure)
    from tagger.storage import OutputLocationError, StorageConfigError, describe_unavailable, is_permanent, is_unavailable
    from tagger.tag.ray import RayEngineError  # the exception only: ray itself is imported on the ray branch

    runner = TagRunner(config, stop)

    def fail(code: int, message: str, command: str) -> int:
        # A re-run that replaces a complete date says that date's output is still there (summary line of exit 3 too).
        return _fail(code, message + runner.kept_note(), command)

    try:
        if finalize_only:
            from tagger.storage import check_output_location

            check_output_location(config.out, config.storage_options)
            plan = runner.partition.read_plan()
            if plan is None:
                raise PlanMismatch(
                    f"{config.out}: no run of {config.run_date} to finalize (no plan in {runner.partition.state}); "
                    "finalize commits a date started by `tagger tag --plan-only`: check --out and --run-date")
            result = runner.finalize(plan, time.time())
        else:
            result = runner.run()
    except (ManifestError, BundleError, PlanMismatch, SinceError, OutputLocationError, StorageConfigError, RuntimeSettingError) as exc:
        return fail(EXIT_INVALID_INPUT, f"invalid input: {exc}", command)
    except LeaseHeld as exc:
        return fail(EXIT_PARTITION_BUSY, f"partition busy: {exc}", command)
    except LeaseLost as exc:
        return fail(EXIT_PARTITION_BUSY, f"partition lost: {exc}. Committed shards are kept; no _SUCCESS written by this run", command)
    except RayEngineError as exc:
        return fail(EXIT_CRASH, f"failed: {exc}", command)
    except NonFiniteScores as exc:
        return fail(EXIT_CRASH, f"failed: {exc}", command)
    except Interrupted as exc:
        return fail(EXIT_INTERRUPTED, f"interrupted: {exc}; committed shards are kept, the same command resumes, no _SUCCESS written", command)
    except StorageUnavailable as exc:
        return fail(EXIT_STORAGE, f"storage unavailable: {exc}", command)
    except WorkerFailure as exc:
        return fail(EXIT_CRASH, f"failed: {exc}", command)
    except FileNotFoundError as exc:
        return fail(EXIT_CRASH, f"failed: {exc}", command)
    except Exception as exc:
        if is_permanent(exc):  # a storage setting or name that no retry can fix: an input error, not an outage
            # One line: botocore's validation messages span several (and quote their regexes).
            return fail(EXIT_INVALID_INPUT, f"invalid input: storage configuration: {type(exc).__name__}: {' '.join(str(exc).split())}",
                        command)
        if is_unavailable(exc):  # e.g. the manifest, the bundle or an output file on a store that is down
            return fail(EXIT_STORAGE, f"storage unavailable: {describe_unavailable(exc)}. Committed shards are kept; "
                                      "running the same command again resumes", command)
        log.exception("the run failed")
        return fail(EXIT_CRASH, f"failed: {type(exc).__name__}: {exc}", command)
    click.echo(result.summary_line, err=True)
    return result.exit_code


def _fail(code: int, message: str, command: str = "tagger tag") -> int:
    click.echo(f"{command}: {message}", err=True)
    return code
