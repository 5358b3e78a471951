"""The data step: catalog and training rows -> pixels or a typed error, and the label vocabularies.

- :mod:`.manifest`: read and check a catalog manifest (CSV, Parquet, JSON Lines; Arrow columns);
- :mod:`.reader`: location -> bytes or a typed error (deadline, scheme guard, byte cap); the one Dataset
  and collate of tag, evaluate and predict; ``load_image`` for retrain;
- :mod:`.decode`: bytes -> upright RGB letterboxed square (draft decode, modes, bomb guard) or ImageError;
- :mod:`.kaggle`: the Kaggle "Fashion Product Images" layout (styles.csv, images/) read by retrain and evaluate;
- :mod:`.split`: the seeded train/val/test split of labelled rows and its split.parquet (retrain writes it,
  evaluate reads it);
- :mod:`.drawings`: generated product pictures (the demo catalog's, int8 calibration's generated set);
- :mod:`.labels`: rare labels folded into ``Other``, label strings <-> class indices (retrain and evaluate).

Importing this package is cheap: it imports none of its modules.
"""
