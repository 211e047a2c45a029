"""fit(): training, artifacts, determinism, resume after a crash or SIGKILL, guards, progress output; lr_factor."""
import contextlib
import csv
import dataclasses
import io
import json
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import make_blobs
from torch import nn

from ensemble_kd import artifacts
from ensemble_kd import train as train_module
from ensemble_kd.artifacts import ArtifactError
from ensemble_kd.augment import Augmentation, make_augment
from ensemble_kd.config import ConfigError, DataConfig, ModelConfig, TrainConfig
from ensemble_kd.inference import evaluate
from ensemble_kd.losses import KDLoss, teacher_log_probs
from ensemble_kd.models import build_model
from ensemble_kd.train import (
    FitOptions,
    NonFiniteLossError,
    StepSchedule,
    TrainSet,
    clip_grad_norm,
    cross_entropy,
    fit,
    load_finished,
    lr_factor,
    save_model,
    set_seed,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# 200 examples in batches of 32 -> 7 steps per epoch; loss_fn call 7 * (e - 1) + s is epoch e, step s.
CFG = TrainConfig(epochs=5, batch_size=32, lr=0.02, weight_decay=1e-4, warmup_epochs=1)
STEPS = 7
STAGE = "toy"


def fresh_model(seed: int = 0) -> nn.Module:
    set_seed(seed)  # dropout > 0 so the per-epoch reseeding matters for determinism
    return build_model(ModelConfig(arch="mlp", hidden=[16], dropout=0.1), (2,), 3, [0.0], [1.0])


def train(model, data, stage_dir, **kwargs):
    kwargs.setdefault("progress", False)
    return fit(model, data, CFG, stage_dir, FitOptions(stage=STAGE, seed=0, **kwargs))


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def epochs_logged(stage_dir) -> list[int]:
    return [r["epoch"] for r in artifacts.read_jsonl(stage_dir / artifacts.METRICS_FILE)]


class Crash(Exception):
    pass


def counting_loss(crash_at: int | None = None, nan_at: int | None = None):
    """Cross-entropy that counts its calls, raising Crash or returning NaN on the given call."""
    base = cross_entropy()

    def loss(logits, labels, targets):
        loss.calls += 1
        if loss.calls == crash_at:
            raise Crash
        if loss.calls == nan_at:
            return base(logits, labels, targets) * float("nan")  # backward runs on it, as on a real NaN
        return base(logits, labels, targets)

    loss.calls = 0
    return loss


@pytest.fixture
def reference(blobs, tmp_path):
    """An uninterrupted run to compare resumed runs with."""
    return train(fresh_model(), blobs, tmp_path / "reference")


# ---------------------------------------------------------------- training and its artifacts

def test_fit_learns_and_writes_model_and_one_metrics_line_per_epoch(blobs, tmp_path):
    stage_dir = tmp_path / "stage"
    model = train(fresh_model(), blobs, stage_dir, val=blobs)
    assert not model.training
    assert evaluate(model, blobs.x, blobs.y).accuracy > 0.9  # chance is 1/3
    assert (stage_dir / artifacts.MODEL_FILE).is_file()
    assert not (stage_dir / artifacts.CHECKPOINT_FILE).exists()
    records = artifacts.read_jsonl(stage_dir / artifacts.METRICS_FILE)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5]
    assert {"loss", "train_accuracy", "lr", "seconds", "val_accuracy"} <= set(records[-1])
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine ends at zero
    saved = artifacts.load_torch(stage_dir / artifacts.MODEL_FILE)
    assert saved["fingerprint"] == {"stage": STAGE} and saved["epochs"] == 5


def test_two_fits_with_the_same_seed_give_identical_weights(blobs, tmp_path, reference):
    again = train(fresh_model(), blobs, tmp_path / "again")
    assert_same_weights(again, reference)


def test_another_seed_gives_other_weights(blobs, tmp_path, reference):
    other = fit(fresh_model(), blobs, CFG, tmp_path / "other", FitOptions(stage=STAGE, seed=1, progress=False))
    assert not torch.equal(other.head.weight, reference.head.weight)


# ---------------------------------------------------------------- resume

def test_resume_after_a_crash_matches_an_uninterrupted_run(blobs, tmp_path, reference):
    stage_dir = tmp_path / "stage"
    with pytest.raises(Crash):
        train(fresh_model(), blobs, stage_dir, loss_fn=counting_loss(crash_at=2 * STEPS + 2))  # epoch 3, step 2
    assert artifacts.load_torch(stage_dir / artifacts.CHECKPOINT_FILE)["epoch"] == 2
    assert epochs_logged(stage_dir) == [1, 2]
    assert not (stage_dir / artifacts.MODEL_FILE).exists()

    loss = counting_loss()
    resumed = train(fresh_model(), blobs, stage_dir, loss_fn=loss)
    assert loss.calls == 3 * STEPS  # epochs 3, 4 and 5 only
    assert_same_weights(resumed, reference)
    assert epochs_logged(stage_dir) == [1, 2, 3, 4, 5]
    assert not (stage_dir / artifacts.CHECKPOINT_FILE).exists()


KILLED_SCRIPT = """
import os, signal, sys
from pathlib import Path

import torch

from ensemble_kd import artifacts
from ensemble_kd.config import ConfigError, ModelConfig, TrainConfig
from ensemble_kd.models import build_model
from ensemble_kd.train import FitOptions, TrainSet, cross_entropy, fit, set_seed

data_file, stage_dir, where = sys.argv[1:]
x, y = torch.load(data_file)
base, calls = cross_entropy(), [0]

def loss(logits, labels, targets):
    calls[0] += 1
    if where == "loss" and calls[0] == {kill_call}:
        os.kill(os.getpid(), signal.SIGKILL)
    return base(logits, labels, targets)

real_save = artifacts.save_torch

def save_torch(path, obj):
    if where == "checkpoint" and Path(path).name == "checkpoint.pt" and obj["epoch"] == 3:
        def half_write(f):  # die halfway through writing the epoch-3 checkpoint
            f.write(b"half a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return artifacts.atomic_write(path, half_write)
    return real_save(path, obj)

artifacts.save_torch = save_torch
set_seed(0)
model = build_model(ModelConfig(arch="mlp", hidden=[16], dropout=0.1), (2,), 3, [0.0], [1.0])
cfg = TrainConfig(**{cfg})
fit(model, TrainSet(x, y), cfg, stage_dir, FitOptions(stage="{stage}", seed=0, loss_fn=loss, progress=False))
"""


@pytest.mark.parametrize("where, logged_before_resume", [("loss", [1, 2]), ("checkpoint", [1, 2, 3])])
def test_resume_after_sigkill_matches_an_uninterrupted_run(blobs, tmp_path, reference, where, logged_before_resume):
    stage_dir = tmp_path / "stage"
    data_file, script = tmp_path / "data.pt", tmp_path / "killed.py"
    torch.save((blobs.x, blobs.y), data_file)
    cfg = {f: getattr(CFG, f) for f in CFG.__dataclass_fields__}
    script.write_text(textwrap.dedent(KILLED_SCRIPT).format(kill_call=2 * STEPS + 2, cfg=cfg, stage=STAGE))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(script), str(data_file), str(stage_dir), where],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert artifacts.load_torch(stage_dir / artifacts.CHECKPOINT_FILE)["epoch"] == 2
    assert epochs_logged(stage_dir) == logged_before_resume

    resumed = train(fresh_model(), blobs, stage_dir)
    assert_same_weights(resumed, reference)
    assert epochs_logged(stage_dir) == [1, 2, 3, 4, 5]


def test_stale_metrics_without_a_checkpoint_are_dropped(blobs, tmp_path):
    # A kill between appending epoch 1's metrics and writing its checkpoint leaves a line and no checkpoint.
    stage_dir = tmp_path / "stage"
    stage_dir.mkdir()
    (stage_dir / artifacts.METRICS_FILE).write_text(json.dumps({"epoch": 1, "loss": 9.0}) + "\n")
    train(fresh_model(), blobs, stage_dir)
    assert epochs_logged(stage_dir) == [1, 2, 3, 4, 5]


def csv_rows(stage_dir) -> tuple[str, list[dict[str, str]]]:
    """(the header line, the rows) of a stage's metrics.csv."""
    text = (stage_dir / artifacts.METRICS_CSV).read_text()
    return text.splitlines()[0], list(csv.DictReader(io.StringIO(text)))


def crash_before_epoch_3s_checkpoint(monkeypatch) -> None:
    """Make fit() die after logging epoch 3 and before its checkpoint lands (the checkpoint says epoch 2)."""
    real_save = artifacts.save_torch

    def save_torch(path, obj):
        if Path(path).name == artifacts.CHECKPOINT_FILE and obj["epoch"] == 3:
            raise Crash
        return real_save(path, obj)

    monkeypatch.setattr(artifacts, "save_torch", save_torch)


def test_metrics_csv_holds_the_jsonl_lines_and_a_resume_appends_without_repeating_header_or_epochs(
        blobs, tmp_path, reference, monkeypatch):
    header, rows = csv_rows(tmp_path / "reference")
    assert header == "epoch,loss,train_accuracy,lr,seconds"
    jsonl = artifacts.read_jsonl(tmp_path / "reference" / artifacts.METRICS_FILE)
    assert rows == [{k: str(v) for k, v in record.items()} for record in jsonl]

    stage_dir = tmp_path / "stage"
    with monkeypatch.context() as patch:
        crash_before_epoch_3s_checkpoint(patch)
        with pytest.raises(Crash):
            train(fresh_model(), blobs, stage_dir)
    assert [row["epoch"] for row in csv_rows(stage_dir)[1]] == ["1", "2", "3"]
    with open(stage_dir / artifacts.METRICS_CSV, "a") as f:
        f.write("4,0.3")  # and a row torn by the crash
    resumed = train(fresh_model(), blobs, stage_dir)
    assert_same_weights(resumed, reference)  # writing the curves changes nothing in training
    header, rows = csv_rows(stage_dir)
    assert (stage_dir / artifacts.METRICS_CSV).read_text().count(header) == 1
    assert [row["epoch"] for row in rows] == ["1", "2", "3", "4", "5"]
    assert [r["loss"] for r in artifacts.read_jsonl(stage_dir / artifacts.METRICS_FILE)] == [
        float(row["loss"]) for row in rows]


def test_tensorboard_events_hold_each_epoch_once_after_a_resume(blobs, tmp_path, monkeypatch):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                            reason="the tensorboard extra is not installed")
    stage_dir = tmp_path / "stage"
    with monkeypatch.context() as patch:
        crash_before_epoch_3s_checkpoint(patch)
        with pytest.raises(Crash):
            train(fresh_model(), blobs, stage_dir, val=blobs, tensorboard=True)
    train(fresh_model(), blobs, stage_dir, val=blobs, tensorboard=True)  # epoch 3 again, then 4 and 5
    events = event_accumulator.EventAccumulator(str(stage_dir))
    events.Reload()
    assert {"loss", "train_accuracy", "val_accuracy", "lr", "seconds"} <= set(events.Tags()["scalars"])
    logged = artifacts.read_jsonl(stage_dir / artifacts.METRICS_FILE)
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4, 5]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([r["loss"] for r in logged])


def test_a_finished_stage_is_loaded_not_retrained(blobs, tmp_path, reference):
    stage_dir = tmp_path / "reference"
    loss = counting_loss()
    again = train(fresh_model(seed=123), blobs, stage_dir, loss_fn=loss)
    assert loss.calls == 0
    assert not again.training
    assert_same_weights(again, reference)
    assert epochs_logged(stage_dir) == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------- early stopping and the best epoch

STOPPING = dataclasses.replace(CFG, epochs=12, early_stopping_patience=3, keep_best=True)


def noisy_val() -> TrainSet:
    """Held-out blobs with 30% of the labels moved to the next class: accuracy peaks early, then stalls."""
    generator = torch.Generator().manual_seed(0)
    val = make_blobs(90, seed=1)
    y = val.y.clone()
    moved = torch.rand(len(y), generator=generator) < 0.3
    y[moved] = (y[moved] + 1) % 3
    return TrainSet(val.x + 1.5 * torch.randn(val.x.shape, generator=generator), y)


def train_stopping(stage_dir, **kwargs):
    kwargs.setdefault("progress", False)
    return fit(fresh_model(), make_blobs(), STOPPING, stage_dir, FitOptions(stage=STAGE, seed=0, val=noisy_val(),
                                                                            **kwargs))


def weights_by_epoch(monkeypatch) -> dict[int, dict[str, torch.Tensor]]:
    """The model weights of every checkpoint fit() writes, by epoch."""
    seen, real_save = {}, artifacts.save_torch

    def save_torch(path, obj):
        if Path(path).name == artifacts.CHECKPOINT_FILE:
            seen[obj["epoch"]] = {k: v.clone() for k, v in obj["model"].items()}
        return real_save(path, obj)

    monkeypatch.setattr(artifacts, "save_torch", save_torch)
    return seen


def test_early_stopping_stops_after_patience_epochs_without_a_better_val_accuracy_and_keeps_the_best(
        tmp_path, monkeypatch, caplog):
    checkpoints = weights_by_epoch(monkeypatch)
    with caplog.at_level(logging.INFO, logger="ensemble_kd.train"):
        model = train_stopping(tmp_path / "stage")
    records = artifacts.read_jsonl(tmp_path / "stage" / artifacts.METRICS_FILE)
    accuracies = [r["val_accuracy"] for r in records]
    best = accuracies.index(max(accuracies)) + 1  # the first epoch with the best accuracy
    assert len(records) == best + 3 < STOPPING.epochs  # three epochs without a better one, then stop
    saved = artifacts.load_torch(tmp_path / "stage" / artifacts.MODEL_FILE)
    assert (saved["epochs_trained"], saved["best_epoch"]) == (best + 3, best)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in checkpoints[best].items())  # the best, not the last
    val = noisy_val()
    assert evaluate(model, val.x, val.y).accuracy == pytest.approx(max(accuracies))
    assert f"early stop after epoch {best + 3}: val acc has not improved for 3 epochs" in caplog.text
    assert f"keeping epoch {best}'s weights" in caplog.text


def test_without_keep_best_early_stopping_keeps_the_last_epochs_weights(tmp_path, monkeypatch):
    checkpoints = weights_by_epoch(monkeypatch)
    model = fit(fresh_model(), make_blobs(), dataclasses.replace(STOPPING, keep_best=False), tmp_path / "stage",
                FitOptions(stage=STAGE, seed=0, val=noisy_val(), progress=False))
    last = max(checkpoints)
    assert last < STOPPING.epochs
    assert all(torch.equal(model.state_dict()[k], v) for k, v in checkpoints[last].items())


@pytest.mark.parametrize("crash", ["mid-training", "after the last checkpoint"])
def test_a_resumed_stage_stops_at_and_keeps_the_same_epoch_as_one_that_never_stopped(tmp_path, monkeypatch, crash):
    reference = train_stopping(tmp_path / "reference")
    stage_dir = tmp_path / "stage"
    with monkeypatch.context() as patch:
        if crash == "mid-training":  # in the epoch after the best one: the best weights live in the checkpoint
            best = artifacts.load_torch(tmp_path / "reference" / artifacts.MODEL_FILE)["best_epoch"]
            loss = counting_loss(crash_at=best * STEPS + 2)
        else:  # every epoch done, model.pt not written yet
            loss = counting_loss()
            patch.setattr(train_module, "save_model", lambda *args, **kwargs: (_ for _ in ()).throw(Crash()))
        with pytest.raises(Crash):
            train_stopping(stage_dir, loss_fn=loss)
    loss = counting_loss()
    resumed = train_stopping(stage_dir, loss_fn=loss)
    assert_same_weights(resumed, reference)
    assert epochs_logged(stage_dir) == epochs_logged(tmp_path / "reference")
    if crash != "mid-training":
        assert loss.calls == 0  # out of patience already: no epoch trained again


def test_early_stopping_without_a_validation_split_is_refused(blobs, tmp_path):
    with pytest.raises(ConfigError, match="early_stopping_patience and keep_best judge epochs on a validation"):
        fit(fresh_model(), blobs, STOPPING, tmp_path / "stage", FitOptions(stage=STAGE, seed=0, progress=False))


# ---------------------------------------------------------------- guards

def test_model_file_from_another_configuration_is_refused(tmp_path):
    model = fresh_model()
    path = save_model(model, tmp_path, {"a": 1})
    with pytest.raises(ArtifactError) as err:
        load_finished(fresh_model(), tmp_path, {"a": 2})
    assert str(path) in str(err.value)
    assert "a: file has 1, this run has 2" in str(err.value)
    assert load_finished(fresh_model(seed=5), tmp_path, {"a": 1}) is True


def test_fit_refuses_a_checkpoint_from_another_configuration(blobs, tmp_path):
    stage_dir = tmp_path / "stage"
    with pytest.raises(Crash):
        train(fresh_model(), blobs, stage_dir, fingerprint={"lr": 1}, loss_fn=counting_loss(crash_at=STEPS + 1))
    with pytest.raises(ArtifactError, match=r"checkpoint.pt was written by another configuration \(lr: file has 1"):
        train(fresh_model(), blobs, stage_dir, fingerprint={"lr": 2})


def test_fit_refuses_a_model_of_another_architecture(blobs, tmp_path, reference):
    wider = build_model(ModelConfig(arch="mlp", hidden=[32]), (2,), 3, [0.0], [1.0])
    with pytest.raises(ArtifactError, match=r"model.pt does not fit this model"):
        train(wider, blobs, tmp_path / "reference")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_checkpoint_is_reported_with_its_path(blobs, tmp_path, damage):
    stage_dir = tmp_path / "stage"
    with pytest.raises(Crash):
        train(fresh_model(), blobs, stage_dir, loss_fn=counting_loss(crash_at=STEPS + 1))
    path = stage_dir / artifacts.CHECKPOINT_FILE
    data = path.read_bytes()
    path.write_bytes(b"\x00not a checkpoint" * 10 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=rf"(?s){path} is corrupt or not a checkpoint.*delete it"):
        train(fresh_model(), blobs, stage_dir)


def test_a_corrupt_model_file_is_reported_with_its_path(tmp_path):
    path = save_model(fresh_model(), tmp_path, {})
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ArtifactError, match=rf"{path} is corrupt"):
        load_finished(fresh_model(), tmp_path, {})


def test_a_torch_file_that_is_not_a_checkpoint_is_refused(blobs, tmp_path):
    stage_dir = tmp_path / "stage"
    artifacts.save_torch(stage_dir / artifacts.CHECKPOINT_FILE, [1, 2, 3])
    with pytest.raises(ArtifactError, match=r"checkpoint.pt is not an ensemble-kd checkpoint"):
        train(fresh_model(), blobs, stage_dir)


def test_non_finite_loss_stops_with_an_actionable_message_and_keeps_the_last_checkpoint(blobs, tmp_path, reference):
    stage_dir = tmp_path / "stage"
    with pytest.raises(NonFiniteLossError) as err:
        train(fresh_model(), blobs, stage_dir, loss_fn=counting_loss(nan_at=STEPS + 1))  # epoch 2, step 1
    message = str(err.value)
    for part in (STAGE, "nan", "epoch 2", "steps 1-7", "learning rate", "--resume"):  # checked at the epoch's end
        assert part in message, part
    checkpoint = artifacts.load_torch(stage_dir / artifacts.CHECKPOINT_FILE)
    assert checkpoint["epoch"] == 1
    fresh_model().load_state_dict(checkpoint["model"])  # loads without error
    assert not (stage_dir / artifacts.MODEL_FILE).exists()
    resumed = train(fresh_model(), blobs, stage_dir)  # and the run can go on from it
    assert_same_weights(resumed, reference)


def test_a_nan_mid_epoch_is_caught_at_the_next_check_and_the_last_good_checkpoint_is_untouched(blobs, tmp_path,
                                                                                             monkeypatch):
    monkeypatch.setattr(train_module, "NONFINITE_CHECK_STEPS", 5)
    cfg = TrainConfig(epochs=3, batch_size=4, lr=0.02)  # 50 steps per epoch
    stage_dir = tmp_path / "stage"
    base, calls, saved = cross_entropy(), [0], {}

    def loss(logits, labels, targets):
        calls[0] += 1
        if calls[0] == 51:  # epoch 2 starts: the checkpoint of epoch 1 is on disk
            saved["checkpoint"] = (stage_dir / artifacts.CHECKPOINT_FILE).read_bytes()
        return base(logits, labels, targets) * (float("nan") if calls[0] == 50 + 12 else 1.0)  # epoch 2, step 12

    with pytest.raises(NonFiniteLossError, match=r"toy: loss became nan at epoch 2, in steps 11-15"):
        fit(fresh_model(), blobs, cfg, stage_dir, FitOptions(stage=STAGE, seed=0, loss_fn=loss, progress=False))
    assert calls[0] == 50 + 15  # stopped at the check after step 15, not at the end of the epoch
    assert (stage_dir / artifacts.CHECKPOINT_FILE).read_bytes() == saved["checkpoint"]
    assert epochs_logged(stage_dir) == [1]
    assert not (stage_dir / artifacts.MODEL_FILE).exists()


# ---------------------------------------------------------------- speed: clipping, host reads, memory format

@pytest.mark.parametrize("max_norm", [0.05, 1e6])  # over the limit (scaled), under it (untouched)
def test_clip_grad_norm_matches_torchs_clip_grad_norm(blobs, max_norm):
    ours, torchs = fresh_model(), fresh_model()
    for model in (ours, torchs):
        cross_entropy()(model.eval()(blobs.x), blobs.y, None).backward()  # eval: no dropout, the same gradients
    clip_grad_norm(list(ours.parameters()), max_norm)
    nn.utils.clip_grad_norm_(torchs.parameters(), max_norm)
    for a, b in zip(ours.parameters(), torchs.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ours.parameters()]))
    assert norm <= max_norm * (1 + 1e-5)


def count_host_reads(monkeypatch) -> list[str]:
    """Record every Python-level read of a tensor's value (item, bool, float, int)."""
    reads = []
    for name in ("item", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name):
            reads.append(_name)
            return _real(self, *args)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


def test_the_step_loop_reads_no_value_back_per_step(blobs, tmp_path, monkeypatch):
    reads = {}
    for batch_size in (32, 8):  # 7 and 25 steps per epoch
        cfg = TrainConfig(epochs=2, batch_size=batch_size, lr=0.02, grad_clip=0.0)  # CPU clipping reads its norm
        counted = count_host_reads(monkeypatch)
        fit(fresh_model(), blobs, cfg, tmp_path / str(batch_size), FitOptions(stage=STAGE, seed=0, progress=False))
        reads[batch_size] = list(counted)
        monkeypatch.undo()
    assert reads[32] == reads[8]  # as many reads however many steps
    assert len(reads[8]) <= 2 * 3  # per epoch: the non-finite flag, the loss sum, the correct count


def image_data(n: int = 96) -> TrainSet:
    generator = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 3
    x = 0.3 * torch.rand(n, 1, 8, 8, generator=generator)
    for k in range(3):  # class k: a bright band across rows 2k .. 2k + 1
        x[y == k, :, 2 * k:2 * k + 2, :] += 0.7
    return TrainSet(x, y)


def fresh_cnn(seed: int = 0) -> nn.Module:
    set_seed(seed)
    return build_model(ModelConfig(arch="cnn", channels=[4, 8], dropout=0.1), (1, 8, 8), 3, [0.5], [0.3])


CNN_CFG = TrainConfig(epochs=3, batch_size=16, lr=0.01)  # 6 steps per epoch


def test_a_conv_model_trains_channels_last_and_comes_back_contiguous(tmp_path):
    model, layouts = fresh_cnn(), []
    conv = model.features[3]  # 4 -> 4 channels (with one input channel both layouts coincide)

    def loss(logits, labels, targets):
        layouts.append(conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous())
        return cross_entropy()(logits, labels, targets)

    data = image_data()
    fit(model, data, CNN_CFG, tmp_path, FitOptions(stage=STAGE, seed=0, loss_fn=loss, progress=False))
    assert layouts and all(layouts)
    assert conv.weight.is_contiguous()
    assert artifacts.load_torch(tmp_path / artifacts.MODEL_FILE)["state_dict"]["features.3.weight"].is_contiguous()
    assert evaluate(model, data.x, data.y).accuracy > 0.9  # chance is 1/3


def test_a_checkpoint_in_contiguous_layout_resumes_correctly_under_channels_last(tmp_path, monkeypatch):
    # an earlier version trained conv models contiguous: fused optimizers must not pair its state
    # with channels-last parameters by memory position
    data = image_data()
    monkeypatch.setattr(train_module, "training_memory_format", lambda model, device: torch.contiguous_format)
    reference = fit(fresh_cnn(), data, CNN_CFG, tmp_path / "reference", FitOptions(stage=STAGE, seed=0, progress=False))
    with pytest.raises(Crash):
        fit(fresh_cnn(), data, CNN_CFG, tmp_path / "stage", FitOptions(stage=STAGE, seed=0, progress=False,
            loss_fn=counting_loss(crash_at=2 * 6 + 1)))
    monkeypatch.undo()
    resumed = fit(fresh_cnn(), data, CNN_CFG, tmp_path / "stage", FitOptions(stage=STAGE, seed=0, progress=False))
    for (name, a), b in zip(resumed.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)  # conv rounding differs by ~1e-7 only


def test_per_image_augmentation_and_mixing_give_the_same_weights_in_any_number_of_workers_and_after_a_resume(
        tmp_path):
    data, labels_seen = image_data(), []

    def options(workers: int, crash_at: int | None = None) -> FitOptions:
        augment = make_augment(DataConfig(random_resized_crop=0.5, auto_augment="randaugment", mix="mixup",
                                          workers=workers), (1, 8, 8), 3)
        loss = counting_loss(crash_at)

        def record(logits, labels, targets):
            labels_seen.append(labels)
            return loss(logits, labels, targets)
        return FitOptions(stage=STAGE, seed=0, augment=augment, loss_fn=record, progress=False)

    reference = fit(fresh_cnn(), data, CNN_CFG, tmp_path / "reference", options(workers=0))
    labels = labels_seen[0]
    assert labels.shape == (16, 3) and torch.allclose(labels.sum(1), torch.ones(16))  # mixed: class probabilities
    assert (labels.max(1).values < 1).any()
    with pytest.raises(Crash):  # in epoch 3, with the images read and augmented by two worker processes
        fit(fresh_cnn(), data, CNN_CFG, tmp_path / "stage", options(workers=2, crash_at=2 * 6 + 2))
    resumed = fit(fresh_cnn(), data, CNN_CFG, tmp_path / "stage", options(workers=2))
    assert_same_weights(resumed, reference)


# ---------------------------------------------------------------- teacher and targets

class Recording(nn.Module):
    """Wraps a model and keeps the last batch it saw."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.last_input: torch.Tensor | None = None

    def forward(self, x):
        self.last_input = x.detach().clone()
        return self.inner(x)


def test_loss_fn_gets_the_teachers_logits_on_the_augmented_batch(blobs, tmp_path):
    torch.manual_seed(0)
    teacher = nn.Linear(2, 3)
    teacher.train()  # fit must put it in eval mode
    student = Recording(fresh_model())
    seen = []

    def loss(logits, labels, targets):
        assert not teacher.training
        assert not targets.requires_grad
        assert targets.shape == logits.shape
        with torch.no_grad():
            assert torch.allclose(targets, teacher(student.last_input))
        seen.append(len(labels))
        return cross_entropy()(logits, labels, targets)

    def shift(x, generator):
        return x + 1.0

    fit(student, blobs, TrainConfig(epochs=1, batch_size=32), tmp_path / "s", FitOptions(stage=STAGE, seed=0,
        loss_fn=loss, teacher=teacher, augment=Augmentation(batch=shift), progress=False))
    assert sum(seen) == len(blobs) and len(seen) == STEPS


def test_loss_fn_gets_the_cached_targets_of_the_batch_without_a_teacher(blobs, tmp_path):
    data = TrainSet(blobs.x, blobs.y, targets=torch.cat([blobs.x * 10, blobs.y[:, None].float()], 1))
    student = Recording(fresh_model())
    calls = []

    def loss(logits, labels, targets):
        assert torch.equal(targets[:, :2], student.last_input * 10)  # the rows of this batch, in order
        assert torch.equal(targets[:, 2].long(), labels)
        calls.append(1)
        return cross_entropy()(logits, labels, None)

    fit(student, data, TrainConfig(epochs=1, batch_size=32), tmp_path / "s",
        FitOptions(stage=STAGE, seed=0, loss_fn=loss, progress=False))
    assert len(calls) == STEPS


def test_a_loss_with_value_and_grad_trains_exactly_as_through_its_autograd_node(blobs, tmp_path):
    kd = KDLoss(0.3, 2.0)  # has value_and_grad: fit backpropagates its gradient from the logits
    torch.manual_seed(3)
    data = TrainSet(blobs.x, blobs.y, targets=teacher_log_probs(torch.randn(len(blobs.y), 3), 2.0))
    via_gradient = train(fresh_model(), data, tmp_path / "gradient", loss_fn=kd)
    via_node = train(fresh_model(), data, tmp_path / "node", loss_fn=lambda s, y, t: kd(s, y, t))  # autograd
    assert_same_weights(via_gradient, via_node)
    logged = [[r["loss"] for r in artifacts.read_jsonl(tmp_path / run / artifacts.METRICS_FILE)]
              for run in ("gradient", "node")]
    assert logged[0] == logged[1] and all(math.isfinite(v) for v in logged[0])


# ---------------------------------------------------------------- learning-rate schedule

@pytest.mark.parametrize("step, total, warmup, schedule, expected", [
    (0, 100, 0, "cosine", 1.0),  # cos(0)
    (50, 100, 0, "cosine", 0.5),  # (1 + cos(pi/2)) / 2
    (25, 100, 0, "cosine", (1 + math.sqrt(0.5)) / 2),  # (1 + cos(pi/4)) / 2 = 0.8536
    (100, 100, 0, "cosine", 0.0),  # cos(pi)
    (150, 100, 0, "cosine", 0.0),  # clamped past the end
    (0, 100, 10, "cosine", 0.1),  # warm-up: (step + 1) / warmup
    (4, 100, 10, "cosine", 0.5),
    (9, 100, 10, "cosine", 1.0),
    (10, 100, 10, "cosine", 1.0),  # schedule starts after warm-up
    (55, 100, 10, "cosine", 0.5),  # halfway through the 90 post-warm-up steps
    (49, 100, 0, "step", 1.0),
    (50, 100, 0, "step", 0.1),
    (74, 100, 0, "step", 0.1),
    (75, 100, 0, "step", 0.01),
    (0, 100, 0, "constant", 1.0),
    (99, 100, 0, "constant", 1.0),
    (3, 100, 4, "constant", 1.0),
])
def test_lr_factor_by_hand(step, total, warmup, schedule, expected):
    assert lr_factor(step, total, warmup, schedule) == pytest.approx(expected, abs=1e-12)


def test_step_schedule_sets_lambdalrs_values_bit_for_bit_and_resumes_from_its_state():
    factor = lambda step: lr_factor(step, 40, 6, "cosine")  # noqa: E731
    ours = torch.optim.AdamW(fresh_model().parameters(), lr=0.02)
    torchs = torch.optim.AdamW(fresh_model().parameters(), lr=0.02)
    schedule, reference = StepSchedule(ours, factor), torch.optim.lr_scheduler.LambdaLR(torchs, factor)
    for _ in range(41):
        assert ours.param_groups[0]["lr"] == torchs.param_groups[0]["lr"]  # exactly, not approximately
        ours.step(), torchs.step(), schedule.step(), reference.step()
    resumed = StepSchedule(torch.optim.AdamW(fresh_model().parameters(), lr=0.02), factor)
    resumed.load_state_dict(reference.state_dict())  # a checkpoint written with LambdaLR
    assert resumed.last_epoch == 41 and resumed.optimizer.param_groups[0]["lr"] == torchs.param_groups[0]["lr"]


def test_progress_off_a_terminal_is_one_log_line_per_epoch_and_no_bar_redraws(
        blobs, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    stderr = io.StringIO()  # what a log file or CI sees: not a terminal
    with contextlib.redirect_stderr(stderr), caplog.at_level("INFO", logger="ensemble_kd.train"):
        train(fresh_model(), blobs, tmp_path, progress=True)
    assert "\r" not in stderr.getvalue() and "batch" not in stderr.getvalue()  # no tqdm bar was drawn
    epochs = [r.getMessage() for r in caplog.records if " epoch " in r.getMessage()]
    assert len(epochs) == CFG.epochs and epochs[0].startswith(f"{STAGE} epoch 1/{CFG.epochs} loss ")
