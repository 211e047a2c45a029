"""Shared fixtures: a tiny synthetic data set that trains in well under a second."""
import pytest
import torch

from ensemble_kd.train import TrainSet

BLOB_CENTRES = [[-3.0, 0.0], [3.0, 0.0], [0.0, 4.0]]


def make_blobs(n: int = 200, seed: int = 0) -> TrainSet:
    """`n` 2-D points around three well-separated centres; label i % 3 for row i."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % len(BLOB_CENTRES)
    x = torch.tensor(BLOB_CENTRES)[y] + 0.5 * torch.randn(n, 2, generator=generator)
    return TrainSet(x, y)


@pytest.fixture
def blobs() -> TrainSet:
    return make_blobs()
