"""Batched prediction, used by every stage: a model's logits, probabilities and accuracy on a split's inputs.

Every function runs the model in eval mode without gradients, in batches, on `device`
(optionally under autocast, `precision`), and returns float32 results on the CPU; a model
that was training is put back in training mode afterwards. The inputs are a tensor, or
image files read from disk batch by batch (`streaming.ImageFiles`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .precision import autocast, resolve_precision
from .streaming import Inputs, batches


@dataclass
class EvalResult:
    accuracy: float  # fraction correct (NaN for no examples)
    logits: torch.Tensor  # (N, C) float32 on CPU


def inference_precision(model: nn.Module, precision: str, device: str | torch.device, batch_size: int) -> str:
    """`precision` for running `model` on batches of `batch_size` without gradients.

    "auto" is decided without running the model: 2 x its parameters x the batch is a lower
    bound of a batch's matmul FLOPs (each weight is used at least once per example)."""
    if precision != "auto":
        return precision
    params = sum(p.numel() for p in model.parameters())
    return resolve_precision(precision, device, 2 * params * batch_size)


@torch.no_grad()
def predict_logits(model: nn.Module, x: Inputs, batch_size: int = 1024,
                   device: str | torch.device = "cpu", precision: str = "fp32") -> torch.Tensor:
    """The model's logits for every row of `x`, in eval mode, as float32 on CPU."""
    was_training = model.training
    model.eval()
    with autocast(inference_precision(model, precision, device, min(batch_size, len(x))), device):
        outputs = [model(chunk.to(device)).float().cpu() for chunk in batches(x, batch_size)]
    model.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty(0)


def predict_probs(model: nn.Module, x: Inputs, batch_size: int = 1024,
                  device: str | torch.device = "cpu", precision: str = "fp32") -> torch.Tensor:
    """softmax of `predict_logits`: (N, C) class probabilities, float32 on CPU."""
    return torch.softmax(predict_logits(model, x, batch_size, device, precision), dim=1)


def evaluate(model: nn.Module, x: Inputs, y: torch.Tensor, batch_size: int = 1024,
             device: str | torch.device = "cpu") -> EvalResult:
    """Accuracy and logits of `model` on (x, y)."""
    logits = predict_logits(model, x, batch_size, device)
    accuracy = float((logits.argmax(1) == y).double().mean()) if len(y) else float("nan")
    return EvalResult(accuracy, logits)
