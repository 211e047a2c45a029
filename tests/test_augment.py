"""augment.py: torchvision's per-image policies and MixUp / CutMix, as make_augment builds them from the config."""
from __future__ import annotations

import pytest
import torch

from ensemble_kd.augment import make_augment
from ensemble_kd.config import DataConfig
from ensemble_kd.streaming import ImageLoader

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (3, 16, 16)


def images(n: int = 8) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(0))


def test_nothing_asked_builds_no_augmentation() -> None:
    assert make_augment(DataConfig(), SHAPE, 10) is None


@pytest.mark.parametrize("setting", [{"random_resized_crop": 0.3}, {"auto_augment": "randaugment"},
                                     {"auto_augment": "trivialaugment"}])
def test_a_per_image_policy_changes_images_the_same_way_under_the_same_epoch_seed(setting: dict) -> None:
    augment = make_augment(DataConfig(**setting), SHAPE, 10)
    assert augment.batch is None and augment.mix is None
    x = images()
    loader = ImageLoader(x, augment.image, workers=0)
    order = [torch.arange(len(x))]
    first, again, other = (next(iter(loader.epoch(order, seed))) for seed in (0, 0, 1))
    assert first.shape == x.shape and first.dtype == torch.float32
    assert 0 <= first.min() and first.max() <= 1
    assert torch.equal(first, again) and not torch.equal(first, other) and not torch.equal(first, x)


def _shares(labels: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each mixed label's share of the image's own class."""
    return labels[torch.arange(len(y)), y]


def test_mixup_blends_each_image_with_its_neighbour_by_the_share_its_label_gives_it() -> None:
    x, y = images(), torch.arange(8) % 3
    mixed, labels = make_augment(DataConfig(mix="mixup", mix_alpha=0.4), SHAPE, 3).mix(x, y, 7)
    assert labels.shape == (8, 3) and torch.allclose(labels.sum(1), torch.ones(8))
    share = _shares(labels, y)[:, None, None, None]  # y[i] != y[i - 1]: the rest is the neighbour's class
    torch.testing.assert_close(mixed, share * x + (1 - share) * x.roll(1, 0))
    assert (share < 1).all()


def test_cutmix_pastes_a_box_of_the_neighbour_whose_area_its_label_gives_it() -> None:
    x, y = images(), torch.arange(8) % 3
    mixed, labels = make_augment(DataConfig(mix="cutmix"), SHAPE, 3).mix(x, y, 7)
    own = (mixed == x).all(1)  # (N, H, W): pixels kept from the image itself
    assert torch.equal(own | (mixed == x.roll(1, 0)).all(1), torch.ones_like(own))
    torch.testing.assert_close(_shares(labels, y), own.flatten(1).float().mean(1))
    assert not own.all()


def test_mixup_cutmix_draws_either_and_the_same_one_under_the_same_seed() -> None:
    x, y = images(), torch.arange(8) % 3
    mix = make_augment(DataConfig(mix="mixup_cutmix"), SHAPE, 3).mix
    pasted = []
    for seed in range(12):
        mixed, labels = mix(x, y, seed)
        again, labels_again = mix(x, y, seed)
        assert torch.equal(mixed, again) and torch.equal(labels, labels_again)
        pasted.append(bool(((mixed == x) | (mixed == x.roll(1, 0))).all()))
    assert any(pasted) and not all(pasted)
