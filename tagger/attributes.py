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


# The tags table's own columns, before and after the attributes' pairs: tagger.tag.writers.tags_schema builds
# the table from these very names, so a column added there is reserved here with it (no second list to forget).
REVIEW_COLUMN = "needs_review"
IMAGES_USED_COLUMN = "images_used"
LEADING_COLUMNS: tuple[str, ...] = ("product_id", "image")
TRAILING_COLUMNS: tuple[str, ...] = (REVIEW_COLUMN, IMAGES_USED_COLUMN, "image_version", "model_version", "run_id",
                                     "tagged_at")
# With --text-column, after REVIEW_COLUMN: which inputs a row's tags came from, where photos and text disagreed, and
# the text's own version (what --since compares for text, as image_version for the photos).
INPUTS_COLUMN = "inputs"
CONFLICT_COLUMN = "conflict"
TEXT_VERSION_COLUMN = "text_version"
TEXT_COLUMNS: tuple[str, ...] = (INPUTS_COLUMN, CONFLICT_COLUMN, TEXT_VERSION_COLUMN)
# Beside them: the hive partition key readers add, and the manifest row and resolved location that --since
# joins the night before's tags on.
ADDED_COLUMNS: tuple[str, ...] = ("run_date", "row", "location")
# An attribute of one of these names would overwrite the column or be overwritten by it.
FIXED_COLUMNS: tuple[str, ...] = LEADING_COLUMNS + TRAILING_COLUMNS + TEXT_COLUMNS + ADDED_COLUMNS
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
