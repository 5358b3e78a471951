"""``tagger report``: the morning report of one run date, read from what the tag job committed.

- :mod:`.config`: ReportConfig, every setting and its default, and the exit code of a crossed threshold;
- :mod:`.load`: complete partitions -> Arrow batches (only the columns needed, streamed), the night before,
  the run's plan and summary, the catalog's own labels;
- :mod:`.metrics`: label mix, score histograms, review shares, drift (PSI, Jensen-Shannon), agreement and
  confusions with the catalog, the most confident disagreements, the thresholds;
- :mod:`.html`: the self-contained page (inline SVG, embedded thumbnails, no script, nothing fetched);
- :mod:`.write`: the tables, report.json and report.html under ``OUT/_reports/run_date=D/``, committed;
- :func:`.build.build_report`: the straight line from a config to a written report.

Like an analyst, the report reads committed partitions only (``_SUCCESS``), never the runner's memory, so
it runs after the tag job, elsewhere, or again. Attributes come from the run's plan (the bundle's own list).
"""

from __future__ import annotations


class ReportError(ValueError):
    """Input the report cannot use (no complete partition, a truth column the catalog lacks...): exit 2."""
