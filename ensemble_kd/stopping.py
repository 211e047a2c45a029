"""Early stopping and best-epoch selection on the validation split, kept by fit() across epochs and resumes.

`BestEpoch` follows a stage's validation accuracy after each epoch: the best so far, the
epoch it came in, how many epochs have passed without beating it, and (with
`keep_best`) a CPU copy of that epoch's weights. With `train.early_stopping_patience`
= P > 0, fit() stops once P epochs in a row have not beaten the best; with
`train.keep_best`, the stage's model.pt holds the best epoch's weights instead of the last
one's. fit() stores `state_dict()` in every checkpoint, so a stage that resumes stops at,
and keeps, the same epoch as one that never stopped. A tie is not an improvement: the
earlier epoch stays the best.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class BestEpoch:
    """The best validation accuracy of a stage so far, and what early stopping and keep_best need of it."""

    patience: int  # stop after this many epochs in a row without a better accuracy; 0 = never stop early
    keep_best: bool  # hold a copy of the best epoch's weights
    accuracy: float = -math.inf  # the best validation accuracy so far
    epoch: int = 0  # the epoch it came in (0: none yet)
    since: int = 0  # epochs finished since then
    weights: dict[str, torch.Tensor] | None = None  # keep_best: that epoch's state dict, on the CPU

    @property
    def active(self) -> bool:
        """Whether the stage uses its validation accuracy for anything beyond logging it."""
        return self.patience > 0 or self.keep_best

    def update(self, epoch: int, accuracy: float, model: nn.Module) -> None:
        """Record epoch `epoch`'s validation accuracy (and, when it is the best yet and keep_best is on,
        a copy of `model`'s weights)."""
        if accuracy > self.accuracy:
            self.accuracy, self.epoch, self.since = accuracy, epoch, 0
            if self.keep_best:
                self.weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            self.since += 1

    def out_of_patience(self) -> bool:
        return self.patience > 0 and self.since >= self.patience

    def restore(self, model: nn.Module) -> bool:
        """Load the best epoch's weights into `model` (keep_best); False when there are none to load."""
        if not self.keep_best or self.weights is None:
            return False
        model.load_state_dict(self.weights)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "epoch": self.epoch, "since": self.since, "weights": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accuracy, self.epoch, self.since = float(state["accuracy"]), int(state["epoch"]), int(state["since"])
        self.weights = state.get("weights")
