"""The run directory: where each stage's outputs live, written atomically.

Every file is written to a temporary name beside its final one, flushed, fsynced and
then `os.replace`d, so a crash leaves either the old file or the new one, never half.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import EnsembleKDError


class ArtifactError(EnsembleKDError, RuntimeError):
    """An artifact is missing, corrupt, or belongs to another configuration."""


# Layout of artifacts/<run>/ (documented in artifacts/README.md).
CONFIG_FILE = "config.toml"
MANIFEST_FILE = "manifest.json"
GENERALIST_DIR = "generalist"
CONFUSION_DIR = "confusion"
CLUSTERS_FILE = "clusters.json"
HEATMAP_FILE = "confusion.png"
SPECIALISTS_DIR = "specialists"
EXPORT_DIR = "export"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
MODEL_FILE = "model.pt"  # the finished model of a stage directory
CHECKPOINT_FILE = "checkpoint.pt"  # the last epoch's training state of an unfinished stage
METRICS_FILE = "metrics.jsonl"  # one JSON object per finished epoch


def atomic_write(path: str | Path, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Call `write(f)` on a temp file next to `path`, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_torch(path: str | Path, obj: Any) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist; run the stage that writes it first")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path} is not valid JSON ({err}); delete it and rerun with --resume") from err


def load_torch(path: str | Path) -> Any:
    """torch.load that names the file and the fix when it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist; run the stage that writes it first")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds on a truncated or foreign file
        raise ArtifactError(f"{path} is corrupt or not a checkpoint ({type(err).__name__}: {err}); "
                            "delete it and rerun with --resume to recreate it") from err


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one line (metrics logs are append-only; a torn last line is dropped on read)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line torn by a crash ends the log
    return records


def prepare_run_dir(run_dir: str | Path, resume: bool = False, overwrite: bool = False) -> Path:
    """Create the run directory, refusing to reuse one that holds work without --resume or --overwrite.

    A directory holding only config.toml (a run that stopped on an error before any stage
    began) holds no work and is reused as if it were empty. A non-empty directory that
    does not look like a run (no config.toml or manifest.json) is never resumed into or
    deleted."""
    import shutil

    run_dir = Path(run_dir)
    if resume and overwrite:
        raise ArtifactError("--resume and --overwrite contradict each other; choose one")
    if run_dir.exists() and not run_dir.is_dir():
        raise ArtifactError(f"{run_dir} exists and is not a directory; choose another --out")
    if _holds_work(run_dir):
        if not _looks_like_run(run_dir):
            raise ArtifactError(f"{run_dir} is not empty and does not look like an ensemble-kd run (no "
                                f"{CONFIG_FILE} or {MANIFEST_FILE}); not writing into it or deleting it: "
                                "choose another --out")
        if overwrite:
            shutil.rmtree(run_dir)
        elif not resume:
            raise ArtifactError(f"run directory {run_dir} already holds a run; pass --resume to continue it, "
                                "--overwrite to replace it, or --out to start a new one")
    elif resume and not (run_dir / CONFIG_FILE).is_file():
        raise ArtifactError(f"--resume given but {run_dir} holds no run to resume; drop --resume to start one")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _holds_work(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(p.name != CONFIG_FILE for p in run_dir.iterdir())


def _looks_like_run(run_dir: Path) -> bool:
    return (run_dir / CONFIG_FILE).is_file() or (run_dir / MANIFEST_FILE).is_file()


def mark_stage(run_dir: str | Path, stage: str, seconds: float, **details: Any) -> None:
    """Record in manifest.json that `stage` finished (and how long it took)."""
    import datetime

    import torch as _torch

    path = Path(run_dir) / MANIFEST_FILE
    manifest = read_json(path) if path.exists() else {}
    manifest.setdefault("versions", {"torch": _torch.__version__})
    manifest.setdefault("stages", {})[stage] = {
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3), **details}
    write_json(path, manifest)
