"""Data streamed from disk: an image folder's splits read image by image while training (`data.storage`).

With `data.storage = "stream"` (or "auto" when the decoded images would take more than
`data.memory_budget_mb`), `load_data` holds each split of an image folder as `ImageFiles`:
the files' paths, never their pixels. Every image is read once when the folder is first
loaded (`scan_split`, in `data.workers` loader processes), which checks each file as the
in-memory path does (unreadable files, sizes, what reading changes: imagefolder.py) and
keeps each image's channel sums for the training set's mean and std. The scan is cached
beside the in-memory path's tensor cache, keyed by the listing, so later runs and the
specialists' worker processes skip it.

Every stage takes inputs that are a tensor or `ImageFiles`: `batches(x, batch_size)`
yields them in order (for files, through a DataLoader with worker processes),
`take(x, indices)` selects examples and `head(x, n)` gives the first n as a tensor.
`ImageLoader` gives fit() its training batches one image at a time, read from files or
from the rows of a tensor and, with a per-image augmentation (augment.py), each image
transformed under a seed of its own position in the epoch: the batches do not depend on
the number of workers and are the same after a resume. Streamed images are the same float32
values the in-memory path holds (uint8 / 255), so a run gives the same results either way.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import multiprocessing
import os
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .config import DataConfig
from .errors import DataError
from .imagefolder import (
    DEFAULT_MAX_IMAGE_PIXELS,
    FolderListing,
    cached_split,
    check_same_size,
    check_split_sizes,
    common_channels,
    decode_image,
    listing_signature,
    log_notes,
    size_text,
    tally_changes,
)

log = logging.getLogger(__name__)

SCAN_BATCH = 256  # images per message from a scanning worker


@dataclass
class ImageFiles:
    """The images of one split of an image folder, read from disk when they are needed."""

    folder: str  # the folder holding train/ and test/
    paths: np.ndarray  # (N,) bytes: each image's path relative to `folder` (os.fsencode; no Python object per file)
    channels: int  # 1 when every image of the data set is greyscale, else 3
    size: tuple[int, int]  # (height, width) of every image as read
    image_size: int  # data.image_size: images are resized to this square size as they are read; 0 = kept
    sums: np.ndarray  # (N, channels) float64: each image's sum of pixel values in [0, 1], per channel
    squares: np.ndarray  # (N, channels) float64: the same of the squared values
    workers: int  # data.workers: loader processes that read the files
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # data.max_image_pixels: a larger image is refused

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), self.channels, *self.size)

    def subset(self, indices: Tensor | np.ndarray) -> ImageFiles:
        """The images at `indices`, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        return dataclasses.replace(self, paths=self.paths[indices], sums=self.sums[indices],
                                   squares=self.squares[indices])

    def read(self, index: int) -> Tensor:
        """Image `index` as float32 (C, H, W) in [0, 1]: the values the in-memory path holds."""
        relative = os.fsdecode(self.paths[index])
        array, _ = decode_image(relative, self.image_size, self.folder, self.channels, self.max_pixels)
        if array.shape[:2] != self.size:
            raise DataError(f"image {relative} (in {self.folder}) is now {size_text(array.shape[:2])}, not "
                            f"{size_text(self.size)} as when the folder was first read; do not change the "
                            "images while a run reads them")
        pixels = torch.from_numpy(array.astype(np.float32))  # PIL's array is read-only: a copy, as float32
        pixels = pixels.unsqueeze(0) if pixels.ndim == 2 else pixels.permute(2, 0, 1)
        return pixels.contiguous().div_(255.0)

    def channel_sums(self) -> tuple[Tensor, Tensor, int]:
        """(sum, sum of squares) per channel over every pixel of every image, in float64, and the pixel count
        per channel."""
        return (torch.from_numpy(self.sums).sum(0), torch.from_numpy(self.squares).sum(0),
                len(self) * self.size[0] * self.size[1])


Inputs = Union[Tensor, ImageFiles]  # what every stage takes as a split's inputs


# ---------------------------------------------------------------- choosing and loading

def storage_for(cfg: DataConfig, listing: FolderListing) -> str:
    """"memory" or "stream": data.storage, or for "auto" whether the decoded images of all splits (float32)
    fit data.memory_budget_mb (the first training image's size stands for every image's)."""
    if cfg.storage != "auto":
        return cfg.storage
    first, _ = decode_image(listing.train.path(0), cfg.image_size, listing.folder, max_pixels=listing.max_pixels)
    channels = 1 if first.ndim == 2 else 3
    count = len(listing.train) + len(listing.test)
    megabytes = count * channels * first.shape[0] * first.shape[1] * 4 / 2**20
    if megabytes <= cfg.memory_budget_mb:
        return "memory"
    log.info("data.storage = auto: the %d decoded images would take about %.0f MB, more than "
             "data.memory_budget_mb = %d, so they are read from disk while training", count, megabytes,
             cfg.memory_budget_mb)
    return "stream"


def stream_imagefolder(listing: FolderListing, cfg: DataConfig) -> tuple[ImageFiles, Tensor, ImageFiles, Tensor,
                                                                          list[str]]:
    """(train images, train labels, test images, test labels, class names) of `listing` as ImageFiles, each
    file read once (or its scan taken from the cache) to check it and to know its channel sums."""
    listed = {"train": listing.train, "test": listing.test}
    scans = {split: scan_split(listing, split, cfg.image_size, cfg.workers) for split in listed}
    channels = common_channels(int(scans["train"]["channels"]), int(scans["test"]["channels"]))
    sizes = {split: (int(scan["height"]), int(scan["width"])) for split, scan in scans.items()}
    check_split_sizes(listing, sizes["train"], sizes["test"])

    def files(split: str) -> tuple[ImageFiles, Tensor]:
        sums, squares = (_with_channels(scans[split][key].numpy(), channels) for key in ("sums", "squares"))
        return ImageFiles(str(listing.folder), listed[split].paths, channels, sizes[split], cfg.image_size, sums,
                          squares, cfg.workers, listing.max_pixels), torch.from_numpy(listed[split].labels)

    (x_train, y_train), (x_test, y_test) = files("train"), files("test")
    return x_train, y_train, x_test, y_test, listing.class_names


def _with_channels(per_image: np.ndarray, channels: int) -> np.ndarray:
    """(N, channels) from a scan's (N, 1) or (N, 3) sums: a greyscale split among colour has each channel the same."""
    return per_image if per_image.shape[1] == channels else per_image.repeat(channels, axis=1)


class _Scanned(Dataset):
    """For the scan: each image's (height, width), greyscale flag, float64 channel sums of its pixel values
    in [0, 1] and of their squares, and what reading it changed."""

    def __init__(self, folder: str, paths: np.ndarray, image_size: int, max_pixels: int) -> None:
        self.folder, self.paths, self.image_size, self.max_pixels = folder, paths, image_size, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[tuple[int, int], bool, np.ndarray, np.ndarray, dict[str, str]]:
        array, changes = decode_image(os.fsdecode(self.paths[index]), self.image_size, self.folder,
                                      max_pixels=self.max_pixels)
        pixels = torch.from_numpy(array.astype(np.float32)).div_(255.0).double()
        pixels = pixels.reshape(array.shape[0] * array.shape[1], -1)  # one column per channel
        return array.shape[:2], array.ndim == 2, pixels.sum(0).numpy(), pixels.square().sum(0).numpy(), changes


_NO_CHANGE: dict[str, str] = {}


def scan_split(listing: FolderListing, split: str, image_size: int, workers: int) -> dict[str, Any]:
    """Read every image of one split ("train" or "test") once: {"sums", "squares": (N, C) float64 tensors,
    "channels", "height", "width", "notes"} (C = 1 when every image of the split is greyscale); DataError
    for a file that cannot be read or a size that differs. Cached while the files are unchanged; the notes
    are logged."""
    files = listing.train if split == "train" else listing.test
    paths = files.paths

    def scan() -> dict[str, Any]:
        log.info("reading the %d %s images in %s once, to check them and measure them (kept for later runs)",
                 len(paths), split, listing.folder)
        scanned = _Scanned(str(listing.folder), paths, image_size, listing.max_pixels)
        loader = DataLoader(scanned, batch_size=SCAN_BATCH, collate_fn=list,
                            **_worker_settings(workers, persistent=False))
        sizes, gray = np.empty((len(paths), 2), dtype=np.int64), np.empty(len(paths), dtype=bool)
        sums, squares = np.empty((len(paths), 3)), np.empty((len(paths), 3))
        changed: dict[int, dict[str, str]] = {}
        i = 0
        for batch in tqdm(_unwrapped(loader), desc=f"reading {split}", unit="batch", leave=False, disable=None):
            for size, is_gray, image_sum, image_square, changes in batch:
                sizes[i], gray[i], sums[i], squares[i] = size, is_gray, image_sum, image_square  # grey: 3 equal
                if changes:
                    changed[i] = changes
                i += 1
        other = np.flatnonzero((sizes != sizes[0]).any(axis=1))
        if len(other):
            check_same_size([files.path(0), files.path(other[0])], sizes[[0, other[0]]].tolist(), listing.folder)
        channels = 1 if gray.all() else 3
        notes = tally_changes((path for path, _ in files), (changed.get(i, _NO_CHANGE) for i in range(len(paths))),
                              gray)
        return {"sums": torch.from_numpy(sums[:, :channels]), "squares": torch.from_numpy(squares[:, :channels]),
                "channels": channels, "height": int(sizes[0, 0]), "width": int(sizes[0, 1]), "notes": notes}

    signature = listing_signature(files, listing.folder, listing.class_names, image_size)
    scanned = cached_split(listing.cache_dir / "scans", f"{split}-size{image_size}", signature, scan)
    log_notes(split, listing.folder, scanned["notes"])
    return scanned


# ---------------------------------------------------------------- reading inputs of either kind

def take(x: Inputs, indices: Tensor) -> Inputs:
    """The examples of `x` at `indices`: a tensor's rows, or a subset of its files."""
    return x[indices] if isinstance(x, Tensor) else x.subset(indices)


def head(x: Inputs, n: int) -> Tensor:
    """The first `n` examples of `x` as a tensor (read from disk for files)."""
    if isinstance(x, Tensor):
        return x[:n]
    return torch.cat(list(batches(x.subset(np.arange(min(n, len(x)))), 256)))


def batches(x: Inputs, batch_size: int) -> Iterator[Tensor]:
    """`x` in batches of `batch_size`, in order: a tensor's chunks, or files read by its workers."""
    if isinstance(x, Tensor):
        yield from x.split(batch_size)
        return
    order = torch.arange(len(x)).split(batch_size)
    workers = x.workers if len(order) > 1 else 0  # a worker reads whole batches: a single one is read here
    loader = ImageLoader(x, None, workers, persistent=False)
    try:
        yield from loader.epoch(order, seed=0)
    finally:
        loader.close()


# ---------------------------------------------------------------- training batches, one image at a time

def item_seed(epoch_seed: int, position: int) -> int:
    """The seed of the image at `position` of an epoch whose own seed is `epoch_seed`."""
    return (epoch_seed * 6_364_136_223_846_793_005 + position * 1_442_695_040_888_963_407) % 2**63


class _Images(Dataset):
    """Item (index, seed): image `index` of `source` (a tensor's row or a file), transformed by `transform`
    under torch's random stream seeded with `seed` (the caller's stream is left as it was)."""

    def __init__(self, source: Inputs, transform: Callable[[Tensor], Tensor] | None) -> None:
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, int]) -> Tensor:
        index, seed = item
        image = self.source[index] if isinstance(self.source, Tensor) else self.source.read(index)
        if self.transform is None:
            return image
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # the CPU stream only, where the transforms draw
            return self.transform(image)


class _EpochPlan:
    """The batch sampler of an ImageLoader: the (index, seed) items of each batch of the current epoch."""

    def __init__(self) -> None:
        self.batches: Sequence[Tensor] = ()
        self.seed = 0

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        position = 0
        for batch in self.batches:
            yield [(index, item_seed(self.seed, position + i)) for i, index in enumerate(batch.tolist())]
            position += len(batch)

    def __len__(self) -> int:
        return len(self.batches)


class ImageLoader:
    """Batches of `source` read one image at a time by a DataLoader with `workers` processes, which stay
    for every epoch (`persistent`) or end with each; each image transformed by `transform` (None: as
    read) under its own seed."""

    def __init__(self, source: Inputs, transform: Callable[[Tensor], Tensor] | None, workers: int,
                 pin_memory: bool = False, persistent: bool = True) -> None:
        self._plan = _EpochPlan()
        self._loader: DataLoader | None = DataLoader(_Images(source, transform), batch_sampler=self._plan,
                                                     pin_memory=pin_memory, **_worker_settings(workers, persistent))

    def epoch(self, batches: Sequence[Tensor], seed: int) -> Iterator[Tensor]:
        """The images of each index batch in `batches`, in order; the image at position p of the epoch is
        transformed under `item_seed(seed, p)`."""
        self._plan.batches, self._plan.seed = batches, seed
        yield from _unwrapped(self._loader)

    def close(self) -> None:
        """End the worker processes (also when the loader is garbage-collected)."""
        self._loader = None


def _worker_settings(workers: int, persistent: bool) -> dict[str, Any]:
    """DataLoader settings for `workers` processes, kept from one pass to the next when `persistent`. Forked,
    so that a loader also starts inside a specialist's loky worker (whose own default context cannot start
    them); their seeds come from a private generator, so starting an epoch leaves torch's global random
    stream (dropout's) as it was."""
    settings: dict[str, Any] = {"num_workers": workers, "generator": torch.Generator()}
    if workers > 0:
        settings.update(persistent_workers=persistent, worker_init_fn=_freeze_inherited_objects,
                        multiprocessing_context=multiprocessing.get_context(
                            "fork" if "fork" in multiprocessing.get_all_start_methods() else None))
    return settings


def _freeze_inherited_objects(worker_id: int) -> None:
    """In a forked worker: keep the garbage collector away from the objects inherited from the parent (the
    folder's listing, say). Collecting them would write to every one of them, and so copy the pages that
    hold them into each worker: memory that would grow with the number of files."""
    gc.freeze()


def _unwrapped(loader: Iterable) -> Iterator[Any]:
    """`loader`'s batches; a DataError raised in a worker process is raised again with its own one-line
    message (the DataLoader wraps it in the worker's traceback), after the loader's iterator and so its
    worker processes are gone (the error's traceback would keep them until the garbage collector runs)."""
    iterator = iter(loader)
    try:
        yield from iterator
    except DataError as err:
        message = str(err).strip()
        if not message.startswith("Caught "):
            raise
        traceback.clear_frames(err.__traceback__)  # the DataLoader's own frames hold the iterator too
        del iterator, err
        raise DataError(message.splitlines()[-1].partition(": ")[2] or message) from None
