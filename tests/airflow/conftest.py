"""Airflow settings for the DAG tests; they must be in the environment before `airflow` is first imported.

These tests run in .venv-airflow (`make test-airflow`), never in the job's .venv, where they are skipped.
AIRFLOW_HOME is a fresh temporary folder (SQLite metadata database, logs), removed afterwards.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.find_spec("airflow")
AIRFLOW_INSTALLED = _spec is not None and _spec.origin not in (None, "namespace")

if AIRFLOW_INSTALLED:
    _HOME = tempfile.mkdtemp(prefix="fashion-tagger-airflow-home-")
    os.environ.update({
        "AIRFLOW_HOME": _HOME,
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGBAG_IMPORT_ERROR_TRACEBACKS": "True",
        # Short back-off so that the retry test sees real retries in seconds (the DAG's defaults are minutes).
        "FASHION_TAGGER_RETRY_DELAY_MINUTES": "0.01",
        "FASHION_TAGGER_MAX_RETRY_DELAY_MINUTES": "0.05",
        "FASHION_TAGGER_RETRIES": "2",
        "FASHION_TAGGER_STOP_GRACE_SECONDS": "10",
    })
    for name in list(os.environ):  # a developer's own deployment settings must not leak in
        if name.startswith("FASHION_TAGGER_") and name not in {
            "FASHION_TAGGER_RETRY_DELAY_MINUTES", "FASHION_TAGGER_MAX_RETRY_DELAY_MINUTES",
            "FASHION_TAGGER_RETRIES", "FASHION_TAGGER_STOP_GRACE_SECONDS",
        }:
            del os.environ[name]


@pytest.fixture(scope="session")
def airflow_db():
    """`airflow db migrate` into the temporary AIRFLOW_HOME (SQLite), once per session."""
    if not AIRFLOW_INSTALLED:
        pytest.skip("Airflow is not installed here; `make test-airflow` runs these tests in .venv-airflow")
    result = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return os.environ["AIRFLOW_HOME"]


def pytest_unconfigure(config):
    if AIRFLOW_INSTALLED:
        shutil.rmtree(_HOME, ignore_errors=True)
