"""Fashion Tagger, nightly, as an Airflow 3 DAG: plan -> N mapped shard tasks -> finalize.

    plan       tagger tag --catalog C --model M --out O --run-date D [--since O] --plan-only
    tag_shard  tagger tag ... --shard I/N          (dynamically mapped: one task per I = 0..N-1)
    finalize   tagger finalize --out O --run-date D

``--run-date`` is the run's logical date (UTC; with the nightly cron schedule below that is the night the
run belongs to, so re-running or backfilling a night rewrites exactly that night's partition). With
``incremental`` on (the default), ``--since O`` reuses the tags of products whose image did not change from
the latest complete partition before that date; the first night simply tags everything.

Exit codes of ``tagger`` decide what Airflow does (README, "Exit codes"):

    2 (invalid input), 3 (too many error rows)  -> AirflowFailException: fail now, never retried
    4 (storage down), 143 (SIGTERM/SIGINT)      -> retried with exponential back-off; committed shards are
                                                   kept and the same command resumes
    5 (another live run owns the date)          -> retried the same way: by then that run has ended, or its
                                                   lease has expired and is taken over
    anything else (1: crash, killed by a signal) -> retried the same way (a worker killed by the OOM killer
                                                   may pass next time; a bug fails after the last retry)

On an execution timeout, or when Airflow stops the task, the ``tagger`` process group gets SIGTERM (it
stops at the next batch and keeps its committed shards), then SIGKILL after a grace period.

Configuration, first match wins: the run's params (Trigger DAG w/ config), an Airflow Variable
``fashion_tagger_<name>``, an environment variable ``FASHION_TAGGER_<NAME>`` of the worker, the default
below. The plan task resolves it once and hands it to the shard and finalize tasks, so a Variable edited
mid-run cannot give the shard tasks another plan.
"""

from __future__ import annotations

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
from typing import Any

import pendulum
from airflow.sdk import CronTriggerTimetable, Param, Variable, dag, task

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


# Built-in defaults: this repository's demo catalog and shipped model (`make tag`), so the example runs as
# shipped (older checkouts generate the demo into data/demo and models/demo).
DEFAULTS: dict[str, Any] = {
    "catalog": _repo_path("demo/catalog.csv", "data/demo/catalog.csv"),
    "model": _repo_path("models/fashion-lite0", "models/demo"),
    "out": str(REPO / "out/airflow"),
    "tagger": shutil.which("tagger") or str(REPO / ".venv/bin/tagger"),
    "num_shards": 4,
    "shard_size": None,  # None: the tagger's default (10,000 rows per committed shard)
    "incremental": True,
    "max_error_rate": None,  # None: the tagger's default (0.05)
    "extra_args": "",  # e.g. "--device cuda --batch-size 256 --workers 8"
}

NO_RETRY_EXIT_CODES = {2: "invalid input", 3: "more error rows than --max-error-rate"}
RETRY_EXIT_CODES = {4: "storage unavailable", 5: "partition busy: another run owns the date",
                    143: "stopped by SIGTERM/SIGINT"}
STOP_GRACE_SECONDS = float(os.environ.get("FASHION_TAGGER_STOP_GRACE_SECONDS", "60"))


def _minutes(name: str, default: int) -> timedelta:
    return timedelta(minutes=float(os.environ.get(name, default)))


# Operator attributes are fixed when the DAG is parsed: set them through the DAG processor's environment.
SCHEDULE = os.environ.get("FASHION_TAGGER_SCHEDULE", "0 2 * * *")  # 02:00 UTC every night
TASK_DEFAULTS = {
    "retries": int(os.environ.get("FASHION_TAGGER_RETRIES", "4")),
    "retry_delay": _minutes("FASHION_TAGGER_RETRY_DELAY_MINUTES", 2),
    "retry_exponential_backoff": 2.0,  # 2, 4, 8, 16 minutes ...
    "max_retry_delay": _minutes("FASHION_TAGGER_MAX_RETRY_DELAY_MINUTES", 60),
}
PLAN_TIMEOUT = _minutes("FASHION_TAGGER_PLAN_TIMEOUT_MINUTES", 30)
SHARD_TIMEOUT = _minutes("FASHION_TAGGER_SHARD_TIMEOUT_MINUTES", 240)
FINALIZE_TIMEOUT = _minutes("FASHION_TAGGER_FINALIZE_TIMEOUT_MINUTES", 15)


def _setting(name: str, params: dict[str, Any]) -> Any:
    value = params.get(name)
    if value is None:
        value = Variable.get(f"fashion_tagger_{name}", default=None)
    if value is None:
        value = os.environ.get(f"FASHION_TAGGER_{name.upper()}")
    if value is None or value == "":
        value = DEFAULTS[name]
    return value


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in {"1", "true", "yes", "on"}
    return bool(value)


def resolve_config(params: dict[str, Any], run_date: str) -> dict[str, Any]:
    """Everything the three tasks need, resolved once (by the plan task) into plain JSON for XCom."""
    config = {name: _setting(name, params) for name in DEFAULTS}
    config["num_shards"] = int(config["num_shards"])
    if config["num_shards"] < 1:
        raise AirflowFailException(f"num_shards must be at least 1, got {config['num_shards']}")
    config["incremental"] = _as_bool(config["incremental"])
    config["run_date"] = run_date
    return config


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
    default_args=TASK_DEFAULTS,
    tags=["fashion-tagger"],
    doc_md=__doc__,
    params={
        "catalog": Param(None, type=["null", "string"], description="Catalog manifest, local or s3://"),
        "model": Param(None, type=["null", "string"], description="Model bundle folder, local or s3://"),
        "out": Param(None, type=["null", "string"], description="Output root, local or s3://"),
        "num_shards": Param(None, type=["null", "integer"], minimum=1, description="Mapped shard tasks (N)"),
        "shard_size": Param(None, type=["null", "integer"], minimum=1, description="Rows per committed shard"),
        "incremental": Param(None, type=["null", "boolean"], description="--since OUT (reuse unchanged images)"),
        "max_error_rate": Param(None, type=["null", "number"], minimum=0, maximum=1),
        "extra_args": Param(None, type=["null", "string"], description="More `tagger tag` options"),
        "tagger": Param(None, type=["null", "string"], description="The tagger executable"),
    },
)
def fashion_tagger():
    @task(execution_timeout=PLAN_TIMEOUT)
    def plan(**context) -> list[dict[str, Any]]:
        """Start the date's run (--plan-only) and return one set of arguments per shard task."""
        config = resolve_config(context["params"], _run_date(context))
        run_tagger(config["tagger"], [*tag_args(config), "--plan-only"])
        n = config["num_shards"]
        return [{"config": config, "shard": f"{i}/{n}"} for i in range(n)]

    @task(execution_timeout=SHARD_TIMEOUT)
    def tag_shard(config: dict[str, Any], shard: str) -> str:
        run_tagger(config["tagger"], [*tag_args(config), "--shard", shard])
        return shard

    @task(execution_timeout=FINALIZE_TIMEOUT)
    def finalize(planned: list[dict[str, Any]]) -> str:
        config = planned[0]["config"]
        args = ["finalize", "--out", str(config["out"]), "--run-date", config["run_date"]]
        if config["max_error_rate"] not in (None, ""):
            args += ["--max-error-rate", str(float(config["max_error_rate"]))]
        run_tagger(config["tagger"], args)
        return f"{config['out']}/tags/run_date={config['run_date']}"

    planned = plan()
    tag_shard.expand_kwargs(planned) >> finalize(planned)


fashion_tagger_dag = fashion_tagger()
