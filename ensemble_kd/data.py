"""Data sets as in-memory tensors, their validation, and batched augmentation.

`load_data(cfg, seed)` returns a `Splits`: float32 inputs in [0, 1] (images as (N, C, H, W),
flat features as (N, D)), int64 labels, a stratified validation hold-out taken from the
training data (for the confusion analysis), the test set, class names and the training
set's per-channel (or per-feature) mean and std.

Data sets (`data.name`):
- `digits`: scikit-learn's 8x8 digits; the test set is a fixed stratified 25% (the same for
  every seed).
- `mnist`, `fashion-mnist`, `cifar10`, `cifar100`: torchvision's files under `data.root`,
  converted to tensors in one go (no per-image PIL transforms).
- `imagefolder`: `data.root` holds `train/<class>/*` and `test/<class>/*` image files, or is a
  .tar.gz of them (read, decoded and cached by `imagefolder.py`). With `data.storage = "stream"`
  (or "auto" when they do not fit `data.memory_budget_mb`) its splits' inputs are `ImageFiles`,
  read from disk batch by batch (`streaming.py`) instead of tensors.
- `synthetic`: Gaussian classes in planted confusable groups, for tests (`planted_groups`).

Training is meant to run on tensors kept on the device, with `augment_batch` doing flips
and padded random crops for a whole batch at once (augment.py builds every augmentation
from the config, the per-image ones of torchvision included).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor

from .config import DataConfig
from .errors import DataError, plural
from .imagefolder import list_imagefolder, load_imagefolder
from .streaming import ImageFiles, Inputs, storage_for, stream_imagefolder, take

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the splits

@dataclass
class Splits:
    """Train / validation / test tensors of one data set, with what a model needs to know about them."""

    x_train: Inputs  # float32 in [0, 1], (N, *input_shape); ImageFiles when streamed from disk
    y_train: Tensor  # int64 class ids
    x_val: Inputs  # stratified hold-out from the training data (data.val_fraction)
    y_val: Tensor
    x_test: Inputs
    y_test: Tensor
    class_names: list[str]
    mean: list[float]  # of x_train: one per channel for images, one per feature for flat data
    std: list[float]  # matching standard deviations, clamped to >= 1e-6
    name: str  # the data set's name (data.name)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def fingerprint(self) -> str:
        """Short sha256 over name, class names, input shape and label counts (train+val, test).

        Train and validation counts are summed so that the fingerprint names the data set,
        not the seed's way of splitting it.
        """
        counts = lambda y: torch.bincount(y, minlength=self.num_classes).tolist()  # noqa: E731
        summary = {
            "name": self.name,
            "classes": list(self.class_names),
            "input_shape": list(self.input_shape),
            "train_val_counts": counts(torch.cat([self.y_train, self.y_val])),
            "test_counts": counts(self.y_test),
        }
        return hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()[:16]

    def content_digest(self) -> str:
        """sha256 over the data's values: every split's inputs and labels (of streamed images, their paths and
        per-image pixel sums), so other pixels with the same classes and counts differ here, not in
        `fingerprint`. Computed once per load (the splits are not changed after it)."""
        cached = self.__dict__.get("_content_digest")
        if cached is None:
            digest = hashlib.sha256()
            for part in (self.x_train, self.y_train, self.x_val, self.y_val, self.x_test, self.y_test):
                if isinstance(part, ImageFiles):
                    for array in (part.paths, part.sums, part.squares):
                        digest.update(np.ascontiguousarray(array).tobytes())
                else:
                    digest.update(str((part.dtype, tuple(part.shape))).encode())
                    digest.update(part.detach().cpu().contiguous().numpy().tobytes())
            cached = self.__dict__["_content_digest"] = digest.hexdigest()
        return cached


def load_data(cfg: DataConfig, seed: int) -> Splits:
    """Load `cfg.name`, subsample (`train_limit`), hold out validation data, check every split."""
    loaders = {
        "digits": lambda: _load_digits(),
        "synthetic": lambda: _load_synthetic(cfg, seed),
        "imagefolder": lambda: _load_imagefolder(cfg),
        **{name: (lambda name=name: _load_torchvision(name, cfg)) for name in _TORCHVISION},
    }  # keyed by choices.DATA_SETS (tests/test_config.py checks that they match)
    if cfg.name not in loaders:
        raise DataError(f"unknown data set data.name = {cfg.name!r}; choose from {', '.join(loaders)}")
    x_train, y_train, x_test, y_test, class_names = loaders[cfg.name]()
    if cfg.image_size > 0 and cfg.name != "imagefolder":  # an image folder is resized as it is decoded
        x_train, x_test = (resize_images(x, cfg.image_size, f"{cfg.name} {split}")
                           for x, split in ((x_train, "train"), (x_test, "test")))
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):  # before any split or count
        validate_split(x, y, len(class_names), split, class_names=class_names)
    _check_test_classes_in_train(y_train, y_test, class_names)
    if cfg.train_limit > 0:
        x_train, y_train = _stratified_subsample(x_train, y_train, cfg.train_limit, seed)
    x_train, y_train, x_val, y_val = _stratified_val_split(x_train, y_train, cfg.val_fraction, seed)
    for split, x, y in (("train", x_train, y_train), ("val", x_val, y_val)):
        validate_split(x, y, len(class_names), split, class_names=class_names)
    mean, std = channel_stats(x_train)
    log.info("data %s: %d train, %d val, %d test examples of shape %s, %d classes", cfg.name,
             len(y_train), len(y_val), len(y_test), tuple(x_train.shape[1:]), len(class_names))
    return Splits(x_train, y_train, x_val, y_val, x_test, y_test, list(class_names), mean, std, cfg.name)


def _load_imagefolder(cfg: DataConfig) -> tuple[Inputs, Tensor, Inputs, Tensor, list[str]]:
    """An image folder decoded into memory, or as ImageFiles to stream from disk (`streaming.storage_for`)."""
    listing = list_imagefolder(cfg)
    if storage_for(cfg, listing) == "stream":
        return stream_imagefolder(listing, cfg)
    return load_imagefolder(listing, cfg.image_size)


def resize_images(x: Tensor, size: int, what: str, chunk: int = 1024) -> Tensor:
    """(N, C, H, W) images resized to size x size (bilinear, antialiased; `data.image_size`), said in the log;
    `x` itself when they have that size already. `what` names them in the log, e.g. "cifar10 train"."""
    if x.ndim != 4:
        raise DataError(f"data.image_size = {size} resizes images, but the {what} inputs are flat features of shape "
                        f"{tuple(x.shape[1:])}; set data.image_size = 0")
    if tuple(x.shape[2:]) == (size, size):
        return x
    out = torch.empty(len(x), x.shape[1], size, size, dtype=x.dtype)
    for start in range(0, len(x), chunk):
        out[start:start + chunk] = F.interpolate(x[start:start + chunk], size=(size, size), mode="bilinear",
                                                 antialias=True, align_corners=False).clamp_(0.0, 1.0)
    log.info("data %s: resized %d images from %dx%d to %dx%d (data.image_size; %.1f GiB in memory)", what, len(x),
             x.shape[3], x.shape[2], size, size, out.element_size() * out.nelement() / 2**30)
    return out


# ---------------------------------------------------------------- validation

def validate_split(x: Inputs, y: Tensor, num_classes: int, split: str,
                   class_names: Sequence[str] | None = None) -> None:
    """Raise DataError when a split cannot be trained or evaluated on; say what is wrong and how to fix it.
    (ImageFiles were checked as they were first read: streaming.scan_split.)"""
    if isinstance(x, Tensor) and x.ndim not in (2, 4):
        raise DataError(f"{split} inputs have shape {tuple(x.shape)}; expected (N, D) features or "
                        "(N, C, H, W) images; reshape them (a grayscale image set needs a channel axis)")
    if y.ndim != 1:
        raise DataError(f"{split} labels have shape {tuple(y.shape)}; expected one class id per example (N,)")
    if len(x) != len(y):
        raise DataError(f"{split} has {plural(len(x), 'input')} but {plural(len(y), 'label')}; "
                        "every input needs exactly one label")
    if len(y) == 0:
        raise DataError(f"{split} split is empty; add examples (or lower data.val_fraction for the val split)")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise DataError(f"{split} labels have dtype {y.dtype}; labels must be integer class ids "
                        "(int64 in [0, num_classes)); convert them with .long()")
    if isinstance(x, Tensor) and not x.dtype.is_floating_point:
        raise DataError(f"{split} inputs have dtype {x.dtype}; expected float32 in [0, 1] "
                        "(for uint8 pixels use x.float() / 255)")
    _check_label_range(y, num_classes, split)
    if isinstance(x, Tensor):
        _check_finite(x, split)
    if split == "train":
        _check_every_class_present(y, num_classes, class_names)


def _check_label_range(y: Tensor, num_classes: int, split: str) -> None:
    outside = ((y < 0) | (y >= num_classes)).nonzero().flatten()
    if len(outside):
        first = int(outside[0])
        raise DataError(f"{split} labels must be in [0, {num_classes}); found {plural(len(outside), 'label')} outside, "
                        f"e.g. {int(y[first])} at index {first}; check the labels or the class list")


def _check_finite(x: Tensor, split: str, chunk: int = 8192) -> None:
    if bool(torch.isfinite(x.sum())):  # fast path: any NaN or inf makes the sum non-finite
        return
    bad_count, first_bad = 0, -1
    for start in range(0, len(x), chunk):
        bad_rows = (~torch.isfinite(x[start:start + chunk])).flatten(1).sum(dim=1)
        bad_count += int(bad_rows.sum())
        if first_bad < 0 and bool(bad_rows.any()):
            first_bad = start + int(bad_rows.nonzero()[0])
    if bad_count:
        raise DataError(f"{split} inputs contain {bad_count} NaN or infinite values (first in example "
                        f"{first_bad}); fix or drop those examples")


def _check_every_class_present(y: Tensor, num_classes: int, class_names: Sequence[str] | None) -> None:
    counts = torch.bincount(y, minlength=num_classes)
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        names = [repr(class_names[c]) if class_names else str(c) for c in missing]
        raise DataError(f"class {names[0]} has no training examples ({plural(len(missing), 'class')} empty: "
                        f"{', '.join(names[:5])}{', ...' if len(names) > 5 else ''}); add examples of it "
                        "or remove the class (and raise data.train_limit if it is set)")


def _check_test_classes_in_train(y_train: Tensor, y_test: Tensor, class_names: Sequence[str]) -> None:
    num_classes = len(class_names)
    in_range = lambda y: y[(y >= 0) & (y < num_classes)]  # noqa: E731  (range errors are reported later)
    train_counts = torch.bincount(in_range(y_train), minlength=num_classes)
    test_counts = torch.bincount(in_range(y_test), minlength=num_classes)
    only_in_test = ((train_counts == 0) & (test_counts > 0)).nonzero().flatten().tolist()
    if only_in_test:
        c = only_in_test[0]
        raise DataError(f"class {class_names[c]!r} has {int(test_counts[c])} test examples but none in train; "
                        "add training examples of it or remove it from the test set")


# ---------------------------------------------------------------- splitting and statistics

def _stratified_indices(y: Tensor, size: int | float, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out) indices, stratified by label; `size` is the held-out part (count or fraction)."""
    indices = np.arange(len(y))
    try:
        kept, held = train_test_split(indices, test_size=size, stratify=y.numpy(), random_state=seed % 2**32)
    except ValueError as err:  # too few examples per class, or fewer held-out slots than classes
        raise DataError(f"cannot make the stratified {what} from {plural(len(y), 'example')} of "
                        f"{plural(int(torch.unique(y).numel()), 'class')}: {err}") from err
    return np.sort(kept), np.sort(held)


def _stratified_subsample(x: Inputs, y: Tensor, limit: int, seed: int) -> tuple[Inputs, Tensor]:
    if limit >= len(y):
        return x, y
    _, kept = _stratified_indices(  # the held-out part of size `limit` is what we keep
        y, limit, seed, f"subsample (data.train_limit = {limit}; it needs at least 1 example per class, "
                        "so raise it or set it to 0 for all)")
    kept_t = torch.from_numpy(kept)
    return take(x, kept_t), y[kept_t]


def _stratified_val_split(x: Inputs, y: Tensor, fraction: float,
                          seed: int) -> tuple[Inputs, Tensor, Inputs, Tensor]:
    train, val = _stratified_indices(
        y, fraction, seed, f"validation split (data.val_fraction = {fraction}; each class needs at least 2 "
                           "training examples and the hold-out at least one per class, so adjust "
                           "data.val_fraction or data.train_limit)")
    train_t, val_t = torch.from_numpy(train), torch.from_numpy(val)
    return take(x, train_t), y[train_t], take(x, val_t), y[val_t]


def channel_stats(x: Inputs, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Mean and std (population, clamped to >= 1e-6) per channel of (N, C, H, W) or per feature of (N, D).

    Accumulated in float64 over chunks of examples, so large image sets need no full-size copy
    (ImageFiles: from each image's sums, measured when the files were first read).
    """
    if isinstance(x, ImageFiles):
        total, total_sq, count = x.channel_sums()
    else:
        reduce_dims = [0] + list(range(2, x.ndim))
        total = torch.zeros(x.shape[1], dtype=torch.float64)
        total_sq = torch.zeros(x.shape[1], dtype=torch.float64)
        for start in range(0, len(x), chunk):
            part = x[start:start + chunk].to("cpu", torch.float64)
            total += part.sum(dim=reduce_dims)
            total_sq += part.square().sum(dim=reduce_dims)
        count = x.numel() / x.shape[1]
    mean = total / count
    var = (total_sq / count - mean.square()).clamp(min=0)
    return mean.tolist(), var.sqrt().clamp(min=1e-6).tolist()


# ---------------------------------------------------------------- augmentation

def augment_batch(x: Tensor, flip: bool, crop_pad: int, generator: torch.Generator) -> Tensor:
    """Random horizontal flips and padded random crops of a whole (N, C, H, W) batch on x's device.

    Each image is flipped with probability 1/2, then zero-padded by `crop_pad` pixels on every
    side and cropped back to (H, W) at an offset drawn uniformly per image. The random numbers
    come from `generator` (on its own device) so a seeded generator gives the same batch.
    Returns a new tensor and leaves x unchanged; returns x itself when both are off.
    """
    if not flip and crop_pad <= 0:
        return x
    _check_images(x)
    return apply_augmentation(x, *draw_augmentation(len(x), flip, crop_pad, generator), crop_pad)


def draw_augmentation(n: int, flip: bool, crop_pad: int,
                      generator: torch.Generator) -> tuple[Tensor | None, Tensor | None]:
    """The random part of `augment_batch` for n images: (flips (n,) bool or None, crop offsets (n, 2)
    in [0, 2 * crop_pad] or None), on the generator's device. Drawn in the order augment_batch uses."""
    device = generator.device
    flips = torch.rand(n, generator=generator, device=device) < 0.5 if flip else None
    offsets = None
    if crop_pad > 0:
        span = 2 * crop_pad + 1
        offset_y = torch.randint(span, (n,), generator=generator, device=device)
        offset_x = torch.randint(span, (n,), generator=generator, device=device)
        offsets = torch.stack([offset_y, offset_x], dim=1)
    return flips, offsets


def apply_augmentation(x: Tensor, flips: Tensor | None, offsets: Tensor | None, crop_pad: int) -> Tensor:
    """Flip the images of (N, C, H, W) `x` where `flips` is true, then crop each at its `offsets`
    (rows, columns) of the image zero-padded by `crop_pad`; a None part is skipped."""
    n, channels, height, width = x.shape
    out = x
    if flips is not None:
        out = torch.where(flips.to(x.device).view(n, 1, 1, 1), x.flip(3), x)
    if offsets is not None and crop_pad > 0:
        offsets = offsets.to(x.device)
        padded = F.pad(out, (crop_pad, crop_pad, crop_pad, crop_pad))
        rows = offsets[:, :1] + torch.arange(height, device=x.device)  # (N, H) rows of the padded image
        cols = offsets[:, 1:] + torch.arange(width, device=x.device)  # (N, W)
        out = padded[torch.arange(n, device=x.device).view(n, 1, 1, 1),
                     torch.arange(channels, device=x.device).view(1, channels, 1, 1),
                     rows.view(n, 1, height, 1), cols.view(n, 1, 1, width)]
    return out


def _check_images(x: Tensor) -> None:
    if x.ndim != 4:
        raise DataError(f"data.flip and data.crop_pad need image batches (N, C, H, W), got shape "
                        f"{tuple(x.shape)}; set data.flip=false and data.crop_pad=0 for flat features")


# ---------------------------------------------------------------- digits

def _load_digits() -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
    """scikit-learn's 8x8 digits; the test set is a fixed stratified 25% (random_state=0) for every seed."""
    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8)
    y = torch.from_numpy(digits.target.astype(np.int64))
    train, test = train_test_split(np.arange(len(y)), test_size=0.25, stratify=digits.target, random_state=0)
    train, test = torch.from_numpy(np.sort(train)), torch.from_numpy(np.sort(test))
    return x[train], y[train], x[test], y[test], [str(d) for d in range(10)]


# ---------------------------------------------------------------- torchvision

_TORCHVISION = {  # data.name -> (torchvision class, the folder it reads under data.root)
    "mnist": ("MNIST", "MNIST/raw/"),
    "fashion-mnist": ("FashionMNIST", "FashionMNIST/raw/"),
    "cifar10": ("CIFAR10", "cifar-10-batches-py/"),
    "cifar100": ("CIFAR100", "cifar-100-python/"),
}


def _load_torchvision(name: str, cfg: DataConfig) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
    import torchvision  # start-up time: about a second to import, and only these data sets need it

    class_name, folder = _TORCHVISION[name]
    dataset_class = getattr(torchvision.datasets, class_name)
    splits = []
    for train in (True, False):
        try:
            dataset = dataset_class(root=cfg.root, train=train, download=cfg.download)
        except (RuntimeError, OSError) as err:  # torchvision: "Dataset not found..."; downloads: URLError
            raise DataError(
                f"{name} files not found or unreadable in {Path(cfg.root).resolve() / folder} ({err}); "
                f"set data.download=true (needs network) or point data.root at a folder holding {folder} "
                "(the real copies on these machines are at ../shared/data)") from err
        splits.append(_tensors_from_torchvision(dataset))
    (x_train, y_train), (x_test, y_test) = splits
    return x_train, y_train, x_test, y_test, list(dataset.classes)


def _tensors_from_torchvision(dataset) -> tuple[Tensor, Tensor]:
    """`.data` / `.targets` straight to tensors: uint8 (N, H, W) or (N, H, W, 3) -> float (N, C, H, W) / 255."""
    pixels = torch.as_tensor(np.asarray(dataset.data))
    pixels = pixels.unsqueeze(1) if pixels.ndim == 3 else pixels.permute(0, 3, 1, 2)
    x = pixels.contiguous().float().div_(255.0)
    y = torch.as_tensor(np.asarray(dataset.targets), dtype=torch.int64)
    return x, y


# ---------------------------------------------------------------- synthetic

_SYNTHETIC_TAG = 0x5E1F  # mixed into the seeds so the synthetic streams differ from other uses of the seed
GROUP_RADIUS = 10.0  # distance of each group centre from the origin (noise std is 1): groups never mix
CLASS_RADIUS = 2.0  # distance of a class centre from its group centre: classes within a group overlap


def planted_groups(cfg: DataConfig) -> list[list[int]]:
    """The synthetic set's confusable groups: group g holds the classes c with c % synthetic_groups == g.

    Interleaved rather than contiguous ids, so that a clusterer that merely groups
    neighbouring class ids cannot recover them by accident.
    """
    classes, groups = cfg.synthetic_classes, cfg.synthetic_groups
    if not 1 <= groups <= classes:
        raise DataError(f"data.synthetic_groups = {groups} must be between 1 and data.synthetic_classes "
                        f"= {classes}; lower the groups or raise the classes")
    return [[c for c in range(classes) if c % groups == g] for g in range(groups)]


def _directions(count: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """`count` unit vectors in `dim` dimensions: orthonormal when count <= dim, else random."""
    raw = rng.standard_normal((dim, count))
    if count <= dim:
        q, r = np.linalg.qr(raw)
        return (q * np.sign(np.diag(r))).T
    return (raw / np.linalg.norm(raw, axis=0, keepdims=True)).T


def _load_synthetic(cfg: DataConfig, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
    """Gaussian classes (unit noise) around centres = group centre + a small class offset.

    The centres and the test set are fixed (the same for every seed, like digits' test set);
    the training examples are drawn from `seed`. The test set has half as many per class.
    """
    groups = planted_groups(cfg)
    classes, dim, per_class = cfg.synthetic_classes, cfg.synthetic_dim, cfg.synthetic_per_class
    if dim < 1 or per_class < 2:
        raise DataError(f"data.synthetic_dim = {dim} and data.synthetic_per_class = {per_class} must be "
                        ">= 1 and >= 2; raise them")
    fixed = np.random.default_rng([_SYNTHETIC_TAG, 0])
    directions = _directions(len(groups) + classes, dim, fixed)
    group_of = np.arange(classes) % len(groups)
    centres = GROUP_RADIUS * directions[group_of] + CLASS_RADIUS * directions[len(groups):]
    x_test, y_test = _sample_gaussians(centres, max(1, per_class // 2), fixed)
    train_rng = np.random.default_rng([_SYNTHETIC_TAG, 1, seed % 2**64])
    x_train, y_train = _sample_gaussians(centres, per_class, train_rng)
    return x_train, y_train, x_test, y_test, [f"c{c}" for c in range(classes)]


def _sample_gaussians(centres: np.ndarray, per_class: int, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    labels = np.repeat(np.arange(len(centres)), per_class)
    points = centres[labels] + rng.standard_normal((len(labels), centres.shape[1]))
    return torch.from_numpy(points.astype(np.float32)), torch.from_numpy(labels.astype(np.int64))
