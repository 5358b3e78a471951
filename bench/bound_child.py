"""The two costs behind the job's limit, measured in one process of the code under test:
``python -P bench/bound_child.py '{"catalog": ..., "model": ..., "batch_size": 32, "images": 64}'`` prints JSON.

Self-contained on purpose (stdlib + ``tagger`` only): bench/bound.py runs it with ``PYTHONPATH`` set to a tree
of today's code or of an older commit, so each side is measured by its own decode and its own ``--runtime auto``.

* decode: process CPU ms per photo of :func:`tagger.data.decode.decode_image` (bytes already read, one thread,
  the bundle's input size), what one DataLoader worker spends per photo;
* model: process CPU ms per photo of the Predictor with the runtime and precision ``--runtime auto`` picks
  (the measured choice where the code measures), on batches of those decoded photos, torch's thread count.
"""

from __future__ import annotations

import csv
import json
import sys
import time


def main() -> None:
    spec = json.loads(sys.argv[1])
    import numpy as np
    import torch

    from tagger.data.decode import decode_image
    from tagger.model.bundle import load_bundle
    from tagger.model.predictor import Predictor
    from tagger.model.choice import choose_runtime

    bundle = load_bundle(spec["model"])
    with open(spec["catalog"], newline="") as handle:
        paths = [row["image"] for row in csv.DictReader(handle)][: spec["images"]]
    datas = [open(p, "rb").read() for p in paths]
    decode_image(datas[0], bundle.input_size)
    rounds = []
    for _ in range(3):
        started = time.process_time()
        pixels = [decode_image(d, bundle.input_size) for d in datas]
        rounds.append(1000 * (time.process_time() - started) / len(datas))
    decode_ms = sorted(rounds)[1]

    cpu = torch.device("cpu")
    try:
        choice = choose_runtime("auto", cpu, "auto", bundle=bundle)
    except TypeError:  # code from before `auto` measured: its fixed preference order
        choice = choose_runtime("auto", cpu, "auto")
    predictor = Predictor(bundle, cpu, precision="auto", runtime=choice)
    n = spec["batch_size"]
    batches = [torch.from_numpy(np.stack([pixels[(i + j) % len(pixels)] for j in range(n)])).permute(0, 3, 1, 2)
               for i in range(0, len(pixels), n)]
    predictor(batches[0])
    rounds = []
    for _ in range(3):
        started = time.process_time()
        for images in batches:
            predictor(images)
        rounds.append(1000 * (time.process_time() - started) / (n * len(batches)))
    model_ms = sorted(rounds)[1]
    print("BENCH-RESULT " + json.dumps({"decode_cpu_ms": round(decode_ms, 2), "model_cpu_ms": round(model_ms, 2),
                                         "runtime": choice.name, "precision": predictor.precision_name,
                                         "threads": torch.get_num_threads(), "photos": len(datas)}))


if __name__ == "__main__":
    main()
