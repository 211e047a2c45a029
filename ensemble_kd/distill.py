"""Stage 6: distil the ensemble into one compact student (and the baseline students).

loss = alpha * CE(y, s) + (1 - alpha) * T^2 * KL(softmax(t / T) || softmax(s / T)).
The teacher is frozen and in eval mode. Without augmentation its logits are computed
once for the whole transfer set, saved, and reused every epoch; with augmentation the
teacher runs on each augmented batch.

Three students of the same architecture and initialisation are trained, so the report
shows what the specialists add: `student` (from the ensemble), `student_from_generalist`
and `student_hard_labels`.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import artifacts
from .config import Config, ConfigError
from .data import Splits
from .generalist import generalist_fingerprint, make_augment, model_fingerprint
from .losses import kd_loss
from .specialists import specialist_recipe
from .models import Classifier, build_model, count_params
from .train import TrainSet, autocast, cross_entropy, fit, load_finished, predict_logits, resolve_device, set_seed

log = logging.getLogger(__name__)

# the three students of a run, each in the run directory folder of the same name
STUDENT, FROM_GENERALIST, HARD_LABELS = "student", "student_from_generalist", "student_hard_labels"


def new_student(cfg: Config, data: Splits, seed: int | None = None) -> Classifier:
    """A fresh student; every student of a run starts from the same weights (seed `cfg.seed + 1`)."""
    set_seed(cfg.seed + 1 if seed is None else seed)
    return build_model(cfg.student.model, data.input_shape, data.num_classes, data.mean, data.std)


def check_student_size(cfg: Config, data: Splits) -> int:
    """The student's parameter count; an error if it exceeds the allowed share of the generalist's."""
    student = count_params(new_student(cfg, data))
    generalist = count_params(build_model(cfg.generalist.model, data.input_shape, data.num_classes,
                                          data.mean, data.std))
    if student > cfg.student.max_params_ratio * generalist:
        raise ConfigError(f"the student has {student:,} parameters, more than student.max_params_ratio = "
                          f"{cfg.student.max_params_ratio} x the generalist's {generalist:,}; choose a smaller "
                          "student.model or raise student.max_params_ratio")
    return student


def cached_teacher_logits(teacher: nn.Module, x: torch.Tensor, path: Path, fingerprint: dict[str, Any],
                          device: torch.device | str = "cpu", precision: str = "fp32") -> torch.Tensor:
    """The teacher's logits on every row of `x`, computed once and kept at `path`."""
    if path.exists():
        saved = artifacts.load_torch(path)
        if saved.get("fingerprint") == fingerprint and saved["logits"].shape[0] == len(x):
            return saved["logits"]
        log.info("%s belongs to another teacher or data; computing the teacher's logits again", path)
    teacher.to(device).eval()
    logits = predict_logits(teacher, x, device=device, precision=precision)
    artifacts.save_torch(path, {"logits": logits, "fingerprint": fingerprint})
    return logits


def student_augment(cfg: Config):
    """The students' augmentation: the data's (flip, crop) with `student.transfer = "live"`, none with "dataset"."""
    return make_augment(cfg) if cfg.student.transfer == "live" else None


def distill(student: nn.Module, teacher: nn.Module | None, data: Splits, cfg: Config, stage_dir: Path,
            fingerprint: dict[str, Any], alpha: float, progress: bool = True, seed: int | None = None) -> nn.Module:
    """Train `student` on hard labels (teacher None) or on `kd_loss` against `teacher`.

    `seed` sets the batch order and the augmented views (default: the run's seed).

    Every student of a run gets the same transfer method (`student.transfer`), so a
    comparison of teachers is fair: "live" runs the teacher on each augmented batch the
    student sees; "dataset" (or no augmentation configured) uses the teacher's logits on the
    plain training images, computed once and cached in `stage_dir`."""
    device = resolve_device(cfg.device)
    augment = student_augment(cfg)
    train, loss_fn, live_teacher = TrainSet(data.x_train, data.y_train), cross_entropy(cfg.student.train.label_smoothing), None
    if teacher is not None:
        temperature = cfg.student.temperature
        loss_fn = lambda s, y, t: kd_loss(s, t, y, alpha, temperature)  # noqa: E731
        if augment is None:
            train.targets = cached_teacher_logits(teacher, data.x_train, stage_dir / "teacher_logits.pt",
                                                  fingerprint, device, cfg.precision)
        else:
            live_teacher = teacher.to(device).eval()
    return fit(student, train, cfg.student.train, stage_dir, stage=stage_dir.name,
               seed=cfg.seed if seed is None else seed,
               fingerprint=fingerprint, loss_fn=loss_fn, teacher=live_teacher, augment=augment,
               val=TrainSet(data.x_val, data.y_val), device=device, precision=cfg.precision,
               compile_model=cfg.compile, progress=progress)


def student_fingerprint(cfg: Config, data: Splits, kind: str) -> dict[str, Any]:
    teacher: dict[str, Any] = {"kind": kind}
    if kind != HARD_LABELS:
        teacher["generalist"] = generalist_fingerprint(cfg, data)
    if kind == STUDENT:
        teacher["specialists"] = specialist_recipe(cfg)
        teacher["clusters"] = dataclasses.asdict(cfg.clusters)
        teacher["ensemble"] = dataclasses.asdict(cfg.ensemble)
    return model_fingerprint(cfg.student.model, data, cfg.seed, teacher=teacher, alpha=cfg.student.alpha,
                             temperature=cfg.student.temperature, train=dataclasses.asdict(cfg.student.train),
                             flip=cfg.data.flip, crop_pad=cfg.data.crop_pad, transfer=cfg.student.transfer)


TEACHERS_FILE = "teachers.json"  # in the student's folder: how much the two teachers differ on the transfer set


@torch.no_grad()
def teacher_disagreement(ensemble: nn.Module, generalist: nn.Module, data: Splits, cfg: Config,
                         batch_size: int = 1024) -> float:
    """Share of the transfer set on which the ensemble's and the generalist's top-1 answers differ.

    The transfer set is what the students are taught on: the training images, seen through
    one seeded augmented pass with `student.transfer = "live"`. A student can only learn
    from the ensemble what differs from the generalist there."""
    device = resolve_device(cfg.device)
    augment = student_augment(cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    ensemble.to(device).eval()
    generalist.to(device).eval()
    differ = torch.zeros((), dtype=torch.long, device=device)
    for chunk in data.x_train.split(batch_size):
        x = chunk.to(device)
        x = augment(x, generator) if augment is not None else x
        with autocast(cfg.precision, device):
            differ += (ensemble(x).argmax(1) != generalist(x).argmax(1)).sum()
    return int(differ) / max(len(data.x_train), 1)


def train_students(cfg: Config, data: Splits, run_dir: str | Path, ensemble: nn.Module,
                   generalist: nn.Module, progress: bool = True) -> dict[str, Path]:
    """Train the student from the ensemble and the two baselines; returns their model files.

    Also writes `student/teachers.json`: the transfer method and the teachers' top-1
    disagreement on the transfer set."""
    check_student_size(cfg, data)
    teachers_path = Path(run_dir) / STUDENT / TEACHERS_FILE
    fingerprint = student_fingerprint(cfg, data, STUDENT)
    if not teachers_path.exists() or artifacts.read_json(teachers_path).get("fingerprint") != fingerprint:
        artifacts.write_json(teachers_path, {"transfer": cfg.student.transfer, "top1_disagreement": round(
            teacher_disagreement(ensemble, generalist, data, cfg), 6), "fingerprint": fingerprint})
    plans = [(STUDENT, ensemble, cfg.student.alpha), (FROM_GENERALIST, generalist, cfg.student.alpha),
             (HARD_LABELS, None, 1.0)]
    paths = {}
    for name, teacher, alpha in plans:
        stage_dir = Path(run_dir) / name
        log.info("training %s", name)
        distill(new_student(cfg, data), teacher, data, cfg, stage_dir, student_fingerprint(cfg, data, name),
                alpha, progress)
        paths[name] = stage_dir / artifacts.MODEL_FILE
    return paths


def load_student_model(cfg: Config, data: Splits, run_dir: str | Path, name: str = STUDENT) -> Classifier:
    """A trained student of this run (eager PyTorch), in eval mode."""
    model = new_student(cfg, data)
    fingerprint = dict(student_fingerprint(cfg, data, name), stage=name)
    if not load_finished(model, Path(run_dir) / name, fingerprint):
        raise artifacts.ArtifactError(f"{Path(run_dir) / name} holds no trained student; run `ensemble-kd run --resume`")
    return model.eval()
