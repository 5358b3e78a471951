"""The report's configuration: one typed, validated object; every default lives here."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .. import storage

# 6: a report threshold was crossed (agreed with the DAG: a failure without retry; the tables are written).
EXIT_THRESHOLD = 6

REPORTS = "_reports"
TABLES = ("label_mix", "drift", "agreement", "disagreements")

# Shares are floored here before PSI's logarithm, so that a label seen on one night only gives a large but
# finite term (Evidently's get_binned_data puts the same 1e-4 in place of a zero share).
PSI_FLOOR = 1e-4
# Drift's noise floor (metrics.noise_floor): the 1 - alpha quantile of what nights drawn from one mix reach, for
# each of two statistics (the distance, the largest label move): a report of 7 attributes flags a night of no
# real change about 1 in 70 nights.
DRIFT_ALPHA = 0.0005
DRIFT_DRAWS = 4_000  # 0.1-0.2 s an attribute of 80 labels on one loaded core (10,000: 0.6-0.8 s)
DRIFT_SEED = 30
SCORE_BINS = 20
EDGE_LABELS = (0.0, 0.25, 0.5, 0.75, 1.0)  # score axis ticks on the page


@dataclass(frozen=True)
class Thresholds:
    """A crossed one makes the command exit :data:`EXIT_THRESHOLD`; None: not checked."""

    max_drift: float | None = None  # Jensen-Shannon distance (base 2, 0..1) of an attribute's label mix
    max_psi: float | None = None  # population stability index of an attribute's label mix
    min_agreement: float | None = None  # accuracy against the catalog's labels, per attribute
    max_review_share: float | None = None  # share of tonight's tags under an attribute's review threshold
    max_error_rate: float | None = None  # error rows / manifest rows
    max_rows_change: float | None = None  # |rows tonight / rows the night before - 1|

    def active(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class ReportConfig:
    out: str
    run_date: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    # attribute -> catalog column holding the catalog's own label; empty: columns named like the attributes
    truth_columns: dict[str, str] = field(default_factory=dict)
    catalog: str | None = None  # default: the catalog the run's plan names
    catalog_format: str | None = None
    id_column: str | None = None  # default: the tag run's own (its summary), else product_id
    previous: str | None = None  # run date to compare with; default: the latest complete one before
    max_disagreements: int = 10_000  # rows of the disagreements table, most confident first
    gallery: int = 24  # thumbnails of the top disagreements on the page
    thumb_size: int = 128
    # Rows per streamed batch, and the catalog rows joined at once (a bigger catalog is joined in id-hash buckets,
    # a pass over the catalog and the tags each): together they bound the memory, whatever the night's size.
    batch_rows: int = 8_192
    bucket_rows: int = 20_000
    thresholds: Thresholds = field(default_factory=Thresholds)

    def __post_init__(self) -> None:
        from datetime import datetime

        for name, value in (("--run-date", self.run_date), ("--previous", self.previous)):
            if value is None:
                continue
            try:
                datetime.strptime(value, "%Y-%m-%d")
            except ValueError:
                raise ValueError(f"{name}: expected YYYY-MM-DD, got {value!r}") from None
        if self.previous is not None and self.previous >= self.run_date:
            raise ValueError(f"--previous {self.previous} is not before --run-date {self.run_date}")

    @property
    def folder(self) -> str:
        return storage.join(self.out, REPORTS, f"run_date={self.run_date}")

    def public_dict(self) -> dict[str, Any]:
        return storage.redact(asdict(self))
