"""``tagger report``: the morning report of a run date. Options -> ReportConfig -> build_report; exit codes."""

from __future__ import annotations

import logging
import sys

import click

from tagger.report.config import EXIT_THRESHOLD

from .options import FiniteFloatRange, parse_storage_options, storage_option

log = logging.getLogger("tagger.report")


def _truth_columns(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for item in values:
        attribute, sep, column = item.partition("=")
        if not sep or not attribute.strip() or not column.strip():
            raise click.BadParameter(f"expected ATTRIBUTE=COLUMN, such as baseColour=colour, got {item!r}")
        mapping[attribute.strip()] = column.strip()
    return mapping


# Options `tagger tag --report` shares with the tag job itself under the same name: there the tag's own are used
# (its catalog, id column and format are the report's defaults anyway; its --max-error-rate is the exit-3 gate).
SHARED_WITH_TAG = ("--catalog", "--catalog-format", "--id-column", "--max-error-rate")


def threshold_options(function, *, skip: tuple[str, ...] = ()):
    """The alerting options: a crossed one exits 6 (after everything is written)."""
    for name, kind, text in reversed([
        ("--max-drift", FiniteFloatRange(0.0, 1.0), "Crossed (report: exit 6) when an attribute's label mix moved further than this Jensen-Shannon "
         "distance (0..1) and past its noise floor."),
        ("--max-psi", FiniteFloatRange(0.0), "Exit 6 when an attribute's population stability index exceeds this (0.25: a real shift) and "
         "its noise floor."),
        ("--min-agreement", FiniteFloatRange(0.0, 1.0), "Exit 6 when an attribute agrees with the catalog's labels on a smaller "
         "share of its labelled rows."),
        ("--max-review-share", FiniteFloatRange(0.0, 1.0), "Exit 6 when a larger share of tonight's tags of an attribute score "
         "under its review threshold."),
        ("--max-error-rate", FiniteFloatRange(0.0, 1.0), "Exit 6 when a larger share of the manifest's rows ended as errors."),
        ("--max-rows-change", FiniteFloatRange(0.0), "Exit 6 when the manifest's rows changed by more than this share from the "
         "night before (0.2: 20 % fewer or more)."),
    ]):
        if name not in skip:
            function = click.option(name, type=kind, default=None, help=text)(function)
    return function


def report_options(function=None, *, within_tag: bool = False):
    """The report's options, in the order --help shows them: what to compare, where the catalog's labels are,
    what to show, then the thresholds. ``within_tag``: the same declarations on `tagger tag` (for --report), less
    the ones the tag job has of its own (:data:`SHARED_WITH_TAG`)."""
    if function is None:
        return lambda f: report_options(f, within_tag=within_tag)
    skip = SHARED_WITH_TAG if within_tag else ()
    function = threshold_options(function, skip=skip)
    function = click.option("--gallery", type=click.IntRange(min=0), default=24, show_default=True,
                            help="Products of the top disagreements shown with their thumbnail on the page.")(function)
    function = click.option("--max-disagreements", type=click.IntRange(min=0), default=10_000, show_default=True,
                            help="Rows of disagreements.parquet, the most confident first (report.json counts them all).")(function)
    function = click.option("--truth-column", "truth_columns", multiple=True, metavar="ATTRIBUTE=COLUMN", callback=_truth_columns,
                            help="The catalog column holding its own label of an attribute, repeatable. Default: the "
                            "catalog's columns named like the bundle's attributes.")(function)
    if not within_tag:
        function = click.option("--id-column", default=None, help="The catalog's product-id column (default: the tag run's, "
                                "else product_id).")(function)
        function = click.option("--catalog-format", type=click.Choice(["csv", "parquet", "jsonl"]), default=None,
                                help="Override the format guessed from the catalog's name.")(function)
        function = click.option("--catalog", default=None, help="Read the catalog's labels from this manifest (joined by "
                                "product id) instead of the one the run's plan names.")(function)
    return click.option("--previous", default=None, metavar="YYYY-MM-DD", help="Compare with this run date instead of "
                        "the latest complete one before --run-date.")(function)


@click.command("report")
@click.option("--out", required=True, envvar="TAGGER_OUT", help="The tag job's output root, local folder or s3://bucket/prefix.")
@click.option("--run-date", default=None, show_default="today, UTC", help="The night to report on: run_date=YYYY-MM-DD.")
@report_options
@storage_option
def report(out: str, run_date: str | None, storage_options: tuple[str, ...], **options) -> None:
    """The morning report of a run date, under OUT/_reports/run_date=D/: report.html (one self-contained page),
    report.json (every figure) and Parquet tables label_mix, drift, agreement, confusions, disagreements.

    Exit codes: 0 written; 6 written, and a threshold (--max-drift, --min-agreement, ...) was crossed (one line
    names it); 2 invalid input (no complete partition for the date, a truth column the catalog lacks, bad option);
    4 storage unavailable; 1 any other failure.
    """
    from tagger.tag.config import today_utc

    _lean_arrow_pool()
    sys.exit(execute(report_config(out, run_date or today_utc(), parse_storage_options(storage_options), options)))


# The keyword names of report_options(within_tag=True): what `tagger tag` hands on to its report.
TAG_REPORT_OPTIONS = ("previous", "gallery", "max_disagreements", "truth_columns", "max_drift", "max_psi", "min_agreement",
                      "max_review_share", "max_rows_change")


def report_config(out: str, run_date: str, storage_options: dict, options: dict):
    """The parsed options of :func:`report_options` -> a ReportConfig (a bad combination: a usage error)."""
    from tagger.report.config import ReportConfig, Thresholds

    options = dict(options)
    limits = {k: options.pop(k) for k in list(options) if k.startswith(("max_", "min_")) and k != "max_disagreements"}
    try:
        return ReportConfig(out=out, run_date=run_date, storage_options=storage_options, thresholds=Thresholds(**limits),
                            **options)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def _lean_arrow_pool() -> None:
    """jemalloc for Arrow in this process: with mimalloc (Arrow's default) what a night's batches used stays in
    its arenas, and the peak grows with the night (bench/nightly_report.py measured it); jemalloc gives it back."""
    import pyarrow as pa

    try:
        pa.set_memory_pool(pa.jemalloc_memory_pool())
    except NotImplementedError:  # an Arrow built without jemalloc: the default pool, a little more memory
        pass


def execute(config, *, prefix: str = "tagger report") -> int:
    """Build and write the report; every outcome is an exit code and one line on stderr."""
    from tagger.data.manifest import ManifestError
    from tagger.data.reader import StorageUnavailable
    from tagger.report import ReportError
    from tagger.report.build import build_report
    from tagger.storage import OutputLocationError, StorageConfigError, is_permanent, is_unavailable

    try:
        result = build_report(config)
    except (ReportError, ManifestError, StorageConfigError, OutputLocationError) as exc:
        click.echo(f"{prefix}: invalid input: {exc}", err=True)
        return 2
    except PermissionError as exc:  # e.g. a read-only file system, or a folder made read-only during the run
        click.echo(f"{prefix}: invalid input: cannot write the report under {config.folder}: {exc}; choose another "
                   "--out or fix its permissions", err=True)
        return 2
    except StorageUnavailable as exc:
        click.echo(f"{prefix}: storage unavailable: {exc}", err=True)
        return 4
    except Exception as exc:
        if is_permanent(exc):
            click.echo(f"{prefix}: invalid input: storage configuration: {type(exc).__name__}: {exc}", err=True)
            return 2
        if is_unavailable(exc):
            click.echo(f"{prefix}: storage unavailable: {type(exc).__name__}: {exc}; run it again later", err=True)
            return 4
        log.exception("the report failed")
        click.echo(f"{prefix}: failed: {type(exc).__name__}: {exc}", err=True)
        return 1
    click.echo(f"report: {result.page}", err=True)
    verdict = result.report.get("verdict")
    if verdict and not verdict["checks"]:
        why = ("the night has no rows: a header-only manifest" if not result.report["counts"]["rows"]
               else "no expectation from the bundle, no night before")
        click.echo(f"{prefix}: verdict: nothing to check ({why})", err=True)
    elif verdict:
        said = "; ".join(f"{c['check']} {c['figure']}, expected {c['expected']}" for c in verdict["not_ok"][:4])
        more = f" (+{len(verdict['not_ok']) - 4} more)" if len(verdict["not_ok"]) > 4 else ""
        click.echo(f"{prefix}: verdict {verdict['status'].upper()}" + (f": {said}{more}" if said else
                   f" ({len(verdict['checks'])} checks)"), err=True)
    if result.crossed:
        click.echo(f"{prefix}: threshold crossed: {'; '.join(result.crossed)}", err=True)
        return EXIT_THRESHOLD
    return 0
