"""The attributes a bundle predicts: the Kaggle seven by default, and the rule every attribute name follows.

Code that needs a bundle's attributes reads them from the bundle (``ModelBundle.attribute_names``);
:data:`ATTRIBUTES` is only what ``tagger retrain`` trains when no ``--attribute`` is given (the Kaggle
``styles.csv`` spelling), and what the synthetic demo data is drawn with.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

ATTRIBUTES: tuple[str, ...] = (
    "gender",
    "masterCategory",
    "subCategory",
    "articleType",
    "baseColour",
    "season",
    "usage",
)


# The tags table's own columns (tagger.tag.writers.tags_schema) and the hive partition key that readers add:
# an attribute of one of these names would overwrite it or be overwritten by it.
FIXED_COLUMNS: tuple[str, ...] = (
    "product_id", "image", "needs_review", "image_version", "model_version", "run_id", "tagged_at", "run_date",
)
SCORE_SUFFIX = "_score"
# A plain identifier: a Parquet column, a polars name and an unquoted SQL column all at once.
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")


def attribute_name_problem(names: Sequence[str]) -> str | None:
    """Why these attribute names cannot be a bundle's (each becomes a tags column and a ``<name>_score``
    column), or None. Checked when training starts and when a bundle is loaded.

    Case-insensitive on purpose: SQL engines (DuckDB, Athena) fold unquoted names, so ``Colour`` and
    ``colour`` would be one column to an analyst.
    """
    if not names:
        return "no attribute given"
    seen: dict[str, str] = {}
    fixed = {c.lower() for c in FIXED_COLUMNS}
    lowered = {str(n).lower() for n in names}
    for name in names:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            return (f"attribute name {name!r} is not a valid column name: use a letter, then letters, digits "
                    "or '_' (at most 64 characters), e.g. pattern or sleeve_length")
        key = name.lower()
        if key in seen:
            return f"attribute {name!r} is given twice" + (f" (as {seen[key]!r}; names are compared ignoring case)" if seen[key] != name else "")
        seen[key] = name
        if key in fixed:
            return f"attribute name {name!r} clashes with the tags table's own column {name!r}; rename the attribute"
        if key.endswith(SCORE_SUFFIX) and key[: -len(SCORE_SUFFIX)] in lowered:
            return (f"attribute name {name!r} clashes with the score column of attribute "
                    f"{name[: -len(SCORE_SUFFIX)]!r}; rename the attribute")
    return None
