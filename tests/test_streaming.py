"""Data streamed from disk (data.storage = "stream"): the same splits, batches and teachers as in memory.
(A whole streamed run against an in-memory one: test_pipeline.py, beside the other determinism test.)"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from conftest import UPRIGHT, assert_same_weights, write_sideways
from PIL import Image

from ensemble_kd import artifacts, distill
from ensemble_kd.augment import make_augment
from ensemble_kd.config import DataConfig, ModelConfig, TrainConfig, load_config
from ensemble_kd.data import DataError, Splits, load_data
from ensemble_kd.distill import new_student
from ensemble_kd.models import build_model
from ensemble_kd.streaming import ImageFiles, head
from ensemble_kd.train import FitOptions, TrainSet, cross_entropy, fit, set_seed

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One image cache (tensors, scans) for the module's runs."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("cache")
        patch.setenv("ENSEMBLE_KD_CACHE", str(folder))
        yield folder


def digits(folder: Path, storage: str) -> Splits:
    """The digits image folder, decoded into memory or streamed (read in this process)."""
    return load_data(DataConfig(name="imagefolder", root=str(folder), storage=storage, workers=0), 0)


def test_streamed_splits_hold_the_in_memory_values_statistics_and_fingerprint(digits_folder: Path,
                                                                              cache: Path) -> None:
    memory, stream = digits(digits_folder, "memory"), digits(digits_folder, "stream")
    assert isinstance(stream.x_train, ImageFiles) and stream.input_shape == memory.input_shape == (1, 8, 8)
    for split in ("train", "val", "test"):
        streamed = getattr(stream, f"x_{split}")
        assert torch.equal(head(streamed, len(streamed)), getattr(memory, f"x_{split}"))
        assert torch.equal(getattr(stream, f"y_{split}"), getattr(memory, f"y_{split}"))
    assert stream.mean == pytest.approx(memory.mean, rel=1e-12) and stream.std == pytest.approx(memory.std, rel=1e-12)
    assert stream.fingerprint() == memory.fingerprint()  # storage is a runtime setting: models are reused


@pytest.mark.parametrize("transfer", ["dataset", "views", "live"])
def test_a_student_streamed_learns_from_the_same_teacher_targets(digits_folder: Path, cache: Path, tmp_path: Path,
                                                                 transfer: str) -> None:
    cfg = load_config(None, ["student.model.hidden=[8]", "student.train.epochs=2", "student.views=2",
                             "data.flip=true", "data.crop_pad=1", f"student.transfer={transfer}"])
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    rows = []
    teacher.register_forward_hook(lambda module, inputs, output: rows.append(len(inputs[0])))
    for storage in ("memory", "stream"):
        data = digits(digits_folder, storage)
        rows.clear()
        distill.distill(new_student(cfg, data), teacher, data, cfg, tmp_path / storage, {"test": 1}, alpha=0.5,
                        progress=False)
        n = len(data.y_train)
        assert sum(rows) == {"dataset": n, "views": 2 * n, "live": 2 * n}[transfer]  # each image once, or live
    if transfer != "live":  # cached per image (per view), in the students' order of the images
        logits = [artifacts.load_torch(tmp_path / s / artifacts.TEACHER_LOGITS_FILE)["logits"]
                  for s in ("memory", "stream")]
        assert torch.equal(*logits)
    assert_same_weights(tmp_path / "memory" / artifacts.MODEL_FILE, tmp_path / "stream" / artifacts.MODEL_FILE)


class Crash(Exception):
    pass


def crashing_loss(at: int):
    """Cross-entropy that raises Crash on its `at`-th call."""
    calls, base = [], cross_entropy()

    def loss(logits, labels, targets):
        calls.append(1)
        if len(calls) == at:
            raise Crash
        return base(logits, labels, targets)
    return loss


def test_a_streamed_fit_resumed_after_a_crash_trains_on_the_batches_of_an_uninterrupted_in_memory_fit(
        digits_folder: Path, cache: Path, tmp_path: Path) -> None:
    memory, stream = digits(digits_folder, "memory"), digits(digits_folder, "stream")
    files = dataclasses.replace(stream.x_train, workers=2)  # read by two worker processes
    cfg = TrainConfig(epochs=2, batch_size=256, lr=0.01)  # 1,212 training images: 5 steps per epoch
    augment = make_augment(DataConfig(flip=True, crop_pad=1, random_resized_crop=0.5, workers=0), (1, 8, 8), 10)

    def trained(x, stage: str, loss_fn=None) -> torch.nn.Module:
        set_seed(0)
        model = build_model(ModelConfig(hidden=[16], dropout=0.1), (1, 8, 8), 10, memory.mean, memory.std)
        return fit(model, TrainSet(x, memory.y_train), cfg, tmp_path / stage, FitOptions(
            stage=stage, seed=0, augment=augment, loss_fn=loss_fn, progress=False))

    reference = trained(memory.x_train, "memory")  # each image cropped in this process
    with pytest.raises(Crash):  # in epoch 2: the run resumes from epoch 1's checkpoint
        trained(files, "stream", crashing_loss(at=5 + 2))
    assert len(artifacts.read_jsonl(tmp_path / "stream" / artifacts.METRICS_FILE)) == 1
    resumed = trained(files, "stream")
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()))


def _odd_folder(root: Path) -> Path:
    """Images that reading changes: sideways phone photos (EXIF), 16-bit greyscale, RGBA among them."""
    for split, count in (("train", 6), ("test", 2)):
        for i in range(count):
            write_sideways(root / split / "cat" / f"{i}.png", UPRIGHT + i)
            deep = root / split / "deep" / f"{i}.png"
            deep.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((3, 4), 257 * (20 + i), dtype=np.uint16)).save(deep)
            glass = root / split / "glass" / f"{i}.png"
            glass.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGBA", (4, 3), (10 * i, 20, 30, 0)).save(glass)
    return root


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ensemble_kd.imagefolder" and "images in" in
            r.getMessage()]


def test_streamed_files_are_read_and_described_as_in_memory(tmp_path: Path, cache: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    root = _odd_folder(tmp_path / "odd")
    said = {}
    for storage in ("memory", "stream", "stream"):  # the second stream load reads its scan from the cache
        caplog.clear()
        with caplog.at_level("INFO"):
            said[storage] = (load_data(DataConfig(name="imagefolder", root=str(root), storage=storage,
                                                  val_fraction=0.25, workers=1), 0), _messages(caplog))
    (memory, memory_said), (stream, stream_said) = said["memory"], said["stream"]
    assert memory_said == stream_said and len(stream_said) == 4  # a warning and an info line per split
    assert "alpha channel" in stream_said[0] and "upright" in stream_said[1] and "16-bit" in stream_said[1]
    assert stream.input_shape == memory.input_shape == (3, 3, 4)
    for split in ("train", "val", "test"):
        assert torch.equal(head(getattr(stream, f"x_{split}"), 100), getattr(memory, f"x_{split}"))


@pytest.mark.parametrize("defect, message", [
    (lambda root: Image.new("L", (8, 8)).save(root / "train" / "cat" / "big.png"), "images differ in size"),
    (lambda root: (root / "train" / "deep" / "broken.png").write_bytes(b"no png"),
     "cannot read image train/deep/broken.png (class 'deep'"),
])
def test_a_streamed_folder_names_a_bad_file_in_one_line_as_in_memory(tmp_path: Path, cache: Path, defect,
                                                                      message: str) -> None:
    root = _odd_folder(tmp_path / "odd")
    defect(root)
    errors = []
    for storage in ("memory", "stream"):
        with pytest.raises(DataError) as caught:
            load_data(DataConfig(name="imagefolder", root=str(root), storage=storage, workers=1), 0)
        errors.append(str(caught.value))
    assert errors[0] == errors[1] and message in errors[1] and "\n" not in errors[1]  # not the worker's traceback


def test_auto_streams_a_folder_whose_decoded_images_exceed_the_budget(tmp_path: Path, cache: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "large"
    for split, count in (("train", 8), ("test", 2)):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (200, 100), (i, 0, 0)).save(root / split / name / f"{i}.png")  # 0.23 MB each as float
    auto = DataConfig(name="imagefolder", root=str(root), workers=0, memory_budget_mb=1)
    with caplog.at_level("INFO"):
        assert isinstance(load_data(auto, 0).x_train, ImageFiles)
    assert "would take about 5 MB, more than data.memory_budget_mb = 1" in caplog.text
    assert isinstance(load_data(dataclasses.replace(auto, memory_budget_mb=5), 0).x_train, torch.Tensor)
