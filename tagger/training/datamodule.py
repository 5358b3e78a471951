"""The LightningDataModule: Kaggle folder in, ``(uint8 NCHW images, LongTensor targets)`` batches out.

It owns the whole way from files to batches (parse, drop rows without a usable image, fold rare
labels, encode, split, decode, augment) so that training, evaluation and the saved split all come
from one place. Targets are ``(N, n_attributes)`` class indices with -1 for "unknown".

Pixels go through :func:`tagger.data.decode.decode_image` at the model's input size, exactly as the tag
job prepares them; augmentation then works on that decoded square, so what the network sees at
training time differs from tagging only by the augmentation itself.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.decode import ImageError
from ..data.reader import ImageSettings, StorageUnavailable, worker_context
from .config import CACHE_MODES, ConfigError, RetrainConfig
from .progress import Ticker
from ..data.kaggle import DataError, DataReport
from ..data.labelled import load_training_data
from ..data.labels import build_vocabularies, check_label_counts, check_label_variety, encode_targets, fold_rare_labels, label_counts, resolve_min_label_count
from ..data.split import SPLITS, read_split, stratified_split

log = logging.getLogger(__name__)


def train_transform(size: int):
    """Geometry only. Hue, saturation and brightness jitter are left out on purpose: they would
    teach the model that a red shirt may look orange, which is exactly the baseColour it must tell."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            # Near-square ratios: the product is already letterboxed, a squashed one is not a real photo.
            v2.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True),
            v2.RandomHorizontalFlip(),
            RotateOnWhite(10),
        ]
    )


class RotateOnWhite:
    """A random rotation within ±``degrees`` whose uncovered corners are white, like the studio background.

    torchvision's bilinear rotate with ``fill=255`` blends the border pixels with black first (its
    sampler pads with zeros), drawing a grey frame that no real photo has. Rotating the inverted image
    with zero padding and inverting back makes "outside" exactly white, edges included.
    """

    def __init__(self, degrees: float):
        self.degrees = degrees

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        angle = float(torch.empty(()).uniform_(-self.degrees, self.degrees))
        return 255 - TF.rotate(255 - image, angle, interpolation=InterpolationMode.BILINEAR, fill=0)


class ProductImages(Dataset):
    """Rows ``rows`` of the data module's arrays. Columns are numpy arrays (fixed-width strings, not
    Python objects): DataLoader workers then share them copy-on-write instead of duplicating every
    object whose reference count they touch.

    With ``cache`` the pixels come from memory; otherwise each item is read and decoded here, and an
    image that fails is flagged in the shared ``failed`` tensor (so the main process can count it)
    and the item is ``None``, which :class:`Collate` leaves out of the batch.
    """

    def __init__(
        self,
        rows: np.ndarray,
        targets: np.ndarray,
        *,
        size: int,
        cache: np.ndarray | None = None,
        urls: np.ndarray | None = None,
        failed: torch.Tensor | None = None,
        transform=None,
        images: ImageSettings | None = None,
    ):
        if cache is None and (urls is None or failed is None):
            raise ValueError("ProductImages needs either a cache or urls + failed")
        self.rows = rows
        self.targets = targets
        self.size = size
        self.cache = cache
        self.urls = urls
        self.failed = failed
        self.transform = transform
        self.images = images or ImageSettings()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        row = int(self.rows[index])
        if self.cache is not None:
            pixels = self.cache[row]
        else:
            if self.failed[row]:
                return None
            url = str(self.urls[row])
            try:
                pixels = self.images.load(url, self.size).copy()  # decode_image's array is read-only
            except ImageError as exc:
                self.failed[row] = True
                log.warning("dropping row %d: %s", row, exc.message)
                return None
        image = torch.from_numpy(pixels).permute(2, 0, 1)
        if self.transform is not None:
            image = self.transform(image)
        return image, torch.from_numpy(self.targets[row])


class Collate:
    """Stacks items, leaving out the ``None`` of images that failed to decode (possibly all of them)."""

    def __init__(self, size: int, n_attributes: int):
        self.size = size
        self.n_attributes = n_attributes

    def __call__(self, items):
        items = [item for item in items if item is not None]
        if not items:
            return torch.empty((0, 3, self.size, self.size), dtype=torch.uint8), torch.empty((0, self.n_attributes), dtype=torch.long)
        return torch.stack([i[0] for i in items]).contiguous(), torch.stack([i[1] for i in items])


class TrunkFeatures(Dataset):
    """Cached frozen-trunk features of ``rows``: a random view (photo or mirror) when training, else the photo."""

    def __init__(self, rows: np.ndarray, features: torch.Tensor, targets: np.ndarray, *, random_view: bool):
        self.rows = rows
        self.features = features
        self.targets = targets
        self.random_view = random_view

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        row = int(self.rows[index])
        view = int(torch.randint(self.features.shape[1], ())) if self.random_view else 0
        return self.features[row, view].float(), torch.from_numpy(self.targets[row])


# The first images decoding is timed on before ``on_estimate`` checks the budget: a few seconds in, or this many
# images, whichever comes first (as the trunk pass is, tagger.training.features).
DECODE_ESTIMATE_AFTER_S = 10.0
DECODE_ESTIMATE_AFTER_IMAGES = 64


def decode_all(
    urls: Sequence[str], size: int, *, threads: int, images: ImageSettings | None = None, errors: list[str] | None = None,
    on_estimate: Callable[[Ticker], None] | None = None, clock: Callable[[], float] = time.monotonic,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode every image once: ``(pixels (n, size, size, 3) uint8, ok (n,) bool)``.

    Threads rather than processes: Pillow releases the GIL while decoding and resizing, and threads
    write straight into one preallocated array. ``on_estimate(ticker)`` is called once, from this thread, after the
    first images (``DECODE_ESTIMATE_AFTER_*``) to check the budget on ``clock``; what it raises stops the decoding
    (the images not started are skipped) and is raised here.
    """
    images = images or ImageSettings()
    pixels = np.empty((len(urls), size, size, 3), dtype=np.uint8)
    ok = np.zeros(len(urls), dtype=bool)
    # The full data set takes minutes: a line every 30 s with rate and ETA.
    ticker = Ticker("decoding", len(urls), clock=clock)
    lock = threading.Lock()
    done = [0]

    down: list[StorageUnavailable] = []
    stop: list[BaseException] = []

    def work(i: int) -> None:
        if down or stop:
            return  # the store is failing, or the budget cannot hold: stop at once, not after every image's deadline
        try:
            pixels[i] = images.load(urls[i], size)
            ok[i] = True
        except StorageUnavailable as exc:
            down.append(exc)
        except ImageError as exc:
            log.warning("dropping the row of %s", exc.message)
            if errors is not None and not errors:
                errors.append(exc.message)  # the first one, for the error that none could be read
        with lock:
            done[0] += 1
            ticker.update(done[0])

    estimated = on_estimate is None
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for _ in pool.map(work, range(len(urls))):
            if estimated or stop:
                continue
            if ticker.elapsed >= DECODE_ESTIMATE_AFTER_S or ticker.done >= min(DECODE_ESTIMATE_AFTER_IMAGES, len(urls)):
                estimated = True
                try:
                    on_estimate(ticker)
                except BaseException as exc:  # noqa: BLE001 - raised below, once the threads have stopped
                    stop.append(exc)
    if stop:
        raise stop[0]
    if down:
        raise down[0]
    return pixels, ok


class FashionDataModule(pl.LightningDataModule):
    """Everything between a Kaggle folder and the batches, for one input size.

    After :meth:`setup`: ``vocab`` (attr -> labels), ``targets`` (n, n_attr) int64, ``ids``,
    ``assignment`` (index into SPLITS per row), ``report`` (row accounting), ``folded``,
    ``min_label_count``, ``fingerprint``, ``cached``.
    """

    def __init__(self, config: RetrainConfig, *, input_size: int, pin_memory: bool = False, augment: bool = True,
                 on_decode_estimate: Callable[[Ticker], None] | None = None, clock: Callable[[], float] = time.monotonic):
        """``config``: the retrain settings this module reads (data, its columns and format, corrections, attributes,
        batch size, seed, split fractions and --split-from, label folding and --keep-labels, the image cache);
        ``input_size``: the backbone's, resolved by the caller; ``on_decode_estimate``, ``clock``: the budget's check
        after the first images of :func:`decode_all`, and its clock."""
        super().__init__()
        if config.cache_images not in CACHE_MODES:
            raise ValueError(f"cache_images must be one of {', '.join(CACHE_MODES)}, got {config.cache_images!r}")
        self.config = config
        self.data = config.data
        self.input_size = input_size
        self.batch_size = config.batch_size
        self.workers = 0  # the caller picks them once the cache is known (train.resolve_workers)
        self.seed = config.seed
        self.storage_options = dict(config.storage_options or {})
        # How each photo is read (size caps, http hosts, storage options): the tag job's one source.
        self.images: ImageSettings = config.image_settings()
        self.attributes = tuple(config.attribute_names)
        self.pin_memory = pin_memory
        self.augment = augment
        self.keep_labels, self.keep_labels_training = _kept_labels(config)
        self.on_decode_estimate, self.clock = on_decode_estimate, clock
        self._ready = False

    # ------------------------------------------------------------------ preparation

    def setup(self, stage: str | None = None) -> None:
        if self._ready:  # Lightning calls this once per stage; the data is the same for all
            return
        started = time.monotonic()
        config = self.config
        kaggle = load_training_data(
            self.data, self.attributes, self.storage_options, corrections=tuple(config.corrections), id_column=config.id_column,
            image_column=config.image_column, fmt=config.data_format,
            text_columns=tuple(getattr(config, "text_columns", None) or ()),
        )
        report: DataReport = kaggle.report
        _log_report(kaggle.styles_url, report)
        table = kaggle.table
        self._check_learnable(table, report)  # before minutes of decoding; checked again on the rows that decode
        urls = table["image"].to_list()
        size = self.input_size

        self.cached = self._want_cache(len(urls))
        self.cache: np.ndarray | None = None
        if self.cached:
            threads = max(1, min(16, os.cpu_count() or 1))
            errors: list[str] = []
            pixels, ok = decode_all(urls, size, threads=threads, images=self.images, errors=errors,
                                    on_estimate=self.on_decode_estimate, clock=self.clock)
            if not ok.any():
                raise DataError(
                    f"none of the {len(urls)} images in {kaggle.images_url} could be decoded; first error: "
                    f"{errors[0] if errors else urls[0]}"
                )
            if not ok.all():
                bad = table.filter(~ok)["id"].to_list()
                report.note_unreadable(bad)
                table = table.filter(ok)
                pixels = _compact(pixels, ok)
            self.cache = pixels
            log.info("decoded %d images at %dpx into memory (%.0f MB) in %.1fs", len(pixels), size, pixels.nbytes / 1e6, time.monotonic() - started)

        self.min_label_count = resolve_min_label_count(config.min_label_count, table.height)
        # Attributes whose vocabulary comes from the starting bundle (--keep-labels) are encoded as that bundle
        # encodes them (its folded labels -> its Other; a label it never had -> Other, else unknown); the rest fold here.
        kept = {a: list(v) for a, v in (self.keep_labels or {}).items() if a in self.attributes}
        folding = fold_rare_labels(table, [a for a in self.attributes if a not in kept], self.min_label_count)
        table = folding.table
        self.folded, self.folded_into = folding.folded, folding.folded_into
        learnt = [a for a in self.attributes if a not in kept]
        check_label_counts(label_counts(table, learnt), table.height, self.min_label_count, report.sources)  # before a head is built
        check_label_variety(label_counts(table, learnt))
        vocab = build_vocabularies(table, learnt) if learnt else {}
        self.vocab = {a: kept[a] if a in kept else vocab[a] for a in self.attributes}
        if kept:
            from ..data.labels import encode_labels

            theirs = self.keep_labels_training.get("data") if isinstance(self.keep_labels_training.get("data"), Mapping) else {}
            facts = {"data": {k: {a: v for a, v in (theirs.get(k) or {}).items() if a in kept} for k in ("folded", "folded_into")}}
            self.folded.update(facts["data"]["folded"])
            self.folded_into.update(facts["data"]["folded_into"])
            columns = {a: table[a].to_list() for a in self.attributes}
            self.targets, mappings = encode_labels(columns, self.vocab, facts, unknown_labels="other")
            self.kept_labels = {a: {"unknown_as_other" if mappings[a].unknown_as_other else "unknown_excluded": mappings[a].n_unknown,
                                    "labels": len(kept[a])} for a in kept}
            for a, m in mappings.items():
                if a in kept and m.n_unknown:
                    log.info("labels %s: %d row(s) with a label the starting bundle does not have (e.g. %s) %s", a, m.n_unknown,
                             ", ".join(list(m.unknown)[:3]), "scored as Other" if m.unknown_as_other else "left unknown")
        else:
            self.targets = encode_targets(table, self.vocab)
            self.kept_labels = {}
        self.out_of_scope = self._apply_scopes()
        # Per attribute and class, as trained: patchy labels are the rule in a real catalog, so say what there is.
        self.label_stats = {a: _class_counts(self.targets[:, j], labels) for j, (a, labels) in enumerate(self.vocab.items())}
        for attr, counts in self.label_stats.items():
            log.info("labels %s: %d of %d rows (%d classes; %s)", attr, sum(counts.values()), table.height, len(counts),
                     ", ".join(f"{k} {v}" for k, v in list(counts.items())[:8]) + (", ..." if len(counts) > 8 else ""))
        check_label_counts(self.label_stats, table.height, self.min_label_count, report.sources)
        check_label_variety(self.label_stats)  # where a scope left one class
        self.assignment = stratified_split(
            self.targets, [len(v) for v in self.vocab.values()], val_fraction=config.val_fraction, test_fraction=config.test_fraction, seed=self.seed
        )
        self.split_reused = self._reuse_split(table["id"].to_list()) if config.split_from else None
        self.ids = np.asarray(table["id"].to_list(), dtype=np.str_)
        text_columns = list(getattr(config, "text_columns", None) or [])
        missing = [c for c in text_columns if c not in table.columns]
        if missing:
            raise ConfigError("text_columns", f"no column {', '.join(missing)} in --data (a Kaggle folder's title is "
                                              f"productDisplayName)")
        # Per row, the text of each --text-column (the text model is fitted on the train rows' after the network).
        self.texts = {c: table[c].to_list() for c in text_columns}
        self.urls = np.asarray(table["image"].to_list(), dtype=np.str_)
        # Shared memory so that DataLoader worker processes can flag images that fail to decode.
        self.failed = torch.zeros(len(self.ids), dtype=torch.bool)
        if not self.cached:
            self.failed.share_memory_()
        report.used = table.height
        self.report = report
        self.fingerprint = kaggle.fingerprint
        self._ready = True

    def _check_learnable(self, table: Any, report: Any) -> None:
        """The label checks of the rows as loaded (each learnt attribute: enough labelled rows, two classes or
        more once rare labels fold), so that a hopeless attribute is refused before any image is decoded."""
        learnt = [a for a in self.attributes if a not in (self.keep_labels or {})]
        min_count = resolve_min_label_count(self.config.min_label_count, table.height)
        folded = fold_rare_labels(table, learnt, min_count).table
        check_label_counts(label_counts(folded, learnt), folded.height, min_count, report.sources)
        check_label_variety(label_counts(folded, learnt))

    def _apply_scopes(self) -> dict[str, int]:
        """``--applies-when``: the scopes checked against the vocabularies; an attribute's labels on rows whose own
        label of the scope attribute is outside the scope are not learnt (counted, said). Then the attributes whose
        labels come from a narrow slice of the data, without a scope, are named with the scope they suggest."""
        from ..model.scope import scope_problem

        scopes = self.config.scopes
        problem = scope_problem(scopes, self.vocab)
        if problem:
            raise ConfigError("applies_when", problem)
        names = list(self.vocab)
        dropped = {}
        for attr, scope in scopes.items():
            j, k = names.index(attr), names.index(scope.attribute)
            wanted = [self.vocab[scope.attribute].index(v) for v in scope.values]
            known_other = self.targets[:, k] >= 0
            outside = (self.targets[:, j] >= 0) & known_other & ~np.isin(self.targets[:, k], wanted)
            self.targets[outside, j] = -1
            dropped[attr] = int(outside.sum())
            log.info("%s applies where %s: %d labelled row(s) outside it are not learnt", attr, scope.describe(), dropped[attr])
        self.narrow = narrow_slices(self.targets, self.vocab, exclude=set(scopes))
        for attr, other, value, share, n, overall in self.narrow:
            log.warning("%s: %.0f %% of its %d labelled rows have %s=%s (%.0f %% of all rows with a %s): if %s only "
                        "applies there, say so with --applies-when %s:%s=%s, so that elsewhere its tag is null, not a guess",
                        attr, 100 * share, n, other, value, 100 * overall, other, attr, attr, other, value)
        return dropped

    def _reuse_split(self, ids: list[str]) -> dict[str, Any]:
        """Rows listed in ``split_from`` keep that split; the others keep their fresh stratified one.

        Fine-tuning a bundle on data it was trained from: a test row of that bundle must stay a test row,
        or the new model is scored on photos its trunk has already fitted (and the comparison of the two
        models is on different rows)."""
        url = self.config.split_from
        if not url.endswith(".parquet"):
            url = os.path.join(url, "split.parquet") if not "://" in url else url.rstrip("/") + "/split.parquet"
        try:
            previous = read_split(url, self.storage_options)
        except FileNotFoundError:
            raise DataError(f"--split-from {self.config.split_from}: no {url} (give a bundle folder with a split.parquet, or the file)") from None
        listed = 0
        for i, row_id in enumerate(ids):
            name = previous.get(row_id)
            if name in SPLITS:
                self.assignment[i] = SPLITS.index(name)
                listed += 1
        log.info("split: %d of %d rows keep their split from %s; %d new rows split afresh", listed, len(ids), url, len(ids) - listed)
        return {"from": url, "kept": listed, "new": len(ids) - listed}

    def _want_cache(self, n: int) -> bool:
        if self.config.cache_images != "auto":
            return self.config.cache_images == "on"
        need = n * self.input_size * self.input_size * 3
        if need > self.config.cache_max_gb * 2**30:
            log.info(
                "not caching decoded images: %d x %dpx needs %.1f GB, over cache_max_gb=%.1f; decoding per epoch",
                n, self.input_size, need / 2**30, self.config.cache_max_gb,
            )
            return False
        return True

    # ------------------------------------------------------------------ accessors

    @property
    def label_counts(self) -> dict[str, int]:
        return {attr: len(labels) for attr, labels in self.vocab.items()}

    def rows(self, split: str) -> np.ndarray:
        return np.nonzero(self.assignment == SPLITS.index(split))[0]

    @property
    def split_sizes(self) -> dict[str, int]:
        return {name: int((self.assignment == i).sum()) for i, name in enumerate(SPLITS)}

    def unreadable_ids(self) -> list[str]:
        """Rows whose image failed to decode while loading (lazy mode; the cache drops them up front)."""
        return self.ids[self.failed.numpy()].tolist()

    def dataset(self, split: str, *, augment: bool = False) -> ProductImages:
        return ProductImages(
            self.rows(split),
            self.targets,
            size=self.input_size,
            cache=self.cache,
            urls=None if self.cached else self.urls,
            failed=None if self.cached else self.failed,
            transform=train_transform(self.input_size) if augment else None,
            images=self.images,
        )

    def _workers_read_a_store(self) -> bool:
        """Whether DataLoader workers read images from an fsspec store (s3:// and the like, not http(s))."""
        if self.cached:
            return False
        return any("://" in url and not url.lower().startswith(("http://", "https://")) for url in map(str, self.urls))

    def loader(self, split: str, *, augment: bool = False, shuffle: bool = False) -> DataLoader:
        dataset = self.dataset(split, augment=augment)
        batch_size = max(1, min(self.batch_size, len(dataset)))
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            # A last batch of one image breaks BatchNorm in training; dropping it costs < 1 batch/epoch.
            drop_last=shuffle and len(dataset) > batch_size,
            num_workers=self.workers,
            # The tag job's rule (tagger.data.reader.worker_context): workers that read from S3 start from a
            # forkserver, since a forked child must not reuse the parent's s3fs event loop (seen: a worker waiting
            # for ever on an image of an s3:// Kaggle folder). Cached images are read by the parent: fork is fine.
            multiprocessing_context=worker_context("auto", self._workers_read_a_store()) if self.workers else None,
            persistent_workers=self.workers > 0,
            pin_memory=self.pin_memory,
            collate_fn=Collate(self.input_size, len(self.vocab)),
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        if self.trunk_features is not None:
            return self.feature_loader("train", shuffle=True)
        return self.loader("train", augment=self.augment, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        if self.trunk_features is not None:
            return self.feature_loader("val")
        return self.loader("val")

    # ------------------------------------------------------------------ frozen-trunk features

    trunk_features: torch.Tensor | None = None  # (n, views, C, H, W) float16, set by retrain (tagger.training.features)
    # (n,) bool: the rows the trunk pass reached when --max-minutes stopped it; None: every row
    trunk_have: np.ndarray | None = None

    def feature_loader(self, split: str, *, shuffle: bool = False) -> DataLoader:
        rows = self.rows(split)
        if self.trunk_have is not None:
            rows = rows[self.trunk_have[rows]]  # the photos the pass did not reach are not used
        dataset = TrunkFeatures(rows, self.trunk_features, self.targets, random_view=shuffle)
        batch_size = max(1, min(self.batch_size, len(dataset)))
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle and len(dataset) > batch_size, generator=generator)

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")


NARROW_SHARE = 0.9  # an attribute whose labelled rows are this much one value of another ...
NARROW_OVERALL = 0.75  # ... that is not this common over all rows: a scope is likely


def narrow_slices(targets: np.ndarray, vocab: Mapping[str, Sequence[str]], exclude: set[str] = frozenset()) -> list[tuple]:
    """``(attribute, other, value, share, n labelled, value's overall share)`` for each attribute (not in ``exclude``)
    whose labelled rows are mostly (> 90 %) one value of another attribute that is not that common overall (< 75 %)."""
    names = list(vocab)
    out = []
    for j, attr in enumerate(names):
        labelled = targets[:, j] >= 0
        if attr in exclude or labelled.sum() < 10 or labelled.mean() > NARROW_SHARE:
            continue
        for k, other in enumerate(names):
            if k == j:
                continue
            both = labelled & (targets[:, k] >= 0)
            everywhere = targets[:, k] >= 0
            if both.sum() < 10:
                continue
            counts = np.bincount(targets[both, k], minlength=len(vocab[other]))
            top = int(counts.argmax())
            share = counts[top] / both.sum()
            overall = float((targets[everywhere, k] == top).mean())
            if share > NARROW_SHARE and overall < NARROW_OVERALL:
                out.append((attr, other, vocab[other][top], float(share), int(labelled.sum()), overall))
                break
    return out


def _kept_labels(config: RetrainConfig) -> tuple[dict[str, list[str]] | None, Mapping[str, Any]]:
    """``--keep-labels``: the starting bundle's vocabularies for the attributes it shares, and its training facts
    (how it folded them)."""
    if not config.keep_labels:
        return None, {}
    import json

    meta = json.loads(open(os.path.join(config.init_weights, "model.json"), encoding="utf-8").read())
    labels = {a["name"]: list(a["labels"]) for a in meta.get("attributes", []) if a.get("name") in config.attribute_names}
    return labels, meta.get("training") or {}


def _log_report(source: str, report: DataReport) -> None:
    if report.repaired:
        log.info("%s: %d line(s) had unquoted commas in the last column and were repaired (e.g. line %s)",
                 source, report.repaired, ", ".join(map(str, report.repaired_lines)))
    if report.malformed:
        log.warning("%s: %d line(s) with too few fields were dropped (e.g. line %s); fix or quote them",
                    source, report.malformed, ", ".join(map(str, report.malformed_lines)))
    if report.missing_id or report.duplicate_id:
        log.warning("%s: dropped %d row(s) without an id and %d repeated id(s) (first row kept)",
                    source, report.missing_id, report.duplicate_id)
    if report.missing_image:
        log.warning("%s: %d row(s) have no file in images/ and were dropped (e.g. id %s)",
                    source, report.missing_image, ", ".join(report.missing_image_ids))


def _class_counts(targets: np.ndarray, labels: Sequence[str]) -> dict[str, int]:
    counts = np.bincount(targets[targets >= 0], minlength=len(labels))
    return {labels[i]: int(counts[i]) for i in sorted(np.nonzero(counts)[0], key=lambda i: (-counts[i], labels[i]))}


def _compact(pixels: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """``pixels[ok]`` without a second full-size copy (the cache can be gigabytes)."""
    for new, old in enumerate(np.nonzero(ok)[0]):
        if new != old:
            pixels[new] = pixels[old]
    return pixels[: int(ok.sum())]
