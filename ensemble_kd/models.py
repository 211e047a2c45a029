"""Architectures by name: `mlp`, `cnn`, CIFAR-style `resnet`, and named `torchvision` and `timm` backbones.

Every model is a `Classifier`: input normalisation (so an exported model takes plain
[0, 1] pixels), a feature extractor, dropout and one linear `head`. Specialists and
students are built by giving a model a new head (`replace_head`). A named backbone
(backbones.py) is the library's model without its classifier, optionally with pretrained
weights, and normalises with those weights' mean and std when they are used
(`model.normalize`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import torch
from torch import nn

from .backbones import normalization, timm_features, torchvision_features
from .config import ConfigError, ModelConfig


class Normalize(nn.Module):
    """(x - mean) / std per channel, with the statistics stored in the model."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], ndim: int) -> None:
        super().__init__()
        view = (1, -1) + (1,) * (ndim - 1)  # broadcast over channels of (N, C, H, W) or features of (N, D)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(view))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(view))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """normalise -> features -> dropout -> head."""

    def __init__(self, normalize: Normalize, features: nn.Module, feature_dim: int,
                 num_classes: int, dropout: float) -> None:
        super().__init__()
        self.normalize = normalize
        self.features = features
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(self.normalize(x))))


def _mlp(cfg: ModelConfig, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for i, hidden in enumerate(cfg.hidden):
        if i > 0:
            layers.append(nn.Dropout(cfg.dropout))
        layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
        width = hidden
    return nn.Sequential(*layers), width


def _conv_bn(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def _cnn(cfg: ModelConfig, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    layers: list[nn.Module] = []
    c_in = input_shape[0]
    for c_out in cfg.channels:  # each block: two 3x3 convs, then a 2x2 max-pool
        layers += _conv_bn(c_in, c_out) + _conv_bn(c_out, c_out) + [nn.MaxPool2d(2, ceil_mode=True)]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(cfg.pool), nn.Flatten()]
    return nn.Sequential(*layers), c_in * cfg.pool**2


class BasicBlock(nn.Module):
    """The two-conv residual block of He et al. (2016), CIFAR variant."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(c_in, c_out, stride), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(c_out))
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def _resnet(cfg: ModelConfig, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    if (cfg.depth - 2) % 6 != 0 or cfg.depth < 8:
        raise ConfigError(f"resnet depth must be 6n+2 (8, 14, 20, 32, ...), got {cfg.depth}; set model.depth")
    blocks_per_stage = (cfg.depth - 2) // 6
    layers: list[nn.Module] = _conv_bn(input_shape[0], cfg.width)
    c_in = cfg.width
    for stage in range(3):
        c_out = cfg.width * 2**stage
        for b in range(blocks_per_stage):
            layers.append(BasicBlock(c_in, c_out, stride=2 if stage > 0 and b == 0 else 1))
            c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), c_in


# keyed by choices.ARCHITECTURES (tests/test_config.py checks that they match)
ARCHITECTURES: dict[str, Callable[[ModelConfig, tuple[int, ...]], tuple[nn.Module, int]]] = {
    "mlp": _mlp,
    "cnn": _cnn,
    "resnet": _resnet,
    "torchvision": torchvision_features,
    "timm": timm_features,
}


def build_model(cfg: ModelConfig, input_shape: Sequence[int], num_classes: int,
                mean: Sequence[float], std: Sequence[float], load_weights: bool = True) -> Classifier:
    """A freshly initialised classifier for inputs of `input_shape` (without the batch dim), normalising
    with `mean` and `std` (the training data's) unless its pretrained weights bring their own.

    `load_weights=False` leaves out cfg.pretrained's weights (the head is new either way): for a
    model whose state is loaded next from a run's file, or whose parameters are only counted."""
    input_shape = tuple(int(d) for d in input_shape)
    if cfg.arch not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {cfg.arch!r}; choose from {', '.join(ARCHITECTURES)}")
    if cfg.arch != "mlp" and len(input_shape) != 3:
        raise ConfigError(f"{cfg.arch} needs image inputs (channels, height, width), got shape {input_shape}; "
                         "use model.arch = 'mlp' for flat features")
    mean, std = normalization(cfg, input_shape[0], mean, std)
    features, feature_dim = ARCHITECTURES[cfg.arch](cfg if load_weights else dataclasses.replace(cfg, pretrained=False),
                                                    input_shape)
    normalize = Normalize(mean, std, ndim=len(input_shape))
    return Classifier(normalize, features, feature_dim, num_classes, cfg.dropout)


def replace_head(model: Classifier, weight: torch.Tensor, bias: torch.Tensor) -> Classifier:
    """Give `model` a new head with these rows (one per output); the rest of the model is kept."""
    head = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    model.head = head.to(model.head.weight.device)
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
