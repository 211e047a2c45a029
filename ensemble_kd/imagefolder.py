"""A user's image folder or archive: listing, decoding (EXIF, bit depth, alpha) and caching.

`data.name = "imagefolder"` reads `data.root`: a folder holding `train/<class>/*` and
`test/<class>/*` image files (the folder names are the class names), or a tar archive
(.tar.gz, .tgz, .tar.bz2, .tar.xz, .tar) of them. An archive is extracted once into a
cache folder (a temporary folder renamed into place, so a half-done extraction never
counts), and the decoded images of each split are cached there as uint8 tensors, keyed by
the listing (names, sizes, modification times), the classes, the image size and the
decoder's version. The cache is `ENSEMBLE_KD_CACHE`, default `~/.cache/ensemble-kd`.
An extraction holds an OS lock (flock) on a file beside its temporary folder while it runs;
a temporary folder whose lock is free was left by a killed extraction and is removed on
the next use of an archive (one without a lock file, made by an older version or where
flock is missing, once it is a day old).
With `data.storage = "stream"` the images are not decoded into memory: streaming.py reads
them while training, from the listing made here, and caches what its first reading found
(`cached_split`, under scans/).

`read_image` is how every image is read, in training and in `predict`: upright by its
EXIF orientation, 16-bit greyscale scaled to 8 bits, alpha dropped, optionally converted
and resized; what it changed is said in the log, once per split. An image of more pixels
than `data.max_image_pixels` (predict: `--max-image-pixels`; by default Pillow's own limit
against decompression bombs) is refused with an error naming it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import tarfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from .artifacts import save_torch
from .config import DataConfig
from .errors import DataError, plural

try:
    import fcntl  # the lock of a running extraction (flock); POSIX only
except ImportError:  # pragma: no cover - Windows
    fcntl = None

log = logging.getLogger(__name__)

_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar")
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
_LAYOUT_HINT = "an imagefolder needs train/<class>/<image> and test/<class>/<image> files"
_STAGING_PREFIX = ".extracting-"  # an archive's temporary extraction folder in its cache folder
_UNLOCKED_STAGING_AGE_S = 24 * 3600  # a temporary folder without a lock file is removed once this old
DEFAULT_MAX_IMAGE_PIXELS: int = DataConfig.max_image_pixels  # Pillow's limit: 2 * Image.MAX_IMAGE_PIXELS


def cache_root() -> Path:
    """Where extracted archives and decoded tensors are kept: $ENSEMBLE_KD_CACHE or ~/.cache/ensemble-kd."""
    return Path(os.environ.get("ENSEMBLE_KD_CACHE") or Path.home() / ".cache" / "ensemble-kd")


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class SplitFiles:
    """The image files of one split, sorted: paths relative to the image folder and class ids, as arrays (a
    million paths as Python strings and tuples would take ~150 MB)."""

    paths: np.ndarray  # (N,) bytes (os.fsencode)
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self) -> Iterator[tuple[str, int]]:
        """(path, class id) of each file."""
        return ((os.fsdecode(path), int(label)) for path, label in zip(self.paths, self.labels))

    def path(self, index: int) -> str:
        return os.fsdecode(self.paths[index])


@dataclass
class FolderListing:
    """The image files of an imagefolder (an archive's once extracted), before any is decoded."""

    cache_dir: Path  # where its decoded tensors (memory) or scans (stream) are cached
    folder: Path  # the folder holding train/ and test/
    class_names: list[str]  # the train/ class folders, sorted
    train: SplitFiles
    test: SplitFiles
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # data.max_image_pixels: larger images are refused


def list_imagefolder(cfg: DataConfig) -> FolderListing:
    """The files of `data.root`: a folder with train/<class>/* and test/<class>/*, or a tar archive of
    them (extracted once into the cache)."""
    source = Path(cfg.root).expanduser()
    if not cfg.max_image_pixels >= 1:
        raise DataError(f"data.max_image_pixels = {cfg.max_image_pixels!r}; give a number of pixels of at least 1")
    if not source.exists():
        raise DataError(f"data.root = {cfg.root!r} does not exist; point it at a folder with train/ and "
                        "test/ (or a .tar.gz of them)")
    if source.is_file():
        cache_dir, folder = _extract_archive(source)
    else:
        cache_dir, folder = cache_root() / f"{source.resolve().name}-{_short_hash(str(source.resolve()))}", source
    folder = _find_split_parent(folder, source)
    class_names = _class_folders(folder / "train")
    train = _list_images(folder / "train", class_names, class_names, "train")
    test_classes = _class_folders(folder / "test")
    unknown = sorted(set(test_classes) - set(class_names))
    if unknown:
        raise DataError(f"class folder test/{unknown[0]} in {folder} has no matching train/{unknown[0]}; "
                        "add training images of it or remove it from test/")
    test = _list_images(folder / "test", test_classes, class_names, "test")
    _warn_untested_classes(folder, sorted(set(class_names) - set(test_classes)))
    return FolderListing(cache_dir, folder, class_names, train, test, cfg.max_image_pixels)


_WARNED_UNTESTED: set[tuple[str, tuple[str, ...]]] = set()  # said once per process


def _warn_untested_classes(folder: Path, untested: list[str]) -> None:
    """One warning line naming the classes of train/ that test/ lacks (once per folder and process)."""
    if not untested or (str(folder), tuple(untested)) in _WARNED_UNTESTED:
        return
    _WARNED_UNTESTED.add((str(folder), tuple(untested)))
    names = ", ".join(untested[:5]) + (f" and {len(untested) - 5} more" if len(untested) > 5 else "")
    log.warning("%s in %s: train/ holds %s that test/ lacks (%s), so the test accuracy says nothing about "
                "them; add test/<class> images of them, or remove them from train/", plural(len(untested), "class"),
                folder, "them" if len(untested) > 1 else "it", names)


def load_imagefolder(listing: FolderListing, image_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
    """(x_train uint8 -> float in [0, 1], y_train, x_test, y_test, class names): every image of `listing`
    decoded into memory (data.storage = "memory"), from the tensor cache when the files are unchanged."""
    folder, cache_dir, class_names = listing.folder, listing.cache_dir, listing.class_names
    x_train, y_train = _decoded_split(listing.train, image_size, cache_dir, "train", class_names, folder,
                                      listing.max_pixels)
    x_test, y_test = _decoded_split(listing.test, image_size, cache_dir, "test", class_names, folder,
                                    listing.max_pixels)
    x_train, x_test = _same_channels(x_train, x_test)
    check_split_sizes(listing, x_train.shape[2:], x_test.shape[2:])
    return x_train.float().div_(255.0), y_train, x_test.float().div_(255.0), y_test, class_names


def check_split_sizes(listing: FolderListing, train_hw: Sequence[int], test_hw: Sequence[int]) -> None:
    """DataError when the train and test images differ in size (height, width)."""
    if tuple(train_hw) != tuple(test_hw):
        raise DataError(f"train images are {size_text(train_hw)} but test images are {size_text(test_hw)} (e.g. "
                        f"{listing.train.path(0)} and {listing.test.path(0)} in {listing.folder}); set "
                        f"data.image_size (e.g. data.image_size={train_hw[-1]}) to resize all images")


def size_text(hw: Sequence[int]) -> str:
    return f"{hw[1]}x{hw[0]}"  # width x height, as image viewers say it


def _archive_stem(path: Path) -> str:
    name = path.name
    for suffix in _ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _extract_archive(archive: Path) -> tuple[Path, Path]:
    """Extract once into <cache>/<stem>-<hash>/extracted (temp dir, then rename); return (cache dir, extracted)."""
    if not tarfile.is_tarfile(archive):
        raise DataError(f"data.root = {archive} is a file but not a tar archive; give a folder with train/ and "
                        "test/ or a .tar.gz of them")
    stat = archive.stat()
    identity = f"{archive.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"  # a replaced archive gets a new folder
    cache_dir = cache_root() / f"{_archive_stem(archive)}-{_short_hash(identity)}"
    extracted = cache_dir / "extracted"
    remove_stale_extractions(cache_root())
    if extracted.is_dir():
        return cache_dir, extracted
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging, lock = new_staging(cache_dir)
    except OSError as err:
        raise DataError(f"cannot create the cache folder {cache_dir} ({err}); set ENSEMBLE_KD_CACHE to a "
                        "writable folder") from err
    try:
        _extract_into(archive, staging, extracted)
    finally:
        _release_staging(staging, lock)
    return cache_dir, extracted


def _extract_into(archive: Path, staging: Path, extracted: Path) -> None:
    """Extract `archive` into `staging`, then rename it to `extracted` (unless another process did first)."""
    log.info("extracting %s into %s (once)", archive, extracted)
    try:
        with tarfile.open(archive) as tar:
            _safe_extract(tar, staging)
        os.replace(staging, extracted)  # atomic: a half-done extraction never appears as `extracted`
    except getattr(tarfile, "FilterError", ()) as err:  # the data filter refused a member
        shutil.rmtree(staging, ignore_errors=True)
        raise DataError(f"cannot extract {archive}: {err}, and tarfile's data filter refuses such members as "
                        "unsafe; repack the archive with plain files under relative paths") from err
    except (tarfile.TarError, OSError, EOFError) as err:
        shutil.rmtree(staging, ignore_errors=True)
        if extracted.is_dir():  # another process finished first
            return
        raise DataError(f"cannot extract {archive} ({type(err).__name__}: {err}); check that the archive is "
                        "complete, and that the cache folder (ENSEMBLE_KD_CACHE) is writable") from err
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def new_staging(cache_dir: Path) -> tuple[Path, int | None]:
    """A new temporary extraction folder in `cache_dir` and the descriptor of its lock file, locked (flock) so
    that `remove_stale_extractions` leaves it alone while this process lives (None where there is no flock).
    The lock file is made and locked before the folder, so no folder is ever seen without its lock held."""
    for _ in range(100):
        staging = cache_dir / f"{_STAGING_PREFIX}{secrets.token_hex(4)}"
        try:
            fd = os.open(_lock_path(staging), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        if fcntl is not None:
            with contextlib.suppress(OSError):  # a file system without flock: found stale by age only
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        staging.mkdir()  # mode 0777 less the umask, like any folder (mkdtemp would make it 0700)
        return staging, fd
    raise FileExistsError(f"no free temporary extraction name in {cache_dir}")


def _lock_path(staging: Path) -> Path:
    return staging.with_name(staging.name + ".lock")


def _release_staging(staging: Path, lock: int | None) -> None:
    """Remove the lock file of a finished extraction (its folder is renamed or removed by then) and unlock it."""
    _lock_path(staging).unlink(missing_ok=True)
    if lock is not None:
        os.close(lock)


def remove_stale_extractions(root: Path) -> None:
    """Remove the temporary extraction folders under `root` (the cache) that no running process holds: left by
    an extraction that was killed. A folder whose lock file is locked is in use; one without a lock file is
    removed only once it is a day old."""
    for staging in sorted(root.glob(f"*/{_STAGING_PREFIX}*")):
        if staging.name.endswith(".lock") or not staging.is_dir() or staging.is_symlink():
            continue
        if _staging_in_use(staging):
            continue
        log.info("removing %s, left in the cache by an extraction that was killed", staging)
        shutil.rmtree(staging, ignore_errors=True)
        _lock_path(staging).unlink(missing_ok=True)


def _staging_in_use(staging: Path) -> bool:
    """Whether a running extraction holds `staging` (its lock file is locked; without one: it is young)."""
    try:
        fd = os.open(_lock_path(staging), os.O_RDWR)
    except OSError:  # no lock file: a folder of an older version, or of a system without flock
        return _young(staging)
    try:
        if fcntl is None:
            return _young(staging)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False  # nobody holds it (closing the descriptor below releases it again)
    except BlockingIOError:
        return True
    except OSError:  # a file system without flock
        return _young(staging)
    finally:
        os.close(fd)


def _young(path: Path) -> bool:
    try:
        return time.time() - path.stat().st_mtime < _UNLOCKED_STAGING_AGE_S
    except OSError:
        return True


def _safe_extract(tar: tarfile.TarFile, target: Path) -> None:
    if hasattr(tarfile, "data_filter"):  # Python 3.11.4+ / 3.10.12+: refuses absolute paths, .., device files
        tar.extractall(target, filter="data")
        return
    root = target.resolve()
    members = tar.getmembers()
    for member in members:
        destination = (target / member.name).resolve()
        if not destination.is_relative_to(root) or member.issym() or member.islnk() or member.isdev():
            raise DataError(f"archive member {member.name!r} is a link, a device or points outside the "
                            "archive; refusing to extract it, repack the archive with plain files")
        _as_data(member)
    tar.extractall(target, members=members)


def _as_data(member: tarfile.TarInfo) -> None:
    """Change `member` as tarfile's data filter would: no setuid, setgid or sticky bit and no group or other
    write permission; files readable and writable by their owner (executable by all only if by the owner);
    folders usable by their owner; the archive's owners not applied (extracting as root)."""
    mode = member.mode & 0o755
    if member.isdir():
        mode |= 0o700
    else:
        mode = (mode if mode & 0o100 else mode & ~0o111) | 0o600
    member.mode = mode
    member.uid = member.gid = -1  # os.chown(path, -1, -1) changes nothing
    member.uname = member.gname = ""


def _find_split_parent(folder: Path, source: Path) -> Path:
    """The folder holding train/ and test/: `folder` itself or its only subfolder (an archive's top folder)."""
    if (folder / "train").is_dir() or (folder / "test").is_dir():
        candidate = folder
    else:
        subfolders = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__MACOSX"))]
        candidate = subfolders[0] if len(subfolders) == 1 else folder
    for split in ("train", "test"):
        if not (candidate / split).is_dir():
            raise DataError(f"{source} has no {split}/ folder ({_what_it_holds(folder, source)}); {_LAYOUT_HINT}")
    return candidate


def _what_it_holds(folder: Path, source: Path) -> str:
    """What the top of `folder` holds, and for an archive (`source`) how its absolute member paths were read."""
    held = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if not p.name.startswith("."))
    said = f"its top holds {', '.join(held[:5])}{', ...' if len(held) > 5 else ''}" if held else "it is empty"
    if source.is_file():
        absolute, total = _absolute_members(source)
        if absolute:
            have = "has an absolute path" if len(absolute) == 1 else "have absolute paths"
            said += (f"; {len(absolute)} of its {plural(total, 'member')} {have} (e.g. {absolute[0]}), extracted "
                     "without the leading / as relative paths; repack it from the folder holding train/ and test/, "
                     "e.g. tar -C that/folder -czf data.tar.gz train test")
    return said


def _absolute_members(archive: Path) -> tuple[list[str], int]:
    """(the member names of `archive` that are absolute paths, the number of members)."""
    try:
        with tarfile.open(archive) as tar:
            names = tar.getnames()
    except (tarfile.TarError, OSError, EOFError):
        return [], 0
    return [name for name in names if name.startswith(("/", os.sep))], len(names)


def _class_folders(split_dir: Path) -> list[str]:
    names = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DataError(f"{split_dir} has no class folders; {_LAYOUT_HINT}")
    return names


def _image_extensions() -> set[str]:
    return {ext.lower() for ext in Image.registered_extensions()}


def _list_images(split_dir: Path, classes: Sequence[str], all_classes: Sequence[str], split: str) -> SplitFiles:
    """The path (relative to split_dir's parent) and class id of every image under split_dir/<class>/, sorted.

    Class ids index `all_classes`; paths are plain strings while one class is listed (60,000
    Path objects cost seconds), then bytes in an array.
    """
    extensions = _image_extensions()
    label_of = {name: i for i, name in enumerate(all_classes)}
    paths, labels = [], []
    skipped = 0
    for name in classes:
        class_files = []
        class_dir = os.path.join(split, name)
        for directory, subdirs, filenames in os.walk(split_dir / name):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            relative_dir = os.path.join(class_dir, os.path.relpath(directory, split_dir / name))
            for filename in sorted(filenames):
                if filename.startswith("."):
                    continue
                if os.path.splitext(filename)[1].lower() not in extensions:
                    skipped += 1
                    continue
                class_files.append(os.fsencode(os.path.normpath(os.path.join(relative_dir, filename))))
        if not class_files:
            raise DataError(f"class folder {split}/{name} ({split_dir / name}) holds no image files; add images "
                            "or remove the folder")
        paths.append(np.array(class_files, dtype=np.bytes_))
        labels.append(np.full(len(class_files), label_of[name], dtype=np.int64))
    if skipped:
        log.warning("%s: skipped %d files that are not images (by extension)", split_dir, skipped)
    return SplitFiles(np.concatenate(paths), np.concatenate(labels))


_DECODER_VERSION = 2  # part of the tensor cache's key: caches of an older decoder are decoded again


def listing_signature(files: SplitFiles, folder: Path, class_names: Sequence[str],
                       image_size: int) -> str:
    """Changes whenever a file is added, removed, replaced or relabelled, or the size, classes or decoder change."""
    digest = hashlib.sha256(json.dumps([list(class_names), image_size, _DECODER_VERSION]).encode())
    for relative, label in files:
        try:
            stat = os.stat(os.path.join(folder, relative))
        except OSError as err:
            raise missing_file_error(relative, folder, err) from err
        digest.update(f"{relative}|{label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]


def missing_file_error(relative: str, folder: str | Path, err: OSError) -> DataError:
    """The error for an image file of a listing that cannot be found or opened: a link to nothing, a file gone."""
    path = os.path.join(folder, relative)
    if os.path.islink(path) and not os.path.exists(path):
        return DataError(f"{relative} (in {folder}) is a symbolic link to {os.readlink(path)}, which does not "
                         "exist; remove the link or restore the file it points to")
    return DataError(f"cannot open {relative} (in {folder}): {err.strerror or err}; fix or remove the file (and "
                     "do not change the folder while a run reads it)")


def _decoded_split(files: SplitFiles, image_size: int, cache_dir: Path, split: str,
                   class_names: Sequence[str], folder: Path,
                   max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[Tensor, Tensor]:
    """uint8 (N, C, H, W) images and int64 labels, from the tensor cache when the files are unchanged.

    What decoding changed (alpha dropped, resized, ...) is logged on every load, cached or not."""
    def decode() -> dict[str, Any]:
        log.info("decoding %d %s images from %s", len(files), split, folder)
        x, notes = _decode_images([path for path, _ in files], image_size, folder, max_pixels)
        return {"x": x, "y": torch.from_numpy(files.labels.copy()), "notes": notes}

    signature = listing_signature(files, folder, class_names, image_size)
    decoded = cached_split(cache_dir / "tensors", f"{split}-size{image_size}", signature, decode)
    log_notes(split, folder, decoded.get("notes", {}))
    return decoded["x"], decoded["y"]


def cached_split(folder: Path, name: str, signature: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`compute()` for one split of an image folder, kept as folder/<name>-<signature>.pt (tensors, strings,
    numbers) and read from there while the signature (`listing_signature`) is the same; older files of
    `name` are removed when a new one is written."""
    cache_file = folder / f"{name}-{signature}.pt"
    if cache_file.is_file():
        try:
            return torch.load(cache_file, map_location="cpu", weights_only=True)
        except Exception as err:  # a torn or foreign file: compute again
            log.warning("ignoring unreadable cache file %s (%s); reading the images again", cache_file, err)
    result = compute()
    try:
        for stale in folder.glob(f"{name}-*.pt"):
            stale.unlink(missing_ok=True)
        save_torch(cache_file, result)
    except OSError as err:
        log.warning("could not write the cache file %s (%s); the images will be read again next time",
                    cache_file, err)
    return result


_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # how PIL opens 16-bit greyscale (PNG, TIFF)
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_EXIF_ORIENTATION = 0x0112  # the EXIF tag saying how a (phone) photo must be turned to stand upright
# what `read_image` changed -> (said as a warning?, how the log says it)
_CHANGES = {
    "upright": (False, "were turned upright as their EXIF orientation says"),
    "16-bit": (False, "were 16-bit, scaled to 8 bits (value / 257)"),
    "alpha": (True, "had an alpha channel, which was dropped (transparent pixels keep their colour)"),
    "to greyscale": (True, "were colour, converted to greyscale"),
    "to colour": (True, "were greyscale among colour images, repeated to 3 channels"),
    "resized": (True, "were resized"),
}


class ImageTooLarge(ValueError):
    """An image has more pixels than the limit it was read under (a possible decompression bomb)."""

    def __init__(self, path: str | Path, pixels: int | None, limit: int) -> None:
        self.path, self.pixels, self.limit = str(path), pixels, limit
        super().__init__(f"{path} has {f'{pixels:,}' if pixels else 'more'} pixels, more than the limit of "
                         f"{limit:,}")

    def advice(self, setting: str, option: str, name: str | None = None) -> str:
        """The error line, naming the image (`name`, default its path) and `setting`, raised by `option`=N."""
        pixels = f"{self.pixels:,}" if self.pixels else "more"
        return (f"{name or self.path} is too large: {pixels} pixels, more than {setting} = {self.limit} allows (a "
                "guard against decompression bombs); if you trust the file, raise it, e.g. "
                f"{option}={self.pixels or 2 * self.limit}, or shrink the image")


_PIXEL_LIMIT_LOCK = threading.Lock()  # Pillow's limit is one global: one image is read under it at a time


def _new_pixel_limit_lock() -> None:
    """A forked child (a DataLoader worker) gets a free lock, whatever another thread held at the fork."""
    global _PIXEL_LIMIT_LOCK
    _PIXEL_LIMIT_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_pixel_limit_lock)


@contextlib.contextmanager
def pixel_limit(max_pixels: int) -> Iterator[None]:
    """Pillow's decompression-bomb limit set to `max_pixels` while an image is read (Pillow refuses images of
    more than twice Image.MAX_IMAGE_PIXELS, and only warns above it: that warning is not shown)."""
    with _PIXEL_LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = (max_pixels + 1) // 2
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _pillow_pixels(err: Exception) -> int | None:
    """The pixel count a DecompressionBombError names, if it does."""
    found = re.search(r"\((\d+) pixels\)", str(err))
    return int(found.group(1)) if found else None


def read_image(path: str | Path, channels: int | None = None, size: tuple[int, int] | None = None,
               max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[np.ndarray, dict[str, str]]:
    """An image file as upright 8-bit pixels, (H, W) greyscale or (H, W, 3) RGB, and what reading it changed.

    The EXIF orientation is applied (phones store photos sideways with a tag saying so);
    16-bit greyscale is scaled to 8 bits (value / 257, so 65535 -> 255, not clipped at
    255); an alpha channel is dropped; `channels` 1 or 3 converts to greyscale or RGB
    (None keeps each image's own); `size` (width, height) resizes (bilinear). The dict
    maps each change made (keys of _CHANGES) to a detail, e.g. {"resized": "28x28 -> 8x8"}.
    Raises ImageTooLarge for an image of more than `max_pixels` pixels, PIL's errors (OSError, ValueError,
    ...) for files it cannot read."""
    try:
        with pixel_limit(max_pixels):
            return _read_image(path, channels, size, max_pixels)
    except Image.DecompressionBombError as err:
        raise ImageTooLarge(path, _pillow_pixels(err), max_pixels) from err


def _read_image(path: str | Path, channels: int | None, size: tuple[int, int] | None,
                max_pixels: int) -> tuple[np.ndarray, dict[str, str]]:
    changes: dict[str, str] = {}
    with Image.open(path) as opened:
        if opened.width * opened.height > max_pixels:
            raise ImageTooLarge(path, opened.width * opened.height, max_pixels)
        image = opened
        if opened.getexif().get(_EXIF_ORIENTATION, 1) != 1:
            image = ImageOps.exif_transpose(opened)
            changes["upright"] = ""
        if image.mode in _SIXTEEN_BIT_MODES:
            wide = np.asarray(image, dtype=np.float64)
            image = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), "L")
            changes["16-bit"] = ""
        if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
            changes["alpha"] = image.mode
        own = "L" if image.mode in _GRAY_MODES else "RGB"
        target = own if channels is None else ("L" if channels == 1 else "RGB")
        if target != own:
            changes["to greyscale" if target == "L" else "to colour"] = image.mode
        image = image.convert(target)
        if size is not None and image.size != size:
            changes["resized"] = f"{size_text(image.size[::-1])} -> {size_text(size[::-1])}"
            image = image.resize(size, Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8), changes


def describe_changes(changes: dict[str, tuple[int, str, str]], total: int) -> tuple[str, str]:
    """(warning text, info text) from {change: (count, first file, its detail)}; "" where there is none."""
    said: dict[bool, list[str]] = {True: [], False: []}
    for change, (count, first, detail) in changes.items():
        warn, text = _CHANGES[change]
        example = f"{first}{': ' + detail if detail else ''}"
        said[warn].append(f"{count} of {total} {text} (e.g. {example})")
    return "; ".join(said[True]), "; ".join(said[False])


def log_notes(split: str, folder: Path, notes: dict[str, Any]) -> None:
    if notes.get("warning"):
        log.warning("%s images in %s: %s", split, folder, notes["warning"])
    if notes.get("info"):
        log.info("%s images in %s: %s", split, folder, notes["info"])


def decode_image(relative: str, image_size: int, folder: str | Path, channels: int | None = None,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[np.ndarray, dict[str, str]]:
    """(H, W) for grayscale images, (H, W, 3) for everything else (or as `channels` says), upright and resized
    to image_size if it is set; with what was changed (`read_image`). DataError naming an unreadable file, or
    one of more than `max_pixels` pixels (data.max_image_pixels)."""
    try:
        size = (image_size, image_size) if image_size > 0 else None
        return read_image(os.path.join(folder, relative), channels=channels, size=size, max_pixels=max_pixels)
    except ImageTooLarge as err:
        raise DataError(err.advice("data.max_image_pixels", "--set data.max_image_pixels",
                                   f"image {relative} (in {folder})")) from err
    except FileNotFoundError as err:
        raise missing_file_error(relative, folder, err) from err
    except (OSError, ValueError, SyntaxError) as err:  # PIL's UnidentifiedImageError is an OSError
        class_name = Path(relative).parts[1]
        raise DataError(f"cannot read image {relative} (class {class_name!r}, in {folder}): {err}; "
                        "remove or replace the file") from err


def _decode_images(paths: Sequence[str], image_size: int, folder: Path,
                   max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[Tensor, dict[str, str]]:
    """Decode plainly, in order, into one uint8 (N, C, H, W) tensor, with notes of what was changed.

    Small JPEGs decode at ~13k/s on one core; a thread pool only added GIL contention.
    """
    decoded = [decode_image(path, image_size, folder, max_pixels=max_pixels) for path in paths]
    arrays = [array for array, _ in decoded]
    check_same_size(paths, [array.shape[:2] for array in arrays], folder)
    gray = [array.ndim == 2 for array in arrays]
    channels = 1 if all(gray) else 3
    stacked = np.empty((len(arrays), *arrays[0].shape[:2], channels), dtype=np.uint8)
    for i, array in enumerate(arrays):
        stacked[i] = array[..., None] if array.ndim == 2 else array  # gray broadcasts to RGB when mixed
    notes = tally_changes(paths, [changed for _, changed in decoded], gray)
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous(), notes


def check_same_size(paths: Sequence[str], sizes: Sequence[Sequence[int]], folder: str | Path) -> None:
    """DataError naming the first image whose (height, width) differs from the first one's."""
    for path, size in zip(paths, sizes):
        if tuple(size) != tuple(sizes[0]):
            raise DataError(f"images differ in size: {paths[0]} is {size_text(sizes[0])} "
                            f"but {path} is {size_text(size)} (in {folder}); set data.image_size "
                            f"(e.g. data.image_size={sizes[0][0]}) to resize all images to one square size")


def tally_changes(paths: Iterable[str], changed: Iterable[dict[str, str]], gray: Sequence[bool]) -> dict[str, str]:
    """{"warning": ..., "info": ...}: what decoding the images of one split changed (the i-th of `changed` for
    the i-th of `paths`; greyscale images among colour ones are said to be made colour), for `log_notes`."""
    all_gray = all(gray)
    changes: dict[str, tuple[int, str, str]] = {}
    for path, image_changes, is_gray in zip(paths, changed, gray):
        if is_gray and not all_gray:
            image_changes = dict(image_changes, **{"to colour": ""})
        for change, detail in image_changes.items():
            count, first, first_detail = changes.get(change, (0, path, detail))
            changes[change] = (count + 1, first, first_detail)
    warning, info = describe_changes(changes, len(gray))
    return {"warning": warning, "info": info}


def _same_channels(x_train: Tensor, x_test: Tensor) -> tuple[Tensor, Tensor]:
    """Grayscale stays one channel only when both splits are all grayscale; otherwise repeat it to RGB."""
    if x_train.shape[1] == x_test.shape[1]:
        return x_train, x_test
    common_channels(x_train.shape[1], x_test.shape[1])
    expand = lambda x: x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # noqa: E731
    return expand(x_train), expand(x_test)


def common_channels(train: int, test: int) -> int:
    """The channels of both splits (1 or 3): 3 unless both are greyscale, said in the log when they differ."""
    if train != test:
        gray, colour = ("train", "test") if train == 1 else ("test", "train")
        log.warning("the %s images are all greyscale but the %s images are in colour: the greyscale ones are "
                    "repeated to 3 channels", gray, colour)
    return max(train, test)
