"""The whole pipeline, stage after stage, each reading the previous stage's artifacts.

data -> generalist -> confusability -> clusters -> specialists -> ensemble -> student -> export.
A stage whose outputs are already in the run directory is not redone, so a run that
stopped anywhere continues with `resume=True`.
"""
from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch

from . import artifacts
from .backbones import check_name, check_pretrained, data_config
from .choices import NAMED_ARCHITECTURES, STAGES
from .config import Config, ConfigError, DataConfig, ModelConfig, check_machine, load_config, to_toml
from .confusion import choose_k, clusterer_from_config, find_clusters
from .curves import TENSORBOARD_EXTRA, tensorboard_installed
from .data import Splits, load_data
from .distill import check_student_size, load_student_model, train_students
from .ensemble import build_ensemble
from .errors import DataError, plural
from .evaluation import evaluate_run
from .export import ONNX_EXTRA, export_run, missing_onnx_modules
from .generalist import load_generalist, train_generalist
from .models import build_model, count_params
from .parallel import DASK_EXTRA
from .precision import autocast_dtype
from .report import write_heatmap, write_report
from .resume import STAGE_FOLDERS, check_resume, nonfinite_restarts, record_restarts
from .specialists import specialist_model_config, train_all_specialists
from .train import resolve_device

log = logging.getLogger(__name__)
DATA_DIGEST = "data_digest"  # manifest.json: sha256 of the values of the data the run was made from


def _announce(stage: str, until: str) -> None:
    """The run-level progress line of a stage starting: "stage 3/6: specialists" (of the stages up to `until`)."""
    log.info("stage %d/%d: %s", STAGES.index(stage) + 1, STAGES.index(until) + 1, stage)


def _timed(run_dir: Path, stage: str, until: str, work: Callable[[], Any]) -> Any:
    """Run a stage's `work` and record its seconds in manifest.json. A trained stage that had
    already finished only loads its models on a resumed run, so it keeps the seconds of the
    run that trained it."""
    _announce(stage, until)
    already_trained = stage in STAGE_FOLDERS and stage in artifacts.finished_stages(run_dir)
    started = time.perf_counter()
    result = work()
    if not already_trained:
        artifacts.mark_stage(run_dir, stage, time.perf_counter() - started)
    return result


def start_run(cfg: Config, run_dir: str | Path, resume: bool = False, overwrite: bool = False) -> Path:
    """Prepare and lock the run directory; save the resolved config in it, unless resuming.

    With `resume`, `cfg` may differ from the run's config.toml only where
    `resume.check_resume` allows (runtime settings, stages without work, how a stage
    continues after a non-finite loss), and config.toml is left as it is: `run_pipeline`
    writes it once the checks that need the data have passed too, so a refused resume
    writes nothing."""
    run_dir = artifacts.prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
    saved = run_dir / artifacts.CONFIG_FILE
    if resume and saved.is_file():
        check_resume(run_dir, load_config(saved), cfg)
    elif not resume:
        artifacts.write_text(saved, to_toml(cfg))
    return run_dir


def check_work_data(run_dir: str | Path, data: Splits, root: str) -> None:
    """ArtifactError naming the first model or checkpoint of the run made from other data than `data` (read
    from data.root = `root`), before anything is written: a resume with another data.root is refused here."""
    run_dir = Path(run_dir)
    expected = data.fingerprint()
    for path in artifacts.work_files(run_dir):
        made_from = artifacts.saved_fingerprint(path).get("data", expected)
        if made_from != expected:
            raise artifacts.ArtifactError(
                f"{path} was made from other data than data.root = {root!r} holds (data fingerprint: file has "
                f"{made_from!r}, this data has {expected!r}); nothing was written: resume with the data the run "
                "was made from (its own config.toml names it; --set data.root=... if it moved), or use a new "
                "--out for this data")
    manifest = run_dir / artifacts.MANIFEST_FILE
    recorded = artifacts.read_json(manifest).get(DATA_DIGEST) if manifest.is_file() else None
    if recorded is not None and recorded != data.content_digest():
        raise artifacts.ArtifactError(
            f"the run in {run_dir} was made from other data than data.root = {root!r} holds (the same classes and "
            "counts, but other values: their content digest differs from the one in its manifest.json); nothing "
            "was written: resume with the data the run was made from, or use a new --out for this data")


def save_run_config(cfg: Config, run_dir: str | Path, data: Splits | None = None) -> None:
    """Make config.toml say `cfg`, once every check that can refuse the run has passed.

    When it changes a resumed run's config, the settings changed to continue a stage after a
    non-finite loss are recorded in manifest.json first (`resume.record_restarts`). Then
    the temporary files a killed process left are removed (only while holding the run's lock).
    A run without work yet records `data`'s content digest in manifest.json (`check_work_data` compares it on
    resume), and a run made by an older version (no marker) gets the marker."""
    run_dir = Path(run_dir)
    if artifacts.holds_lock(run_dir) and not artifacts.is_marked_run(run_dir):
        artifacts.mark_run(run_dir)
    manifest_path = run_dir / artifacts.MANIFEST_FILE
    manifest = artifacts.read_json(manifest_path) if manifest_path.is_file() else {}
    if data is not None and manifest.get(DATA_DIGEST) != data.content_digest() and not artifacts.work_files(run_dir):
        artifacts.write_json(manifest_path, {**manifest, DATA_DIGEST: data.content_digest()})
    path = run_dir / artifacts.CONFIG_FILE
    text = to_toml(cfg)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        if path.is_file():
            saved = load_config(path)
            check_resume(run_dir, saved, cfg, say=False)  # for a caller that skipped start_run(resume=True)
            record_restarts(run_dir, nonfinite_restarts(run_dir, saved, cfg))
        artifacts.write_text(path, text)
    if artifacts.holds_lock(run_dir):
        artifacts.remove_stale_temp_files(run_dir)


def preflight(cfg: Config, until: str = "export") -> None:
    """ConfigError for what needs no data to know: an unknown stage, a missing device or extra."""
    if until not in STAGES:
        raise ConfigError(f"--until {until!r} is not a stage; choose from {', '.join(STAGES)}")
    stop = STAGES.index(until)
    check_machine(cfg)  # more threads than the machine can run
    autocast_dtype(cfg.precision, resolve_device(cfg.device))  # device = cuda without CUDA, bf16 unsupported
    if "onnx" in cfg.export.formats and stop >= STAGES.index("export") and missing_onnx_modules():
        raise ConfigError(f"export.formats has 'onnx', which needs the onnx extra: {ONNX_EXTRA} (missing: "
                          f"{', '.join(missing_onnx_modules())}); install it, or drop onnx from export.formats "
                          "(torchscript and state_dict need nothing more)")
    if cfg.specialists.backend == "dask" and stop >= STAGES.index("specialists") \
            and importlib.util.find_spec("distributed") is None:
        raise ConfigError(f"specialists.backend = 'dask' needs the dask extra: {DASK_EXTRA}")
    if cfg.log.tensorboard and not tensorboard_installed():
        raise ConfigError(f"log.tensorboard = true needs the tensorboard extra: {TENSORBOARD_EXTRA}; install it, or "
                          "set log.tensorboard = false (each stage's metrics.csv is written either way)")
    for key, model in _models(cfg, until):
        if model.arch in NAMED_ARCHITECTURES:
            check_name(model, key)  # an unknown name, or timm without its extra
            check_pretrained(model, key)


def _models(cfg: Config, until: str) -> list[tuple[str, ModelConfig]]:
    """(config key, settings) of every model the stages up to `until` build from their own settings."""
    stop = STAGES.index(until)
    models = [("generalist.model", cfg.generalist.model)]
    if cfg.specialists.init == "scratch" and stop >= STAGES.index("specialists"):
        models.append(("specialists.model", specialist_model_config(cfg)))
    if stop >= STAGES.index("student"):
        models.append(("student.model", cfg.student.model))
    return models


def run_pipeline(cfg: Config, run_dir: str | Path, until: str = "export", progress: bool = True) -> dict[str, Any]:
    """Run every stage up to and including `until`; returns the report (as written to report.json)."""
    preflight(cfg, until)
    run_dir = Path(run_dir)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    reached = lambda stage: STAGES.index(until) >= STAGES.index(stage)  # noqa: E731
    data = load_data(_data_config(cfg), cfg.seed)
    _check_data_fits(cfg, data, until)
    _check_clusters_fit(cfg, data)
    if reached("student"):
        check_student_size(cfg, data)  # an oversized student is an error now, not after hours of training
    check_work_data(run_dir, data, cfg.data.root)
    save_run_config(cfg, run_dir, data)  # every check that can refuse the run has passed

    _timed(run_dir, "generalist", until, lambda: train_generalist(cfg, data, run_dir, progress))
    generalist = load_generalist(cfg, data, run_dir)
    report: dict[str, Any] = {"run": run_dir.name, "data": cfg.data.name, "seed": cfg.seed,
                              "num_classes": data.num_classes, "class_names": data.class_names}
    clusters: list[list[int]] = []
    if reached("clusters"):
        found = _timed(run_dir, "clusters", until, lambda: _clusters_stage(cfg, data, run_dir, generalist))
        clusters = [c["ids"] for c in found["clusters"]]
        report["clusters"] = [c["names"] for c in found["clusters"]]
        report["cluster_inside_share"] = [c["inside_share"] for c in found["clusters"]]
    if reached("specialists"):
        _timed(run_dir, "specialists", until, lambda: train_all_specialists(cfg, run_dir, data))
    ensemble = None
    if reached("ensemble"):
        _announce("ensemble", until)
        ensemble = build_ensemble(cfg, data, run_dir, generalist)
    if reached("student"):
        _timed(run_dir, "student", until, lambda: train_students(cfg, data, run_dir, ensemble, generalist, progress))
    report.update(evaluate_run(cfg, data, run_dir, generalist, clusters, ensemble, with_students=reached("student")))
    if reached("export"):
        student = load_student_model(cfg, data, run_dir)
        report["exports"] = _timed(run_dir, "export", until, lambda: export_run(cfg, data, run_dir, student))
    write_report(run_dir, report)
    return report


def _clusters_stage(cfg: Config, data: Splits, run_dir: Path, generalist: torch.nn.Module) -> dict[str, Any]:
    """Stages 2 and 3: the matrices and clusters.json (confusion.py), then their heatmap (report.py)."""
    clusters = find_clusters(cfg, data, run_dir, generalist)
    write_heatmap(run_dir)
    return clusters


def _data_config(cfg: Config) -> DataConfig:
    """The run's data settings (`backbones.data_config`), saying so when pretrained weights set the image size."""
    data_cfg = data_config(cfg)
    if data_cfg.image_size != cfg.data.image_size:
        model = cfg.generalist.model
        log.info("generalist.model: the pretrained %s %s weights expect %dx%d inputs, so images are resized to "
                 "that (set data.image_size to choose another size)", model.arch, model.name, data_cfg.image_size,
                 data_cfg.image_size)
    return data_cfg


def _check_data_fits(cfg: Config, data: Splits, until: str = "export") -> None:
    """Settings the data cannot meet are an error before any training: each model (with its pretrained
    weights, so a weights file that does not fit is found now) must take the data's inputs."""
    if data.num_classes < 2:
        raise DataError(f"the data has {plural(data.num_classes, 'class')} ({', '.join(data.class_names)}); a "
                        "classifier needs at least 2: add another class (for an imagefolder, another class folder)")
    if cfg.ensemble.top_n > data.num_classes:
        raise ConfigError(f"ensemble.top_n = {cfg.ensemble.top_n} but the data has only {data.num_classes} "
                          f"classes; choose top_n <= {data.num_classes}")
    for key, model in _models(cfg, until):
        try:
            build_model(model, data.input_shape, data.num_classes, data.mean, data.std)
        except ConfigError as err:
            raise ConfigError(f"{key}: {err}") from err
        except (RuntimeError, MemoryError) as err:
            if not _is_allocation_failure(err):
                raise
            raise ConfigError(f"{key}: a model of {_parameter_count(model, data)} parameters does not fit in memory "
                              f"({_short(err)}); choose a smaller model (fewer or narrower {key}.hidden layers or "
                              f"{key}.channels)") from err


def _is_allocation_failure(err: BaseException) -> bool:
    """What the allocator raises when a model's weights do not fit (CPU or CUDA)."""
    text = str(err).lower()
    return isinstance(err, MemoryError) or isinstance(err, torch.cuda.OutOfMemoryError) or any(
        words in text for words in ("can't allocate memory", "cannot allocate memory", "out of memory",
                                    "not enough memory", "failed to allocate"))


def _parameter_count(model: ModelConfig, data: Splits) -> str:
    """How many parameters `model` would have (built without memory, on the meta device), e.g. "about 78,500,000";
    "so many" when it cannot be built there."""
    try:
        with torch.device("meta"):
            built = build_model(model, data.input_shape, data.num_classes, data.mean, data.std)
        return f"about {count_params(built):,}"
    except Exception:  # noqa: BLE001 - the count is only for the message
        return "so many"


def _short(err: BaseException, limit: int = 120) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _check_clusters_fit(cfg: Config, data: Splits) -> None:
    """Cluster settings no clustering of these classes can meet are an error before any training
    (`ClassClusterer.check_feasible`); says which k `clusters.k = 0` chose."""
    k = choose_k(cfg.clusters, data.num_classes)
    if cfg.clusters.k == 0 and k == 0:
        log.warning("clusters.k = 0 and the data has %s: too few for clusters of clusters.min_size = %d "
                    "that leave other classes to each specialist, so no specialists; the ensemble is the "
                    "generalist alone", plural(data.num_classes, "class"), cfg.clusters.min_size)
        return
    if cfg.clusters.k == 0:
        log.info("clusters.k = 0: chose k = %d for %d classes (about the square root of the number of classes)",
                 k, data.num_classes)
    clusterer_from_config(cfg.clusters, k=k).check_feasible(data.num_classes)
