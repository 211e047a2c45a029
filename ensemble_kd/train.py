"""One training loop for every stage: `fit()` and `evaluate()`.

`fit` trains a model on in-memory tensors, appends per-epoch metrics to
`metrics.jsonl`, writes an atomic checkpoint after each epoch and resumes from it, and
writes `model.pt` when done. Each epoch reseeds its own random streams from
(seed, epoch), so a run resumed at an epoch boundary gives the same weights as one that
never stopped.

Mixed precision (`precision` = bf16 | fp16) runs the forward pass and the teacher under
`torch.autocast`; the loss, the weights and the optimizer stay in float32, and fp16
(CUDA only) scales the loss with a `GradScaler`. On CUDA the training tensors are moved
to the GPU once, when they take less than half of its free memory.
"""
from __future__ import annotations

import contextlib
import functools
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

from . import artifacts
from .artifacts import ArtifactError
from .config import ConfigError, TrainConfig
from .errors import EnsembleKDError

log = logging.getLogger(__name__)

# loss_fn(logits, labels, targets) -> scalar; `targets` are per-example teacher outputs or None
LossFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
# epoch_indices(epoch, generator) -> the example indices of one epoch, in order
IndexFn = Callable[[int, torch.Generator], torch.Tensor]
# augment(x, generator) -> augmented batch
AugmentFn = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


class NonFiniteLossError(EnsembleKDError, FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainSet:
    """Examples held as tensors: inputs, hard labels and optional per-example teacher targets."""

    x: torch.Tensor
    y: torch.Tensor
    targets: torch.Tensor | None = None  # cached teacher logits, aligned with x

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class EvalResult:
    accuracy: float  # fraction correct
    per_class_accuracy: list[float]  # accuracy on each true class (NaN where a class has no example)
    logits: torch.Tensor  # (N, C) on CPU


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' but no CUDA GPU is visible; use --set device=cpu or device=auto")
    return torch.device(name)


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str, device: str | torch.device) -> torch.dtype | None:
    """The autocast dtype of `precision` on `device`, None for fp32; ConfigError where it cannot run."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision = {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    device_type = torch.device(device).type
    if precision == "fp16" and device_type != "cuda":
        raise ConfigError(f"precision = 'fp16' needs a CUDA device (float16 autocast with a gradient scaler), "
                          f"but this stage runs on {device_type}; use precision = 'bf16' or 'fp32' there, "
                          "or device = 'cuda'")
    if precision == "bf16" and not _bf16_autocast_works(device_type):
        other = "'fp16' or 'fp32'" if device_type == "cuda" else "'fp32'"
        raise ConfigError(f"precision = 'bf16' but this {device_type} device has no bfloat16 support; "
                          f"use precision = {other}")
    return PRECISIONS[precision]


@functools.lru_cache(maxsize=None)
def _bf16_autocast_works(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            probe = torch.ones(2, 2, device=device_type)
            return (probe @ probe).dtype == torch.bfloat16
    except (RuntimeError, ValueError):
        return False


def autocast(precision: str, device: str | torch.device) -> contextlib.AbstractContextManager:
    """`torch.autocast` for `precision` on `device`; a no-op for fp32."""
    dtype = autocast_dtype(precision, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


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
    memory there (so batches need no copy from the host); unchanged on CPU or when too large."""
    if device.type != "cuda":
        return train
    tensors = [t for t in (train.x, train.y, train.targets) if t is not None]
    size = sum(t.element_size() * t.nelement() for t in tensors)
    free, _ = torch.cuda.mem_get_info(device)
    if size > share * free:
        log.info("training data (%.1f GiB) stays on the CPU: more than %.0f%% of the %.1f GiB free on %s",
                 size / 2**30, 100 * share, free / 2**30, device)
        return train
    return TrainSet(train.x.to(device), train.y.to(device), None if train.targets is None else train.targets.to(device))


def epoch_seed(seed: int, epoch: int) -> int:
    """A distinct, reproducible seed for each (run seed, epoch)."""
    return (seed * 1_000_003 + epoch * 7919) % (2**63 - 1)


def cross_entropy(label_smoothing: float = 0.0) -> LossFn:
    def loss(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    return loss


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


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


def _check_fingerprint(path: Path, saved: dict[str, Any], expected: dict[str, Any]) -> None:
    differing = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
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


def _resume(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, stage_dir: Path,
            fingerprint: dict[str, Any], scaler: Any = None) -> int:
    """Restore the last checkpoint; returns the number of epochs already done (0 if none)."""
    path = stage_dir / artifacts.CHECKPOINT_FILE
    if not path.exists():  # starting afresh: lines of an epoch whose checkpoint never landed are stale
        (stage_dir / artifacts.METRICS_FILE).unlink(missing_ok=True)
        return 0
    ckpt = artifacts.load_torch(path)
    if not isinstance(ckpt, dict) or not {"epoch", "model", "optimizer", "scheduler"} <= set(ckpt):
        raise ArtifactError(f"{path} is not an ensemble-kd checkpoint; delete it and rerun with --resume")
    _check_fingerprint(path, ckpt.get("fingerprint", {}), fingerprint)
    _load_state(model, ckpt["model"], path)
    _load_state(optimizer, ckpt["optimizer"], path)
    scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    done = int(ckpt["epoch"])
    kept = [r for r in artifacts.read_jsonl(stage_dir / artifacts.METRICS_FILE) if r["epoch"] <= done]
    artifacts.write_text(stage_dir / artifacts.METRICS_FILE, "".join(_jsonl(r) for r in kept))
    log.info("resuming %s from epoch %d", stage_dir.name, done)
    return done


def _jsonl(record: dict[str, Any]) -> str:
    import json
    return json.dumps(record) + "\n"


def fit(model: nn.Module, train: TrainSet, cfg: TrainConfig, stage_dir: str | Path, *, stage: str, seed: int,
        fingerprint: dict[str, Any] | None = None, loss_fn: LossFn | None = None,
        teacher: nn.Module | None = None, epoch_indices: IndexFn | None = None,
        augment: AugmentFn | None = None, val: TrainSet | None = None,
        device: str | torch.device = "cpu", progress: bool = True, precision: str = "fp32") -> nn.Module:
    """Train `model` for `cfg.epochs`, resuming from `stage_dir` if a checkpoint is there.

    With `teacher`, the targets of each batch are the teacher's logits on the (augmented)
    batch; otherwise `train.targets` (if any) are passed to `loss_fn` as they are.
    `precision` (fp32 | bf16 | fp16) is not part of the fingerprint, like `device`: a
    stage may resume at another precision; model.pt records it when it is not fp32.
    Returns the model in eval mode; `stage_dir/model.pt` marks the stage finished.
    """
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = dict(fingerprint or {}, stage=stage)
    device = torch.device(device)
    autocast_dtype(precision, device)  # an impossible precision fails before any work
    model.to(device)
    if load_finished(model, stage_dir, fingerprint):
        log.info("%s already trained (%s); not training again", stage, stage_dir / artifacts.MODEL_FILE)
        return model.eval()
    loss_fn = loss_fn or cross_entropy(cfg.label_smoothing)
    epoch_indices = epoch_indices or (lambda epoch, gen: torch.randperm(len(train), generator=gen))
    steps_per_epoch = math.ceil(len(epoch_indices(0, torch.Generator().manual_seed(0))) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, total_steps, cfg.warmup_epochs * steps_per_epoch, cfg.schedule))
    scaler = _grad_scaler(precision)
    start = _resume(model, optimizer, scheduler, stage_dir, fingerprint, scaler)
    if teacher is not None:
        teacher.eval()
    if start < cfg.epochs:
        train = keep_on_device(train, device)
    for epoch in range(start + 1, cfg.epochs + 1):
        with _current_cuda_device(device):
            record = _train_epoch(model, train, cfg, optimizer, scheduler, loss_fn, teacher, epoch_indices, augment,
                                  stage, epoch, seed, device, progress, precision, scaler)
            if val is not None:
                record["val_accuracy"] = evaluate(model, val.x, val.y, device=device).accuracy
        artifacts.append_jsonl(stage_dir / artifacts.METRICS_FILE, record)
        artifacts.save_torch(stage_dir / artifacts.CHECKPOINT_FILE, {
            "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "fingerprint": fingerprint,
            **({"scaler": scaler.state_dict()} if scaler is not None else {})})
        log.info("%s epoch %d/%d loss %.4f train acc %.4f%s", stage, epoch, cfg.epochs, record["loss"],
                 record["train_accuracy"], f" val acc {record['val_accuracy']:.4f}" if val is not None else "")
    model.eval()
    save_model(model, stage_dir, fingerprint, epochs=cfg.epochs,
               **({"precision": precision} if precision != "fp32" else {}))
    (stage_dir / artifacts.CHECKPOINT_FILE).unlink(missing_ok=True)
    return model


def _train_epoch(model: nn.Module, train: TrainSet, cfg: TrainConfig, optimizer: torch.optim.Optimizer,
                 scheduler: Any, loss_fn: LossFn, teacher: nn.Module | None, epoch_indices: IndexFn,
                 augment: AugmentFn | None, stage: str, epoch: int, seed: int, device: torch.device,
                 progress: bool, precision: str = "fp32", scaler: Any = None) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    torch.manual_seed(epoch_seed(seed, epoch))  # dropout draws from the global stream
    order = epoch_indices(epoch, generator)
    model.train()
    started, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
    batches = order.split(cfg.batch_size)
    bar = tqdm(batches, desc=f"{stage} {epoch}/{cfg.epochs}", leave=False, disable=not progress, unit="batch")
    for step, idx in enumerate(bar, start=1):
        idx = idx.to(train.x.device)  # the data may already live on the device (keep_on_device)
        x, y = train.x[idx].to(device, non_blocking=True), train.y[idx].to(device, non_blocking=True)
        if augment is not None:
            x = augment(x, generator)
        targets = None
        with autocast(precision, device):
            if teacher is not None:
                with torch.no_grad():
                    targets = teacher(x)
            elif train.targets is not None:
                targets = train.targets[idx].to(device, non_blocking=True)
            logits = model(x)
        if precision != "fp32":  # the loss (softmax, logs, sums) in float32
            logits, targets = logits.float(), None if targets is None else targets.float()
        loss = loss_fn(logits, y, targets)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"{stage}: loss became {loss.item()} at epoch {epoch}, step {step}; the last good checkpoint "
                f"is kept. Lower the learning rate (now {cfg.lr:g}) or raise grad_clip, then rerun with --resume")
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
        else:  # fp16: scaled backward; clip the true gradients; a step with inf/NaN gradients is skipped
            scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
        scheduler.step()
        loss_sum += loss.item() * len(idx)
        correct += int((logits.argmax(1) == y).sum()) if y.dtype == torch.int64 else 0
        seen += len(idx)
    return {"epoch": epoch, "loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
            "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - started, 3)}


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024,
                   device: str | torch.device = "cpu", precision: str = "fp32") -> torch.Tensor:
    """The model's logits for every row of `x`, in eval mode, as float32 on CPU."""
    was_training = model.training
    model.eval()
    with autocast(precision, device):
        outputs = [model(chunk.to(device)).float().cpu() for chunk in x.split(batch_size)]
    model.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty(0)


def per_class_accuracy(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float]:
    correct = torch.bincount(labels[predictions == labels], minlength=num_classes).double()
    totals = torch.bincount(labels, minlength=num_classes).double()
    return [float(c / t) if t > 0 else float("nan") for c, t in zip(correct, totals)]


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024,
             device: str | torch.device = "cpu") -> EvalResult:
    """Accuracy, per-class accuracy and logits of `model` on (x, y)."""
    logits = predict_logits(model, x, batch_size, device)
    predictions = logits.argmax(1)
    accuracy = float((predictions == y).double().mean()) if len(y) else float("nan")
    return EvalResult(accuracy, per_class_accuracy(predictions, y, logits.shape[1]), logits)


def set_seed(seed: int) -> None:
    """Seed torch and numpy for model initialisation."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
