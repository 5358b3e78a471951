"""Demo data for tests and ``tagger demo-data`` / ``tagger demo-check``.

- :mod:`.drawn`: a synthetic catalog in the Kaggle layout (shapes in named colours, every label visible),
  and demo-check's scoring of a tagged partition against true labels.

The built-in real-photo demo is the repository's ``demo/`` folder, not this package.
"""
