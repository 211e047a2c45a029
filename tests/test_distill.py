"""Distillation: the teacher's logits computed once (or per augmented batch), the size check, equal starts."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from ensemble_kd import artifacts, distill
from ensemble_kd.config import Config, ConfigError, load_config
from ensemble_kd.data import Splits
from ensemble_kd.distill import (
    FROM_GENERALIST,
    HARD_LABELS,
    STUDENT,
    cached_teacher_logits,
    check_student_size,
    new_student,
    train_students,
    transfer_views,
)
from ensemble_kd.inference import predict_logits
from ensemble_kd.losses import DKDLoss, KDLoss

N_TRAIN, N_CLASSES, BATCH, EPOCHS = 40, 4, 16, 3
BATCHES_PER_EPOCH = 3  # ceil(40 / 16)


class CountingTeacher(nn.Module):
    """A linear teacher on flattened inputs that counts its forward calls, rows and modes."""

    def __init__(self, in_features: int = 16, classes: int = N_CLASSES) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, classes)
        self.calls, self.rows, self.training_flags = 0, 0, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.rows += len(x)
        self.training_flags.append(self.training)
        return self.linear(x.flatten(1))


def image_splits() -> Splits:
    """40 random 1x4x4 'images', 4 classes; val and test reuse the first 8."""
    x = torch.rand(N_TRAIN, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.arange(N_TRAIN) % N_CLASSES
    return Splits(x, y, x[:8], y[:8], x[:8], y[:8], [f"k{i}" for i in range(N_CLASSES)], [0.5], [0.3], "tiny-images")


def student_config(*overrides: str) -> Config:
    return load_config(None, ["generalist.model.hidden=[16]", "student.model.hidden=[8]",
                              f"student.train.epochs={EPOCHS}", f"student.train.batch_size={BATCH}", *overrides])


def _distill(cfg: Config, teacher: nn.Module, stage_dir: Path) -> nn.Module:
    data = image_splits()
    return distill.distill(new_student(cfg, data), teacher, data, cfg, stage_dir, {"test": 1}, alpha=0.5,
                           progress=False)


def test_cached_teacher_logits_run_the_teacher_once_per_batch_then_reuse_the_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = CountingTeacher()
    x = torch.rand(2100, 16)
    path = tmp_path / "teacher_logits.pt"
    logits = cached_teacher_logits(lambda: predict_logits(teacher, x), path, {"teacher": "a"})
    assert teacher.calls == 3 and teacher.rows == 2100  # batches of 1024: 1024 + 1024 + 52
    assert set(teacher.training_flags) == {False}  # frozen teacher runs in eval mode
    with torch.no_grad():
        assert torch.allclose(logits, teacher(x))
    teacher.calls = 0
    again = cached_teacher_logits(lambda: predict_logits(teacher, x), path, {"teacher": "a"})
    assert teacher.calls == 0 and torch.equal(again, logits)
    cached_teacher_logits(lambda: predict_logits(teacher, x), path, {"teacher": "b"})  # another teacher: again
    assert teacher.calls == 3


def test_distill_without_augmentation_calls_the_teacher_once_however_many_epochs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = CountingTeacher()
    _distill(student_config(), teacher, tmp_path / "student")
    assert teacher.calls == 1 and teacher.rows == N_TRAIN  # one pass over 40 rows, not 3 epochs of batches
    assert (tmp_path / "student" / "teacher_logits.pt").is_file()
    assert len(artifacts.read_jsonl(tmp_path / "student" / "metrics.jsonl")) == EPOCHS

    second = CountingTeacher()
    _distill(student_config(), second, tmp_path / "student")
    assert second.calls == 0  # logits come from the file, the student from model.pt


def test_distill_with_augmentation_runs_the_teacher_on_every_batch_of_every_epoch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = CountingTeacher()
    cfg = student_config("data.flip=true", "data.crop_pad=1", "student.transfer=live")
    _distill(cfg, teacher, tmp_path / "student")
    assert teacher.calls == EPOCHS * BATCHES_PER_EPOCH
    assert teacher.rows == EPOCHS * N_TRAIN
    assert set(teacher.training_flags) == {False}
    assert not (tmp_path / "student" / "teacher_logits.pt").exists()


VIEWS = 2


def test_distill_with_fixed_views_runs_the_teacher_once_per_view_for_every_student_seed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = CountingTeacher()
    cfg = student_config("data.flip=true", "data.crop_pad=1", "student.transfer=views", f"student.views={VIEWS}")
    data = image_splits()
    cache = tmp_path / "teacher_logits.pt"
    for seed in (1, 2):  # two students of different seeds share the teacher's logits on the views
        distill.distill(new_student(cfg, data, seed=seed), teacher, data, cfg, tmp_path / f"student{seed}",
                        {"seed": seed}, alpha=0.5, progress=False, seed=seed, teacher_cache=cache,
                        teacher_fingerprint={"teacher": "a"})
    assert teacher.rows == VIEWS * N_TRAIN  # each view once, not once per epoch or per student
    saved = artifacts.load_torch(cache)["logits"]
    assert saved.shape == (VIEWS, N_TRAIN, N_CLASSES)
    views = transfer_views(cfg, N_TRAIN)
    assert views.count == VIEWS and torch.equal(views.flips, transfer_views(cfg, N_TRAIN).flips)  # from the run seed
    with torch.no_grad():  # the cached logits are the teacher's on exactly those views
        first, _ = views.batch(data.x_train, 0, torch.arange(N_TRAIN))
        assert torch.allclose(saved[0], teacher(first))
    assert not torch.equal(saved[0], saved[1])
    assert transfer_views(student_config("student.transfer=views"), N_TRAIN) is None  # no augmentation: plain


def test_views_of_epoch_cycle_the_augmented_views_then_end_on_the_plain_one() -> None:
    cfg = student_config("data.flip=true", "data.crop_pad=1", "student.transfer=views", "student.views=3",
                         "student.train.epochs=10", "student.plain_epochs=2")
    views = transfer_views(cfg, N_TRAIN)
    assert views.count == 4  # three augmented views and the plain images
    assert [views.of_epoch(e, 10) for e in range(1, 11)] == [0, 1, 2, 0, 1, 2, 0, 1, 3, 3]
    without = transfer_views(student_config("data.flip=true", "student.transfer=views", "student.views=3"), N_TRAIN)
    assert [without.of_epoch(e, 5) for e in range(1, 6)] == [0, 1, 2, 0, 1]


def test_plain_epochs_teach_the_last_epochs_on_the_plain_images_with_the_teachers_logits_on_them(
        tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = CountingTeacher()
    cfg = student_config("data.flip=true", "data.crop_pad=1", "student.transfer=views", "student.views=1",
                         "student.plain_epochs=1")  # epochs 1 and 2 on the one augmented view, epoch 3 plain
    data = image_splits()
    student = new_student(cfg, data)
    seen: list[torch.Tensor] = []  # the inputs of each training step, in order
    student.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()) if module.training else None)
    distill.distill(student, teacher, data, cfg, tmp_path / "student", {"test": 1}, alpha=0.5, progress=False)
    assert teacher.rows == 2 * N_TRAIN  # the augmented view and the plain images, each labelled once
    saved = artifacts.load_torch(tmp_path / "student" / "teacher_logits.pt")["logits"]
    with torch.no_grad():
        assert torch.allclose(saved[-1], teacher(data.x_train))  # the last view is the images themselves
    plain_rows = {tuple(row.flatten().tolist()) for row in data.x_train}
    is_plain = lambda batches: all(tuple(r.flatten().tolist()) in plain_rows for b in batches for r in b)  # noqa: E731
    assert is_plain(seen[-BATCHES_PER_EPOCH:])  # the last epoch: plain images only
    assert not is_plain(seen[:-BATCHES_PER_EPOCH])  # the epochs before: flipped and shifted views


def test_check_student_size_against_the_generalist() -> None:
    data = image_splits()
    # flat 16 inputs, 4 classes: student 16*8+8 + 8*4+4 = 172 parameters, generalist 16*16+16 + 16*4+4 = 340
    assert check_student_size(student_config(), data) == 172
    assert check_student_size(student_config("student.max_params_ratio=0.51"), data) == 172  # 173.4 allowed
    with pytest.raises(ConfigError, match="max_params_ratio"):
        check_student_size(student_config("student.max_params_ratio=0.5"), data)  # 170 allowed
    with pytest.raises(ConfigError, match="more than student.max_params_ratio"):
        check_student_size(student_config("student.model.hidden=[64]"), data)  # 1,348 > 340


def test_the_three_students_start_from_identical_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    starts, real_distill = {}, distill.distill

    def recording_distill(student, teacher, data, cfg, stage_dir, fingerprint, alpha, progress=True, **kwargs):
        starts[stage_dir.name] = (copy.deepcopy(student.state_dict()), teacher, alpha)
        return real_distill(student, teacher, data, cfg, stage_dir, fingerprint, alpha, progress, **kwargs)

    monkeypatch.setattr(distill, "distill", recording_distill)
    torch.manual_seed(0)
    ensemble, generalist = CountingTeacher(), CountingTeacher()
    cfg = student_config("student.train.epochs=1")
    paths = train_students(cfg, image_splits(), tmp_path, ensemble, generalist, progress=False)
    assert set(paths) == set(starts) == {STUDENT, FROM_GENERALIST, HARD_LABELS}
    assert all(p.is_file() for p in paths.values())
    reference = starts[STUDENT][0]
    for name in (FROM_GENERALIST, HARD_LABELS):
        assert all(torch.equal(reference[k], v) for k, v in starts[name][0].items()), name
    assert starts[STUDENT][1] is ensemble and starts[FROM_GENERALIST][1] is generalist
    assert starts[HARD_LABELS][1] is None and starts[HARD_LABELS][2] == 1.0
    assert starts[STUDENT][2] == starts[FROM_GENERALIST][2] == cfg.student.alpha


def test_student_loss_dkd_trains_on_dkd_and_kd_stays_the_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    real_fit = distill.fit
    monkeypatch.setattr(distill, "fit", lambda *args, **kw: seen.append(args[4].loss_fn) or real_fit(*args, **kw))
    torch.manual_seed(0)
    for overrides in ([], ["student.loss=dkd", "student.dkd_beta=4"]):
        _distill(student_config("student.transfer=dataset", *overrides), CountingTeacher(), tmp_path / str(len(seen)))
    assert isinstance(seen[0], KDLoss) and isinstance(seen[1], DKDLoss) and seen[1].beta == 4.0
    cfg = student_config("student.loss=dkd")
    assert distill.student_fingerprint(cfg, image_splits(), STUDENT) != distill.student_fingerprint(
        student_config(), image_splits(), STUDENT)


def test_dkd_with_live_mixed_labels_is_refused_before_training() -> None:
    with pytest.raises(ConfigError, match="student.loss = 'dkd'"):
        student_config("student.loss=dkd", "student.transfer=live", "data.mix=mixup")


def test_without_baselines_only_the_student_from_the_ensemble_trains(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = student_config("student.train.epochs=1", "student.baselines=false")
    paths = train_students(cfg, image_splits(), tmp_path, CountingTeacher(), CountingTeacher(), progress=False)
    assert set(paths) == {STUDENT} and paths[STUDENT].is_file()
    assert not (tmp_path / HARD_LABELS).exists()


def test_view_mean_trains_on_the_plain_images_against_the_teacher_averaged_over_its_views(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    teacher = CountingTeacher()
    cfg = student_config("data.flip=true", "data.crop_pad=1", "student.transfer=view_mean", f"student.views={VIEWS}")
    data = image_splits()
    trained_on = []
    real_fit = distill.fit
    monkeypatch.setattr(distill, "fit", lambda *args, **kw: trained_on.append(args[1]) or real_fit(*args, **kw))
    _distill(cfg, teacher, tmp_path / "student")
    assert teacher.rows == (VIEWS + 1) * N_TRAIN  # each augmented view and the plain images, labelled once
    saved = artifacts.load_torch(tmp_path / "student" / "teacher_logits.pt")["logits"]
    assert saved.shape == (VIEWS + 1, N_TRAIN, N_CLASSES)
    train = trained_on[0]
    assert train.views is None and torch.equal(train.x, data.x_train)  # the plain images, every epoch
    mean = torch.softmax(saved / cfg.student.temperature, -1).mean(0)  # the teacher's mean distribution at T
    assert torch.allclose(train.targets.exp(), mean, atol=1e-6)
    assert distill.transfer_views(cfg, N_TRAIN) is None
