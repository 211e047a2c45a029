"""Shared helpers of the benchmark scripts: machine description, JSON results, tables, timing.

Each script imports this module as `common` (a script's own folder is on sys.path when it
is run as `python benchmarks/<script>.py`).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ensemble_kd import artifacts
from ensemble_kd.config import load_config
from ensemble_kd.data import load_data
from ensemble_kd.distill import (
    FROM_GENERALIST,
    HARD_LABELS,
    STUDENT,
    distill,
    new_student,
    student_fingerprint,
    teacher_fingerprint,
    transfer_fingerprint,
)
from ensemble_kd.ensemble import build_ensemble
from ensemble_kd.generalist import load_generalist
from ensemble_kd.inference import evaluate

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SHARED_DATA = REPO.parent / "shared" / "data"  # real MNIST / Fashion-MNIST copies on these machines
EXTRA_STUDENTS = REPO / "benchmarks" / "cache" / "students"  # more students of finished runs (teachers.py, ablation.py)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> list[str]:
    """The vector-instruction flags that matter for matmul speed (AVX2, AVX-512, AMX, bf16)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(f for f in line.split(":", 1)[1].split()
                              if f.startswith(("avx2", "avx512f", "avx512_bf16", "amx", "fma")))
    except OSError:
        pass
    return []


def machine_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """What the timings depend on: CPU, cores, load at the start, library versions, device."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def write_result(name: str, result: dict[str, Any]) -> Path:
    """Write `result` as benchmarks/results/<name>.json (pretty, keys in insertion order; Path values
    relative to the repository)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, path)
    return path


def relative(path: str | Path) -> str:
    """`path` relative to the repository (result files never hold a machine's absolute paths)."""
    return os.path.relpath(Path(path).absolute(), REPO)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return relative(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with right-aligned numbers and left-aligned text."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [all(_is_number(row[i]) for row in rows) if rows else False for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) or value is None


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def timed(work: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    started = time.perf_counter()
    result = work()
    return time.perf_counter() - started, result


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def log_to_stderr(message: str) -> None:
    """Progress lines for the person watching (the table goes to stdout)."""
    print(message, file=sys.stderr, flush=True)


def train_extra_student(run: Path, kind: str, student_seed: int, overrides: Sequence[str] = (),
                        folder: str | None = None) -> tuple[float, Any]:
    """(test accuracy, student) of one more student of a finished run, differing from the run's own only in
    its seed and in `overrides` (`--set` lines of the student's settings: its size, transfer method, epochs).

    `kind` is a student folder of the run (student, student_from_generalist,
    student_hard_labels): its teacher is the run's ensemble, its generalist or none. The
    student gets the run's architecture, alpha, temperature, training and transfer method
    (`student.transfer`) unless `overrides` change them; `student_seed` sets its initial weights and batch
    order (and the live views). Cached teacher logits (views, dataset) are computed once per teacher and
    transfer set: the run's own file when the overrides keep the run's transfer, else one kept beside the
    extra students. Trained in `EXTRA_STUDENTS/<run>/<folder or kind-seed<k>>` and reused from there when
    finished, by whichever script asks for it again."""
    run_cfg = load_config(run / artifacts.CONFIG_FILE)
    cfg = load_config(run / artifacts.CONFIG_FILE, list(overrides)) if overrides else run_cfg
    data = load_data(cfg.data, cfg.seed)
    generalist = load_generalist(cfg, data, run) if kind != HARD_LABELS else None
    teacher = {STUDENT: lambda: build_ensemble(cfg, data, run, generalist), FROM_GENERALIST: lambda: generalist,
               HARD_LABELS: lambda: None}[kind]()
    alpha = 1.0 if kind == HARD_LABELS else cfg.student.alpha
    fingerprint = dict(student_fingerprint(cfg, data, kind), student_seed=student_seed)
    transfer = transfer_fingerprint(cfg)
    cache = run / kind / artifacts.TEACHER_LOGITS_FILE  # the run's, where cached
    if transfer != transfer_fingerprint(run_cfg):
        cache = EXTRA_STUDENTS / run.name / "teachers" / f"{kind}-{digest(transfer)}.pt"
    student = distill(new_student(cfg, data, seed=student_seed), teacher, data, cfg,
                      EXTRA_STUDENTS / run.name / (folder or f"{kind}-seed{student_seed}"), fingerprint, alpha,
                      progress=False, seed=student_seed, teacher_cache=cache,
                      teacher_fingerprint=teacher_fingerprint(cfg, data, kind))
    return evaluate(student.cpu(), data.x_test, data.y_test).accuracy, student


def digest(settings: dict[str, Any]) -> str:
    """A short stable name for a dict of settings (for cache file names)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
