"""Run an exported student on image files or .npy arrays and list its top classes.

Images (PNG, JPEG, ... anything PIL opens) become one example each, read as for
training (`imagefolder.read_image`: EXIF orientation applied, 16-bit scaled to 8 bits, alpha
dropped), converted to greyscale or RGB to match the student's channels, resized to its
height and width, and scaled to [0, 1]; one warning line says which inputs were
converted or resized. A .npy file holds one example (*input_shape) or a batch
(N >= 1, *input_shape); uint8 arrays are scaled by 1/255, float arrays are taken as [0, 1].
A .npy file is memory-mapped and run BATCH_SIZE rows at a time, and `iter_predictions` yields
each row's result as it comes, so memory stays flat however many rows a file holds. An image
of more pixels than `max_image_pixels` (Pillow's limit by default) is refused.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Iterator, TextIO

import numpy as np
import torch
from PIL import UnidentifiedImageError

from .export import InputError, LoadedStudent, load_student
from .imagefolder import DEFAULT_MAX_IMAGE_PIXELS, ImageTooLarge, read_image

logger = logging.getLogger(__name__)

BATCH_SIZE = 1024  # examples run through the student at once


def _shape_text(shape: list[int] | tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def _load_image(path: Path, input_shape: list[int],
                max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[torch.Tensor, dict[str, str]]:
    """One image as a (1, C, H, W) batch in [0, 1], fitted to the student's input, and what was changed."""
    if len(input_shape) != 3 or input_shape[0] not in (1, 3):
        raise InputError(f"{path}: this student takes inputs of shape {_shape_text(input_shape)}, not images; "
                         "give a .npy file with arrays of that shape")
    channels, height, width = input_shape
    try:
        array, changes = read_image(path, channels=channels, size=(width, height), max_pixels=max_pixels)
    except ImageTooLarge as err:
        raise InputError(err.advice("--max-image-pixels", "--max-image-pixels")) from err
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise InputError(f"{path}: unreadable image ({err}); give a PNG/JPEG image or a .npy array") from err
    pixels = array.astype(np.float32) / 255.0
    pixels = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)  # (H, W[, C]) -> (C, H, W)
    return torch.from_numpy(np.ascontiguousarray(pixels))[None], changes


def _open_npy(path: Path, input_shape: list[int]) -> np.ndarray:
    """The array of a .npy file, memory-mapped (read from disk as it is used), as (N, *input_shape)."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise InputError(f"{path}: unreadable .npy file ({err}); save it with numpy.save") from err
    shape = list(array.shape)
    if shape == input_shape:
        array = array[None]
    elif shape[1:] != input_shape:
        raise InputError(f"{path}: array of shape {_shape_text(shape)}, expected {_shape_text(input_shape)} for "
                         f"one example or {_shape_text(['N'] + input_shape)} for a batch")
    if len(array) == 0:
        raise InputError(f"{path}: array of shape {_shape_text(shape)} holds no examples; save at least one")
    if array.dtype != np.uint8 and not np.issubdtype(array.dtype, np.floating):
        raise InputError(f"{path}: array of dtype {array.dtype}; save uint8 pixels (0-255) or floats in [0, 1]")
    return array


def _npy_batches(path: Path, input_shape: list[int], batch_size: int = BATCH_SIZE) -> Iterator[torch.Tensor]:
    """The examples of a .npy file as float32 batches of at most `batch_size` rows in [0, 1], read one batch at a
    time; one warning (after the last batch) when values fall outside [0, 1]."""
    array = _open_npy(path, input_shape)
    low, high = np.inf, -np.inf
    for start in range(0, len(array), batch_size):
        rows = np.asarray(array[start:start + batch_size])
        batch = rows.astype(np.float32) / 255.0 if rows.dtype == np.uint8 else rows.astype(np.float32)
        if not np.isfinite(batch).all():
            raise InputError(f"{path}: array holds NaN or infinite values (row {start + _first_bad_row(batch)}); "
                             "clean the inputs first")
        low, high = min(low, float(batch.min())), max(high, float(batch.max()))
        yield torch.from_numpy(np.ascontiguousarray(batch))
    if low < 0.0 or high > 1.0:
        logger.warning("%s: values span [%.3g, %.3g], outside the [0, 1] the student expects; "
                       "scale them to [0, 1] for sensible predictions", path, low, high)


def _first_bad_row(batch: np.ndarray) -> int:
    return int(np.flatnonzero(~np.isfinite(batch.reshape(len(batch), -1)).all(axis=1))[0])


def _checked_path(path: str | Path) -> Path:
    """`path` as a Path, InputError unless it is a file."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder; give the image or .npy files in it, e.g. {path}/*.png")
    if not path.exists():
        raise InputError(f"{path} does not exist; check the path")
    if not path.is_file():
        raise InputError(f"{path} is not a regular file; give image files or .npy files")
    return path


def _file_batches(path: str | Path, input_shape: list[int],
                  max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[Iterator[torch.Tensor], dict[str, str]]:
    """One file's examples as batches of float32 pixels in [0, 1] (a .npy file read batch by batch), and what
    was changed to fit the student."""
    path = _checked_path(path)
    if path.suffix.lower() == ".npy":  # its shape and dtype are checked when the first batch is read
        return _npy_batches(path, list(input_shape)), {}
    image, changes = _load_image(path, list(input_shape), max_pixels)
    return iter([image]), changes


_FITTING = ("alpha", "to greyscale", "to colour", "resized")  # changes made to fit the student, said once


def _say_what_changed(changed: list[tuple[str, dict[str, str]]], input_shape: list[int]) -> None:
    """One warning line for the inputs that were converted or resized to the student's input."""
    fitted = [(path, {k: v for k, v in changes.items() if k in _FITTING}) for path, changes in changed]
    fitted = [(path, changes) for path, changes in fitted if changes]
    if not fitted:
        return
    said = {"alpha": "dropped the alpha channel of {}", "to greyscale": "converted {} to greyscale",
            "to colour": "converted {} to RGB", "resized": "resized {}"}
    examples = [f"{path} ({', '.join(said[k].format(v) for k, v in changes.items())})" for path, changes in fitted[:3]]
    logger.warning("%d of %d inputs did not match the student's input %s and were changed: %s%s", len(fitted),
                   len(changed), _shape_text(input_shape), "; ".join(examples), "; ..." if len(fitted) > 3 else "")


def load_inputs(paths: list[str | Path], input_shape: list[int],
                max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> torch.Tensor:
    """All examples of `paths` (images and .npy files) stacked into (N, *input_shape) in [0, 1] (all in memory:
    `iter_predictions` reads large .npy files batch by batch instead)."""
    input_shape = [int(d) for d in input_shape]
    if not paths:
        return torch.empty(0, *input_shape)
    batches, changed = [], []
    for path in paths:
        file_batches, changes = _file_batches(path, input_shape, max_image_pixels)
        batches += list(file_batches)
        changed.append((str(path), changes))
    _say_what_changed(changed, input_shape)
    return torch.cat(batches)


def _top_classes(probs: torch.Tensor, class_names: list[str], top_k: int) -> list[list[dict]]:
    values, indices = probs.topk(min(top_k, probs.shape[1]), dim=1)
    return [[{"class": class_names[i], "class_id": i, "prob": p}
             for p, i in zip(row_values.tolist(), row_indices.tolist())]
            for row_values, row_indices in zip(values, indices)]


def iter_predictions(student: LoadedStudent, paths: Iterable[str | Path], top_k: int = 3,
                     max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Iterator[dict]:
    """{"file", "index" (row within a .npy, 0 for images), "top": [{"class", "class_id", "prob"}...]} for each
    example of `paths`, in order, as it is predicted (a .npy file BATCH_SIZE rows at a time). Every path, and
    every .npy file's shape and dtype, is checked before the first result; an image or a row that cannot be
    read is an InputError when it is reached."""
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    paths = [_checked_path(path) for path in paths]
    for path in paths:
        if path.suffix.lower() == ".npy":
            _open_npy(path, list(student.meta.input_shape))
    changed = []
    for path in paths:
        batches, changes = _file_batches(path, student.meta.input_shape, max_image_pixels)
        changed.append((str(path), changes))
        index = 0
        for batch in batches:
            for top in _top_classes(student.predict_proba(batch), student.meta.class_names, top_k):
                yield {"file": str(path), "index": index, "top": top}
                index += 1
    _say_what_changed(changed, student.meta.input_shape)


def predict_files(model_path: str | Path, paths: list[str | Path], top_k: int = 3,
                  max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> list[dict]:
    """[{"file", "index" (row within a .npy, 0 for images), "top": [{"class", "class_id", "prob"}...]}]."""
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    return list(iter_predictions(load_student(model_path), paths, top_k, max_image_pixels))


def format_prediction(result: dict) -> str:
    """One example's line: `file[index]: name (0.93), name2 (0.04)` (no [index] for images)."""
    where = result["file"] + (f"[{result['index']}]" if result["file"].lower().endswith(".npy") else "")
    tops = ", ".join(f"{t['class']} ({t['prob']:.2f})" for t in result["top"])
    return f"{where}: {tops}"


def write_predictions(results: Iterable[dict], out: TextIO, as_json: bool = False) -> None:
    """Write each result to `out` as it comes: a line each, or (as_json) one JSON list, as json.dumps(results,
    indent=2) would write it."""
    if not as_json:
        for result in results:
            out.write(format_prediction(result) + "\n")
        return
    first = True
    for result in results:
        item = "\n".join("  " + line for line in json.dumps(result, indent=2).splitlines())
        out.write(("[\n" if first else ",\n") + item)
        first = False
    out.write("[]\n" if first else "\n]\n")


def format_predictions(results: list[dict]) -> str:
    """One line per example: `file[index]: name (0.93), name2 (0.04)` (no [index] for images)."""
    return "\n".join(format_prediction(result) for result in results)
