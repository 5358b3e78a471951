"""The product attributes Fashion Tagger predicts, in the Kaggle `styles.csv` spelling."""

ATTRIBUTES: tuple[str, ...] = (
    "gender",
    "masterCategory",
    "subCategory",
    "articleType",
    "baseColour",
    "season",
    "usage",
)
