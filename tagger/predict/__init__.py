"""``tagger predict``: a model's predictions beside external images.

- :mod:`.gallery`: images found under the inputs, their top-k labels (:mod:`tagger.model.scoring`), and the
  contact sheet (PNG) and self-contained HTML gallery that show them.
"""
