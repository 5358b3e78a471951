"""``tagger tag``: the nightly job, from a manifest to committed Parquet partitions.

- :mod:`.config`: :class:`~.config.TagConfig`, every option and its default (and the option names shared
  by every command: devices, precisions, runtimes, the byte cap);
- :mod:`.runner`: the tag run as a short line: checks, lease, plan, shards, summary, composing the parts:
- :mod:`.plan`: the typed plan of a run date (``plan.json``): its key, run id, shards, reuse facts;
- :mod:`.loader`: the reader part: the DataLoader over :class:`tagger.data.reader.ImageRows`, its faults typed;
- :mod:`.model_part`: the model part: device, runtime and precision resolved up front, then the
  :class:`tagger.model.predictor.Predictor`, a NaN score refused;
- :mod:`.rows`: a batch's predictions and errors -> rows of the open shard's parts;
- :mod:`.writers`: Parquet schemas, part writers, ``_SUCCESS``, reading a complete partition;
- :mod:`.partition`: one run date's folders: plan, shard markers, summary;
- :mod:`.shards`: the partition's lease, shard parts and done markers, fencing, ``_SUCCESS``;
- :mod:`.lease`: who owns a run date: lease with heartbeat, takeover, fencing;
- :mod:`.incremental`: ``--since``: current image versions and the rows to reuse;
- :mod:`.summary`: the run summary (``summary.json``, the line on stderr);
- :mod:`.stop`: SIGTERM/SIGINT, honoured from the first second;
- :mod:`.ray`: ``--engine ray``, the tagging of the pending shards on Ray Data (the ``ray`` extra).
"""
