"""Stage 1: the generalist, one classifier over all classes."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from . import artifacts
from .augment import augment_fingerprint, make_augment
from .config import Config, ModelConfig, fingerprint_settings
from .data import Splits
from .models import Classifier, build_model
from .train import FitOptions, TrainSet, fit, load_finished, resolve_device, set_seed

log = logging.getLogger(__name__)


def model_fingerprint(model_cfg: ModelConfig, data: Splits, seed: int, **extra: Any) -> dict[str, Any]:
    """What a saved model must agree on to be reused by this run."""
    return {"arch": fingerprint_settings(model_cfg), "num_classes": data.num_classes,
            "input_shape": list(data.input_shape), "data": data.fingerprint(), "seed": seed, **extra}


def generalist_fingerprint(cfg: Config, data: Splits) -> dict[str, Any]:
    return model_fingerprint(cfg.generalist.model, data, cfg.seed, train=fingerprint_settings(cfg.generalist.train),
                             **augment_fingerprint(cfg.data))


def new_generalist(cfg: Config, data: Splits, load_weights: bool = True) -> Classifier:
    """The generalist before training (with generalist.model.pretrained's weights unless `load_weights` is False)."""
    set_seed(cfg.seed)
    return build_model(cfg.generalist.model, data.input_shape, data.num_classes, data.mean, data.std, load_weights)


def train_generalist(cfg: Config, data: Splits, run_dir: str | Path, progress: bool = True) -> Path:
    """Train (or resume, or reuse) the generalist; returns the path of its model file."""
    stage_dir = Path(run_dir) / artifacts.GENERALIST_DIR
    model = new_generalist(cfg, data)
    fit(model, TrainSet(data.x_train, data.y_train), cfg.generalist.train, stage_dir, FitOptions(
        stage="generalist", seed=cfg.seed, fingerprint=generalist_fingerprint(cfg, data),
        augment=make_augment(cfg.data, data.input_shape, data.num_classes), val=TrainSet(data.x_val, data.y_val),
        device=resolve_device(cfg.device), progress=progress, precision=cfg.precision, compile_model=cfg.compile,
        tensorboard=cfg.log.tensorboard, lr_setting="generalist.train.lr", clip_setting="generalist.train.grad_clip"))
    return stage_dir / artifacts.MODEL_FILE


def load_generalist(cfg: Config, data: Splits, run_dir: str | Path) -> Classifier:
    """The trained generalist of this run, in eval mode; an error if it has not been trained."""
    path = Path(run_dir) / artifacts.GENERALIST_DIR
    model = new_generalist(cfg, data, load_weights=False)
    fingerprint = dict(generalist_fingerprint(cfg, data), stage="generalist")
    if not load_finished(model, path, fingerprint):
        raise artifacts.ArtifactError(f"no trained generalist in {path}; run `ensemble-kd run` first")
    return model.eval()
