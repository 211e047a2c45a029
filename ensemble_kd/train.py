"""One training loop for every stage, `fit()`, with the devices it runs on.

`fit` trains a model on in-memory tensors (or image files streamed from disk), appends
per-epoch metrics to `metrics.jsonl` and `metrics.csv` (and TensorBoard events when asked:
curves.py), writes an atomic checkpoint after each epoch and resumes from it, and writes
`model.pt` when done. Each epoch reseeds its own random streams from (seed, epoch), so a
run resumed at an epoch boundary gives the same weights as one that never stopped.

The step loop never waits for the device: the loss sum and the correct count stay on
the device and are read once per epoch, and the non-finite guard reads its on-device
flag (the running loss sum, NaN or infinite once any loss is) every
`NONFINITE_CHECK_STEPS` steps and at the end of the epoch, before any checkpoint or
model file is written. On CUDA the epoch's example order is copied to the GPU once.
Optimizers use torch's fused kernels where it has them for the device (CUDA; CPU since
torch 2.4), and gradient clipping (`clip_grad_norm`) costs a few small ops per step. A
loss that writes out its own gradient (`value_and_grad`, as the distillation loss
`losses.KDLoss` does) has it backpropagated from the logits: the backward pass runs no
loss node (30-36 µs a step saved on the digits student; benchmarks/README.md).

Mixed precision (`precision` = bf16 | fp16; precision.py) runs the forward pass and the
teacher under `torch.autocast`; the loss, the weights and the optimizer stay in float32,
and fp16 (CUDA only) scales the loss with a `GradScaler`. `precision = "auto"` is
resolved once per fit (`precision.training_precision`) and said in the log. Models with
2-D convolutions train in channels-last memory format on CPU and CUDA (faster for `cnn`
and `resnet` in both precisions; see benchmarks/README.md) and are returned and saved in
the usual contiguous format. With `compile_model`, the forward and backward passes run
through `torch.compile`. On CUDA the training tensors are moved to the GPU once, when
they take less than half of its free memory.

Batches are gathered from the tensors by index, unless the inputs are image files
(`streaming.ImageFiles`) or an augmentation works image by image (augment.py): then a
DataLoader reads them (`streaming.ImageLoader`, with worker processes that stay for the
whole fit), in the same order. Either way the batch is then flipped and cropped, and mixed
(MixUp / CutMix: the labels become class probabilities) where the augmentation says so.

Optional early stopping and best-epoch selection on the validation split
(`train.early_stopping_patience`, `train.keep_best`; stopping.py) survive a resume: their
state is part of every checkpoint.

Progress: a tqdm bar per epoch on a terminal, and one log line per finished epoch. When
stderr is not a terminal (CI, `nohup`, a log file) there is no bar, so a log holds the
epoch lines only, never carriage-return redraws.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import artifacts, curves, inference
from .artifacts import ArtifactError
from .augment import Augmentation
from .config import ConfigError, TrainConfig
from .data import apply_augmentation
from .errors import EnsembleKDError
from .precision import PRECISIONS, autocast_dtype, resolve_precision, training_precision
from .resume import after_restarts
from .stopping import BestEpoch
from .streaming import ImageLoader, Inputs, head, item_seed

log = logging.getLogger(__name__)

# loss_fn(logits, labels, targets) -> scalar; `targets` are per-example teacher outputs or None. A loss_fn that
# also has `value_and_grad(logits, labels, targets)` -> (loss, d loss / d logits), such as losses.KDLoss, is
# trained through that outside fp16: fit backpropagates the gradient from the logits, with no loss node
LossFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
ValueAndGrad = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]]
# epoch_indices(epoch, generator) -> the example indices of one epoch, in order
IndexFn = Callable[[int, torch.Generator], torch.Tensor]


class NonFiniteLossError(EnsembleKDError, FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class Views:
    """Fixed augmented views of a training set: epoch e trains on view (e - 1) % count (`of_epoch`; the
    last epochs on a final plain view when `plain_epochs` > 0), each image flipped and cropped as
    recorded here, with a teacher's targets on exactly that view (`student.transfer = "views"`). The
    teacher runs once per view, not once per epoch and student."""

    flips: torch.Tensor | None  # (count, N) bool: image flipped in that view (None: no flips)
    offsets: torch.Tensor | None  # (count, N, 2) crop offsets into the image padded by crop_pad (None: no crops)
    crop_pad: int  # padding of the crops
    targets: torch.Tensor | None = None  # (count, N, C) the teacher's targets on each view (what loss_fn takes);
    # None for hard labels
    plain_epochs: int = 0  # > 0: the last view is the plain images (no flip, centred), taught in the last
    # plain_epochs epochs

    @property
    def count(self) -> int:
        parts = [t for t in (self.flips, self.offsets, self.targets) if t is not None]
        return len(parts[0]) if parts else 1

    def to(self, device: torch.device) -> "Views":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Views(move(self.flips), move(self.offsets), self.crop_pad, move(self.targets), self.plain_epochs)

    def of_epoch(self, epoch: int, epochs: int) -> int:
        """The view epoch `epoch` (1-based) of `epochs` trains on: the plain one in the last plain_epochs
        epochs, else the augmented ones in turn."""
        if self.plain_epochs and epoch > epochs - self.plain_epochs:
            return self.count - 1
        return (epoch - 1) % (self.count - (1 if self.plain_epochs else 0))

    def batch(self, x: torch.Tensor, view: int, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Examples `idx` (already gathered as `x`) seen through `view`, and the teacher's targets there."""
        flips = None if self.flips is None else self.flips[view][idx]
        offsets = None if self.offsets is None else self.offsets[view][idx]
        targets = None if self.targets is None else self.targets[view][idx]
        return apply_augmentation(x, flips, offsets, self.crop_pad), targets


@dataclass
class TrainSet:
    """Examples: inputs (tensors, or image files read while training), hard labels and optional per-example
    teacher targets."""

    x: Inputs
    y: torch.Tensor
    targets: torch.Tensor | None = None  # cached teacher targets (what loss_fn takes), aligned with x
    views: Views | None = None  # fixed augmented views (and a teacher's targets on them), one per epoch in turn

    def __len__(self) -> int:
        return len(self.y)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' but no CUDA GPU is visible; use --set device=cpu or device=auto")
    return torch.device(name)


def training_memory_format(model: nn.Module, device: torch.device) -> torch.memory_format:
    """channels-last for a model with 2-D convolutions on CPU or CUDA, where it is faster (measured for
    `cnn` and `resnet` in fp32 and bf16: benchmarks/README.md); the usual contiguous format otherwise."""
    has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    return torch.channels_last if has_conv and device.type in ("cpu", "cuda") else torch.contiguous_format


def _grad_scaler(precision: str) -> Any:
    """A loss scaler for fp16 (small gradients would underflow to zero without it); None otherwise."""
    if precision != "fp16":
        return None
    if hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        return torch.amp.GradScaler("cuda")
    return torch.cuda.amp.GradScaler()


def _current_cuda_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Make an indexed GPU (cuda:k) the current one, so tensors made without a device land there too."""
    if device.type == "cuda" and device.index is not None:
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def keep_on_device(train: TrainSet, device: torch.device, share: float = 0.5) -> TrainSet:
    """`train` moved to a CUDA device once, when its tensors take less than `share` of the free
    memory there (so batches need no copy from the host); unchanged on CPU, when too large or when the
    inputs are image files."""
    if device.type != "cuda" or not isinstance(train.x, torch.Tensor):
        return train
    views = [] if train.views is None else [train.views.flips, train.views.offsets, train.views.targets]
    tensors = [t for t in (train.x, train.y, train.targets, *views) if t is not None]
    size = sum(t.element_size() * t.nelement() for t in tensors)
    free, _ = torch.cuda.mem_get_info(device)
    if size > share * free:
        log.info("training data (%.1f GiB) stays on the CPU: more than %.0f%% of the %.1f GiB free on %s",
                 size / 2**30, 100 * share, free / 2**30, device)
        return train
    return TrainSet(train.x.to(device), train.y.to(device), None if train.targets is None else train.targets.to(device),
                    None if train.views is None else train.views.to(device))


def epoch_seed(seed: int, epoch: int) -> int:
    """A distinct, reproducible seed for each (run seed, epoch)."""
    return (seed * 1_000_003 + epoch * 7919) % (2**63 - 1)


def cross_entropy(label_smoothing: float = 0.0) -> LossFn:
    def loss(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    return loss


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD (Nesterov) over the trainable parameters, with torch's fused kernel (one call updates
    every parameter) where torch has one for their device: CUDA, and CPU since torch 2.4."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        make = functools.partial(torch.optim.SGD, params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                                 weight_decay=cfg.weight_decay)
    else:
        make = functools.partial(torch.optim.AdamW, params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    try:
        return make(fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device or optimizer in this torch
        return make()


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> None:
    """Scale the gradients of `params` so that their total 2-norm is at most `max_norm`, as
    `torch.nn.utils.clip_grad_norm_` does (factor max_norm / (norm + 1e-6) when below 1), at less cost.

    On CPU the norm is a host value (reading it waits for nothing), so the gradients are
    scaled only when it is over the limit. Elsewhere torch's foreach clip_grad_norm_ scales
    them on the device by a clamped factor, never reading the norm back (no sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    if grads[0].device.type != "cpu":
        nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        return
    norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
    if norm + 1e-6 > max_norm:
        torch._foreach_mul_(grads, max_norm / (norm + 1e-6))


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at `step` (linear warm-up, then the schedule)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if schedule == "step":
        return 0.1 ** (int(progress >= 0.5) + int(progress >= 0.75))
    return 1.0


class StepSchedule:
    """Sets each parameter group's learning rate to its base rate x `factor(step)` before every step.

    The values of torch's `LambdaLR(optimizer, factor)`, bit for bit, without its per-step
    bookkeeping (which cost about 2% of a small model's step on CPU: benchmarks/README.md).
    Its state_dict has LambdaLR's `last_epoch` (steps taken) and `base_lrs`, so a checkpoint
    written with either resumes with the other."""

    def __init__(self, optimizer: torch.optim.Optimizer, factor: Callable[[int], float]) -> None:
        self.optimizer, self.factor = optimizer, factor
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.last_epoch = 0
        self._apply()

    def step(self) -> None:
        self.last_epoch += 1
        self._apply()

    def _apply(self) -> None:
        factor = self.factor(self.last_epoch)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * factor

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_epoch, self.base_lrs = int(state["last_epoch"]), list(state["base_lrs"])
        self._apply()

    def step_to(self, step: int) -> None:
        """Set the learning rates of step `step` (from the current base_lrs)."""
        self.last_epoch = step
        self._apply()


def _check_fingerprint(path: Path, saved: dict[str, Any], expected: dict[str, Any]) -> None:
    """ArtifactError naming what differs, unless only settings that a resume changed to continue the run
    after a non-finite loss do (`resume.after_restarts`)."""
    differing = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
    if differing and all(after_restarts(path, saved).get(k) == v for k, v in expected.items()):
        return
    if differing:
        what = "; ".join(f"{k}: file has {a!r}, this run has {b!r}" for k, (a, b) in differing.items())
        raise ArtifactError(f"{path} was written by another configuration ({what}); use a new --out "
                            "directory, or --overwrite to replace this run")


def load_finished(model: nn.Module, stage_dir: Path, fingerprint: dict[str, Any]) -> bool:
    """Load `stage_dir/model.pt` into `model` if it exists; False when the stage has not finished."""
    path = Path(stage_dir) / artifacts.MODEL_FILE
    if not path.exists():
        return False
    saved = artifacts.load_torch(path)
    if not isinstance(saved, dict) or "state_dict" not in saved:
        raise ArtifactError(f"{path} is not an ensemble-kd model file; delete it and rerun with --resume")
    _check_fingerprint(path, saved.get("fingerprint", {}), fingerprint)
    _load_state(model, saved["state_dict"], path)
    return True


def _load_state(module: nn.Module | torch.optim.Optimizer | Any, state: dict, path: Path) -> None:
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as err:
        raise ArtifactError(f"{path} does not fit this model ({err}); it comes from another architecture: "
                            "use a new --out directory or --overwrite") from err


def save_model(model: nn.Module, stage_dir: Path, fingerprint: dict[str, Any], **extra: Any) -> Path:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return artifacts.save_torch(Path(stage_dir) / artifacts.MODEL_FILE,
                                {"state_dict": state, "fingerprint": fingerprint, **extra})


def _resume(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: StepSchedule, stage_dir: Path,
            fingerprint: dict[str, Any], scaler: Any = None, best: BestEpoch | None = None) -> int:
    """Restore the last checkpoint (and `best`'s state from it); returns the number of epochs already done
    (0 if none)."""
    path = stage_dir / artifacts.CHECKPOINT_FILE
    if not path.exists():
        curves.cut_back(stage_dir, 0)
        return 0
    ckpt = artifacts.load_torch(path)
    if not isinstance(ckpt, dict) or not {"epoch", "model", "optimizer", "scheduler"} <= set(ckpt):
        raise ArtifactError(f"{path} is not an ensemble-kd checkpoint; delete it and rerun with --resume")
    _check_fingerprint(path, ckpt.get("fingerprint", {}), fingerprint)
    _load_state(model, ckpt["model"], path)
    _load_state(optimizer, ckpt["optimizer"], path)
    _match_parameter_layout(optimizer)
    base_lrs = list(scheduler.base_lrs)  # the configured lr: a resume after a non-finite loss may lower it
    scheduler.load_state_dict(ckpt["scheduler"])
    scheduler.base_lrs = base_lrs
    scheduler.step_to(scheduler.last_epoch)
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if best is not None and ckpt.get("best"):
        best.load_state_dict(ckpt["best"])
    done = int(ckpt["epoch"])
    curves.cut_back(stage_dir, done)
    log.info("resuming %s from epoch %d", stage_dir.name, done)
    return done


def _match_parameter_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give each optimizer state tensor its parameter's memory layout (same values).

    A checkpoint keeps the layout it was written in (say contiguous, before channels-last
    training), and fused optimizer kernels pair elements by memory position, not by index."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    state[key] = torch.empty_strided(param.shape, param.stride(), dtype=value.dtype,
                                                     device=value.device).copy_(value)


NONFINITE_CHECK_STEPS = 50  # steps between reads of the on-device non-finite flag (each read waits for the device)


@dataclass
class FitOptions:
    """How one fit() call trains, besides the hyperparameters of its TrainConfig."""

    stage: str  # the stage's name, in the log, the progress bar and the fingerprint
    seed: int  # each epoch's batch order, augmentation and dropout come from (seed, epoch)
    fingerprint: dict[str, Any] | None = None  # what a checkpoint or model.pt in stage_dir must match to be reused
    loss_fn: LossFn | None = None  # loss_fn(logits, labels, targets); default: cross-entropy (cfg.label_smoothing)
    teacher: nn.Module | None = None  # run on each (augmented) batch for its targets; else train.targets are used
    epoch_indices: IndexFn | None = None  # the examples of each epoch, in order; default: a shuffle of all
    augment: Augmentation | None = None  # random augmentation of every training batch (augment.py)
    val: TrainSet | None = None  # held-out examples whose accuracy is logged after each epoch
    device: str | torch.device = "cpu"  # where the model trains
    progress: bool = True  # a progress bar per epoch on a terminal (never in a log file)
    precision: str = "fp32"  # auto | fp32 | bf16 | fp16 autocast; like device, not part of the fingerprint
    compile_model: bool = False  # run forward and backward through torch.compile
    tensorboard: bool = False  # also write each epoch's metrics as TensorBoard events into stage_dir (log.tensorboard)
    lr_setting: str = ""  # config key of cfg.lr (e.g. generalist.train.lr), named in the advice on a non-finite loss
    clip_setting: str = ""  # the config key of cfg.grad_clip, named in the same advice


def fit(model: nn.Module, train: TrainSet, cfg: TrainConfig, stage_dir: str | Path, options: FitOptions) -> nn.Module:
    """Train `model` for `cfg.epochs`, resuming from `stage_dir` if a checkpoint is there.

    With `options.teacher`, the targets of each batch are the teacher's logits on the
    (augmented) batch; otherwise `train.targets` (if any) are passed to the loss as they are. With
    `options.augment.mix`, the labels given to the loss are (N, C) class probabilities.
    `precision` and `compile_model` are not part of the fingerprint, like `device`: a stage
    may resume at another precision (so "auto" may mix bf16 and fp32 epochs when a run
    resumes on another machine); model.pt records the precision used when it is not fp32.
    A non-finite loss raises NonFiniteLossError, naming the epoch and the steps between two
    checks, before that epoch's metrics line or checkpoint is written.
    `cfg.early_stopping_patience` and `cfg.keep_best` judge epochs by their accuracy on
    `options.val` (stopping.py); model.pt then also records `epochs_trained` and `best_epoch`.
    Returns the model in eval mode; `stage_dir/model.pt` marks the stage finished.
    """
    o = options
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = dict(o.fingerprint or {}, stage=o.stage)
    device = torch.device(o.device)
    autocast_dtype(o.precision, device)  # an impossible precision fails before any work
    if (cfg.early_stopping_patience > 0 or cfg.keep_best) and o.val is None:
        raise ConfigError(f"{o.stage}: early_stopping_patience and keep_best judge epochs on a validation split, "
                          "and this training has none (FitOptions.val); pass one or switch both off")
    model.to(device)
    if load_finished(model, stage_dir, fingerprint):
        log.info("%s already trained (%s); not training again", o.stage, stage_dir / artifacts.MODEL_FILE)
        return model.eval()
    precision = _chosen_precision(o.precision, device, model, train, cfg.batch_size, o.stage)
    memory_format = training_memory_format(model, device)
    model.to(memory_format=memory_format)  # before the optimizer, so its state takes the same layout
    loss_fn = o.loss_fn or cross_entropy(cfg.label_smoothing)
    epoch_indices = o.epoch_indices or (lambda epoch, gen: torch.randperm(len(train), generator=gen))
    steps_per_epoch = math.ceil(len(epoch_indices(0, torch.Generator().manual_seed(0))) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    optimizer = make_optimizer(model, cfg)
    scheduler = StepSchedule(optimizer, lambda step: lr_factor(
        step, total_steps, cfg.warmup_epochs * steps_per_epoch, cfg.schedule))
    scaler = _grad_scaler(precision)
    best = BestEpoch(cfg.early_stopping_patience, cfg.keep_best)
    start = _resume(model, optimizer, scheduler, stage_dir, fingerprint, scaler, best)
    if o.teacher is not None:
        o.teacher.eval()
    loader = image_loader(train.x, o.augment, device) if start < cfg.epochs else None
    if start < cfg.epochs and loader is None:  # a loader's worker processes read from the CPU
        train = keep_on_device(train, device)
    loop = _Loop(model, torch.compile(model) if o.compile_model else model,
                 [p for p in model.parameters() if p.requires_grad], train, cfg, optimizer, scheduler, scaler,
                 loss_fn, o.teacher, epoch_indices, o.augment, o.stage, o.seed, device, precision, memory_format,
                 o.progress, loader, getattr(loss_fn, "value_and_grad", None) if scaler is None else None)
    epoch_log = curves.EpochLog(stage_dir, o.tensorboard, start)
    try:
        last = _run_epochs(loop, o, start, best, epoch_log, stage_dir, fingerprint)
    finally:
        epoch_log.close()
        if loop.loader is not None:
            loop.loader.close()
    if best.restore(model) and best.epoch != last:
        log.info("%s: keeping epoch %d's weights (best val acc %.4f), not epoch %d's", o.stage, best.epoch,
                 best.accuracy, last)
    model.to(memory_format=torch.contiguous_format).eval()
    chosen = {"epochs_trained": last, "best_epoch": best.epoch} if best.active else {}
    save_model(model, stage_dir, fingerprint, epochs=cfg.epochs, **chosen,
               **({"precision": precision} if precision != "fp32" else {}))
    (stage_dir / artifacts.CHECKPOINT_FILE).unlink(missing_ok=True)
    (stage_dir / artifacts.NONFINITE_FILE).unlink(missing_ok=True)  # finished: nothing left to continue
    return model


def _run_epochs(loop: _Loop, o: FitOptions, start: int, best: BestEpoch, epoch_log: curves.EpochLog,
                stage_dir: Path, fingerprint: dict[str, Any]) -> int:
    """Train the epochs after `start`, each followed by its metrics and checkpoint, until cfg.epochs or
    early stopping; returns the last epoch trained."""
    cfg, last = loop.cfg, start
    for epoch in range(start + 1, cfg.epochs + 1):
        if best.out_of_patience():  # checked first, so a stage resumed after its last epoch stops too
            log.info("%s: early stop after epoch %d: val acc has not improved for %d epoch%s (best %.4f at "
                     "epoch %d)", o.stage, last, best.since, "s" if best.since > 1 else "", best.accuracy, best.epoch)
            break
        with _current_cuda_device(loop.device):
            try:
                record = _train_epoch(loop, epoch)
            except NonFiniteLossError as err:
                raise _stopped_on_nonfinite(err, loop, o, stage_dir, epoch) from None
            if o.val is not None:
                record["val_accuracy"] = inference.evaluate(loop.model, o.val.x, o.val.y, device=loop.device).accuracy
        if best.active:
            best.update(epoch, record["val_accuracy"], loop.model)
        epoch_log.write(record)
        artifacts.save_torch(stage_dir / artifacts.CHECKPOINT_FILE, {
            "epoch": epoch, "model": loop.model.state_dict(), "optimizer": loop.optimizer.state_dict(),
            "scheduler": loop.scheduler.state_dict(), "fingerprint": fingerprint,
            **({"scaler": loop.scaler.state_dict()} if loop.scaler is not None else {}),
            **({"best": best.state_dict()} if best.active else {})})
        log.info("%s epoch %d/%d loss %.4f train acc %.4f%s", o.stage, epoch, cfg.epochs, record["loss"],
                 record["train_accuracy"], f" val acc {record['val_accuracy']:.4f}" if o.val is not None else "")
        last = epoch
    return last


def image_loader(x: Inputs, augment: Augmentation | None, device: torch.device) -> ImageLoader | None:
    """The loader of training batches of `x` when they are read image by image: from image files, or with
    a per-image augmentation; None when they are gathered from the tensor by index."""
    transform = None if augment is None else augment.image
    if isinstance(x, torch.Tensor) and transform is None:
        return None
    workers = augment.workers if isinstance(x, torch.Tensor) else x.workers
    return ImageLoader(x, transform, workers, pin_memory=device.type == "cuda")


def _chosen_precision(precision: str, device: torch.device, model: nn.Module, train: TrainSet, batch_size: int,
                      stage: str) -> str:
    """`precision` resolved for training `model` in batches of `batch_size`, said in the log when it was "auto"."""
    if precision != "auto" or len(train) == 0:
        return resolve_precision(precision, device)
    chosen = training_precision(precision, device, model, head(train.x, 1), min(batch_size, len(train)))
    log.info("%s: precision auto -> %s on %s", stage, chosen, device)
    return chosen


@dataclass
class _Loop:
    """What every epoch of one fit() call works with."""

    model: nn.Module  # the weights being trained and checkpointed
    forward: nn.Module  # `model` itself, or its torch.compile wrapper
    params: list[nn.Parameter]  # the trainable parameters (clipped together)
    train: TrainSet
    cfg: TrainConfig
    optimizer: torch.optim.Optimizer
    scheduler: StepSchedule  # stepped once per batch
    scaler: Any  # fp16 GradScaler, else None
    loss_fn: LossFn
    teacher: nn.Module | None
    epoch_indices: IndexFn
    augment: Augmentation | None
    stage: str
    seed: int
    device: torch.device
    precision: str  # resolved: fp32 | bf16 | fp16
    memory_format: torch.memory_format  # of image batches: channels-last for conv models
    progress: bool
    loader: ImageLoader | None  # reads the batches image by image; None: gathered from train.x by index
    value_and_grad: ValueAndGrad | None = None  # loss_fn.value_and_grad where it has one, outside fp16

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = PRECISIONS[self.precision]
        return contextlib.nullcontext() if dtype is torch.float32 else torch.autocast(self.device.type, dtype=dtype)


def _train_epoch(loop: _Loop, epoch: int) -> dict[str, Any]:
    """One pass over the epoch's batches; reads the device twice (the loss sum, the correct count) at its end
    and checks the non-finite flag every NONFINITE_CHECK_STEPS steps."""
    started = time.perf_counter()
    device = loop.device
    generator = torch.Generator().manual_seed(epoch_seed(loop.seed, epoch))
    _seed_global_stream(epoch_seed(loop.seed, epoch), device)  # dropout draws from it
    order = loop.epoch_indices(epoch, generator).to(loop.train.y.device)  # on a GPU: one copy per epoch
    augment_generator = generator if device.type == "cpu" else torch.Generator(device=device).manual_seed(
        epoch_seed(loop.seed, epoch))  # draws where the batch is: no copy from the host per step
    loop.model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # sum of loss x batch size: the non-finite flag
    correct = torch.zeros((), dtype=torch.int64, device=device)
    batches = order.split(loop.cfg.batch_size)
    bar = tqdm(batches, desc=f"{loop.stage} {epoch}/{loop.cfg.epochs}", leave=False, unit="batch",
               disable=None) if loop.progress else batches  # disable=None: no bar when stderr is not a terminal
    seen, checked = 0, 0
    view = None if loop.train.views is None else loop.train.views.of_epoch(epoch, loop.cfg.epochs)
    read = itertools.repeat(None) if loop.loader is None else loop.loader.epoch(batches, epoch_seed(loop.seed, epoch))
    for step, (idx, x) in enumerate(zip(bar, read), start=1):
        artifacts.check_may_write()  # a specialist worker whose run has died stops here (parallel.py)
        mix_seed = item_seed(epoch_seed(loop.seed, epoch) + 1, step)
        logits, y, loss = _train_step(loop, idx, augment_generator, view, x, mix_seed)
        loss_sum.add_(loss.detach(), alpha=len(idx))
        if y.dtype == torch.int64 or y.ndim == 2:
            labels = y if y.ndim == 1 else y.argmax(1)  # mixed labels: the class with the largest share
            correct.add_((logits.detach().argmax(1) == labels).sum())
        seen += len(idx)
        if step % NONFINITE_CHECK_STEPS == 0 or step == len(batches):
            _check_finite(loss_sum, loop, epoch, checked + 1, step)
            checked = step
    return {"epoch": epoch, "loss": float(loss_sum) / max(seen, 1), "train_accuracy": int(correct) / max(seen, 1),
            "lr": loop.optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - started, 3)}


def _seed_global_stream(seed: int, device: torch.device) -> None:
    """Seed torch's global random stream of `device` (its dropout draws from it). On CPU only the CPU
    generator: torch.manual_seed also seeds every other backend, 0.2 ms that a short epoch notices."""
    if device.type == "cpu":
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


def _train_step(loop: _Loop, idx: torch.Tensor, generator: torch.Generator, view: int | None = None,
                x: torch.Tensor | None = None, mix_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward, loss, backward, clipping and optimizer step on the examples `idx` (their inputs `x` when the
    loader has read them, else gathered from train.x; seen through the fixed `view` of `train.views` when
    there are views); (logits, labels, loss)."""
    train, device, cfg, augment = loop.train, loop.device, loop.cfg, loop.augment
    x = train.x[idx] if x is None else x
    x, y = x.to(device, non_blocking=True), train.y[idx].to(device, non_blocking=True)
    view_targets = None
    if view is not None:
        x, view_targets = train.views.batch(x, view, idx)
    if augment is not None and augment.batch is not None:
        x = augment.batch(x, generator)
    if augment is not None and augment.mix is not None:
        x, y = augment.mix(x, y, mix_seed)
    if x.ndim == 4:
        x = x.contiguous(memory_format=loop.memory_format)
    targets = None
    with loop.autocast():
        if loop.teacher is not None:
            with torch.no_grad():
                targets = loop.teacher(x)
        elif view_targets is not None:
            targets = view_targets.to(device, non_blocking=True)
        elif train.targets is not None:
            targets = train.targets[idx].to(device, non_blocking=True)
        logits = loop.forward(x)
    if loop.precision != "fp32":  # the loss (softmax, logs, sums) in float32
        logits, targets = logits.float(), None if targets is None else targets.float()
    loop.optimizer.zero_grad(set_to_none=True)
    if loop.value_and_grad is not None:  # the loss's gradient written out: backpropagated from the logits
        loss, grad = loop.value_and_grad(logits, y, targets)
        logits.backward(grad)
    else:
        loss = loop.loss_fn(logits, y, targets)
        (loss if loop.scaler is None else loop.scaler.scale(loss)).backward()
    if loop.scaler is None:
        if cfg.grad_clip > 0:
            clip_grad_norm(loop.params, cfg.grad_clip)
        loop.optimizer.step()
    else:  # fp16: the backward pass was scaled; clip the true gradients; a step with inf/NaN gradients is skipped
        if cfg.grad_clip > 0:
            loop.scaler.unscale_(loop.optimizer)
            clip_grad_norm(loop.params, cfg.grad_clip)
        loop.scaler.step(loop.optimizer)
        loop.scaler.update()
    loop.scheduler.step()
    return logits, y, loss


def _check_finite(loss_sum: torch.Tensor, loop: _Loop, epoch: int, first: int, last: int) -> None:
    """NonFiniteLossError when the running loss sum of the epoch is NaN or infinite (steps first..last are
    those since the last check); `_stopped_on_nonfinite` adds what to do."""
    if bool(torch.isfinite(loss_sum)):
        return
    steps = f"step {last}" if first == last else f"steps {first}-{last}"
    raise NonFiniteLossError(f"{loop.stage}: loss became {float(loss_sum)} at epoch {epoch}, in {steps} (it is "
                             f"checked every {NONFINITE_CHECK_STEPS} steps)")


def _stopped_on_nonfinite(err: NonFiniteLossError, loop: _Loop, o: FitOptions, stage_dir: Path,
                          epoch: int) -> NonFiniteLossError:
    """`err` with the way to continue, after recording the failure in stage_dir/nonfinite.json, which lets a
    resume change the stage's learning rate and clipping (resume.NONFINITE_SETTINGS)."""
    cfg, kept = loop.cfg, epoch - 1  # the checkpoint on disk is that of the epoch before
    artifacts.write_json(stage_dir / artifacts.NONFINITE_FILE, {
        "stage": loop.stage, "epoch": epoch, "message": str(err), "lr": cfg.lr, "grad_clip": cfg.grad_clip,
        "lr_setting": o.lr_setting, "clip_setting": o.clip_setting})
    clip = cfg.grad_clip / 2 if cfg.grad_clip > 0 else 1.0
    start = f"its last good checkpoint (epoch {kept}, kept)" if kept > 0 else "its start (no epoch had finished)"
    if not o.lr_setting:
        return NonFiniteLossError(f"{err}; lower the learning rate (now {cfg.lr:g}) or clip gradients harder "
                                  f"(grad_clip, now {cfg.grad_clip:g}), then rerun with --resume")
    return NonFiniteLossError(
        f"{err}. To continue from {start} with a lower learning rate or harder gradient clipping, rerun with "
        f"--resume --set {o.lr_setting}={cfg.lr / 2:g} (now {cfg.lr:g}) or --resume --set {o.clip_setting}="
        f"{clip:g} (now {cfg.grad_clip:g}); config.toml records the new value")


def set_seed(seed: int) -> None:
    """Seed torch and numpy for model initialisation."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
