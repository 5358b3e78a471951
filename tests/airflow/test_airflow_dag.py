"""The example DAG (dags/fashion_tagger.py) under a real Airflow 3: dag.test() on the demo catalog.

Run by `make test-airflow` in .venv-airflow, which passes the job's executables and the demo paths:
FT_TAGGER (the job's `tagger`), FT_PYTHON (the job's python), FT_CATALOG and FT_MODEL (the Makefile's
CATALOG and MODEL defaults). In the job's .venv (plain `make test`) Airflow is not installed: skipped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

pytest.importorskip("airflow.sdk", reason="Airflow is not installed here; `make test-airflow` runs this in .venv-airflow")

from airflow.sdk import DAG  # noqa: E402
from airflow.sdk.exceptions import AirflowException, AirflowFailException  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
NIGHT_1, NIGHT_2 = "2026-11-26", "2026-11-27"
SHARD_SIZE = 50  # the demo's rows (150-200 + 2 broken) -> 4-5 committed shards over the 2 mapped tasks
THREADS = 2


def _dag_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fashion_tagger_dag_under_test", REPO / "dags" / "fashion_tagger.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dag_module(airflow_db):
    return _dag_module()


def _night(date: str) -> datetime:
    return datetime.fromisoformat(date).replace(hour=2, tzinfo=timezone.utc)  # the cron's 02:00 UTC


def _test_run(date: str, conf: dict, module=None):
    """dag.test() of the night `date` on a DAG parsed afresh: a DAG object keeps the params of its last
    dag.test() run_conf, which would leak one test's settings into the next."""
    return (module or _dag_module()).fashion_tagger_dag.test(logical_date=_night(date), run_conf=conf)


def _states(dag_run) -> dict[tuple[str, int], tuple[str, int]]:
    return {(ti.task_id, ti.map_index): (str(ti.state), ti.try_number) for ti in dag_run.get_task_instances()}


@pytest.fixture(scope="module")
def job():
    paths = {name: os.environ.get(f"FT_{name.upper()}") for name in ("tagger", "python", "catalog", "model")}
    if not any(paths.values()):
        pytest.skip("FT_TAGGER, FT_PYTHON, FT_CATALOG, FT_MODEL not set: run `make test-airflow`, which passes them")
    missing = [f"FT_{k.upper()}={v}" for k, v in paths.items() if not v or not Path(v).exists()]
    assert not missing, f"missing: {', '.join(missing)} (the demo catalog and model come with `make tag`)"
    return {k: os.path.abspath(v) for k, v in paths.items()}  # not resolve(): .venv/bin/python is a symlink


def _as_list(callbacks) -> list:
    return list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]


def test_the_dag_parses_with_its_schedule_mapping_retries_and_timeouts(dag_module):
    dag = dag_module.fashion_tagger_dag
    assert isinstance(dag, DAG) and dag.dag_id == "fashion_tagger"
    assert set(dag.task_ids) == {"plan", "tag_shard", "finalize", "report"}
    assert type(dag.timetable).__name__ == "CronTriggerTimetable" and dag_module.SCHEDULE == "0 2 * * *"
    shard = dag.get_task("tag_shard")
    assert shard.upstream_task_ids == {"plan"} and dag.get_task("finalize").upstream_task_ids == {"plan", "tag_shard"}
    assert dag.get_task("report").upstream_task_ids == {"plan", "finalize"}
    for task in dag.tasks:
        assert task.retries >= 1 and task.retry_exponential_backoff == 2.0 and task.execution_timeout is not None
        assert dag_module.on_failure in _as_list(task.on_failure_callback)
    assert dag.dagrun_timeout == dag_module.DAGRUN_TIMEOUT and dag.dagrun_timeout.total_seconds() == 22 * 3600
    assert dag_module.on_run_failure in _as_list(dag.on_failure_callback)
    assert [asset.name for asset in dag.get_task("finalize").outlets] == ["fashion_tagger_tags"]
    assert set(dag.params) >= {"demo", "catalog", "model", "out", "num_shards", "shard_size", "incremental",
                               "threads", "workers", "report_max_drift", "report_min_agreement",
                               "report_max_review_share", "tagger"}


@pytest.mark.parametrize("code, retried", [(2, False), (3, False), (6, False), (4, True), (5, True), (143, True),
                                           (1, True)])
def test_exit_codes_map_to_fail_now_or_retry(dag_module, code, retried):
    with pytest.raises(AirflowException) as raised:
        dag_module.run_tagger("/bin/sh", ["-c", f"echo 'tagger tag: the last line'; exit {code}"])
    assert isinstance(raised.value, AirflowFailException) is not retried
    assert f"exited {code}" in str(raised.value) and "the last line" in str(raised.value)


def test_a_missing_executable_fails_without_retry(dag_module):
    with pytest.raises(AirflowFailException, match="cannot run"):
        dag_module.run_tagger("/nonexistent/tagger", ["tag"])


def test_a_timeout_stops_the_tagger_process_group(dag_module, tmp_path):
    """Airflow's execution timeout arrives as an exception in the task; the child must not outlive it."""
    marker = tmp_path / "stopped"
    script = f"trap 'echo stopped > {marker}; exit 143' TERM; echo started; sleep 60 & wait"

    class Timeout(Exception):
        pass

    def alarm(*_):
        raise Timeout()

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(2)
    started = time.monotonic()
    try:
        with pytest.raises(Timeout):
            dag_module.run_tagger("/bin/sh", ["-c", script], grace=10)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - started < 10
    assert marker.read_text().strip() == "stopped"


def test_settings_come_from_params_then_variables_then_environment_then_defaults(dag_module, monkeypatch):
    monkeypatch.setenv("AIRFLOW_VAR_FASHION_TAGGER_OUT", "s3://from-variable")  # an Airflow Variable, from the environment
    monkeypatch.setenv("FASHION_TAGGER_OUT", "/from-env")
    monkeypatch.setenv("FASHION_TAGGER_NUM_SHARDS", "3")
    monkeypatch.setenv("FASHION_TAGGER_CATALOG", "/from-env/catalog.csv")
    monkeypatch.setenv("FASHION_TAGGER_MODEL", "/from-env/model")
    config = dag_module.resolve_config({"catalog": "s3://from-params/catalog.parquet", "incremental": False}, "2026-11-26")
    assert config["catalog"] == "s3://from-params/catalog.parquet"
    assert config["out"] == "s3://from-variable"
    assert config["num_shards"] == 3
    assert config["model"] == "/from-env/model"
    args = dag_module.tag_args(config)
    assert args[:2] == ["tag", "--catalog"] and "--since" not in args and args[args.index("--run-date") + 1] == "2026-11-26"
    assert "--since" in dag_module.tag_args({**config, "incremental": True})


def test_unconfigured_the_plan_fails_naming_the_variables_and_demo_is_asked_for(dag_module, monkeypatch):
    with pytest.raises(AirflowFailException) as raised:
        dag_module.resolve_config({}, "2026-11-26")
    message = str(raised.value)
    assert "not configured" in message and "fashion_tagger_demo" in message
    assert all(f"fashion_tagger_{name}" in message for name in ("catalog", "model", "out"))
    with pytest.raises(AirflowFailException, match="set the Airflow Variables fashion_tagger_out \\("):
        dag_module.resolve_config({"catalog": "c.csv", "model": "m"}, "2026-11-26")

    monkeypatch.setenv("AIRFLOW_VAR_FASHION_TAGGER_DEMO", "true")  # demo mode, asked for by a Variable
    config = dag_module.resolve_config({"out": "/elsewhere"}, "2026-11-26")
    assert config["catalog"] == str(REPO / "demo/catalog.csv") and config["model"] == str(REPO / "models/fashion-lite0")
    assert config["out"] == "/elsewhere"
    assert dag_module.resolve_config({"demo": False, "catalog": "c", "model": "m", "out": "o"}, "2026-11-26")["demo"] is False


def test_the_catalog_location_is_templated_by_the_run_date(dag_module):
    conf = {"model": "m", "out": "s3://out"}
    config = dag_module.resolve_config({**conf, "catalog": "s3://feed/{{ ds }}/catalog-{{ ds_nodash }}.parquet"},
                                       "2026-11-26")
    assert config["catalog"] == "s3://feed/2026-11-26/catalog-20261126.parquet"
    assert dag_module.tag_args(config)[2] == config["catalog"]
    with pytest.raises(AirflowFailException, match="catalog setting .* is not a valid template"):
        dag_module.resolve_config({**conf, "catalog": "s3://feed/{{ yesterday }}/catalog.csv"}, "2026-11-26")


def test_shard_tasks_take_a_pool_and_their_threads_and_workers_from_the_configuration(dag_module, monkeypatch):
    assert dag_module.fashion_tagger_dag.get_task("tag_shard").pool == "default_pool"  # never a pool that may not exist
    monkeypatch.setenv("FASHION_TAGGER_POOL", "fashion_tagger")
    monkeypatch.setenv("FASHION_TAGGER_POOL_SLOTS", "2")
    shard = _dag_module().fashion_tagger_dag.get_task("tag_shard")  # pools are fixed when the DAG is parsed
    assert (shard.pool, shard.pool_slots) == ("fashion_tagger", 2)
    for task in ("plan", "finalize", "report"):
        assert dag_module.fashion_tagger_dag.get_task(task).pool == "default_pool"

    conf = {"catalog": "c.csv", "model": "m", "out": "o"}
    config = dag_module.resolve_config(conf, "2026-11-26")
    args = dag_module.shard_args(config, "1/4")
    assert args[args.index("--threads") + 1] == "2" and args[args.index("--workers") + 1] == "2"  # the defaults
    assert "--threads" not in dag_module.tag_args(config)  # the plan's command: not part of its key
    monkeypatch.setenv("AIRFLOW_VAR_FASHION_TAGGER_THREADS", "3")
    config = dag_module.resolve_config({**conf, "workers": 1, "extra_args": "--batch-size 8"}, "2026-11-26")
    args = dag_module.shard_args(config, "1/4")
    assert args[args.index("--shard") + 1] == "1/4" and args[args.index("--threads") + 1] == "3"
    assert args[args.index("--workers") + 1] == "1" and args[-2:] == ["--batch-size", "8"]
    with pytest.raises(AirflowFailException, match="threads and workers"):
        dag_module.resolve_config({**conf, "workers": -1}, "2026-11-26")


def test_the_tagger_executable_is_looked_up_by_each_task_not_handed_over(dag_module, monkeypatch):
    monkeypatch.setenv("FASHION_TAGGER_TAGGER", "/opt/worker/bin/tagger")
    assert dag_module.tagger_executable({}) == "/opt/worker/bin/tagger"
    assert dag_module.tagger_executable({"tagger": "/x/tagger"}) == "/x/tagger"
    assert "tagger" not in dag_module.resolve_config({"catalog": "c", "model": "m", "out": "o"}, "2026-11-26")


def test_the_failure_hook_is_a_dotted_name_resolved_when_the_dag_is_parsed(dag_module):
    assert dag_module._callback("os.path:join") is os.path.join
    with pytest.raises(ValueError, match="package.module:function"):
        dag_module._callback("os.path.join")


def test_report_thresholds_come_from_the_configuration(dag_module):
    config = dag_module.resolve_config({"catalog": "c", "model": "m", "out": "o", "report_max_drift": 0.2,
                                        "report_min_agreement": 0.8, "report_args": "--truth-column gender=gender"},
                                       "2026-11-26")
    assert dag_module.report_args(config) == ["report", "--out", "o", "--run-date", "2026-11-26", "--max-drift", "0.2",
                                              "--min-agreement", "0.8", "--truth-column", "gender=gender"]


def _fake_tagger(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fake-tagger"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


def test_under_airflow_exit_2_fails_at_once_and_exit_4_is_retried(dag_module, tmp_path):
    # exit 2 from the plan: failed on its first try, although retries are configured
    invalid = _fake_tagger(tmp_path, "echo 'tagger tag: invalid input: no such manifest' >&2; exit 2")
    run = _test_run("2026-10-01", {"tagger": invalid, "catalog": "c.csv", "model": "m",
                                   "out": str(tmp_path / "out2"), "num_shards": 2})
    states = _states(run)
    assert str(run.state) == "failed"
    assert states[("plan", -1)] == ("failed", 1), states

    # exit 4 from shard 1/2 on its first try only: the task is retried and the run succeeds
    counter = tmp_path / "tries"
    flaky = _fake_tagger(tmp_path, f"""case "$*" in *"--shard 1/2"*)
  echo x >> {counter}; [ "$(wc -l < {counter})" -ge 2 ] || {{ echo 'storage unavailable' >&2; exit 4; }};;
esac
exit 0""")
    run = _test_run("2026-10-02", {"tagger": flaky, "catalog": "c.csv", "model": "m",
                                   "out": str(tmp_path / "out4"), "num_shards": 2})
    states = _states(run)
    assert str(run.state) == "success", states
    assert states[("tag_shard", 1)] == ("success", 2) and states[("tag_shard", 0)] == ("success", 1), states


def test_under_airflow_unconfigured_fails_the_first_task_and_calls_the_failure_hook(dag_module, tmp_path, monkeypatch):
    calls = []
    module = _dag_module()
    monkeypatch.setattr(module, "ON_FAILURE_HOOK", lambda context: calls.append(context["ti"].task_id))
    never = _fake_tagger(tmp_path, f"touch {tmp_path / 'ran'}; exit 0")
    run = _test_run("2026-10-03", {"tagger": never}, module)
    states = _states(run)
    assert str(run.state) == "failed" and states[("plan", -1)] == ("failed", 1), states
    assert not (tmp_path / "ran").exists()  # nothing was started, nothing written
    assert calls == ["plan"]  # once: the run's own callback leaves a task's failure to the task's


def test_a_run_that_failed_without_a_failed_task_calls_the_hook(dag_module, monkeypatch):
    calls = []
    monkeypatch.setattr(dag_module, "ON_FAILURE_HOOK", lambda context: calls.append(context["reason"]))
    dag_module.on_run_failure({"reason": "task_failure"})
    dag_module.on_run_failure({"reason": "timed_out"})
    assert calls == ["timed_out"]


def test_under_airflow_a_crossed_report_threshold_fails_the_report_task_only(dag_module, tmp_path):
    """Exit 6 from `tagger report` (after finalize committed the night): failed on its first try, not retried;
    the shard and finalize tasks stay successful and the Asset event names the committed partition."""
    calls = tmp_path / "calls"
    fake = _fake_tagger(tmp_path, f"""echo "$*" >> {calls}
[ "$1" = report ] && {{ echo 'tagger report: drift 0.41 > --max-drift 0.2 (article_type)' >&2; exit 6; }}
exit 0""")
    out = tmp_path / "out6"
    conf = {"tagger": fake, "catalog": "s3://feed/{{ ds }}/catalog.csv", "model": "m", "out": str(out),
            "num_shards": 2, "threads": 3, "workers": 1, "report_max_drift": 0.2, "report_min_agreement": 0.9}
    run = _test_run("2026-10-04", conf)
    states = _states(run)
    assert str(run.state) == "failed", states
    assert states[("report", -1)] == ("failed", 1), states
    assert all(state == "success" for (task, _), (state, _) in states.items() if task != "report"), states

    lines = calls.read_text().splitlines()
    assert sum("--plan-only" in line for line in lines) == 1 and lines[0].startswith("tag --catalog s3://feed/2026-10-04/catalog.csv ")
    shards = sorted(line for line in lines if "--shard " in line)
    assert [line.split("--shard ")[1].split()[0] for line in shards] == ["0/2", "1/2"]
    assert all("--threads 3 --workers 1" in line for line in shards), shards
    assert lines[-1] == f"report --out {out} --run-date 2026-10-04 --max-drift 0.2 --min-agreement 0.9", lines
    assert sum(line.startswith("report ") for line in lines) == 1  # no retry

    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    with create_session() as session:
        events = (session.query(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
                  .filter(AssetModel.name == "fashion_tagger_tags").all())
        extras = [event.extra for event in events]
    assert {"run_date": "2026-10-04", "out": str(out), "tags": f"{out}/tags/run_date=2026-10-04",
            "errors": f"{out}/errors/run_date=2026-10-04"} in extras, extras


def test_every_option_a_step_passes_is_one_the_jobs_command_has(job, dag_module):
    """The DAG's contract with the job: each step's command (plan, shard, finalize, report, with every setting
    that adds an option) names only options that the job's `tagger COMMAND --help` lists."""
    config = dag_module.resolve_config({"catalog": "c.csv", "model": "m", "out": "o", "shard_size": 50,
                                        "max_error_rate": 0.1, "report_max_drift": 0.2, "report_min_agreement": 0.8,
                                        "report_max_review_share": 0.7, "report_args": "--truth-column gender=gender"},
                                       "2026-11-26")
    helps: dict[str, str] = {}
    for step, shard in (("plan", None), ("shard", "0/2"), ("finalize", None), ("report", None)):
        args = dag_module.step_args(step, config, shard)
        command = args[0]
        if command not in helps:
            result = subprocess.run([job["tagger"], command, "--help"], capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, result.stderr[-2000:]
            helps[command] = result.stdout
        options = [arg for arg in args if arg.startswith("--")]
        assert options, args
        missing = [option for option in options if option not in helps[command]]
        assert not missing, f"the {step} step passes {missing}, which `tagger {command}` does not have"
    assert {"--max-drift", "--min-agreement", "--max-review-share", "--truth-column"} <= set(
        dag_module.step_args("report", config))


def _tag_single(job: dict, out: Path, date: str) -> None:
    # --threads as the DAG's shard tasks: a score may differ in its last bit with the thread count
    command = [job["tagger"], "tag", "--catalog", job["catalog"], "--model", job["model"], "--out", str(out),
               "--run-date", date, "--shard-size", str(SHARD_SIZE), "--progress", "none", "--workers", "1",
               "--threads", str(THREADS)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def _compare(job: dict, a: Path, b: Path, date: str) -> dict:
    result = subprocess.run([job["python"], str(REPO / "tests/airflow/compare_partitions.py"), str(a), str(b), date],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_two_nights_with_two_mapped_shards_equal_single_runs(dag_module, job, tmp_path):
    out, single = tmp_path / "airflow-out", tmp_path / "single-out"
    conf = {"tagger": job["tagger"], "catalog": job["catalog"], "model": job["model"], "out": str(out),
            "num_shards": 2, "shard_size": SHARD_SIZE, "threads": THREADS, "workers": 1}

    run = _test_run(NIGHT_1, conf)
    states = _states(run)
    assert str(run.state) == "success", states
    assert set(states) == {("plan", -1), ("tag_shard", 0), ("tag_shard", 1), ("finalize", -1), ("report", -1)}
    assert all(state == "success" for state, _ in states.values()), states
    assert (out / "_reports" / f"run_date={NIGHT_1}" / "report.html").is_file()

    for table in ("tags", "errors"):
        success = out / table / f"run_date={NIGHT_1}" / "_SUCCESS"
        assert success.is_file(), f"{success} missing"
    summary = json.loads((out / "_runs" / f"run_date={NIGHT_1}" / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["num_shards"] == -(-summary["rows"] // SHARD_SIZE) > 2, summary
    assert summary["rows"] == summary["tagged"] + summary["reused"] + summary["errors"]

    _tag_single(job, single, NIGHT_1)
    verdict = _compare(job, out, single, NIGHT_1)
    assert verdict["tags"]["equal"] and verdict["errors"]["equal"], verdict
    assert verdict["tags"]["rows"][0] + verdict["errors"]["rows"][0] == summary["rows"]

    # The next night: --since reuses every unchanged product of night 1 and still writes a complete partition.
    run = _test_run(NIGHT_2, conf)
    assert str(run.state) == "success", _states(run)
    assert (out / "_reports" / f"run_date={NIGHT_2}" / "report.html").is_file()
    summary_2 = json.loads((out / "_runs" / f"run_date={NIGHT_2}" / "summary.json").read_text())
    assert summary_2["status"] == "succeeded", summary_2
    assert summary_2["reused"] == summary["tagged"] + summary["reused"] and summary_2["tagged"] == 0, summary_2
    _tag_single(job, single, NIGHT_2)
    verdict = _compare(job, out, single, NIGHT_2)
    assert verdict["tags"]["equal"] and verdict["errors"]["equal"], verdict
