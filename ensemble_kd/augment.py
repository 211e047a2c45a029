"""The random augmentation of training batches, built from the data settings.

Three parts, each off by default, applied in this order:

- per image (`data.random_resized_crop`, `data.auto_augment`): torchvision.transforms.v2's
  RandomResizedCrop (back to the image's own size) and RandAugment or TrivialAugmentWide,
  applied to each image as it is read (`streaming.ImageLoader`, in `data.workers` processes)
  under a seed of its own position in the epoch;
- batched (`data.flip`, `data.crop_pad`): flips and padded crops of a whole batch on its
  device (`data.augment_batch`), drawn from fit()'s per-epoch generator;
- mixing (`data.mix`): v2's MixUp or CutMix of each batch; its labels become mixed class
  probabilities (of the stage's own classes: a specialist's |S| + 1).

The generalist and the specialists train with all of them; the students only with
`student.transfer = "live"` (the teacher then labels the augmented, mixed batch). Fixed
views (`"views"`) are flips and crops only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .config import NEUTRAL_SETTINGS, DataConfig
from .data import augment_batch

# batched(x, generator) -> augmented batch; per_image(image) -> augmented image; mix(x, labels, seed) -> (x, labels)
BatchFn = Callable[[Tensor, torch.Generator], Tensor]
ImageFn = Callable[[Tensor], Tensor]
MixFn = Callable[[Tensor, Tensor, int], "tuple[Tensor, Tensor]"]

AUGMENT_SETTINGS = ("flip", "crop_pad", "random_resized_crop", "auto_augment", "mix", "mix_alpha")  # of DataConfig


@dataclass
class Augmentation:
    """What fit() does to each training batch at random (see the module docstring)."""

    batch: BatchFn | None = None  # flips and padded crops of the whole batch
    image: ImageFn | None = None  # each image as it is read, under its own seed
    mix: MixFn | None = None  # MixUp / CutMix of the batch and its labels
    workers: int = 0  # loader processes that apply `image` to images held in memory (data.workers)


def make_augment(cfg: DataConfig, input_shape: Sequence[int], num_classes: int) -> Augmentation | None:
    """The augmentation `cfg` asks for, for examples of `input_shape` labelled with `num_classes` classes;
    None when it asks for none."""
    batch = None
    if cfg.flip or cfg.crop_pad > 0:
        batch = lambda x, gen: augment_batch(x, cfg.flip, cfg.crop_pad, gen)  # noqa: E731
    image = _image_transform(cfg, input_shape) if cfg.random_resized_crop > 0 or cfg.auto_augment != "none" else None
    mix = _Mix(cfg.mix, cfg.mix_alpha, num_classes) if cfg.mix != "none" else None
    if batch is None and image is None and mix is None:
        return None
    return Augmentation(batch, image, mix, cfg.workers)


def augment_fingerprint(cfg: DataConfig) -> dict[str, Any]:
    """The augmentation settings a trained model depends on: flip and crop_pad, and the others where they
    are on (so models trained before they existed keep their fingerprints)."""
    settings = {name: getattr(cfg, name) for name in AUGMENT_SETTINGS}
    if cfg.mix == "none":
        del settings["mix_alpha"]
    return {k: v for k, v in settings.items() if k not in NEUTRAL_SETTINGS or v != NEUTRAL_SETTINGS[k]}


def _image_transform(cfg: DataConfig, input_shape: Sequence[int]) -> ImageFn:
    import torchvision.transforms.v2 as v2  # start-up time: about a second to import, and only these settings need it

    if len(input_shape) != 3:
        raise ValueError(f"per-image augmentation needs images (C, H, W), not inputs of shape {tuple(input_shape)}")
    steps = []
    if cfg.random_resized_crop > 0:
        steps.append(v2.RandomResizedCrop(tuple(input_shape[1:]), scale=(cfg.random_resized_crop, 1.0),
                                          antialias=True))
    policies = {"randaugment": v2.RandAugment, "trivialaugment": v2.TrivialAugmentWide}
    if cfg.auto_augment in policies:
        steps.append(policies[cfg.auto_augment]())
    return v2.Compose(steps)


class _Mix:
    """MixUp, CutMix or either at random (torchvision.transforms.v2) of a batch and its class ids, drawn
    under `seed` (the caller's random stream is left as it was)."""

    def __init__(self, kind: str, alpha: float, num_classes: int) -> None:
        import torchvision.transforms.v2 as v2  # start-up time, as in _image_transform

        mixes = {"mixup": v2.MixUp(alpha=alpha, num_classes=num_classes),
                 "cutmix": v2.CutMix(alpha=alpha, num_classes=num_classes)}
        self.mix = mixes[kind] if kind in mixes else v2.RandomChoice(list(mixes.values()))

    def __call__(self, x: Tensor, labels: Tensor, seed: int) -> tuple[Tensor, Tensor]:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # v2 draws the weight and the box on the CPU
            return self.mix(x, labels)
