"""Backbones by name from torchvision and timm, with pretrained weights from the library or a local file.

`model.arch = "torchvision"` builds `torchvision.models.get_model(model.name)`;
`model.arch = "timm"` builds `timm.create_model(model.name)` (the timm extra). Either
way the library's classifier is removed and the backbone returns pooled features, to
which models.py adds its own dropout and head (so specialists get their |S| + 1 outputs
and students their classes as with every other architecture).

`model.pretrained`: false (fresh weights), true (the library's own download, which needs
network) or the path of a local weights file. A torchvision file is a state dict of that
model (as `torch.save(model.state_dict())` writes it, or {"state_dict": ...}); a timm file
is anything timm's own loader reads (.pth, .bin, .safetensors). The old classifier's
weights are dropped, every other weight must fit, or the error names the file. Inputs of
other than 3 channels: timm adapts its first convolution (`in_chans`); for torchvision it
is replaced, its pretrained filters summed over RGB for greyscale (said in the log).

The weights' own configuration (`weights_config`: torchvision's weights enum, timm's
pretrained_cfg) gives the input size (`data_config`: images are resized to it when
`data.image_size = 0`) and the normalisation (`model.normalize = "auto"`).
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from .choices import NAMED_ARCHITECTURES
from .config import ConfigError, DataConfig, ModelConfig
from .errors import MissingExtraError

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger(__name__)

TIMM_EXTRA = "pip install 'ensemble-kd[timm]'"


@dataclass
class WeightsConfig:
    """What a library's pretrained weights of a model expect of their inputs."""

    input_size: int  # square side the weights were trained at (pixels)
    mean: list[float]  # RGB normalisation
    std: list[float]


def _torchvision_models() -> Any:
    import torchvision.models  # start-up time: about a second to import (as in data.py); only named backbones need it

    return torchvision.models


def _timm(key: str = "model") -> Any:
    try:
        import timm  # the timm extra: imported only for model.arch = "timm"
    except ImportError as err:
        raise MissingExtraError(f"{key}.arch = 'timm' needs the timm extra: {TIMM_EXTRA}") from err
    return timm


# ---------------------------------------------------------------- names and the weights' configuration

def check_name(cfg: ModelConfig, key: str) -> None:
    """ConfigError (naming `key`, e.g. "generalist.model", and close matches) unless the library has cfg.name."""
    if cfg.arch == "torchvision":
        models = _torchvision_models()
        known = models.list_models(module=models)  # classification models only
        ok = cfg.name in known
    else:
        timm = _timm(key)
        ok, known = timm.is_model(cfg.name), timm.list_models()
    if not ok:
        close = difflib.get_close_matches(cfg.name, known, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see the library's list of models"
        raise ConfigError(f"{key}.name = {cfg.name!r} is not a {cfg.arch} classification model; {hint}")


def check_pretrained(cfg: ModelConfig, key: str) -> None:
    """ConfigError naming `key` when model.pretrained is a path with no file there."""
    if isinstance(cfg.pretrained, str) and not Path(cfg.pretrained).expanduser().is_file():
        raise ConfigError(f"{key}.pretrained = {cfg.pretrained!r} is not a file; give the path of a weights file, "
                          "true (the library's own download) or false")


def weights_config(cfg: ModelConfig) -> WeightsConfig:
    """The input size and normalisation of the library's (default) pretrained weights of cfg.name."""
    if cfg.arch == "torchvision":
        try:
            transforms = _torchvision_models().get_model_weights(cfg.name).DEFAULT.transforms()
        except (ValueError, KeyError, AttributeError) as err:  # a model without published weights
            raise ConfigError(f"torchvision has no pretrained weights of {cfg.name} to take the input size and "
                              f"normalisation from ({err}); set model.normalize = 'data'") from err
        return WeightsConfig(int(transforms.crop_size[0]), list(transforms.mean), list(transforms.std))
    pretrained_cfg = _timm().get_pretrained_cfg(cfg.name)
    if pretrained_cfg is None:
        raise ConfigError(f"timm has no pretrained configuration of {cfg.name}; set model.normalize = 'data'")
    return WeightsConfig(int(pretrained_cfg.input_size[-1]), list(pretrained_cfg.mean), list(pretrained_cfg.std))


def uses_weights_normalization(cfg: ModelConfig) -> bool:
    return cfg.arch in NAMED_ARCHITECTURES and (cfg.normalize == "weights"
                                                or (cfg.normalize == "auto" and cfg.pretrained is not False))


def normalization(cfg: ModelConfig, channels: int, mean: Sequence[float],
                  std: Sequence[float]) -> tuple[list[float], list[float]]:
    """The (mean, std) a model of `cfg` normalises its inputs with: the weights' (`model.normalize`
    auto with pretrained weights, or weights; averaged over RGB for greyscale), else the given data's."""
    if not uses_weights_normalization(cfg):
        return list(mean), list(std)
    weights = weights_config(cfg)
    if channels == len(weights.mean):
        return weights.mean, weights.std
    return [sum(weights.mean) / len(weights.mean)] * channels, [sum(weights.std) / len(weights.std)] * channels


def data_config(cfg: Config) -> DataConfig:
    """The data settings every stage of the run loads with: `data`, with `image_size` set to the input size
    of the generalist's pretrained weights when it is 0 (the config's own size wins)."""
    model = cfg.generalist.model
    if cfg.data.image_size > 0 or model.arch not in NAMED_ARCHITECTURES or model.pretrained is False:
        return cfg.data
    return dataclasses.replace(cfg.data, image_size=weights_config(model).input_size)


# ---------------------------------------------------------------- building

def torchvision_features(cfg: ModelConfig, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    """torchvision's cfg.name without its classifier (pretrained as cfg.pretrained says): (features, width)."""
    weights = "DEFAULT" if cfg.pretrained is True else None
    try:
        model = _torchvision_models().get_model(cfg.name, weights=weights)
    except Exception as err:  # no network, a broken download, an unknown name
        raise ConfigError(f"torchvision could not build {cfg.name} with pretrained = {cfg.pretrained!r} "
                          f"({type(err).__name__}: {err}); without network, download the weights elsewhere and "
                          "set model.pretrained to the file's path") from err
    head = _drop_classifier(model, cfg.name)
    if isinstance(cfg.pretrained, str):
        _load_torchvision_file(model, Path(cfg.pretrained).expanduser(), head)
    _adapt_first_conv(model, input_shape[0], cfg)
    return model, _width(model, input_shape, cfg)


def _drop_classifier(model: nn.Module, name: str) -> str:
    """Replace the model's last linear layer (its classifier) by an identity; returns that layer's name."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"torchvision {name} has no linear classifier to replace; choose another model.name")
    parent, _, child = linears[-1].rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
    return linears[-1]


def _load_torchvision_file(model: nn.Module, path: Path, head: str) -> None:
    """Load a state dict file into `model` (whose classifier `head` is gone): every other weight must fit."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds on a foreign or truncated file
        raise ConfigError(f"model.pretrained = {str(path)!r} is not a weights file torch can read "
                          f"({type(err).__name__}: {err})") from err
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ConfigError(f"model.pretrained = {str(path)!r} holds no state dict; save one with "
                          "torch.save(model.state_dict(), path)")
    kept = {k: v for k, v in state.items() if not k.startswith(head + ".")}
    try:
        model.load_state_dict(kept, strict=True)
    except RuntimeError as err:
        raise ConfigError(f"the weights in {path} do not fit this model ({str(err).splitlines()[0]}...); give a "
                          "state dict of the same model.name") from err
    log.info("loaded pretrained weights from %s (%d tensors; its classifier replaced)", path, len(kept))


def _adapt_first_conv(model: nn.Module, channels: int, cfg: ModelConfig) -> None:
    """Give the first 3-channel convolution `channels` inputs (greyscale: its RGB filters summed)."""
    if channels == 3:
        return
    name = next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3), None)
    if name is None:
        return
    old: nn.Conv2d = model.get_submodule(name)
    new = nn.Conv2d(channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation, old.groups,
                    old.bias is not None, old.padding_mode)
    pretrained = cfg.pretrained is not False
    if pretrained:
        with torch.no_grad():
            summed = old.weight.sum(1, keepdim=True)  # what a grey pixel (r = g = b) saw through the RGB filters
            new.weight.copy_(summed.repeat(1, channels, 1, 1) / channels)
            if old.bias is not None:
                new.bias.copy_(old.bias)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    log.info("torchvision %s: first convolution (%s) takes %d input channel%s%s", cfg.name, name, channels,
             "s" if channels > 1 else "", ", its pretrained RGB filters summed" if pretrained else "")


def timm_features(cfg: ModelConfig, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    """timm's cfg.name without its classifier (num_classes = 0), pretrained as cfg.pretrained says."""
    timm = _timm()
    options: dict[str, Any] = {"pretrained": cfg.pretrained is not False, "num_classes": 0,
                               "in_chans": input_shape[0]}
    if isinstance(cfg.pretrained, str):
        options["pretrained_cfg_overlay"] = {"file": str(Path(cfg.pretrained).expanduser())}
    try:
        model = timm.create_model(cfg.name, **options)
    except Exception as err:  # no network, a foreign file, weights that do not fit
        raise ConfigError(f"timm could not build {cfg.name} with pretrained = {cfg.pretrained!r} "
                          f"({type(err).__name__}: {str(err)[:300]}); give a weights file of that model, or without "
                          "network download them elsewhere and set model.pretrained to the file's path") from err
    if isinstance(cfg.pretrained, str):
        log.info("loaded pretrained weights from %s into timm %s", cfg.pretrained, cfg.name)
    return model, _width(model, input_shape, cfg)


def _width(features: nn.Module, input_shape: tuple[int, ...], cfg: ModelConfig) -> int:
    """The number of features the backbone returns for one input (one forward pass in eval mode)."""
    was_training = features.training
    try:
        with torch.no_grad():
            out = features.eval()(torch.zeros(2, *input_shape))
    except RuntimeError as err:
        raise ConfigError(f"{cfg.arch} {cfg.name} cannot take inputs of shape {tuple(input_shape)} "
                          f"({str(err).splitlines()[0]}); set data.image_size to a larger size") from err
    finally:
        features.train(was_training)
    if out.ndim != 2:
        raise ConfigError(f"{cfg.arch} {cfg.name} returns features of shape {tuple(out.shape[1:])}, not a vector; "
                          "choose another model.name")
    return int(out.shape[1])
