"""Shared fixtures and helpers: the tiny synthetic run (built once per session), small models, torch's threads.

Test modules import the helpers with `from conftest import ...`; no test module imports another.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from ensemble_kd import artifacts
from ensemble_kd.cli import main
from ensemble_kd.config import Config, ModelConfig, load_config, to_toml
from ensemble_kd.export import StudentMeta
from ensemble_kd.models import build_model
from ensemble_kd.pipeline import run_pipeline, start_run
from ensemble_kd.train import TrainSet

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- the tiny run

TINY = [  # 6 synthetic classes in 2 planted groups, two specialists, seconds per stage; one thread is
    # fastest for such tiny layers (and not slowed down by whatever else runs on the machine)
    "threads=1", "data.name=synthetic", "data.synthetic_classes=6", "data.synthetic_groups=2",
    "data.synthetic_per_class=40", "data.synthetic_dim=8", "generalist.model.hidden=[16]",
    "generalist.train.epochs=3", "generalist.train.batch_size=32", "clusters.k=2", "specialists.train.epochs=2",
    "specialists.soft_epochs=1", "specialists.train.batch_size=32", "specialists.n_jobs=1",
    "student.model.hidden=[8]", "student.train.epochs=3", "student.train.batch_size=32",
    "export.formats=[\"torchscript\",\"state_dict\"]",
]
N_TEST_PER_CLASS = 20  # synthetic: half of synthetic_per_class
STUDENTS = artifacts.STUDENT_DIRS
MODELS = ("generalist", "ensemble", *STUDENTS)


def tiny_config(*overrides: str) -> Config:
    return load_config(None, [*TINY, *overrides])


def full_run(run_dir: Path, *overrides: str) -> tuple[Path, dict]:
    """A whole tiny run (specialists one at a time, in this process) in `run_dir`: (run directory, report)."""
    cfg = tiny_config(*overrides)
    run_dir = start_run(cfg, run_dir)
    return run_dir, run_pipeline(cfg, run_dir, progress=False)


SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # for tests that start the CLI


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny config (`tiny_config()`) written as a TOML file."""
    path = tmp_path_factory.mktemp("config") / "tiny.toml"
    path.write_text(to_toml(tiny_config()))
    return path


def cli(*argv: str) -> tuple[int, str]:
    """`ensemble-kd ARGV` in this process: (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, err.getvalue()


def run_cli(config_file: Path, out: Path, *extra: str) -> tuple[int, str]:
    """`ensemble-kd run --config CONFIG_FILE --out OUT --quiet EXTRA...`: (exit code, stderr)."""
    return cli("run", "--config", str(config_file), "--out", str(out), "--quiet", *extra)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), f"{a} != {b}"


def until_clusters(run_dir: Path, into: Path) -> Path:
    """A copy of the finished `run_dir` in `into`, as `run --until clusters` leaves one: generalist and clusters."""
    into.parent.mkdir(parents=True, exist_ok=True)
    copy = Path(shutil.copytree(run_dir, into))
    for name in (artifacts.SPECIALISTS_DIR, artifacts.EXPORT_DIR, *STUDENTS):
        shutil.rmtree(copy / name)
    for name in (artifacts.REPORT_JSON, artifacts.REPORT_MD, "accuracy_vs_size.png"):
        (copy / name).unlink()
    return copy


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The finished tiny run every test may read (never write): (run directory, returned report).
    Tests that change a run work on a copy."""
    threads = torch.get_num_threads()
    try:
        return full_run(tmp_path_factory.mktemp("tiny") / "run")
    finally:
        torch.set_num_threads(threads)  # the run's threads=1 must not slow the tests that come after


@pytest.fixture(scope="session")
def clustered_run(tiny_run: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run with a trained generalist and clusters.json, no specialists yet (read only: copy it)."""
    return until_clusters(tiny_run[0], tmp_path_factory.mktemp("clustered") / "run")


@pytest.fixture(autouse=True, scope="module")
def restore_torch_threads():
    """`threads=1` runs set torch's thread count for the process; give later test modules theirs back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """The models are tiny: one thread avoids thread contention on a busy 2-core machine (restored after).
    A module takes it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- small data and models

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


UPRIGHT = np.array([[250, 10, 10, 10], [250, 90, 10, 10], [250, 10, 10, 170]], dtype=np.uint8)  # 4 wide, 3 high


def write_sideways(path: Path, upright: np.ndarray = UPRIGHT) -> None:
    """Stored turned a quarter left, with the EXIF orientation (6) that says to turn it back, as phones do."""
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(path, exif=exif.tobytes())


def write_digits_folder(root: Path) -> Path:
    """scikit-learn's 8x8 digits as an image folder of greyscale PNGs, root/{train,test}/<digit>/<n>.png, split
    as data.name = "digits" splits them (a fixed stratified 25% test set); pixels 0-16 scaled to 0-255."""
    digits = load_digits()
    pixels = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    train, test = train_test_split(np.arange(len(pixels)), test_size=0.25, stratify=digits.target, random_state=0)
    for split, indices in (("train", train), ("test", test)):
        for i in indices:
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[i]).save(folder / f"{i:04d}.png")
    return root


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits as an image folder (`write_digits_folder`), written once per session: read only."""
    return write_digits_folder(tmp_path_factory.mktemp("digits-folder") / "digits")


IMAGE_SHAPE = [1, 8, 8]
FLAT_SHAPE = [10]
CLASS_NAMES = ["zero", "one", "two", "three"]
ARCHS = {  # name -> (model config, input shape)
    "mlp": (ModelConfig(arch="mlp", hidden=[16], dropout=0.5), IMAGE_SHAPE),
    "cnn": (ModelConfig(arch="cnn", channels=[4], dropout=0.5), IMAGE_SHAPE),
    "mlp_flat": (ModelConfig(arch="mlp", hidden=[16], dropout=0.5), FLAT_SHAPE),
}


def make_model(arch: str) -> tuple[torch.nn.Module, StudentMeta]:
    """A small model (ARCHS) in train mode whose BatchNorm statistics have moved (so eval != train), and its
    export metadata."""
    torch.manual_seed(0)
    cfg, shape = ARCHS[arch]
    mean, std = [0.3] * shape[0], [0.2] * shape[0]  # per channel, or per feature of flat inputs
    model = build_model(cfg, shape, len(CLASS_NAMES), mean, std)
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(16, *shape))  # train-mode passes update BatchNorm running stats
    meta = StudentMeta(class_names=CLASS_NAMES, input_shape=list(shape), model_config=vars(cfg).copy(),
                       mean=mean, std=std, config={"seed": 0, "student": {"temperature": 4.0}},
                       data_fingerprint="abc123")
    return model, meta
