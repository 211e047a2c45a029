"""Stage 7: export the student alone (TorchScript, torch.export, ONNX, state dict) and load it back.

`export_student` writes the student as TorchScript (`student.ts`), a `torch.export`
program (`student.pt2`), ONNX (`student.onnx`) and/or a state dict with its metadata
(`student_state.pt`), plus `student.json` (class names, input shape, normalisation, the
run config) beside them. Every file is first written to a temporary name, loaded back
and compared with the eager model on a check batch; a format whose outputs differ by more
than `atol` is an error that leaves the previous export in place. The model normalises
its own inputs, so every format takes float32 pixels in [0, 1] of shape
(N, *input_shape) and returns (N, C) logits.

`load_student` opens any of these files (or the export directory) as a `LoadedStudent`.
Opening a file never unpickles arbitrary objects: a state dict is read with
`weights_only=True`, TorchScript by torch's own unpickler (which knows no Python
functions), and a `.pt2` is never handed to `torch.export.load`, which unpickles with
`weights_only=False` when a safe load fails, evaluates the program's symbolic shapes as
Python expressions and may load compiled code. Instead the student is rebuilt from the
file's metadata and raw weights (`_load_export`), and a `.pt2` holding anything but raw
weights, JSON and pickles that `weights_only=True` accepts is refused.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import io
import json
import logging
import os
import re
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch

from .artifacts import (
    CONFIG_FILE,
    EXPORT_DIR,
    atomic_write,
    new_temp_file,
    require_run_dir,
    save_torch,
    write_bytes,
    write_json,
)
from .backbones import data_config, normalization
from .choices import EXPORT_FORMATS as FORMATS
from .config import ModelConfig, load_config
from .errors import WRITE_ERRNOS, EnsembleKDError
from .models import Classifier, build_model
from .streaming import head

if TYPE_CHECKING:
    from .config import Config
    from .data import Splits

logger = logging.getLogger(__name__)

FILE_NAMES = {  # one per format of FORMATS
    "torchscript": "student.ts",
    "export": "student.pt2",
    "onnx": "student.onnx",
    "state_dict": "student_state.pt",
}
META_FILE = "student.json"  # the metadata, human readable, beside the exported files
META_KEY = "meta.json"  # name of the embedded metadata (extra file / ONNX metadata_props key)
LOAD_PREFERENCE = ("state_dict", "torchscript", "onnx", "export")  # what load_student(dir) opens first
STATE_FORMAT = "ensemble-kd-student"
STATE_VERSION = 1
ONNX_EXTRA = "pip install 'ensemble-kd[onnx]'"
STREAMED_CHECK_IMAGES = 1024  # test images an export is checked on when the test set is streamed from disk
ONNX_HINT = f"ONNX export needs the onnx extra: {ONNX_EXTRA}"
ONNX_INPUT, ONNX_OUTPUT = "pixels", "logits"

Runner = Callable[[torch.Tensor], torch.Tensor]


class ExportError(EnsembleKDError, RuntimeError):
    """An export failed or an exported file is missing, corrupt or foreign."""


class InputError(EnsembleKDError, ValueError):
    """Inputs given to an exported student have the wrong shape, type or content."""


@dataclass
class StudentMeta:
    class_names: list[str]  # one name per output, in output order
    input_shape: list[int]  # one example's shape, without the batch dim
    model_config: dict  # dataclasses.asdict(ModelConfig) of the student
    mean: list[float]  # normalisation baked into the model (for information)
    std: list[float]
    config: dict = field(default_factory=dict)  # the whole run config the student came from
    data_fingerprint: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> StudentMeta:
        if not isinstance(d, dict):
            raise ExportError(f"student metadata must be a JSON object, got {type(d).__name__}; re-export the student")
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in d]
        if missing:
            raise ExportError(f"student metadata lacks {', '.join(missing)}; re-export the student with this version")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        values["class_names"] = [str(c) for c in values["class_names"]]
        values["input_shape"] = [int(s) for s in values["input_shape"]]
        return cls(**values)


# ---------------------------------------------------------------- writing


def missing_onnx_modules() -> list[str]:
    """The modules of the onnx extra that are not installed."""
    return [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]


def _require_onnx() -> None:
    missing = missing_onnx_modules()
    if missing:
        raise ExportError(f"{ONNX_HINT} (missing: {', '.join(missing)})")


def _batch_dim() -> tuple[dict[int, Any]]:
    return ({0: torch.export.Dim("batch")},)


def _write_torchscript(model: Classifier, example: torch.Tensor, meta_json: str, path: Path) -> None:
    with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export but still works
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, example)
        atomic_write(path, lambda f: torch.jit.save(traced, f, _extra_files={META_KEY: meta_json}))


def _write_export(model: Classifier, example: torch.Tensor, meta_json: str, path: Path) -> None:
    program = torch.export.export(model, (example,), dynamic_shapes=_batch_dim())
    atomic_write(path, lambda f: torch.export.save(program, f, extra_files={META_KEY: meta_json}))


_ONNX_LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir")  # the exporter logs each optimisation pass at INFO


@contextlib.contextmanager
def _quiet_onnx_exporter() -> Iterator[None]:
    """Keep the ONNX exporter's progress (log records of every pass, printed steps, deprecation notes) out of
    the run's output; what it printed goes to this module's debug log. Its failures still raise."""
    loggers = [logging.getLogger(name) for name in _ONNX_LOGGERS]
    levels = [each.level for each in loggers]
    chatter = io.StringIO()
    try:
        for each in loggers:
            each.setLevel(max(each.getEffectiveLevel(), logging.WARNING))
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for each, level in zip(loggers, levels):
            each.setLevel(level)
        if chatter.getvalue().strip():
            logger.debug("ONNX exporter: %s", chatter.getvalue().strip())


def _write_onnx(model: Classifier, example: torch.Tensor, meta_json: str, path: Path) -> None:
    with _quiet_onnx_exporter():
        program = torch.onnx.export(model, (example,), dynamo=True, verbose=False, dynamic_shapes=_batch_dim(),
                                    input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT])
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, meta_json
    write_bytes(path, proto.SerializeToString())


def _write_state_dict(model: Classifier, example: torch.Tensor, meta_json: str, path: Path) -> None:
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    save_torch(path, {"format": STATE_FORMAT, "version": STATE_VERSION, "state_dict": state,
                      "meta": json.loads(meta_json)})


WRITERS: dict[str, Callable[[Classifier, torch.Tensor, str, Path], None]] = {
    "torchscript": _write_torchscript,
    "export": _write_export,
    "onnx": _write_onnx,
    "state_dict": _write_state_dict,
}


def _check_formats(formats: list[str]) -> list[str]:
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ExportError(f"unknown export format(s) {', '.join(map(repr, unknown))}; "
                          f"choose from {', '.join(FORMATS)}")
    if not formats:
        raise ExportError(f"no export formats given; choose one or more of {', '.join(FORMATS)}")
    return list(dict.fromkeys(formats))  # drop repeats, keep order


def _meta_json(meta: StudentMeta) -> str:
    try:
        return json.dumps(meta.to_dict(), indent=2)
    except (TypeError, ValueError) as err:
        raise ExportError(f"student metadata is not JSON-serialisable ({err}); "
                          "pass plain dicts, lists, strings and numbers in StudentMeta") from err


def _check_batch_on_cpu(check_batch: torch.Tensor, meta: StudentMeta) -> torch.Tensor:
    batch = torch.as_tensor(check_batch).detach().to("cpu", torch.float32)
    if batch.dim() != len(meta.input_shape) + 1 or list(batch.shape[1:]) != meta.input_shape or len(batch) == 0:
        raise ExportError(f"check batch has shape {tuple(batch.shape)}, expected (N>=1, "
                          f"{', '.join(map(str, meta.input_shape))}); pass a few real inputs of the student")
    return batch


def _example(batch: torch.Tensor) -> torch.Tensor:
    """Two rows: tracing with a batch of 1 would let torch.export specialise the batch size to 1.

    A copy, not a view: torch.export saves its example inputs with the program, and a view
    of the check batch would take the whole batch's storage into student.pt2."""
    return batch[:2].clone() if len(batch) >= 2 else torch.cat([batch, batch])


def parity(student: LoadedStudent, batch: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max |loaded - expected|, share of rows with the same argmax) on `batch`."""
    got = student.logits(batch)
    max_abs_diff = float((got - expected).abs().max())
    top1_agreement = float((got.argmax(1) == expected.argmax(1)).float().mean())
    return max_abs_diff, top1_agreement


def _export_one(fmt: str, model: Classifier, example: torch.Tensor, meta_json: str, path: Path) -> None:
    try:
        WRITERS[fmt](model, example, meta_json, path)
    except ExportError:
        raise
    except OSError as err:
        if err.errno in WRITE_ERRNOS:  # an unwritable folder, not the format: the command line says so
            raise
        raise ExportError(f"{fmt} export of the student failed ({type(err).__name__}: {err}); "
                          f"drop {fmt!r} from export.formats or use another format") from err
    except Exception as err:  # exporters raise many kinds on unsupported models
        raise ExportError(f"{fmt} export of the student failed ({type(err).__name__}: {err}); "
                          f"drop {fmt!r} from export.formats or use another format") from err


def export_student(model: Classifier, meta: StudentMeta, out_dir: str | Path, formats: list[str],
                   check_batch: torch.Tensor, atol: float = 1e-4) -> dict:
    """Write the student in each of `formats` into `out_dir`, each checked against eager PyTorch.

    Every format is written to a temporary file and checked there; only when all pass do
    they replace the files of `out_dir` (then student.json). A failed export or parity
    check leaves the previous export as it was.
    Returns {"formats": {fmt: {"path", "bytes", "max_abs_diff", "top1_agreement"}}, "meta": {...}}.
    The caller's model is not changed (a CPU copy in eval mode is exported).
    """
    formats = _check_formats(list(formats))
    if "onnx" in formats:
        _require_onnx()
    out_dir = _folder_for(out_dir, formats)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_json = _meta_json(meta)
    batch = _check_batch_on_cpu(check_batch, meta)
    student = copy.deepcopy(model).cpu().eval()
    with torch.no_grad():
        expected = student(batch)
    checked: dict[str, Path] = {}  # format -> its temporary file, written and checked
    results: dict[str, dict[str, Any]] = {}
    try:
        for fmt in formats:
            checked[fmt] = _temp_path(out_dir / FILE_NAMES[fmt])
            results[fmt] = _export_checked(fmt, student, batch, expected, meta_json, checked[fmt], atol)
        for fmt, temp in list(checked.items()):
            path = out_dir / FILE_NAMES[fmt]
            os.replace(temp, path)
            del checked[fmt]
            results[fmt]["path"] = str(path)
            logger.info("exported %s to %s (%d bytes, max |diff| %.2g, top-1 agreement %.3f)", fmt, path,
                        results[fmt]["bytes"], results[fmt]["max_abs_diff"], results[fmt]["top1_agreement"])
    finally:
        for temp in checked.values():  # never leave a file that gives other answers than the student
            temp.unlink(missing_ok=True)
    write_json(out_dir / META_FILE, json.loads(meta_json))
    return {"formats": results, "meta": meta.to_dict()}


def _folder_for(out_dir: str | Path, formats: list[str]) -> Path:
    """`out_dir`, unless it is a file (ExportError: the export is a folder of files)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} is a file, not a folder: the student is exported into a folder (as "
                          f"{', '.join(FILE_NAMES[f] for f in formats)} and {META_FILE}); give a folder for --out")
    return out_dir


def _temp_path(path: Path) -> Path:
    """A fresh, unused name beside `path` (the atomic writers write it in turn via their own temp file)."""
    fd, name = new_temp_file(path)
    os.close(fd)
    return name


def _export_checked(fmt: str, student: Classifier, batch: torch.Tensor, expected: torch.Tensor, meta_json: str,
                    path: Path, atol: float) -> dict[str, Any]:
    """Write `fmt` to `path`, load it back and compare it with the eager outputs `expected`."""
    _export_one(fmt, student, _example(batch), meta_json, path)
    loaded = [_open(path, fmt)]
    if fmt == "export":  # the program others run with torch.export.load, and what load_student rebuilds
        loaded.append(LoadedStudent(loaded[0].meta, fmt, path, _export_program(path)))
    checks = [parity(each, batch, expected) for each in loaded]
    max_abs_diff, top1_agreement = max(c[0] for c in checks), min(c[1] for c in checks)
    if not max_abs_diff <= atol:
        raise ExportError(f"{fmt} export differs from eager PyTorch by {max_abs_diff:.3g} > atol {atol:g} "
                          f"(top-1 agreement {top1_agreement:.3f}); the previous export is kept. Raise "
                          f"export.parity_atol if this is float rounding, or drop {fmt!r} from export.formats")
    return {"path": str(path), "bytes": path.stat().st_size, "max_abs_diff": max_abs_diff,
            "top1_agreement": top1_agreement}


# ---------------------------------------------------------------- loading


class LoadedStudent:
    """An exported student of any format: float32 pixels in [0, 1] -> logits on CPU."""

    def __init__(self, meta: StudentMeta, format: str, path: Path, run: Runner) -> None:
        self.meta = meta
        self.format = format
        self.path = path
        self._run = run

    def __repr__(self) -> str:
        return (f"LoadedStudent(format={self.format!r}, path='{self.path}', "
                f"classes={len(self.meta.class_names)}, input_shape={self.meta.input_shape})")

    def _as_input(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(x))
        if not isinstance(x, torch.Tensor):
            raise InputError(f"expected a tensor or numpy array, got {type(x).__name__}")
        expected = f"(N, {', '.join(map(str, self.meta.input_shape))})"
        if not x.is_floating_point():
            raise InputError(f"expected float32 pixels in [0, 1] of shape {expected}, got dtype {x.dtype}; "
                             "divide 8-bit pixels by 255 first (predict.load_inputs does this)")
        if x.dim() != len(self.meta.input_shape) + 1 or list(x.shape[1:]) != self.meta.input_shape:
            hint = ("; add a batch dimension, e.g. x[None]" if list(x.shape) == self.meta.input_shape
                    else "; resize the inputs to the shape the student was trained on")
            raise InputError(f"expected input of shape {expected}, got {tuple(x.shape)}{hint}")
        return x.detach().to("cpu", torch.float32).contiguous()

    def logits(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(N, *input_shape) float pixels in [0, 1] -> (N, C) float32 logits on CPU."""
        x = self._as_input(x)
        if len(x) == 0:
            return torch.empty(0, len(self.meta.class_names))
        with torch.no_grad():
            out = self._run(x)
        return torch.as_tensor(out).detach().to("cpu", torch.float32)

    def predict_proba(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1)


def _corrupt(path: Path, err: Exception, what: str) -> ExportError:
    return ExportError(f"{path} is corrupt or not {what} ({type(err).__name__}: {str(err)[:300]}); "
                       "re-export the student (ensemble-kd export) to recreate it")


def _load_torchscript(path: Path) -> tuple[Runner, dict | None]:
    extra = {META_KEY: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as err:
        raise _corrupt(path, err, "a TorchScript student") from err
    return module.eval(), _parse_embedded(extra[META_KEY], path)


def _export_program(path: Path) -> Runner:
    """The program of a .pt2 this process just wrote, run by torch (never for a file from elsewhere: see
    `_load_export`). Read from memory, so torch does not warn about a temporary name not ending in .pt2."""
    try:
        return torch.export.load(io.BytesIO(path.read_bytes())).module()
    except Exception as err:
        raise _corrupt(path, err, "a torch.export student") from err


def _load_export(path: Path) -> tuple[Runner, dict | None]:
    """A .pt2 student rebuilt from its metadata and raw weights, without running anything the file holds: the
    file is read as data (`_Pt2`), and refused if it holds anything torch.export.load would run."""
    archive = _Pt2(path)
    _vet_pt2(archive)
    embedded = archive.embedded_meta()
    meta = StudentMeta.from_dict(embedded if embedded is not None else _meta_beside(path))
    model = _student_model(meta, path)
    _check_payload_sizes(archive, model)
    return _with_weights(model, _pt2_weights(archive), path), meta.to_dict()


def _load_onnx(path: Path) -> tuple[Runner, dict | None]:
    try:
        import onnxruntime  # the onnx extra
    except ImportError as err:
        raise ExportError(f"loading {path} needs onnxruntime: pip install 'ensemble-kd[onnx]'") from err
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:
        raise _corrupt(path, err, "an ONNX student") from err
    input_name = session.get_inputs()[0].name
    embedded = session.get_modelmeta().custom_metadata_map.get(META_KEY, "")

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {input_name: x.numpy()})[0])

    return run, _parse_embedded(embedded, path)


def _load_state_dict(path: Path) -> tuple[Runner, dict | None]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise _refused_pickle(path, "a pickle", err) or _corrupt(path, err, "a state-dict student") from err
    if not isinstance(blob, dict) or blob.get("format") != STATE_FORMAT:
        raise ExportError(f"{path} is not an ensemble-kd student export (no format={STATE_FORMAT!r} marker); "
                          "give the student_state.pt written by `ensemble-kd export`")
    if blob.get("version") != STATE_VERSION:
        raise ExportError(f"{path} has student format version {blob.get('version')!r}, this ensemble-kd reads "
                          f"version {STATE_VERSION}; re-export the student with this version")
    meta = StudentMeta.from_dict(blob.get("meta"))
    return _with_weights(_student_model(meta, path), blob["state_dict"], path), meta.to_dict()


def _student_model(meta: StudentMeta, path: Path) -> Classifier:
    """The student architecture `meta` describes, with fresh weights (every weight comes from the file)."""
    try:
        return build_model(ModelConfig(**meta.model_config), meta.input_shape, len(meta.class_names),
                           meta.mean, meta.std, load_weights=False)
    except Exception as err:
        raise ExportError(f"{path}: its metadata describes no model this ensemble-kd builds "
                          f"({type(err).__name__}: {str(err)[:300]}); re-export the student") from err


def _with_weights(model: Classifier, state: Any, path: Path) -> Classifier:
    """`model` in eval mode holding the weights `state` (every one, nothing else)."""
    try:
        model.load_state_dict(state, strict=True)
    except Exception as err:
        raise ExportError(f"{path}: the weights do not fit the model its metadata describes "
                          f"({type(err).__name__}: {str(err)[:300]}); re-export the student") from err
    return model.eval()


# ---------------------------------------------------------------- a .pt2 read as data

# torch.export's dtype codes (torch._export.serde.schema.ScalarType) of the weights a student may hold
PT2_DTYPES = {1: torch.uint8, 2: torch.int8, 3: torch.int16, 4: torch.int32, 5: torch.int64, 6: torch.float16,
              7: torch.float32, 8: torch.float64, 12: torch.bool, 13: torch.bfloat16}
PT2_STRIDED = 7  # torch.export's code of the strided (dense) layout
# every member a .pt2 of torch.export.save may hold for a program without custom objects or compiled code
_PT2_MEMBERS = re.compile(r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
                          r"|models/\w+\.json|data/(weights|constants)/\w+(\.json|\.pt)?|data/sample_inputs/\w+\.pt"
                          r"|extra/[^/]+)")
_PT2_WEIGHTS_CONFIG = "data/weights/model_weights_config.json"
_PT2_CONSTANTS_CONFIG = "data/constants/model_constants_config.json"


def _refused(path: Path, what: str) -> ExportError:
    return ExportError(f"{path} holds {what}, which could run code when loaded; refusing to open it. Open another "
                       "format of the same export, or re-export the student from its run directory yourself")


def _refused_pickle(path: Path, what: str, err: Exception) -> ExportError | None:
    """The refusal of a pickle that `torch.load(weights_only=True)` refused (naming the global it wanted), or
    None when `err` is another failure (a truncated or foreign file)."""
    if "weights only load failed" not in str(err).lower():
        return None
    named = re.search(r"GLOBAL ([\w.]+)", str(err))
    return _refused(path, f"{what} that is not plain tensors{f' (it names {named.group(1)})' if named else ''}")


class _Pt2:
    """The members of a .pt2 archive (a zip of one top folder), read from memory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.zip = zipfile.ZipFile(io.BytesIO(path.read_bytes()))
            self.names = self.zip.namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            raise _corrupt(path, err, "a torch.export student") from err
        tops = {name.split("/", 1)[0] for name in self.names}
        if len(tops) != 1 or f"{next(iter(tops))}/archive_format" not in self.names:
            raise _corrupt(path, ValueError("no single top folder holding archive_format"), "a torch.export student")
        self.top = next(iter(tops))

    def members(self) -> list[str]:
        """Every member's name within the top folder."""
        return [name.split("/", 1)[1] if "/" in name else "" for name in self.names]

    def size(self, name: str) -> int:
        return self.zip.getinfo(f"{self.top}/{name}").file_size

    def read(self, name: str) -> bytes:
        try:
            return self.zip.read(f"{self.top}/{name}")
        except (KeyError, zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
            raise _corrupt(self.path, err, "a torch.export student") from err

    def embedded_meta(self) -> dict | None:
        """The metadata export_student embeds (extra/meta.json), None when there is none."""
        name = f"extra/{META_KEY}"
        return _parse_embedded(self.read(name), self.path) if name in self.members() else None

    def json(self, name: str) -> Any:
        try:
            return json.loads(self.read(name).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise _corrupt(self.path, err, "a torch.export student") from err


def _pt2_weights(archive: _Pt2) -> dict[str, torch.Tensor]:
    """The weights of a vetted .pt2 by name, from their raw payloads (never its program or pickles)."""
    if archive.read("byteorder").decode("ascii", "replace").strip() != sys.byteorder:
        raise ExportError(f"{archive.path} was written on a machine of another byte order; re-export the student "
                          "on this one")
    config = archive.json(_PT2_WEIGHTS_CONFIG)["config"]
    return {name: _pt2_tensor(archive, name, entry) for name, entry in config.items()}


def _check_payload_sizes(archive: _Pt2, model: Classifier) -> None:
    """ExportError when the weight payloads of `archive` would take more memory than `model`'s weights (a zip
    bomb, or the weights of another model), checked before any is read."""
    config = archive.json(_PT2_WEIGHTS_CONFIG)["config"]
    payloads = {f"data/weights/{entry.get('path_name')}" for entry in config.values()}
    unknown = sorted(p for p in payloads if p not in archive.members())
    if unknown:
        raise _corrupt(archive.path, KeyError(unknown[0]), "a torch.export student")
    held = sum(archive.size(p) for p in payloads)
    needed = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if held > needed:
        raise ExportError(f"{archive.path}: its weights take {held} bytes, more than the {needed} of the model its "
                          "metadata describes; re-export the student")


def _vet_pt2(archive: _Pt2) -> None:
    """ExportError for a member or config entry of `archive` that torch.export.load would unpickle unsafely
    or load as code: unknown members (compiled code), pickled weights or constants, custom objects."""
    for name in archive.members():
        if not _PT2_MEMBERS.fullmatch(name):
            raise _refused(archive.path, f"{name!r}, a member no torch.export program of ensemble-kd has")
        if name.endswith(".pt"):
            _vet_pickle(archive, name)
    for config_name in (_PT2_WEIGHTS_CONFIG, _PT2_CONSTANTS_CONFIG):
        if config_name not in archive.members():
            raise _corrupt(archive.path, KeyError(config_name), "a torch.export student")
        config = archive.json(config_name)
        entries = config.get("config", {}) if isinstance(config, dict) else None
        if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
            raise _corrupt(archive.path, ValueError(f"{config_name} is not a payload config"), "a torch.export student")
        for name, entry in entries.items():
            if entry.get("use_pickle") or not str(entry.get("path_name", "")).startswith(("weight_", "tensor_")):
                raise _refused(archive.path, f"a pickled object {name!r} ({config_name})")


def _vet_pickle(archive: _Pt2, name: str) -> None:
    """ExportError unless the pickle `name` loads with weights_only=True (torch.export.load would otherwise
    retry it with weights_only=False)."""
    try:
        torch.load(io.BytesIO(archive.read(name)), map_location="cpu", weights_only=True)
    except ExportError:
        raise
    except Exception as err:
        raise (_refused_pickle(archive.path, f"a pickle {name!r}", err)
               or _corrupt(archive.path, err, "a torch.export student")) from err


def _pt2_tensor(archive: _Pt2, name: str, entry: dict) -> torch.Tensor:
    """Weight `name` of a .pt2: the raw bytes of its payload file, viewed as its config says, copied."""
    meta = entry.get("tensor_meta") or {}
    try:
        dtype = PT2_DTYPES[meta["dtype"]]
        if meta.get("layout", PT2_STRIDED) != PT2_STRIDED:
            raise ValueError(f"layout {meta.get('layout')} is not strided")
        sizes = [int(s["as_int"]) for s in meta["sizes"]]
        strides = [int(s["as_int"]) for s in meta["strides"]]
        offset = int(meta["storage_offset"]["as_int"])
        raw = bytearray(archive.read(f"data/weights/{entry['path_name']}"))
        flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        return torch.as_strided(flat, sizes, strides, offset).clone()
    except ExportError:
        raise
    except Exception as err:  # a missing key, an unknown dtype, a view outside its payload, ...
        raise _corrupt(archive.path, ValueError(f"weight {name!r}: {type(err).__name__}: {err}"),
                       "a torch.export student") from err


LOADERS: dict[str, Callable[[Path], tuple[Runner, dict | None]]] = {
    "torchscript": _load_torchscript,
    "export": _load_export,
    "onnx": _load_onnx,
    "state_dict": _load_state_dict,
}
SUFFIXES = {".ts": "torchscript", ".pt2": "export", ".onnx": "onnx", ".pt": "state_dict"}


def _parse_embedded(text: str | bytes, path: Path) -> dict | None:
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ExportError(f"{path} holds unreadable metadata ({err}); re-export the student") from err


def _meta_beside(path: Path) -> dict:
    meta_path = path.parent / META_FILE
    if not meta_path.is_file():
        raise ExportError(f"{path} has no embedded metadata and {meta_path} is missing; "
                          f"keep {META_FILE} next to the model or re-export the student")
    try:
        return json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExportError(f"{meta_path} is not valid JSON ({err}); re-export the student") from err


def _exported_in(folder: Path) -> tuple[Path, str] | None:
    for fmt in LOAD_PREFERENCE:
        if (folder / FILE_NAMES[fmt]).is_file():
            return folder / FILE_NAMES[fmt], fmt
    return None


def _resolve(path: Path) -> tuple[Path, str]:
    if not path.exists():
        raise ExportError(f"{path} does not exist; give an exported student file (.ts, .pt2, .onnx or "
                          "student_state.pt), its export folder or a run directory, or run `ensemble-kd export` first")
    if path.is_dir():
        found = _exported_in(path) or _exported_in(path / EXPORT_DIR)  # a run directory keeps them in export/
        if found:
            return found
        names = ", ".join(FILE_NAMES[f] for f in LOAD_PREFERENCE)
        if (path / CONFIG_FILE).is_file():
            raise ExportError(f"{path} is a run directory with no exported student yet (looked for {names} in "
                              f"{path / EXPORT_DIR}); export it with `ensemble-kd export {path}`")
        raise ExportError(f"{path} holds no exported student (looked for {names}); give an export folder or "
                          "file, or run `ensemble-kd export` first")
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ExportError(f"{path}: unknown model file type {path.suffix!r}; give a .ts, .pt2, .onnx or "
                          "student_state.pt file, or the export directory")
    if not path.is_file():
        raise ExportError(f"{path} is not a regular file; give an exported student file or its export folder")
    return path, fmt


def load_student(path: str | Path) -> LoadedStudent:
    """Open an exported student (.ts, .pt2, .onnx, .pt, or the export directory)."""
    return _open(*_resolve(Path(path)))


def _open(path: Path, fmt: str) -> LoadedStudent:
    run, embedded = LOADERS[fmt](path)
    meta = StudentMeta.from_dict(embedded if embedded is not None else _meta_beside(path))
    return LoadedStudent(meta, fmt, path, run)


# ---------------------------------------------------------------- stage 7 of a run


def export_run(cfg: "Config", data: "Splits", run_dir: str | Path, student: Classifier,
               formats: list[str] | None = None, out_dir: str | Path | None = None) -> dict:
    """Export a run's student, checked against eager PyTorch on the whole test set (its first
    STREAMED_CHECK_IMAGES images when the test set is streamed from disk)."""
    mean, std = normalization(cfg.student.model, data.input_shape[0], data.mean, data.std)
    meta = StudentMeta(class_names=list(data.class_names), input_shape=list(data.input_shape),
                       model_config=dataclasses.asdict(cfg.student.model), mean=mean, std=std,
                       config=dataclasses.asdict(cfg), data_fingerprint=data.fingerprint())
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir) / EXPORT_DIR
    check = data.x_test if isinstance(data.x_test, torch.Tensor) else head(data.x_test, STREAMED_CHECK_IMAGES)
    return export_student(student, meta, out_dir, list(formats or cfg.export.formats), check, cfg.export.parity_atol)


def export_from_run_dir(run_dir: str | Path, formats: list[str] | None = None,
                        out_dir: str | Path | None = None) -> dict:
    """`ensemble-kd export`: export the student of a finished run directory (formats: the run's by default)."""
    # start-up time: `import ensemble_kd` and `predict` load this module, which needs no data or training code
    from .data import load_data
    from .distill import load_student_model

    cfg = load_config(require_run_dir(run_dir) / CONFIG_FILE)
    formats = _check_formats(list(cfg.export.formats if formats is None else formats))
    if "onnx" in formats:  # what can fail without the data fails before it loads
        _require_onnx()
    if out_dir is not None:
        _folder_for(out_dir, formats)
    data = load_data(data_config(cfg), cfg.seed)
    return export_run(cfg, data, run_dir, load_student_model(cfg, data, run_dir), formats, out_dir)
