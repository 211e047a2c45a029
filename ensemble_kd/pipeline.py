"""The whole pipeline, stage after stage, each reading the previous stage's artifacts.

data -> generalist -> confusability -> clusters -> specialists -> ensemble -> student -> export.
A stage whose outputs are already in the run directory is not redone, so a run that
stopped anywhere continues with `resume=True`.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch

from . import artifacts
from .config import Config, ConfigError, load_config, to_toml
from .data import DataError, Splits, load_data
from .export import ONNX_EXTRA, missing_onnx_modules
from .models import build_model
from .parallel import DASK_EXTRA
from .resume import check_resume
from .train import autocast_dtype, resolve_device

log = logging.getLogger(__name__)

STAGES = ("generalist", "clusters", "specialists", "ensemble", "student", "export")


def _timed(run_dir: Path, stage: str, work: Callable[[], Any]) -> Any:
    started = time.perf_counter()
    result = work()
    artifacts.mark_stage(run_dir, stage, time.perf_counter() - started)
    return result


def start_run(cfg: Config, run_dir: str | Path, resume: bool = False, overwrite: bool = False) -> Path:
    """Prepare and lock the run directory and save the resolved config in it.

    With `resume`, `cfg` may differ from the run's config.toml only where
    `resume.check_resume` allows (runtime settings, stages without work); a refused
    resume leaves config.toml as it was."""
    run_dir = artifacts.prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
    saved = run_dir / artifacts.CONFIG_FILE
    if resume and saved.is_file():
        check_resume(run_dir, load_config(saved), cfg)
    artifacts.write_text(saved, to_toml(cfg))
    return run_dir


def preflight(cfg: Config, until: str = "export") -> None:
    """ConfigError for what needs no data to know: an unknown stage, a missing device or extra."""
    if until not in STAGES:
        raise ConfigError(f"--until {until!r} is not a stage; choose from {', '.join(STAGES)}")
    stop = STAGES.index(until)
    autocast_dtype(cfg.precision, resolve_device(cfg.device))  # device = cuda without CUDA, bf16 unsupported
    if "onnx" in cfg.export.formats and stop >= STAGES.index("export") and missing_onnx_modules():
        raise ConfigError(f"export.formats has 'onnx', which needs the onnx extra: {ONNX_EXTRA} (missing: "
                          f"{', '.join(missing_onnx_modules())}); install it, or drop onnx from export.formats "
                          "(torchscript and state_dict need nothing more)")
    if cfg.specialists.backend == "dask" and stop >= STAGES.index("specialists") \
            and importlib.util.find_spec("distributed") is None:
        raise ConfigError(f"specialists.backend = 'dask' needs the dask extra: {DASK_EXTRA}")


def run_pipeline(cfg: Config, run_dir: str | Path, until: str = "export", progress: bool = True) -> dict[str, Any]:
    """Run every stage up to and including `until`; returns the report (as written to report.json)."""
    from .confusion import find_clusters
    from .distill import check_student_size, load_student_model, train_students
    from .ensemble import build_ensemble
    from .evaluation import evaluate_run
    from .export import export_run
    from .generalist import load_generalist, train_generalist
    from .report import write_report
    from .specialists import train_all_specialists

    preflight(cfg, until)
    run_dir = Path(run_dir)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    stop = STAGES.index(until)
    data = load_data(cfg.data, cfg.seed)
    log.info("data %s: %d train, %d val, %d test, %d classes, input %s", cfg.data.name, len(data.y_train),
             len(data.y_val), len(data.y_test), data.num_classes, tuple(data.input_shape))
    _check_data_fits(cfg, data)
    _check_clusters_fit(cfg, data)
    if stop >= STAGES.index("student"):
        check_student_size(cfg, data)  # an oversized student is an error now, not after hours of training

    _timed(run_dir, "generalist", lambda: train_generalist(cfg, data, run_dir, progress))
    generalist = load_generalist(cfg, data, run_dir)
    clusters = _timed(run_dir, "clusters", lambda: find_clusters(cfg, data, run_dir, generalist))
    report: dict[str, Any] = {"run": run_dir.name, "data": cfg.data.name, "seed": cfg.seed,
                              "num_classes": data.num_classes, "class_names": data.class_names,
                              "clusters": [c["names"] for c in clusters["clusters"]]}
    if stop >= STAGES.index("specialists"):
        _timed(run_dir, "specialists", lambda: train_all_specialists(cfg, run_dir, data))
    ensemble = None
    if stop >= STAGES.index("ensemble"):
        ensemble = build_ensemble(cfg, data, run_dir, generalist)
    if stop >= STAGES.index("student"):
        _timed(run_dir, "student", lambda: train_students(cfg, data, run_dir, ensemble, generalist, progress))
    report.update(evaluate_run(cfg, data, run_dir, generalist, ensemble, with_students=stop >= STAGES.index("student")))
    if stop >= STAGES.index("export"):
        student = load_student_model(cfg, data, run_dir)
        report["exports"] = _timed(run_dir, "export", lambda: export_run(cfg, data, run_dir, student))
    write_report(run_dir, report)
    return report


def _check_data_fits(cfg: Config, data: Splits) -> None:
    """Settings the data cannot meet are an error before any training."""
    if data.num_classes < 2:
        raise DataError(f"the data has {data.num_classes} class ({', '.join(data.class_names)}); a classifier "
                        "needs at least 2: add another class (for an imagefolder, another class folder)")
    if cfg.ensemble.top_n > data.num_classes:
        raise ConfigError(f"ensemble.top_n = {cfg.ensemble.top_n} but the data has only {data.num_classes} "
                          f"classes; choose top_n <= {data.num_classes}")
    try:
        build_model(cfg.generalist.model, data.input_shape, data.num_classes, data.mean, data.std)
    except ConfigError as err:
        raise ConfigError(f"generalist.model: {err}") from err


def _check_clusters_fit(cfg: Config, data: Splits) -> None:
    """Impossible cluster settings are an error before any training; says which k `clusters.k = 0` chose."""
    from .confusion import choose_k

    c = dataclasses.replace(cfg.clusters, k=choose_k(cfg.clusters, data.num_classes))
    if cfg.clusters.k == 0 and c.k == 0:
        log.warning("clusters.k = 0 and the data has %d classes: too few for clusters of clusters.min_size = %d "
                    "that leave other classes to each specialist, so no specialists; the ensemble is the "
                    "generalist alone", data.num_classes, c.min_size)
        return
    if cfg.clusters.k == 0:
        log.info("clusters.k = 0: chose k = %d for %d classes (about the square root of the number of classes)",
                 c.k, data.num_classes)
    if c.k > data.num_classes:
        raise ConfigError(f"clusters.k = {c.k} but the data has only {data.num_classes} classes; "
                          f"choose k <= {data.num_classes}")
    if c.k * c.min_size > data.num_classes:
        raise ConfigError(f"clusters.k = {c.k} clusters of at least clusters.min_size = {c.min_size} classes need "
                          f"{c.k * c.min_size} classes, the data has {data.num_classes}; lower k or min_size")
    if c.max_size and c.min_confusion == 0 and c.k * c.max_size < data.num_classes:
        raise ConfigError(f"clusters.k = {c.k} clusters of at most clusters.max_size = {c.max_size} classes hold "
                          f"{c.k * c.max_size} classes, the data has {data.num_classes}; raise k or max_size "
                          "(0 = no limit), or set clusters.min_confusion to leave unconfused classes out")
