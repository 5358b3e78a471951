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


def test_the_dag_parses_with_its_schedule_mapping_retries_and_timeouts(dag_module):
    dag = dag_module.fashion_tagger_dag
    assert isinstance(dag, DAG) and dag.dag_id == "fashion_tagger"
    assert set(dag.task_ids) == {"plan", "tag_shard", "finalize"}
    assert type(dag.timetable).__name__ == "CronTriggerTimetable" and dag_module.SCHEDULE == "0 2 * * *"
    shard = dag.get_task("tag_shard")
    assert shard.upstream_task_ids == {"plan"} and dag.get_task("finalize").upstream_task_ids == {"plan", "tag_shard"}
    for task in dag.tasks:
        assert task.retries >= 1 and task.retry_exponential_backoff == 2.0 and task.execution_timeout is not None
    assert set(dag.params) >= {"catalog", "model", "out", "num_shards", "shard_size", "incremental", "tagger"}


@pytest.mark.parametrize("code, retried", [(2, False), (3, False), (4, True), (5, True), (143, True), (1, True)])
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
    config = dag_module.resolve_config({"catalog": "s3://from-params/catalog.parquet", "incremental": False}, "2026-11-26")
    assert config["catalog"] == "s3://from-params/catalog.parquet"
    assert config["out"] == "s3://from-variable"
    assert config["num_shards"] == 3
    assert config["model"] == dag_module.DEFAULTS["model"]
    args = dag_module.tag_args(config)
    assert args[:2] == ["tag", "--catalog"] and "--since" not in args and args[args.index("--run-date") + 1] == "2026-11-26"
    assert "--since" in dag_module.tag_args({**config, "incremental": True})


def _fake_tagger(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fake-tagger"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


def test_under_airflow_exit_2_fails_at_once_and_exit_4_is_retried(dag_module, tmp_path):
    dag = dag_module.fashion_tagger_dag
    # exit 2 from the plan: failed on its first try, although retries are configured
    invalid = _fake_tagger(tmp_path, "echo 'tagger tag: invalid input: no such manifest' >&2; exit 2")
    run = dag.test(logical_date=_night("2026-10-01"),
                   run_conf={"tagger": invalid, "out": str(tmp_path / "out2"), "num_shards": 2})
    states = _states(run)
    assert str(run.state) == "failed"
    assert states[("plan", -1)] == ("failed", 1), states

    # exit 4 from shard 1/2 on its first try only: the task is retried and the run succeeds
    counter = tmp_path / "tries"
    flaky = _fake_tagger(tmp_path, f"""case "$*" in *"--shard 1/2"*)
  echo x >> {counter}; [ "$(wc -l < {counter})" -ge 2 ] || {{ echo 'storage unavailable' >&2; exit 4; }};;
esac
exit 0""")
    run = dag.test(logical_date=_night("2026-10-02"),
                   run_conf={"tagger": flaky, "out": str(tmp_path / "out4"), "num_shards": 2})
    states = _states(run)
    assert str(run.state) == "success", states
    assert states[("tag_shard", 1)] == ("success", 2) and states[("tag_shard", 0)] == ("success", 1), states


def _tag_single(job: dict, out: Path, date: str) -> None:
    command = [job["tagger"], "tag", "--catalog", job["catalog"], "--model", job["model"], "--out", str(out),
               "--run-date", date, "--shard-size", str(SHARD_SIZE), "--progress", "none", "--workers", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def _compare(job: dict, a: Path, b: Path, date: str) -> dict:
    result = subprocess.run([job["python"], str(REPO / "tests/airflow/compare_partitions.py"), str(a), str(b), date],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_two_nights_with_two_mapped_shards_equal_single_runs(dag_module, job, tmp_path):
    dag = dag_module.fashion_tagger_dag
    out, single = tmp_path / "airflow-out", tmp_path / "single-out"
    conf = {"tagger": job["tagger"], "catalog": job["catalog"], "model": job["model"], "out": str(out),
            "num_shards": 2, "shard_size": SHARD_SIZE, "extra_args": "--workers 1"}

    run = dag.test(logical_date=_night(NIGHT_1), run_conf=conf)
    states = _states(run)
    assert str(run.state) == "success", states
    assert set(states) == {("plan", -1), ("tag_shard", 0), ("tag_shard", 1), ("finalize", -1)}
    assert all(state == "success" for state, _ in states.values()), states

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
    run = dag.test(logical_date=_night(NIGHT_2), run_conf=conf)
    assert str(run.state) == "success", _states(run)
    summary_2 = json.loads((out / "_runs" / f"run_date={NIGHT_2}" / "summary.json").read_text())
    assert summary_2["status"] == "succeeded", summary_2
    assert summary_2["reused"] == summary["tagged"] + summary["reused"] and summary_2["tagged"] == 0, summary_2
    _tag_single(job, single, NIGHT_2)
    verdict = _compare(job, out, single, NIGHT_2)
    assert verdict["tags"]["equal"] and verdict["errors"]["equal"], verdict
