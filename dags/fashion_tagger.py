"""Fashion Tagger, nightly, as an Airflow 3 DAG: plan -> N mapped shard tasks -> finalize -> report.

    plan       tagger tag --catalog C --model M --out O --run-date D [--since O] --plan-only
    tag_shard  tagger tag ... --shard I/N --threads T --workers W   (mapped: one task per I = 0..N-1, in a pool)
    finalize   tagger finalize --out O --run-date D                 (outlet: the Asset ``fashion_tagger_tags``)
    report     tagger report --out O --run-date D [--max-drift X --min-agreement Y --max-review-share Z]

``--run-date`` is the run's logical date (UTC; with the nightly cron schedule below that is the night the
run belongs to, so re-running or backfilling a night rewrites exactly that night's partition). With
``incremental`` on (the default), ``--since O`` reuses the tags of products whose image did not change from
the latest complete partition before that date; the first night simply tags everything. The catalog
location is a template: ``s3://feed/{{ ds }}/catalog.parquet`` reads each night's own file.

Exit codes of ``tagger`` decide what Airflow does (docs/reference/exit-codes.md):

    2 (invalid input), 3 (too many error rows),  -> AirflowFailException: fail now, never retried
    6 (report: a quality threshold crossed)
    4 (storage down), 143 (SIGTERM/SIGINT)       -> retried with exponential back-off; committed shards are
                                                    kept and the same command resumes
    5 (another live run owns the date)           -> retried the same way: by then that run has ended, or its
                                                    lease has expired and is taken over
    anything else (1: crash, killed by a signal)  -> retried the same way (a worker killed by the OOM killer
                                                    may pass next time; a bug fails after the last retry)

On an execution timeout, or when Airflow stops the task, the ``tagger`` process group gets SIGTERM (it
stops at the next batch and keeps its committed shards), then SIGKILL after a grace period.

Configuration, first match wins: the run's params (Trigger DAG w/ config), an Airflow Variable
``fashion_tagger_<name>``, an environment variable ``FASHION_TAGGER_<NAME>`` of the worker, the default
below. ``catalog``, ``model`` and ``out`` have no default: unconfigured, the plan task fails and names the
Variables to set (``demo`` = true tags this repository's demo catalog into out/airflow instead). The plan
task resolves the configuration once and hands it to the other tasks, so a Variable edited mid-run cannot
give the shard tasks another plan; only the ``tagger`` executable is looked up where each task runs.
"""

from __future__ import annotations

import importlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections import deque
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import jinja2
import jinja2.sandbox
import pendulum
from airflow.sdk import Asset, CronTriggerTimetable, Param, Variable, dag, task

try:  # Airflow 3 Task SDK
    from airflow.sdk.exceptions import AirflowException, AirflowFailException
except ImportError:  # pragma: no cover - older layouts
    from airflow.exceptions import AirflowException, AirflowFailException

log = logging.getLogger(__name__)

DAG_ID = "fashion_tagger"
REPO = Path(__file__).resolve().parents[1]


def _repo_path(*candidates: str) -> str:
    """The first of `candidates` (relative to this repository) that exists, else the first."""
    return str(next((REPO / c for c in candidates if (REPO / c).exists()), REPO / candidates[0]))


REQUIRED = ("catalog", "model", "out")
# Used only when `demo` is asked for: this repository's demo catalog and shipped model (`make tag`). A deploy
# that forgot its Variables must fail, not tag the demo and report success.
DEMO: dict[str, Any] = {
    "catalog": lambda: _repo_path("demo/catalog.csv", "data/demo/catalog.csv"),
    "model": lambda: _repo_path("models/fashion-lite0", "models/demo"),
    "out": lambda: str(REPO / "out/airflow"),
}
DEFAULTS: dict[str, Any] = {
    "demo": False,
    "catalog": None,  # a template: {{ ds }} is the run date, e.g. s3://feed/{{ ds }}/catalog.parquet
    "model": None,
    "out": None,
    "num_shards": 4,
    "shard_size": None,  # None: the tagger's default (10,000 rows per committed shard)
    "incremental": True,
    "max_error_rate": None,  # None: the tagger's default (0.05)
    # Per shard task: the tagger's own defaults (one model thread per core, min(8, CPUs) decode workers) are
    # for a machine of its own; N shard tasks sharing one Airflow worker would each take every core.
    "threads": 2,
    "workers": 2,
    "extra_args": "",  # e.g. "--device cuda --batch-size 256 --workers 8" (wins over threads/workers)
    "report_max_drift": None,  # None: no threshold (the report is written, never fails the run)
    "report_min_agreement": None,
    "report_max_review_share": None,
    "report_args": "",  # more `tagger report` options, e.g. "--truth-column gender=gender"
}

NO_RETRY_EXIT_CODES = {2: "invalid input", 3: "more error rows than --max-error-rate",
                       6: "a report threshold was crossed"}
RETRY_EXIT_CODES = {4: "storage unavailable", 5: "partition busy: another run owns the date",
                    143: "stopped by SIGTERM/SIGINT"}
STOP_GRACE_SECONDS = float(os.environ.get("FASHION_TAGGER_STOP_GRACE_SECONDS", "60"))


def _minutes(name: str, default: int) -> timedelta:
    return timedelta(minutes=float(os.environ.get(name, default)))


def _callback(spec: str | None) -> Callable[[dict[str, Any]], None] | None:
    """`package.module:function` -> the function (FASHION_TAGGER_ON_FAILURE_CALLBACK); a wrong name is a DAG
    import error in the UI, not a silently missing alert."""
    if not spec:
        return None
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"FASHION_TAGGER_ON_FAILURE_CALLBACK={spec!r}: expected package.module:function")
    return getattr(importlib.import_module(module), name)


ON_FAILURE_HOOK = _callback(os.environ.get("FASHION_TAGGER_ON_FAILURE_CALLBACK"))


def on_failure(context: dict[str, Any]) -> None:
    """A task failed for good (after its last retry): log one line, then call the deployment's hook (paging,
    chat) with Airflow's context."""
    ti = context.get("ti") or context.get("task_instance")
    where = f"task {ti.task_id}" + (f"[{ti.map_index}]" if getattr(ti, "map_index", -1) >= 0 else "") if ti else "run"
    run = context.get("dag_run")
    log.error("fashion_tagger: %s failed (run %s): %s", where, getattr(run, "run_id", "?"),
              context.get("exception") or context.get("reason") or "see the task log")
    if ON_FAILURE_HOOK is not None:
        ON_FAILURE_HOOK(context)


def on_run_failure(context: dict[str, Any]) -> None:
    """The run failed: the hook hears of it once. A failed task has called it already; a run that failed for
    another reason (dagrun_timeout: its tasks are stopped, none of them fails on its own) calls it here."""
    if context.get("reason") != "task_failure":
        on_failure(context)


# Operator attributes are fixed when the DAG is parsed: set them through the DAG processor's environment.
SCHEDULE = os.environ.get("FASHION_TAGGER_SCHEDULE", "0 2 * * *")  # 02:00 UTC every night
TASK_DEFAULTS = {
    "retries": int(os.environ.get("FASHION_TAGGER_RETRIES", "4")),
    "retry_delay": _minutes("FASHION_TAGGER_RETRY_DELAY_MINUTES", 2),
    "retry_exponential_backoff": 2.0,  # 2, 4, 8, 16 minutes ...
    "max_retry_delay": _minutes("FASHION_TAGGER_MAX_RETRY_DELAY_MINUTES", 60),
    "on_failure_callback": on_failure,
}
PLAN_TIMEOUT = _minutes("FASHION_TAGGER_PLAN_TIMEOUT_MINUTES", 30)
SHARD_TIMEOUT = _minutes("FASHION_TAGGER_SHARD_TIMEOUT_MINUTES", 240)
FINALIZE_TIMEOUT = _minutes("FASHION_TAGGER_FINALIZE_TIMEOUT_MINUTES", 15)
REPORT_TIMEOUT = _minutes("FASHION_TAGGER_REPORT_TIMEOUT_MINUTES", 30)
# A night's run must end before the next night's may start (max_active_runs=1 queues it behind this one).
DAGRUN_TIMEOUT = _minutes("FASHION_TAGGER_DAGRUN_TIMEOUT_MINUTES", 22 * 60)
# The shard tasks' pool: how many run at once over all workers (`airflow pools set fashion_tagger 4 ...`);
# each takes about threads + workers cores. default_pool exists everywhere, so an unset pool never hangs.
SHARD_POOL = os.environ.get("FASHION_TAGGER_POOL", "default_pool")
SHARD_POOL_SLOTS = int(os.environ.get("FASHION_TAGGER_POOL_SLOTS", "1"))
# Downstream DAGs schedule on this Asset; each event's extra names the committed partition and run date.
TAGS_ASSET = Asset(os.environ.get("FASHION_TAGGER_ASSET", "fashion_tagger_tags"))


def _setting(name: str, params: dict[str, Any]) -> Any:
    value = params.get(name)
    if value is None:
        value = Variable.get(f"fashion_tagger_{name}", default=None)
    if value is None:
        value = os.environ.get(f"FASHION_TAGGER_{name.upper()}")
    if value is None or value == "":
        value = DEFAULTS.get(name)
    return value


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in {"1", "true", "yes", "on"}
    return bool(value)


def render(template: str, run_date: str, name: str) -> str:
    """`{{ ds }}` / `{{ ds_nodash }}` (the run date) in a setting; anything else undefined is an error."""
    env = jinja2.sandbox.SandboxedEnvironment(undefined=jinja2.StrictUndefined)
    try:
        return env.from_string(template).render(ds=run_date, ds_nodash=run_date.replace("-", ""), run_date=run_date)
    except jinja2.TemplateError as exc:
        raise AirflowFailException(f"the {name} setting {template!r} is not a valid template: {exc} "
                                   "(it may use {{ ds }} and {{ ds_nodash }}, the run date)") from exc


def resolve_config(params: dict[str, Any], run_date: str) -> dict[str, Any]:
    """Everything the tasks need, resolved once (by the plan task) into plain JSON for XCom."""
    config = {name: _setting(name, params) for name in DEFAULTS}
    config["demo"] = _as_bool(config["demo"])
    missing = [name for name in REQUIRED if config[name] in (None, "")]
    if missing and config["demo"]:
        config.update({name: DEMO[name]() for name in missing})
    elif missing:
        names = ", ".join(f"fashion_tagger_{name}" for name in missing)
        raise AirflowFailException(
            f"fashion_tagger is not configured: set the Airflow Variables {names} (e.g. `airflow variables set "
            f"fashion_tagger_catalog 's3://feed/{{{{ ds }}}}/catalog.parquet'`), or pass {', '.join(missing)} "
            f"as the run's params, or set FASHION_TAGGER_{missing[0].upper()}... on the workers; to tag this "
            "repository's demo catalog into out/airflow instead, set the Variable fashion_tagger_demo to true")
    config["catalog"] = render(str(config["catalog"]), run_date, "catalog")
    for name in ("num_shards", "threads", "workers"):
        config[name] = int(config[name])
    if config["num_shards"] < 1:
        raise AirflowFailException(f"num_shards must be at least 1, got {config['num_shards']}")
    if config["threads"] < 0 or config["workers"] < 0:
        raise AirflowFailException(f"threads and workers must be at least 0, got {config['threads']} and "
                                   f"{config['workers']} (threads 0: one per core; workers 0: decode in the task)")
    config["incremental"] = _as_bool(config["incremental"])
    config["run_date"] = run_date
    return config


def tagger_executable(params: dict[str, Any]) -> str:
    """The `tagger` to run, looked up on the machine where the task runs (workers may differ from the plan's)."""
    return str(_setting("tagger", params) or shutil.which("tagger") or REPO / ".venv/bin/tagger")


def tag_args(config: dict[str, Any]) -> list[str]:
    """The `tagger tag` arguments shared by the plan and every shard task (they must match: the plan's key)."""
    args = ["tag", "--catalog", str(config["catalog"]), "--model", str(config["model"]), "--out", str(config["out"]),
            "--run-date", config["run_date"], "--progress", "none"]
    if config["shard_size"] not in (None, ""):
        args += ["--shard-size", str(int(config["shard_size"]))]
    if config["max_error_rate"] not in (None, ""):
        args += ["--max-error-rate", str(float(config["max_error_rate"]))]
    if config["incremental"]:
        args += ["--since", str(config["out"])]
    return args + shlex.split(str(config["extra_args"] or ""))


def shard_args(config: dict[str, Any], shard: str) -> list[str]:
    """A shard task's command: the plan's arguments, the shard, and this task's share of the machine (threads
    and workers are not part of the plan's key; extra_args come last and win)."""
    args = tag_args(config)
    cut = len(args) - len(shlex.split(str(config["extra_args"] or "")))
    return [*args[:cut], "--shard", shard, "--threads", str(config["threads"]), "--workers", str(config["workers"]),
            *args[cut:]]


def report_args(config: dict[str, Any]) -> list[str]:
    args = ["report", "--out", str(config["out"]), "--run-date", config["run_date"]]
    for name, option in (("report_max_drift", "--max-drift"), ("report_min_agreement", "--min-agreement"),
                         ("report_max_review_share", "--max-review-share")):
        if config[name] not in (None, ""):
            args += [option, str(float(config[name]))]
    return args + shlex.split(str(config["report_args"] or ""))


def _stop(process: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the tagger's process group (it exits 143 keeping committed shards), SIGKILL after `grace`."""
    if process.poll() is not None:
        return
    log.warning("stopping tagger (pid %d): SIGTERM, SIGKILL after %.0f s", process.pid, grace)
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def run_tagger(executable: str, args: list[str], *, grace: float | None = None) -> None:
    """Run `executable args`, stream its output into the task log, map its exit code to Airflow's outcome."""
    command = [executable, *args]
    log.info("running: %s", shlex.join(command))
    started = time.monotonic()
    try:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   errors="replace", start_new_session=True)
    except OSError as exc:  # no such executable: a configuration error, retrying cannot help
        raise AirflowFailException(f"cannot run {executable!r}: {exc}; set the 'tagger' param, the "
                                   "fashion_tagger_tagger Variable or FASHION_TAGGER_TAGGER") from exc
    tail: deque[str] = deque(maxlen=5)
    try:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            log.info("%s", line)
        code = process.wait()
    except BaseException:  # execution timeout (AirflowTaskTimeout), task stopped, worker shutting down
        _stop(process, STOP_GRACE_SECONDS if grace is None else grace)
        raise
    seconds = time.monotonic() - started
    if code == 0:
        log.info("tagger exited 0 after %.1f s", seconds)
        return
    last = tail[-1] if tail else "(no output)"
    if code in NO_RETRY_EXIT_CODES:
        raise AirflowFailException(f"tagger exited {code} ({NO_RETRY_EXIT_CODES[code]}), not retried: {last}")
    reason = RETRY_EXIT_CODES.get(code) or (f"killed by signal {-code}" if code < 0 else "crash")
    raise AirflowException(f"tagger exited {code} ({reason}) after {seconds:.0f} s; will be retried: {last}")


def _run_date(context: dict[str, Any]) -> str:
    # Airflow 3: a manually triggered run may have no logical date; then the time it was triggered for.
    moment = context.get("logical_date") or context["dag_run"].run_after
    return pendulum.instance(moment).in_timezone("UTC").date().isoformat()


@dag(
    dag_id=DAG_ID,
    # A trigger timetable: the run at 02:00 UTC on 2026-11-27 has logical date 2026-11-27 -> that night's partition.
    schedule=CronTriggerTimetable(SCHEDULE, timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # one run per night at a time: two runs of one date must never write together
    dagrun_timeout=DAGRUN_TIMEOUT,
    on_failure_callback=on_run_failure,
    default_args=TASK_DEFAULTS,
    tags=["fashion-tagger"],
    doc_md=__doc__,
    params={
        "demo": Param(None, type=["null", "boolean"], description="Tag this repository's demo (catalog, model, out unset)"),
        "catalog": Param(None, type=["null", "string"],
                         description="Catalog manifest, local or s3://; {{ ds }} is the run date"),
        "model": Param(None, type=["null", "string"], description="Model bundle folder, local or s3://"),
        "out": Param(None, type=["null", "string"], description="Output root, local or s3://"),
        "num_shards": Param(None, type=["null", "integer"], minimum=1, description="Mapped shard tasks (N)"),
        "shard_size": Param(None, type=["null", "integer"], minimum=1, description="Rows per committed shard"),
        "incremental": Param(None, type=["null", "boolean"], description="--since OUT (reuse unchanged images)"),
        "max_error_rate": Param(None, type=["null", "number"], minimum=0, maximum=1),
        "threads": Param(None, type=["null", "integer"], minimum=0, description="Model threads per shard task"),
        "workers": Param(None, type=["null", "integer"], minimum=0, description="Decode processes per shard task"),
        "extra_args": Param(None, type=["null", "string"], description="More `tagger tag` options"),
        "report_max_drift": Param(None, type=["null", "number"], minimum=0, maximum=1),
        "report_min_agreement": Param(None, type=["null", "number"], minimum=0, maximum=1),
        "report_max_review_share": Param(None, type=["null", "number"], minimum=0, maximum=1),
        "report_args": Param(None, type=["null", "string"], description="More `tagger report` options"),
        "tagger": Param(None, type=["null", "string"], description="The tagger executable"),
    },
)
def fashion_tagger():
    @task(execution_timeout=PLAN_TIMEOUT)
    def plan(**context) -> list[dict[str, Any]]:
        """Start the date's run (--plan-only) and return one set of arguments per shard task."""
        config = resolve_config(context["params"], _run_date(context))
        run_tagger(tagger_executable(context["params"]), [*tag_args(config), "--plan-only"])
        n = config["num_shards"]
        return [{"config": config, "shard": f"{i}/{n}"} for i in range(n)]

    @task(execution_timeout=SHARD_TIMEOUT, pool=SHARD_POOL, pool_slots=SHARD_POOL_SLOTS)
    def tag_shard(config: dict[str, Any], shard: str, **context) -> str:
        run_tagger(tagger_executable(context["params"]), shard_args(config, shard))
        return shard

    @task(execution_timeout=FINALIZE_TIMEOUT, outlets=[TAGS_ASSET])
    def finalize(planned: list[dict[str, Any]], **context) -> str:
        config = planned[0]["config"]
        args = ["finalize", "--out", str(config["out"]), "--run-date", config["run_date"]]
        if config["max_error_rate"] not in (None, ""):
            args += ["--max-error-rate", str(float(config["max_error_rate"]))]
        run_tagger(tagger_executable(context["params"]), args)
        partition = f"{config['out']}/tags/run_date={config['run_date']}"
        context["outlet_events"][TAGS_ASSET].extra = {
            "run_date": config["run_date"], "out": str(config["out"]), "tags": partition,
            "errors": f"{config['out']}/errors/run_date={config['run_date']}"}
        return partition

    @task(execution_timeout=REPORT_TIMEOUT)
    def report(planned: list[dict[str, Any]], **context) -> str:
        """The night's quality report; a crossed threshold (exit 6) fails this task only, never retried: the
        tag partitions are committed by then and stay as they are."""
        config = planned[0]["config"]
        run_tagger(tagger_executable(context["params"]), report_args(config))
        return f"{config['out']}/_reports/run_date={config['run_date']}"

    planned = plan()
    tag_shard.expand_kwargs(planned) >> finalize(planned) >> report(planned)


fashion_tagger_dag = fashion_tagger()
