"""Run an exported student on image files or .npy arrays and list its top classes.

Images (PNG, JPEG, ... anything PIL opens) become one example each, read as for
training (`imagefolder.read_image`: EXIF orientation applied, 16-bit scaled to 8 bits, alpha
dropped), converted to greyscale or RGB to match the student's channels, resized to its
height and width, and scaled to [0, 1]; one warning line says which inputs were
converted or resized. A .npy file holds one example (*input_shape) or a batch
(N >= 1, *input_shape); uint8 arrays are scaled by 1/255, float arrays are taken as [0, 1].
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import UnidentifiedImageError

from .export import InputError, LoadedStudent, load_student
from .imagefolder import read_image

logger = logging.getLogger(__name__)

BATCH_SIZE = 1024  # examples run through the student at once


def _shape_text(shape: list[int] | tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def _load_image(path: Path, input_shape: list[int]) -> tuple[torch.Tensor, dict[str, str]]:
    """One image as a (1, C, H, W) batch in [0, 1], fitted to the student's input, and what was changed."""
    if len(input_shape) != 3 or input_shape[0] not in (1, 3):
        raise InputError(f"{path}: this student takes inputs of shape {_shape_text(input_shape)}, not images; "
                         "give a .npy file with arrays of that shape")
    channels, height, width = input_shape
    try:
        array, changes = read_image(path, channels=channels, size=(width, height))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise InputError(f"{path}: unreadable image ({err}); give a PNG/JPEG image or a .npy array") from err
    pixels = array.astype(np.float32) / 255.0
    pixels = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)  # (H, W[, C]) -> (C, H, W)
    return torch.from_numpy(np.ascontiguousarray(pixels))[None], changes


def _load_npy(path: Path, input_shape: list[int]) -> torch.Tensor:
    try:
        array = np.load(path, allow_pickle=False)
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
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
    else:
        raise InputError(f"{path}: array of dtype {array.dtype}; save uint8 pixels (0-255) or floats in [0, 1]")
    if not np.isfinite(array).all():
        raise InputError(f"{path}: array holds NaN or infinite values; clean the inputs first")
    if array.size and (array.min() < 0.0 or array.max() > 1.0):
        logger.warning("%s: values span [%.3g, %.3g], outside the [0, 1] the student expects; "
                       "scale them to [0, 1] for sensible predictions", path, array.min(), array.max())
    return torch.from_numpy(np.ascontiguousarray(array))


def _load_file(path: str | Path, input_shape: list[int]) -> tuple[torch.Tensor, dict[str, str]]:
    """One file as a batch (n, *input_shape) of float32 pixels in [0, 1], and what was changed to fit it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist; check the path")
    if path.suffix.lower() == ".npy":
        return _load_npy(path, list(input_shape)), {}
    return _load_image(path, list(input_shape))


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


def load_inputs(paths: list[str | Path], input_shape: list[int]) -> torch.Tensor:
    """All examples of `paths` (images and .npy files) stacked into (N, *input_shape) in [0, 1]."""
    input_shape = [int(d) for d in input_shape]
    if not paths:
        return torch.empty(0, *input_shape)
    loaded = [_load_file(p, input_shape) for p in paths]
    _say_what_changed([(str(p), changes) for p, (_, changes) in zip(paths, loaded)], input_shape)
    return torch.cat([x for x, _ in loaded])


def _top_classes(probs: torch.Tensor, class_names: list[str], top_k: int) -> list[list[dict]]:
    values, indices = probs.topk(min(top_k, probs.shape[1]), dim=1)
    return [[{"class": class_names[i], "class_id": i, "prob": p}
             for p, i in zip(row_values.tolist(), row_indices.tolist())]
            for row_values, row_indices in zip(values, indices)]


def _predict_proba(student: LoadedStudent, x: torch.Tensor) -> torch.Tensor:
    """Probabilities in batches of BATCH_SIZE, so a large .npy does not need one huge forward pass."""
    if len(x) == 0:
        return torch.empty(0, len(student.meta.class_names))
    return torch.cat([student.predict_proba(x[i:i + BATCH_SIZE]) for i in range(0, len(x), BATCH_SIZE)])


def predict_files(model_path: str | Path, paths: list[str | Path], top_k: int = 3) -> list[dict]:
    """[{"file", "index" (row within a .npy, 0 for images), "top": [{"class", "class_id", "prob"}...]}]."""
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    student = load_student(model_path)
    results: list[dict] = []
    changed = []
    for path in paths:
        x, changes = _load_file(path, student.meta.input_shape)
        changed.append((str(path), changes))
        probs = _predict_proba(student, x)
        for index, top in enumerate(_top_classes(probs, student.meta.class_names, top_k)):
            results.append({"file": str(path), "index": index, "top": top})
    _say_what_changed(changed, student.meta.input_shape)
    return results


def format_predictions(results: list[dict]) -> str:
    """One line per example: `file[index]: name (0.93), name2 (0.04)` (no [index] for images)."""
    lines = []
    for result in results:
        where = result["file"] + (f"[{result['index']}]" if result["file"].lower().endswith(".npy") else "")
        tops = ", ".join(f"{t['class']} ({t['prob']:.2f})" for t in result["top"])
        lines.append(f"{where}: {tops}")
    return "\n".join(lines)
