"""The frozen-trunk pass, and the cache that keeps its work.

With ``--freeze-stages N`` every photo (and, with ``--cache-mirror``, its mirror image) goes once through the stem
and the first N block stages; training reads those features. On a CPU that pass is most of a short retrain (minutes
per thousand photos), and it gives the same features for the same photo whatever the labels are: a re-run, a second
attribute or ``--corrections`` on the same photos. So each photo's features are kept on disk, in
``$TAGGER_CACHE/trunk-features/<trunk key>/`` (see :func:`tagger.storage.user_cache_dir`):

- the trunk key hashes the backbone's name, the frozen stages' weights and BatchNorm statistics, the number of
  frozen stages and the input transform (size, mean, std): another model or recipe never reads these features;
- each file is named by the hash of the photo's decoded pixels (the photo's bytes as the trunk sees them, after
  the letterbox at the input size) and the view (photo or mirror): a changed photo gets a new name and is computed.

The cache has a size limit (``--feature-cache-gb``, env ``TAGGER_FEATURE_CACHE_GB``; 0 turns it off); the least
recently used files go first. Every run says what it reused and what it computed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .progress import Ticker

log = logging.getLogger(__name__)

CACHE_KIND = "trunk-features"
GB = 1e9
# The first batches the pass is timed on before the budget is checked: enough to leave start-up costs behind.
ESTIMATE_AFTER_S = 10.0
ESTIMATE_AFTER_BATCHES = 4


def trunk_key(backbone: str, net, freeze_stages: int) -> str:
    """What makes a photo's trunk features: the backbone, the frozen modules' tensors, their number, the transform."""
    digest = hashlib.sha256(f"{backbone}|{freeze_stages}|".encode())
    config = net.data_config
    digest.update(repr((config.input_size, tuple(config.mean), tuple(config.std))).encode())
    for module in net.trunk_modules(freeze_stages):
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


def pixel_hashes(pixels: np.ndarray) -> list[str]:
    return [hashlib.blake2b(image.tobytes(), digest_size=16).hexdigest() for image in pixels]


@dataclass
class FeatureStore:
    """One trunk key's folder; ``None`` folder: no cache (everything is computed)."""

    folder: Path | None
    limit_bytes: float
    reused: int = 0
    computed: int = 0
    evicted: int = 0
    notes: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, key: str, limit_gb: float) -> FeatureStore:
        from .. import storage

        if limit_gb <= 0:
            return cls(None, 0)
        folder = Path(storage.user_cache_dir(CACHE_KIND)) / key
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("trunk-feature cache: cannot create %s (%s); computing every photo, keeping nothing. Set "
                        "TAGGER_CACHE to a writable folder or --feature-cache-gb 0 to say so", folder, exc)
            return cls(None, 0)
        return cls(folder, limit_gb * GB)

    def path(self, digest: str, view: int) -> Path:
        return self.folder / digest[:2] / f"{digest}.{view}.npy"

    def get(self, digest: str, view: int) -> np.ndarray | None:
        if self.folder is None:
            return None
        path = self.path(digest, view)
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None
        os.utime(path)  # least recently used goes first
        return array

    def put(self, digest: str, view: int, array: np.ndarray) -> None:
        if self.folder is None:
            return
        path = self.path(digest, view)
        try:
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            with open(tmp, "wb") as handle:
                np.save(handle, array, allow_pickle=False)
            os.replace(tmp, path)  # a reader never sees half a file
        except OSError as exc:
            if not self.notes:
                log.warning("trunk-feature cache: cannot write under %s (%s); this run's features are not kept", self.folder, exc)
            self.notes.append(str(exc))

    def trim(self) -> None:
        """Keep the whole cache (every trunk key) under the limit, oldest-used files first."""
        if self.folder is None:
            return
        root = self.folder.parent
        files = [(p.stat().st_mtime, p.stat().st_size, p) for p in root.glob("*/*/*.npy")]
        total = sum(size for _, size, _ in files)
        if total <= self.limit_bytes:
            return
        for _, size, path in sorted(files):
            if total <= self.limit_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
            self.evicted += 1
        log.info("trunk-feature cache: removed the %d least recently used file(s) to stay under %.1f GB (%s)",
                 self.evicted, self.limit_bytes / GB, root)


def trunk_features(
    pixels: np.ndarray,
    trunk: Callable[[torch.Tensor], torch.Tensor],
    store: FeatureStore,
    *,
    views: int = 2,
    batch_size: int = 8,
    on_estimate: Callable[[Ticker], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    order: Sequence[int] | None = None,
    stop: Callable[[], bool] | None = None,
) -> tuple[torch.Tensor, np.ndarray]:
    """``(features, have)``: ``(n, views, C, H, W)`` float16 features of ``pixels`` (n, H, W, 3 uint8) through ``trunk``
    (the whole backbone: ``(n, views, C)``), and ``have`` (n,) bool, the rows with every view. From ``store`` where it
    has them, else computed in batches of ``batch_size``, rows in ``order`` (default: as given), and stored as they
    come (a run stopped half way keeps what it did). ``on_estimate(ticker)`` is called once, after the first batches,
    to check the budget; ``clock``: the budget's. ``stop()`` is asked after each batch: true ends the pass there (the
    budget's reserve is reached), the rows not computed have ``have`` false.

    Small batches on purpose: at 224 px the early activations of a 64-image batch outgrow the CPU caches and the pass
    runs twice as slow (lite0 trunk on one core: 20 images/s at 8, 10 at 64).
    """
    started = time.monotonic()
    n = len(pixels)
    digests = pixel_hashes(pixels)
    features: torch.Tensor | None = None
    missing: list[tuple[int, int]] = []  # (row, view)
    have = np.ones(n, dtype=bool)
    for row in range(n) if order is None else order:
        digest = digests[row]
        for view in range(views):
            cached = store.get(digest, view)
            if cached is None:
                missing.append((row, view))
                continue
            if features is None:
                features = torch.empty((n, views, *cached.shape), dtype=torch.float16)
            if tuple(features.shape[2:]) != cached.shape:
                missing.append((row, view))
                continue
            features[row, view] = torch.from_numpy(cached)
            store.reused += 1
    if store.folder is not None:
        log.info("trunk-feature cache %s: %d of %d photo views found, %d to compute", store.folder, store.reused, n * views, len(missing))
    ticker = Ticker("frozen-trunk pass", len(missing), "photo views", clock=clock)
    estimated = on_estimate is None
    for begin in range(0, len(missing), batch_size):
        chunk = missing[begin : begin + batch_size]
        images = torch.from_numpy(np.stack([pixels[row] for row, _ in chunk])).permute(0, 3, 1, 2)
        flip = torch.tensor([view == 1 for _, view in chunk])
        if flip.any():
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        with torch.no_grad():
            out = trunk(images.contiguous()).float().to(torch.float16)
        if features is None:
            features = torch.empty((n, views, *out.shape[1:]), dtype=torch.float16)
        for (row, view), value in zip(chunk, out):
            features[row, view] = value
            store.put(digests[row], view, value.numpy())
            store.computed += 1
        ticker.update(begin + len(chunk))
        if not estimated and (ticker.elapsed >= ESTIMATE_AFTER_S or begin // batch_size + 1 >= ESTIMATE_AFTER_BATCHES):
            estimated = True
            on_estimate(ticker)
        if stop is not None and begin + len(chunk) < len(missing) and stop():
            for row, _ in missing[begin + len(chunk):]:
                have[row] = False
            ticker.finish(f"; stopped there, {int((~have).sum())} of {n} photos without features")
            break
    else:
        if missing:
            ticker.finish()
    store.trim()
    log.info("frozen-trunk features %s (%.0f MB): %d photo view(s) reused from the cache, %d computed, in %.0fs",
             tuple(features.shape), features.numel() * 2 / 1e6, store.reused, store.computed, time.monotonic() - started)
    return features, have
