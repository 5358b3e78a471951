"""One measured run, in its own process: ``python -m bench.child '{"variant": ..., ...}'`` prints JSON.

``tagger``: the real job, :class:`tagger.tag.runner.TagRunner` on a manifest, exactly as ``tagger tag`` runs it.
``baseline``: the loop a user would otherwise write, as timm's ``inference.py`` does it: PIL open +
convert("RGB"), timm's eval transforms (torchvision Resize + CenterCrop, ToTensor, Normalize), a
DataLoader, the model in eval mode under ``torch.no_grad()``, top label and score per attribute.

Levers (for the lever study; the A/B comparison runs each side as shipped): ``precision``, ``draft``,
``channels_last``, ``compile``, ``threads`` (torch threads of the main process).
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
import tempfile
import time


def _levers(spec: dict) -> None:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    if "channels_last" in spec or spec.get("compile") or "amp" in spec:
        import tagger.model.predictor as inference

        original = inference.Predictor.__init__

        def patched(self, bundle, device, *, amp=None, channels_last=True, **kwargs):
            amp = spec.get("amp", amp)
            original(self, bundle, device, amp=amp, channels_last=spec.get("channels_last", channels_last), **kwargs)
            if spec.get("compile"):
                self.net = torch.compile(self.net)

        inference.Predictor.__init__ = patched


def run_tagger(spec: dict) -> dict:
    from tagger.tag.config import TagConfig
    from tagger.tag.runner import TagRunner

    _levers({k: v for k, v in spec.items() if k != "threads"})
    out = tempfile.mkdtemp(prefix="bench-out-", dir=spec.get("scratch"))
    extra = {k: spec[k] for k in ("precision", "worker_start_method", "threads", "runtime", "engine", "allow_hosts",
                                  "allow_private_addresses", "allow_plain_http") if k in spec}
    config = TagConfig(
        catalog=spec["catalog"], model=spec["model"], out=out, run_date="2026-01-01", device="cpu",
        batch_size=spec["batch_size"], workers=spec["workers"], progress="none", draft_decode=spec.get("draft", True),
        shard_size=spec.get("shard_size", 10_000), **extra,
    )
    started = time.perf_counter()
    result = TagRunner(config).run()
    wall = time.perf_counter() - started
    shutil.rmtree(out, ignore_errors=True)
    summary = result.summary
    return {
        "runtime": (summary.get("this_process") or {}).get("runtime"),
        "engine": (summary.get("this_process") or {}).get("engine"),
        "exit_code": result.exit_code,
        "rows": summary.get("rows"),
        "tagged": summary.get("tagged"),
        "errors": summary.get("errors"),
        "wall_s": round(wall, 3),
        "durations_s": summary.get("durations_s"),
    }


def run_baseline(spec: dict) -> dict:
    import torch
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from tagger.model.bundle import load_bundle

    _levers({k: v for k, v in spec.items() if k == "threads"})
    started = time.perf_counter()
    with open(spec["catalog"], newline="") as handle:
        paths = [row["image"] for row in csv.DictReader(handle)]
    bundle = load_bundle(spec["model"])
    net = bundle.build_net()  # the same architecture and weights as the tag job's
    size = bundle.input_size

    class Model(torch.nn.Module):  # the user's model: backbone + heads, fed normalised floats
        def __init__(self):
            super().__init__()
            self.backbone, self.heads = net.backbone, net.heads

        def forward(self, x):
            features = self.backbone(x)
            return {name: head(features) for name, head in self.heads.items()}

    model = Model().eval()
    transform = create_transform(**resolve_data_config({"input_size": (3, size, size)}, model=net.backbone))

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, index):
            return transform(Image.open(paths[index]).convert("RGB"))

    loader = torch.utils.data.DataLoader(Files(), batch_size=spec["batch_size"], num_workers=spec["workers"], shuffle=False)
    labels, seen = [], 0
    with torch.no_grad():
        for images in loader:
            logits = model(images)
            labels.append({k: v.softmax(1).max(1) for k, v in logits.items()})
            seen += images.shape[0]
    wall = time.perf_counter() - started
    return {"exit_code": 0, "rows": seen, "tagged": seen, "errors": 0, "wall_s": round(wall, 3), "transform": str(transform).replace("\n", " ")}


def main() -> None:
    spec = json.loads(sys.argv[1])
    import logging

    logging.basicConfig(level=logging.WARNING)
    result = {"tagger": run_tagger, "baseline": run_baseline}[spec["variant"]](spec)
    print("BENCH-RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
