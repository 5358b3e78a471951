"""The parts the tag runner (:mod:`tagger.runner`) composes, each small and testable alone.

- :mod:`.plan`: the typed plan of a run date (``plan.json``): its key, run id, shards, reuse facts;
- :mod:`.loader`: the DataLoader over :class:`tagger.reader.ImageRows`, its faults mapped to typed errors;
- :mod:`.predictor`: device, runtime and precision resolved up front, then the :class:`tagger.inference.Predictor`;
- :mod:`.rows`: a batch's predictions and errors -> rows of the open shard's parts;
- :mod:`.shards`: the partition's lease, shard parts and done markers, fencing, ``_SUCCESS``;
- :mod:`.summary`: the run summary (``summary.json``, the line on stderr);
- :mod:`.stop`: SIGTERM/SIGINT, honoured from the first second.
"""
