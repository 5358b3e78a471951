"""The report's files under ``OUT/_reports/run_date=D/``, each committed whole (tagger.storage): the Parquet
tables first, then report.json, then report.html; a rerun replaces them one by one, never leaving a torn file."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from .. import storage
from .config import ReportConfig

PAGE, FIGURES = "report.html", "report.json"


def file_names(tables: list[str]) -> list[str]:
    return [*(f"{name}.parquet" for name in tables), FIGURES, PAGE]


def write_report(config: ReportConfig, tables: dict[str, pa.Table], report: dict[str, Any], page: str) -> tuple[str, str]:
    folder, options = config.folder, config.storage_options
    for name, table in tables.items():
        storage.write_parquet(storage.join(folder, f"{name}.parquet"), table, options)
    storage.write_bytes(storage.join(folder, FIGURES), json.dumps(report, indent=2, default=_plain).encode(), options)
    page_url = storage.join(folder, PAGE)
    storage.write_bytes(page_url, page.encode("utf-8"), options)
    return folder, page_url


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON")
