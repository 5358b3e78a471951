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

Where the tasks run (``FASHION_TAGGER_RUN_IN``, fixed when the DAG is parsed; the steps, arguments, pool,
Asset, timeouts and exit-code policy are the same three ways, because one class defines the steps):

    process     (default) ``tagger`` as a subprocess of the Airflow worker, which has the job installed
    kubernetes  each task a pod of the project's image (KubernetesPodOperator, provider cncf.kubernetes)
    docker      each task a container of the image on the worker's host (DockerOperator; podman's
                Docker-compatible socket serves it too)

Credentials come from Airflow, never from the command line: ``aws_conn_id`` names an Airflow Connection
whose keys (and region, endpoint) the task hands to ``tagger`` as AWS_* environment variables, and
``cdn_conn_id`` one whose host(s) and headers become TAGGER_ALLOW_HOSTS and TAGGER_HTTP_HEADERS. Each task
reads them when it runs (they never pass through XCom) and masks them in its log.
"""

from __future__ import annotations

import importlib
import json
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
from airflow.sdk import DAG, Asset, BaseOperator, Connection, CronTriggerTimetable, Param, Variable
from airflow.sdk.log import mask_secret

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
    # Airflow Connections handed to the tagger as its environment (never arguments, never XCom):
    "aws_conn_id": None,  # login/password: AWS keys; extra: aws_session_token, region_name, endpoint_url
    "cdn_conn_id": None,  # host (or extra allow_hosts): the CDN's host(s); extra headers: {"Name": "value"}
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


def raise_for_exit(code: int, seconds: float, last: str, what: str = "tagger") -> None:
    """The exit-code policy of every step, wherever it ran (process, pod, container): 0 returns; 2, 3, 6 fail
    at once, never retried; 4, 5, 143 and anything else are retried (AirflowException)."""
    if code == 0:
        log.info("%s exited 0 after %.1f s", what, seconds)
        return
    if code in NO_RETRY_EXIT_CODES:
        raise AirflowFailException(f"{what} exited {code} ({NO_RETRY_EXIT_CODES[code]}), not retried: {last}")
    reason = RETRY_EXIT_CODES.get(code) or (f"killed by signal {-code}" if code < 0 else "crash")
    raise AirflowException(f"{what} exited {code} ({reason}) after {seconds:.0f} s; will be retried: {last}")


def run_tagger(executable: str, args: list[str], *, grace: float | None = None, env: dict[str, str] | None = None) -> None:
    """Run `executable args`, stream its output into the task log, map its exit code to Airflow's outcome.
    `env`: added to the worker's environment (credentials: never on the command line, which `ps` shows)."""
    command = [executable, *args]
    log.info("running: %s", shlex.join(command))
    started = time.monotonic()
    try:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   errors="replace", start_new_session=True,
                                   env={**os.environ, **env} if env else None)
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
    raise_for_exit(code, time.monotonic() - started, tail[-1] if tail else "(no output)")


# -- credentials from Airflow -------------------------------------------------------------------------------
# The keys of an AWS Connection this DAG hands over. Others (role_arn, profile_name, ...) would need the
# amazon provider's session machinery: refused by name rather than ignored, so that a night never runs
# under other credentials than the Connection meant.
AWS_EXTRA_ENV = {"aws_session_token": "AWS_SESSION_TOKEN", "region_name": "AWS_DEFAULT_REGION",
                 "endpoint_url": "AWS_ENDPOINT_URL"}
CDN_EXTRA = {"allow_hosts", "headers", "allow_private_addresses", "allow_plain_http"}


def _connection(conn_id: str, what: str) -> Any:
    try:
        return Connection.get(conn_id)
    except Exception as exc:  # the SDK's own "not found" error differs between releases
        raise AirflowFailException(f"the {what} Connection {conn_id!r} cannot be read ({type(exc).__name__}: {exc}); "
                                   f"create it (`airflow connections add {conn_id} ...`) or unset {what}") from exc


def aws_environment(conn_id: str) -> dict[str, str]:
    """An AWS Connection -> AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (login, password) and, from its extra,
    AWS_SESSION_TOKEN, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL: what botocore's standard chain reads in the job."""
    conn = _connection(conn_id, "aws_conn_id")
    extra = conn.extra_dejson or {}
    unknown = sorted(set(extra) - set(AWS_EXTRA_ENV))
    if unknown:
        raise AirflowFailException(f"aws_conn_id {conn_id!r}: extra {', '.join(unknown)} is not handed to the job "
                                   f"(only {', '.join(AWS_EXTRA_ENV)}); give the keys, or let the pod's or worker's "
                                   "own role act (IRSA, instance profile) and unset aws_conn_id")
    if bool(conn.login) != bool(conn.password):
        raise AirflowFailException(f"aws_conn_id {conn_id!r}: set both login (access key id) and password (secret key)")
    env = {"AWS_ACCESS_KEY_ID": conn.login, "AWS_SECRET_ACCESS_KEY": conn.password} if conn.login else {}
    env.update({name: str(extra[key]) for key, name in AWS_EXTRA_ENV.items() if extra.get(key)})
    return env


def cdn_environment(conn_id: str) -> dict[str, str]:
    """A CDN Connection -> TAGGER_ALLOW_HOSTS (its host, or extra allow_hosts), TAGGER_HTTP_HEADERS (extra
    headers, e.g. an Authorization header), TAGGER_ALLOW_PRIVATE_ADDRESSES / TAGGER_ALLOW_PLAIN_HTTP."""
    conn = _connection(conn_id, "cdn_conn_id")
    extra = conn.extra_dejson or {}
    unknown = sorted(set(extra) - CDN_EXTRA)
    if unknown:
        raise AirflowFailException(f"cdn_conn_id {conn_id!r}: unknown extra {', '.join(unknown)} "
                                   f"(known: {', '.join(sorted(CDN_EXTRA))})")
    # The Connection's port is part of what is allowed: --allow-host without one allows the default port only.
    hosts = extra.get("allow_hosts") or (f"{conn.host}:{conn.port}" if conn.host and conn.port else conn.host)
    if not hosts:
        raise AirflowFailException(f"cdn_conn_id {conn_id!r}: no host (set the Connection's host, or extra allow_hosts)")
    env = {"TAGGER_ALLOW_HOSTS": " ".join(hosts) if isinstance(hosts, list) else str(hosts)}
    headers = extra.get("headers")
    if headers:
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            raise AirflowFailException(f"cdn_conn_id {conn_id!r}: extra headers must be an object of strings")
        env["TAGGER_HTTP_HEADERS"] = json.dumps(headers)
    for key, name in (("allow_private_addresses", "TAGGER_ALLOW_PRIVATE_ADDRESSES"),
                      ("allow_plain_http", "TAGGER_ALLOW_PLAIN_HTTP")):
        if _as_bool(extra.get(key, False)):
            env[name] = "1"
    return env


SECRET_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "TAGGER_HTTP_HEADERS"}


def tagger_environment(config: dict[str, Any]) -> dict[str, str]:
    """The credentials a step hands to `tagger`, read from Airflow when the step runs and masked in its log."""
    env: dict[str, str] = {}
    if config.get("aws_conn_id"):
        env.update(aws_environment(str(config["aws_conn_id"])))
    if config.get("cdn_conn_id"):
        env.update(cdn_environment(str(config["cdn_conn_id"])))
    for name, value in env.items():
        if name in SECRET_ENV:
            mask_secret(value, name)
    for header in json.loads(env.get("TAGGER_HTTP_HEADERS", "{}")).values():
        mask_secret(header)
    if env:
        log.info("tagger environment from Airflow Connections: %s", ", ".join(sorted(env)))
    return env


def _run_date(context: dict[str, Any]) -> str:
    # Airflow 3: a manually triggered run may have no logical date; then the time it was triggered for.
    moment = context.get("logical_date") or context["dag_run"].run_after
    return pendulum.instance(moment).in_timezone("UTC").date().isoformat()


# -- the four steps, defined once; where they run is a subclass -----------------------------------------------
RUN_IN = os.environ.get("FASHION_TAGGER_RUN_IN", "process")
RUN_IN_CHOICES = ("process", "kubernetes", "docker")
if RUN_IN not in RUN_IN_CHOICES:
    raise ValueError(f"FASHION_TAGGER_RUN_IN={RUN_IN!r}: expected one of {', '.join(RUN_IN_CHOICES)}")
# The project's image (`make image`, pushed to your registry); its entry point is `tagger`.
IMAGE = os.environ.get("FASHION_TAGGER_IMAGE", "localhost/fashion-tagger:latest")


def step_args(step: str, config: dict[str, Any], shard: str | None = None) -> list[str]:
    """The `tagger` arguments of a step, the same wherever it runs."""
    if step == "plan":
        return [*tag_args(config), "--plan-only"]
    if step == "shard":
        return shard_args(config, str(shard))
    if step == "finalize":
        args = ["finalize", "--out", str(config["out"]), "--run-date", config["run_date"]]
        if config["max_error_rate"] not in (None, ""):
            args += ["--max-error-rate", str(float(config["max_error_rate"]))]
        return args
    if step == "report":
        return report_args(config)
    raise ValueError(f"unknown step {step!r}")


class TaggerStep(BaseOperator):
    """One step of the night (plan, shard, finalize, report) as an operator: the configuration resolved once by
    the plan and handed on by XCom, the step's arguments, the credentials read from Airflow when it runs, what
    it returns and the Asset event. ``run_step`` (the subclass) runs `tagger` and applies :func:`raise_for_exit`."""

    def __init__(self, *, step: str, planned: list[dict[str, Any]] | None = None, config: dict[str, Any] | None = None,
                 shard: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.step, self.planned, self.config, self.shard = step, planned, config, shard

    def step_config(self, context: dict[str, Any]) -> dict[str, Any]:
        if self.step == "plan":
            return resolve_config(context["params"], _run_date(context))
        if self.step == "shard":
            return self.config
        return self.planned[0]["config"]

    def execute(self, context: dict[str, Any]) -> Any:
        config = self.step_config(context)
        self.run_step(step_args(self.step, config, self.shard), tagger_environment(config), config, context)
        if self.step == "plan":
            n = config["num_shards"]
            return [{"config": config, "shard": f"{i}/{n}"} for i in range(n)]
        if self.step == "shard":
            return self.shard
        if self.step == "finalize":
            partition = f"{config['out']}/tags/run_date={config['run_date']}"
            context["outlet_events"][TAGS_ASSET].extra = {
                "run_date": config["run_date"], "out": str(config["out"]), "tags": partition,
                "errors": f"{config['out']}/errors/run_date={config['run_date']}"}
            return partition
        return f"{config['out']}/_reports/run_date={config['run_date']}"

    def run_step(self, args: list[str], env: dict[str, str], config: dict[str, Any], context: dict[str, Any]) -> None:
        raise NotImplementedError


class TaggerProcess(TaggerStep):
    """`tagger` as a subprocess of the worker (the job installed there)."""

    template_fields = ("planned",)

    def run_step(self, args, env, config, context):
        run_tagger(tagger_executable(context["params"]), args, env=env)


def _pod_operator() -> type:
    """KubernetesPodOperator, subclassed: the step's arguments and credentials set when it runs (so that they
    are not rendered templates stored in the metadata database), resources from the step's share of a machine,
    and the container's exit code through the DAG's policy instead of the provider's plain failure."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import models as k8s

    class TaggerPod(TaggerStep, KubernetesPodOperator):
        template_fields = (*KubernetesPodOperator.template_fields, "planned")

        def __init__(self, **kwargs: Any) -> None:
            defaults = dict(
                image=IMAGE, namespace=os.environ.get("FASHION_TAGGER_NAMESPACE", "default"),
                name=f"fashion-tagger-{kwargs['step']}", random_name_suffix=True,
                service_account_name=os.environ.get("FASHION_TAGGER_SERVICE_ACCOUNT") or None,
                kubernetes_conn_id=os.environ.get("FASHION_TAGGER_KUBERNETES_CONN_ID", "kubernetes_default"),
                labels={"app.kubernetes.io/name": "fashion-tagger", "fashion-tagger/step": kwargs["step"]},
                get_logs=True, on_finish_action="delete_pod", log_pod_spec_on_failure=False,  # the spec holds the env
                termination_grace_period=int(STOP_GRACE_SECONDS),  # SIGTERM: the job stops at its next batch
                startup_timeout_seconds=int(os.environ.get("FASHION_TAGGER_POD_STARTUP_SECONDS", "600")),
            )
            secret = os.environ.get("FASHION_TAGGER_K8S_SECRET")
            if secret:  # a Secret the platform keeps, every key an environment variable of the pod
                from airflow.providers.cncf.kubernetes.secret import Secret

                defaults["secrets"] = [Secret("env", None, secret)]
            super().__init__(**{**defaults, **kwargs})

        def prepare(self, args: list[str], env: dict[str, str], config: dict[str, Any]) -> None:
            self.arguments = args
            self.env_vars = [k8s.V1EnvVar(name=name, value=value) for name, value in sorted(env.items())]
            self.container_resources = pod_resources(self.step, config)

        def run_step(self, args, env, config, context):
            self.prepare(args, env, config)
            # The provider's do_xcom_push adds a sidecar that reads the container's /airflow/xcom; the step's
            # own return value (the plan) is what goes to XCom, so the pod runs without the sidecar.
            self.do_xcom_push, push = False, self.do_xcom_push
            try:
                KubernetesPodOperator.execute(self, context)
            finally:
                self.do_xcom_push = push

        def cleanup(self, pod, remote_pod, *args, **kwargs):
            code = pod_exit_code(remote_pod, self.base_container_name)
            try:
                super().cleanup(pod, remote_pod, *args, **kwargs)
            except AirflowException as exc:
                if code is None or type(exc).__name__ == "AirflowSkipException":
                    raise
                raise_for_exit(code, 0, str(exc).splitlines()[0], f"pod {getattr(pod.metadata, 'name', '?')}")

    return TaggerPod


def pod_exit_code(remote_pod: Any, container: str) -> int | None:
    """The exit code of the pod's tagger container, None while it has none (not started, still running)."""
    statuses = (getattr(getattr(remote_pod, "status", None), "container_statuses", None)) or []
    for status in statuses:
        if status.name == container and status.state and status.state.terminated:
            return status.state.terminated.exit_code
    return None


def pod_resources(step: str, config: dict[str, Any]) -> Any:
    """A shard pod requests the cores it uses (threads + workers, the pool's arithmetic); every pod gets
    FASHION_TAGGER_POD_MEMORY (default 4Gi: the model, a batch of photos and the decode workers' buffers)."""
    from kubernetes.client import models as k8s

    memory = os.environ.get("FASHION_TAGGER_POD_MEMORY", "4Gi")
    cpu = str(max(1, config["threads"] + config["workers"])) if step == "shard" else "1"
    return k8s.V1ResourceRequirements(requests={"cpu": cpu, "memory": memory}, limits={"memory": memory})


def _docker_operator() -> type:
    """DockerOperator, subclassed: the step's arguments as the container's command (the image's entry point is
    `tagger`), credentials as its private environment (never logged, never a rendered template), a stop that
    gives the job its grace period, and the container's exit code through the DAG's policy."""
    from airflow.providers.docker.operators.docker import DockerOperator
    from docker.types import Mount

    def mounts() -> list[Any]:
        # FASHION_TAGGER_DOCKER_MOUNTS="/data/catalogs:ro,/data/out": host folders at the same path inside
        # (local catalogs, models, outputs; s3:// needs none).
        found = []
        for item in filter(None, (s.strip() for s in os.environ.get("FASHION_TAGGER_DOCKER_MOUNTS", "").split(","))):
            path, _, mode = item.partition(":")
            found.append(Mount(target=path, source=path, type="bind", read_only=mode == "ro"))
        return found

    class TaggerContainer(TaggerStep, DockerOperator):
        template_fields = (*DockerOperator.template_fields, "planned")

        def __init__(self, **kwargs: Any) -> None:
            defaults = dict(
                image=IMAGE, docker_url=os.environ.get("FASHION_TAGGER_DOCKER_URL", "unix://var/run/docker.sock"),
                mounts=mounts(), network_mode=os.environ.get("FASHION_TAGGER_DOCKER_NETWORK", "bridge"),
                user=os.environ.get("FASHION_TAGGER_DOCKER_USER") or None, auto_remove="never",
                mount_tmp_dir=False, tty=False, force_pull=False, do_xcom_push=True, xcom_all=False,
            )
            super().__init__(**{**defaults, **kwargs})

        def run_step(self, args, env, config, context):
            self.command = args
            self._private_environment = env
            try:
                DockerOperator.execute(self, context)
            except BaseException as exc:
                if not self.container:  # never started (no such image, no socket): the provider's error stands
                    raise
                code = self._exit_code()
                if code is None:  # still running: a timeout or a stop; SIGTERM first, the job keeps its shards
                    self._stop()
                    raise
                if code == 0:
                    raise
                last = (getattr(exc, "logs", None) or ["(no output)"])[-1]
                raise_for_exit(code, 0, last.decode(errors="replace") if isinstance(last, bytes) else str(last).strip(),
                               "container")
            finally:
                self._remove()

        def _exit_code(self) -> int | None:
            if not self.container:
                return None
            state = self.cli.inspect_container(self.container["Id"])["State"]
            return None if state.get("Running") else int(state.get("ExitCode", 1))

        def _stop(self) -> None:
            log.warning("stopping the container: SIGTERM, SIGKILL after %.0f s", STOP_GRACE_SECONDS)
            self.cli.stop(self.container["Id"], timeout=int(STOP_GRACE_SECONDS))

        def _remove(self) -> None:
            if self.container:
                try:
                    self.cli.remove_container(self.container["Id"], force=True)
                except Exception as exc:  # the outcome is the job's; a leftover container is only said
                    log.warning("could not remove container %s: %s", self.container["Id"][:12], exc)

        def on_kill(self) -> None:
            if self.container and self.hook.client_created:
                self._stop()
                self._remove()

    return TaggerContainer


def step_operator(run_in: str = RUN_IN) -> type:
    if run_in == "kubernetes":
        return _pod_operator()
    if run_in == "docker":
        return _docker_operator()
    return TaggerProcess


def build_dag(run_in: str = RUN_IN) -> DAG:
    Step = step_operator(run_in)
    with DAG(
        dag_id=DAG_ID,
        # A trigger timetable: the run at 02:00 UTC on 2026-11-27 has logical date 2026-11-27 -> that night's partition.
        schedule=CronTriggerTimetable(SCHEDULE, timezone="UTC"),
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,  # one run per night at a time: two runs of one date must never write together
        dagrun_timeout=DAGRUN_TIMEOUT,
        on_failure_callback=on_run_failure,
        default_args=TASK_DEFAULTS,
        tags=["fashion-tagger", run_in],
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
            "aws_conn_id": Param(None, type=["null", "string"], description="Airflow Connection with the AWS keys"),
            "cdn_conn_id": Param(None, type=["null", "string"], description="Airflow Connection with the CDN host(s), headers"),
            "tagger": Param(None, type=["null", "string"], description="The tagger executable (process mode)"),
        },
    ) as dag:
        plan = Step(task_id="plan", step="plan", execution_timeout=PLAN_TIMEOUT)
        shards = Step.partial(task_id="tag_shard", step="shard", execution_timeout=SHARD_TIMEOUT, pool=SHARD_POOL,
                              pool_slots=SHARD_POOL_SLOTS).expand_kwargs(plan.output)
        finalize = Step(task_id="finalize", step="finalize", planned=plan.output, execution_timeout=FINALIZE_TIMEOUT,
                        outlets=[TAGS_ASSET])
        # The night's quality report; a crossed threshold (exit 6) fails this task only, never retried: the tag
        # partitions are committed by then and stay as they are.
        report = Step(task_id="report", step="report", planned=plan.output, execution_timeout=REPORT_TIMEOUT)
        shards >> finalize >> report
    return dag


fashion_tagger_dag = build_dag()
