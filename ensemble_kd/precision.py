"""Mixed precision: which precision a model runs in on a device, and the autocast region for it.

`precision` = bf16 | fp16 runs forward passes under `torch.autocast` (fp16 only on CUDA);
fp32 runs them as they are. `precision = "auto"` picks bf16 where the device computes it
natively (CUDA GPUs of compute capability 8.0 or newer, CPUs with AVX512-BF16 or AMX) and
one step does enough matmul work for bf16 to pay (`BF16_MIN_STEP_FLOPS`), else fp32:
`training_precision` counts a training step's FLOPs with torch's FlopCounterMode, and
`inference.inference_precision` bounds a prediction batch's from the parameter count.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from . import choices
from .config import ConfigError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_CHOICES = choices.PRECISIONS  # PRECISIONS and auto: bf16 where it is native and pays, else fp32
# auto picks bf16 only from this many matmul FLOPs per step: below it autocast's casts cost more than bf16
# saves (speed.py part 2, one thread of an AVX512-BF16 EPYC: the digits MLP ran at 0.88x in bf16 at 30 MFLOP
# per step, 1.09x at 121 MFLOP; the Fashion-MNIST MLP 1.55x at 1.2 GFLOP; benchmarks/README.md)
BF16_MIN_STEP_FLOPS = 1e8


@functools.lru_cache(maxsize=None)
def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 in hardware: a CUDA GPU of compute capability 8.0 or newer,
    or a CPU with AVX512-BF16 or AMX (and a torch build whose CPU autocast has bfloat16)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(probe() for probe in probes if probe is not None) and _bf16_autocast_works("cpu")
    return False


def forward_flops(model: nn.Module, example: torch.Tensor) -> int:
    """Matmul and convolution FLOPs of one forward pass of `model` on `example` (torch's FlopCounterMode),
    run in eval mode without gradients, so no batch-norm statistic or random stream moves."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(example)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def resolve_precision(precision: str, device: str | torch.device, step_flops: float | None = None) -> str:
    """The precision that `precision` stands for on `device`: itself, unless it is "auto".

    "auto" is bf16 when the device computes bfloat16 natively (`native_bf16`) and one step
    does at least BF16_MIN_STEP_FLOPS matmul FLOPs (`step_flops`, where known); else fp32.
    """
    if precision != "auto":
        return precision
    if not native_bf16(torch.device(device)):
        return "fp32"
    return "bf16" if step_flops is None or step_flops >= BF16_MIN_STEP_FLOPS else "fp32"


def training_precision(precision: str, device: str | torch.device, model: nn.Module, example: torch.Tensor,
                       batch_size: int) -> str:
    """`precision` for training `model` in batches of `batch_size`; "auto" counts a step as 3 x (forward and
    backward) the forward FLOPs of one `example` x batch_size."""
    if precision != "auto" or not native_bf16(torch.device(device)):
        return resolve_precision(precision, device)
    return resolve_precision(precision, device, 3 * batch_size * forward_flops(model, example[:1].to(device)))


def autocast_dtype(precision: str, device: str | torch.device) -> torch.dtype | None:
    """The autocast dtype of `precision` on `device`, None for fp32; ConfigError where it cannot run."""
    if precision not in PRECISION_CHOICES:
        raise ConfigError(f"precision = {precision!r} is not one of {', '.join(PRECISION_CHOICES)}")
    precision = resolve_precision(precision, device)
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
