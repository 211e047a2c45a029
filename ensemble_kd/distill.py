"""Stage 6: distil the ensemble into one compact student (and the baseline students).

loss = alpha * CE(y, s) + (1 - alpha) * T^2 * KL(softmax(t / T) || softmax(s / T)).
The teacher is frozen and in eval mode. How the student sees its targets is
`student.transfer`, the same for every student of a run: "live" runs the teacher on each
augmented batch; "views" labels fixed augmented views of the training set once (the
teacher's logits kept in teacher_logits.pt as (views, N, C); with `student.plain_epochs` the
plain images are one more view, taught last); "view_mean" labels the same views and the plain
images once, and the student learns on the plain images the teacher's distribution averaged
over all of them; "dataset", or no augmentation configured, labels the plain training images
once ((N, C)). The loss is `student.loss`: Hinton's (above) or DKD (losses.dkd_loss).

Three students of the same architecture and initialisation are trained, so the report
shows what the specialists add: `student` (from the ensemble), `student_from_generalist`
and `student_hard_labels`.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import artifacts
from .augment import Augmentation, augment_fingerprint, make_augment
from .config import Config, ConfigError, fingerprint_settings, recipe
from .data import Splits, draw_augmentation
from .generalist import generalist_fingerprint, model_fingerprint
from .inference import inference_precision, predict_logits
from .losses import DKDLoss, KDLoss, teacher_log_probs, view_mean_logits
from .models import Classifier, build_model, count_params
from .precision import autocast
from .streaming import Inputs, batches
from .train import (
    FitOptions,
    TrainSet,
    Views,
    cross_entropy,
    fit,
    image_loader,
    load_finished,
    resolve_device,
    set_seed,
)

log = logging.getLogger(__name__)

# the three students of a run, each in the run directory folder of the same name
STUDENT, FROM_GENERALIST, HARD_LABELS = artifacts.STUDENT_DIRS


def new_student(cfg: Config, data: Splits, seed: int | None = None, load_weights: bool = True) -> Classifier:
    """A fresh student; every student of a run starts from the same weights (seed `cfg.seed + 1`, and
    student.model.pretrained's weights unless `load_weights` is False)."""
    set_seed(cfg.seed + 1 if seed is None else seed)
    return build_model(cfg.student.model, data.input_shape, data.num_classes, data.mean, data.std, load_weights)


def check_student_size(cfg: Config, data: Splits) -> int:
    """The student's parameter count; an error if it exceeds the allowed share of the generalist's."""
    student = count_params(new_student(cfg, data, load_weights=False))
    generalist = count_params(build_model(cfg.generalist.model, data.input_shape, data.num_classes,
                                          data.mean, data.std, load_weights=False))
    if student > cfg.student.max_params_ratio * generalist:
        raise ConfigError(f"the student has {student:,} parameters, more than student.max_params_ratio = "
                          f"{cfg.student.max_params_ratio} x the generalist's {generalist:,}; choose a smaller "
                          "student.model or raise student.max_params_ratio")
    return student




def cached_teacher_logits(compute: Callable[[], torch.Tensor], path: Path, fingerprint: dict[str, Any]) -> torch.Tensor:
    """`compute()` (a teacher's logits on the transfer set), run once and kept at `path` with `fingerprint`."""
    if path.exists():
        saved = artifacts.load_torch(path)
        if isinstance(saved, dict) and saved.get("fingerprint") == fingerprint:
            return saved["logits"]
        log.info("%s belongs to another teacher or data; computing the teacher's logits again", path)
    logits = compute()
    artifacts.save_torch(path, {"logits": logits, "fingerprint": fingerprint})
    return logits


def student_augment(cfg: Config, data: Splits) -> Augmentation | None:
    """The students' random augmentation: the data's (augment.py) with `student.transfer = "live"`, else none
    ("views" draws its fixed views once, "dataset" uses the plain images)."""
    return make_augment(cfg.data, data.input_shape, data.num_classes) if cfg.student.transfer == "live" else None


def labelled_views(cfg: Config, n: int) -> Views | None:
    """The fixed augmented views of n training images that a teacher labels once, drawn from the run seed (the
    same for every student of the run): `student.views` of them, then the plain images as one more view with
    `student.plain_epochs` > 0 ("views") and always with "view_mean"; None for other methods or without
    augmentation."""
    transfer = cfg.student.transfer
    if transfer not in ("views", "view_mean") or (not cfg.data.flip and cfg.data.crop_pad == 0):
        return None
    generator = torch.Generator().manual_seed(cfg.seed * 7_919 + 17)  # not the stream of any training epoch
    draws = [draw_augmentation(n, cfg.data.flip, cfg.data.crop_pad, generator) for _ in range(cfg.student.views)]
    if cfg.student.plain_epochs or transfer == "view_mean":  # no flip, and the crop at offset crop_pad: the image
        draws.append((torch.zeros(n, dtype=torch.bool), torch.full((n, 2), cfg.data.crop_pad, dtype=torch.long)))
    flips = torch.stack([f for f, _ in draws]) if cfg.data.flip else None
    offsets = torch.stack([o for _, o in draws]).to(torch.int16) if cfg.data.crop_pad > 0 else None
    return Views(flips, offsets, cfg.data.crop_pad, plain_epochs=cfg.student.plain_epochs)


def transfer_views(cfg: Config, n: int) -> Views | None:
    """The views the students train on, one per epoch in turn: the labelled views of `student.transfer =
    "views"`; None for other methods ("view_mean" trains on the plain images)."""
    return labelled_views(cfg, n) if cfg.student.transfer == "views" else None


@torch.no_grad()
def view_logits(teacher: nn.Module, x: Inputs, views: Views, device: torch.device, precision: str,
                batch_size: int = 1024) -> torch.Tensor:
    """(count, N, C) float32 on CPU: the teacher's logits on every image of `x` in every view."""
    teacher.to(device).eval()
    precision = inference_precision(teacher, precision, device, min(batch_size, len(x)))
    per_view = []
    for view in range(views.count):
        chunks = []
        for images, idx in zip(batches(x, batch_size), torch.arange(len(x)).split(batch_size)):
            batch, _ = views.batch(images.to(device), view, idx)
            with autocast(precision, device):
                chunks.append(teacher(batch).float().cpu())
        per_view.append(torch.cat(chunks))
    return torch.stack(per_view)


def teacher_targets(teacher: nn.Module, data: Splits, cfg: Config, path: Path,
                    fingerprint: dict[str, Any]) -> tuple[torch.Tensor, Views | None]:
    """The teacher's logits on the transfer set, computed once and kept at `path` (on every labelled view:
    (count, N, C)). Returned as (count, N, C) with the views they label for `student.transfer = "views"`;
    as (N, C) for the plain training images otherwise, with "view_mean" the teacher averaged over the
    views (`losses.view_mean_logits` at the distillation temperature)."""
    device = resolve_device(cfg.device)
    views = labelled_views(cfg, len(data.x_train))
    if views is not None:
        logits = cached_teacher_logits(
            lambda: view_logits(teacher, data.x_train, views, device, cfg.precision), path, fingerprint)
        if cfg.student.transfer == "view_mean":
            return view_mean_logits(logits, cfg.student.temperature), None
        views.targets = logits
        return views.targets, views
    logits = cached_teacher_logits(lambda: predict_logits(teacher.to(device).eval(), data.x_train, device=device,
                                                          precision=cfg.precision), path, fingerprint)
    return logits, None


def distill(student: nn.Module, teacher: nn.Module | None, data: Splits, cfg: Config, stage_dir: Path,
            fingerprint: dict[str, Any], alpha: float, progress: bool = True, seed: int | None = None,
            teacher_cache: Path | None = None, teacher_fingerprint: dict[str, Any] | None = None) -> nn.Module:
    """Train `student` on hard labels (teacher None) or on `kd_loss` against `teacher`.

    Every student of a run gets the same transfer method (`student.transfer`), so a
    comparison of teachers is fair: "live" runs the teacher on each augmented batch the
    student sees; "views" trains epoch e on the fixed augmented view (e - 1) % student.views
    with the teacher's logits on it, computed once (and the last `student.plain_epochs` epochs on
    the plain images, one more view); "view_mean" trains on the plain images against the teacher's
    distribution averaged over those views and the image itself; "dataset" (or no augmentation
    configured) uses the teacher's logits on the plain training images. Cached logits are
    kept at `teacher_cache` (default `stage_dir/teacher_logits.pt`), checked against
    `teacher_fingerprint`. `seed` sets the batch order and the live views (default: the run's seed).
    """
    device = resolve_device(cfg.device)
    augment = student_augment(cfg, data)
    train = TrainSet(data.x_train, data.y_train, views=transfer_views(cfg, len(data.x_train)))
    loss_fn, live_teacher = cross_entropy(cfg.student.train.label_smoothing), None
    if teacher is not None:
        temperature = cfg.student.temperature
        if augment is None:  # cached logits: their log-probabilities at T once, not in every step
            cache = teacher_cache or stage_dir / artifacts.TEACHER_LOGITS_FILE
            logits, views = teacher_targets(teacher, data, cfg, cache, teacher_fingerprint or fingerprint)
            log_probs = teacher_log_probs(logits, temperature)
            if views is not None:
                views.targets = log_probs
            train.views, train.targets = views, None if views is not None else log_probs
            loss_fn = student_loss(cfg, alpha)
        else:
            soft = student_loss(cfg, alpha)
            loss_fn = lambda s, y, t: soft(s, y, teacher_log_probs(t, temperature))  # noqa: E731
            live_teacher = teacher.to(device).eval()
    return fit(student, train, cfg.student.train, stage_dir, FitOptions(
        stage=stage_dir.name, seed=cfg.seed if seed is None else seed, fingerprint=fingerprint, loss_fn=loss_fn,
        teacher=live_teacher, augment=augment, val=TrainSet(data.x_val, data.y_val), device=device,
        progress=progress, precision=cfg.precision, compile_model=cfg.compile, tensorboard=cfg.log.tensorboard,
        lr_setting="student.train.lr", clip_setting="student.train.grad_clip"))


def student_loss(cfg: Config, alpha: float) -> KDLoss | DKDLoss:
    """The distillation loss `student.loss` names, as fit's loss_fn(logits, labels, teacher_log_probs)."""
    s = cfg.student
    return DKDLoss(alpha, s.temperature, s.dkd_beta) if s.loss == "dkd" else KDLoss(alpha, s.temperature)


def teacher_fingerprint(cfg: Config, data: Splits, kind: str) -> dict[str, Any]:
    """What a teacher's logits on the transfer set depend on: the teacher of the student `kind`
    (the ensemble, the generalist, or none) and the transfer set."""
    teacher: dict[str, Any] = {"kind": kind}
    if kind != HARD_LABELS:
        teacher["generalist"] = generalist_fingerprint(cfg, data)
    if kind == STUDENT:
        teacher["specialists"] = recipe(cfg.specialists, "specialists.")  # as in the specialists' fingerprints
        teacher["clusters"] = dataclasses.asdict(cfg.clusters)
        teacher["ensemble"] = dataclasses.asdict(cfg.ensemble)
    return {"teacher": teacher, "data": data.fingerprint(), "seed": cfg.seed, **transfer_fingerprint(cfg)}


def transfer_fingerprint(cfg: Config) -> dict[str, Any]:
    views = cfg.student.views if cfg.student.transfer in ("views", "view_mean") else 0
    # plain_epochs is absent when 0, so that older runs match
    plain = {"plain_epochs": cfg.student.plain_epochs} if cfg.student.plain_epochs else {}
    return {"transfer": cfg.student.transfer, "views": views, **plain, **augment_fingerprint(cfg.data)}


def student_fingerprint(cfg: Config, data: Splits, kind: str) -> dict[str, Any]:
    s = cfg.student
    loss = {"loss": s.loss, "dkd_beta": s.dkd_beta} if s.loss != "kd" else {}  # absent for kd: older runs match
    return model_fingerprint(s.model, data, cfg.seed, teacher=teacher_fingerprint(cfg, data, kind)["teacher"],
                             alpha=s.alpha, temperature=s.temperature, train=fingerprint_settings(s.train),
                             **loss, **transfer_fingerprint(cfg))




@torch.no_grad()
def teacher_disagreement(ensemble: nn.Module, generalist: nn.Module, data: Splits, cfg: Config,
                         run_dir: str | Path, batch_size: int = 1024) -> float:
    """Share of the transfer set on which the ensemble's and the generalist's top-1 answers differ.

    The transfer set is what the students are taught on: the training images, through their
    fixed views ("views"), one seeded augmented pass ("live"; not mixed), or plain ("dataset"; with
    "view_mean" the teachers' answers averaged over the views). A student
    can only learn from the ensemble what differs from the generalist there. Cached teacher
    logits are read from the students' folders of `run_dir` (computed there if missing)."""
    augment = student_augment(cfg, data)
    if augment is None:
        ours, theirs = (teacher_targets(teacher, data, cfg, Path(run_dir) / kind / artifacts.TEACHER_LOGITS_FILE,
                                        teacher_fingerprint(cfg, data, kind))[0]
                        for kind, teacher in ((STUDENT, ensemble), (FROM_GENERALIST, generalist)))
        return float((ours.argmax(-1) != theirs.argmax(-1)).double().mean())
    device = resolve_device(cfg.device)
    generator = torch.Generator().manual_seed(cfg.seed)
    ensemble.to(device).eval()
    generalist.to(device).eval()
    differ = torch.zeros((), dtype=torch.long, device=device)
    precision = inference_precision(ensemble, cfg.precision, device, batch_size)
    loader = image_loader(data.x_train, augment, device)  # per-image augmentation, or image files
    chunks = batches(data.x_train, batch_size) if loader is None else loader.epoch(
        torch.arange(len(data.x_train)).split(batch_size), cfg.seed)
    try:
        for chunk in chunks:
            x = chunk.to(device) if augment.batch is None else augment.batch(chunk.to(device), generator)
            with autocast(precision, device):
                differ += (ensemble(x).argmax(1) != generalist(x).argmax(1)).sum()
    finally:
        if loader is not None:
            loader.close()
    return int(differ) / max(len(data.x_train), 1)


def train_students(cfg: Config, data: Splits, run_dir: str | Path, ensemble: nn.Module,
                   generalist: nn.Module, progress: bool = True) -> dict[str, Path]:
    """Train the student from the ensemble and (with `student.baselines`) the two baselines; returns their
    model files.

    Then writes `student/teachers.json`: the transfer method and the teachers' top-1
    disagreement on the transfer set."""
    check_student_size(cfg, data)
    augmented = augment_fingerprint(cfg.data)
    unseen = [f"data.{k}" for k in ("random_resized_crop", "auto_augment", "mix") if k in augmented]
    if unseen and cfg.student.transfer != "live":
        log.info("student.transfer = %r: the students train without %s (a teacher labels augmented batches only "
                 "with student.transfer = 'live')", cfg.student.transfer, " and ".join(unseen))
    plans = [(STUDENT, ensemble, cfg.student.alpha), (FROM_GENERALIST, generalist, cfg.student.alpha),
             (HARD_LABELS, None, 1.0)][:None if cfg.student.baselines else 1]
    paths = {}
    for name, teacher, alpha in plans:
        stage_dir = Path(run_dir) / name
        log.info("training %s", name)
        distill(new_student(cfg, data), teacher, data, cfg, stage_dir, student_fingerprint(cfg, data, name),
                alpha, progress, teacher_fingerprint=teacher_fingerprint(cfg, data, name))
        paths[name] = stage_dir / artifacts.MODEL_FILE
    teachers_path = Path(run_dir) / STUDENT / artifacts.TEACHERS_FILE
    fingerprint = student_fingerprint(cfg, data, STUDENT)
    if not teachers_path.exists() or artifacts.read_json(teachers_path).get("fingerprint") != fingerprint:
        disagreement = teacher_disagreement(ensemble, generalist, data, cfg, run_dir)
        artifacts.write_json(teachers_path, {"transfer": cfg.student.transfer, "top1_disagreement": round(
            disagreement, 6), "fingerprint": fingerprint})
    return paths


def load_student_model(cfg: Config, data: Splits, run_dir: str | Path, name: str = STUDENT) -> Classifier:
    """A trained student of this run (eager PyTorch), in eval mode."""
    model = new_student(cfg, data, load_weights=False)
    fingerprint = dict(student_fingerprint(cfg, data, name), stage=name)
    if not load_finished(model, Path(run_dir) / name, fingerprint):
        raise artifacts.ArtifactError(f"{Path(run_dir) / name} holds no trained student; "
                                      "run `ensemble-kd run --resume`")
    return model.eval()
