"""Shared fixtures: tiny synthetic data, a tiny run stopped after its clusters, torch's thread count."""
from pathlib import Path

import pytest
import torch

from ensemble_kd.pipeline import run_pipeline, start_run

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


@pytest.fixture(autouse=True, scope="module")
def restore_torch_threads():
    """`threads=1` runs set torch's thread count for the process; give later test modules theirs back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def clustered_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run with a trained generalist and clusters.json, no specialists yet."""
    from test_pipeline import tiny_config

    cfg = tiny_config()
    run_dir = start_run(cfg, tmp_path_factory.mktemp("clustered") / "run")
    run_pipeline(cfg, run_dir, until="clusters", progress=False)
    return run_dir
