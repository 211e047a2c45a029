"""Reliability: crashes, bad input and reruns never lose finished work or give a wrong answer silently.

Kills are real: a subprocess runs the CLI and gets SIGKILL (or Ctrl-C) at a chosen point;
the hooks that pick the point live in the test scripts, never in the library.
Resuming must then give the same student as a run that never stopped, without training
finished stages again. Runs use the tiny synthetic config of conftest.py.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    IMAGE_SHAPE,
    STUDENTS,
    SUBPROCESS_ENV,
    assert_same_weights,
    cli,
    make_model,
    run_cli,
    tiny_config,
    until_clusters,
)
from PIL import Image

from ensemble_kd import artifacts
from ensemble_kd import data as data_module
from ensemble_kd import export as export_module
from ensemble_kd import train as train_module
from ensemble_kd.config import load_config, to_toml
from ensemble_kd.data import load_data
from ensemble_kd.export import ExportError, export_student, load_student
from ensemble_kd.pipeline import start_run
from ensemble_kd.specialists import specialist_dir, train_all_specialists


@pytest.fixture
def reference(tiny_run: tuple[Path, dict]) -> Path:
    """The session's tiny run, never interrupted (specialists in-process, n_jobs = 1); read only."""
    return tiny_run[0]


def run_cli_ok(config_file: Path, out: Path, *extra: str) -> None:
    code, err = run_cli(config_file, out, *extra)
    assert code == 0, err


def run_script(tmp_path: Path, source: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(source)
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout,
                          env=SUBPROCESS_ENV)


def model_files(run_dir: Path) -> dict[str, tuple[bytes, int]]:
    """Every model.pt of a run: relative path -> (bytes, mtime in ns)."""
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("model.pt")}


def epochs_logged(stage_dir: Path) -> list[int]:
    return [r["epoch"] for r in artifacts.read_jsonl(stage_dir / artifacts.METRICS_FILE)]


def copy_run(reference: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(reference, tmp_path / "run"))


# ---------------------------------------------------------------- 1. kill anywhere, resume everywhere

KILL_AT_EPOCH = """
import os, signal, sys
from pathlib import Path
from ensemble_kd import artifacts
from ensemble_kd.cli import main

config, out, stage_dir, epoch = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
real_append = artifacts.append_jsonl

def append_jsonl(path, record):  # fit calls it once per epoch, after training it and before its checkpoint
    if Path(path).parent == out / stage_dir and record["epoch"] == epoch:
        os.kill(os.getpid(), signal.SIGKILL)
    real_append(path, record)

artifacts.append_jsonl = append_jsonl
sys.exit(main(["run", "--config", config, "--out", str(out), "--quiet"]))
"""


@pytest.mark.parametrize("stage_dir, epoch, epochs, finished", [
    ("generalist", 2, 3, []),
    ("specialists/specialist_01/hard", 2, 2, ["generalist", "specialists/specialist_00"]),
    ("student", 2, 3, ["generalist", "specialists/specialist_00", "specialists/specialist_01"]),
])
def test_sigkill_in_any_stage_then_resume_gives_the_uninterrupted_student(
        reference: Path, config_file: Path, tmp_path: Path, stage_dir: str, epoch: int, epochs: int,
        finished: list[str]) -> None:
    out = tmp_path / "run"
    killed = run_script(tmp_path, KILL_AT_EPOCH, str(config_file), str(out), stage_dir, str(epoch))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / stage_dir / "model.pt").exists()
    assert artifacts.load_torch(out / stage_dir / "checkpoint.pt")["epoch"] == epoch - 1
    for name in finished:
        assert (out / name / "model.pt").is_file(), name
    before = model_files(out)

    run_cli_ok(config_file, out, "--resume")
    after = model_files(out)
    assert {k: after[k] for k in before} == before  # finished stages were loaded, not trained or written again
    assert epochs_logged(out / stage_dir) == list(range(1, epochs + 1))  # resumed from the checkpoint
    for name in ("specialists/specialist_01/model.pt", *(f"{s}/model.pt" for s in STUDENTS)):
        assert_same_weights(out / name, reference / name)
    assert (out / "export" / "student.ts").is_file()


# ---------------------------------------------------------------- 2. atomic writes

def _fsync_fails(fd: int) -> None:
    raise OSError(28, "No space left on device")


def _torch_save_dies_halfway(obj, f, *args, **kwargs) -> None:
    f.write(b"PK\x03\x04 half a zip file")
    raise KeyboardInterrupt


@pytest.mark.parametrize("writer, old, new, reader, failure", [
    (artifacts.save_torch, {"v": torch.ones(3)}, {"v": torch.zeros(3)}, artifacts.load_torch, ("torch", "save")),
    (artifacts.write_json, {"v": 1}, {"v": 2}, artifacts.read_json, ("os", "fsync")),
    (artifacts.write_text, "old", "new", lambda p: Path(p).read_text(), ("os", "fsync")),
])
def test_a_write_failing_halfway_keeps_the_previous_file_and_leaves_no_temp(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer, old, new, reader, failure) -> None:
    path = tmp_path / "artifact"
    writer(path, old)
    module, name = failure
    monkeypatch.setattr(torch if module == "torch" else os, name,
                        _torch_save_dies_halfway if module == "torch" else _fsync_fails)
    with pytest.raises((OSError, KeyboardInterrupt)):
        writer(path, new)
    monkeypatch.undo()
    kept = reader(path)
    if module == "torch":
        assert torch.equal(kept["v"], old["v"])
    else:
        assert kept == old
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_files_follow_the_umask_like_open(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        written = [artifacts.write_text(tmp_path / "config.toml", "seed = 0\n"),
                   artifacts.save_torch(tmp_path / "model.pt", {"v": torch.ones(2)})]
        model, meta = make_model("mlp")
        export_student(model, meta, tmp_path / "export", ["torchscript", "state_dict"], torch.rand(2, *IMAGE_SHAPE))
        written += sorted((tmp_path / "export").iterdir())
        with open(tmp_path / "by-open.txt", "w") as f:
            f.write("reference")
    finally:
        os.umask(previous)
    expected = (tmp_path / "by-open.txt").stat().st_mode & 0o777
    assert expected == 0o666 & ~umask
    assert {p.name: p.stat().st_mode & 0o777 for p in written} == {p.name: expected for p in written}


@pytest.fixture
def previous_export(tmp_path: Path) -> tuple[Path, torch.Tensor, dict[str, bytes]]:
    """A good export in tmp_path/export: (folder, check batch, file name -> bytes)."""
    model, meta = make_model("mlp")
    batch = torch.rand(4, *IMAGE_SHAPE)
    out = tmp_path / "export"
    export_student(model, meta, out, ["torchscript", "state_dict"], batch)
    return out, batch, {p.name: p.read_bytes() for p in out.iterdir()}


def _other_student() -> tuple[torch.nn.Module, export_module.StudentMeta]:
    model, meta = make_model("mlp")
    with torch.no_grad():
        model.head.bias += 1.0
    return model, meta


def test_a_failed_parity_check_keeps_the_previous_export(previous_export) -> None:
    out, batch, files = previous_export
    model, meta = _other_student()
    with pytest.raises(ExportError, match="differs from eager PyTorch .* previous export is kept"):
        export_student(model, meta, out, ["torchscript", "state_dict"], batch, atol=-1.0)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files  # all old files, nothing else


def test_a_format_failing_halfway_keeps_every_previous_file(previous_export, monkeypatch: pytest.MonkeyPatch) -> None:
    out, batch, files = previous_export

    def dies_halfway(model, example, meta_json, path):
        artifacts.atomic_write(path, lambda f: (f.write(b"half"), _fsync_fails(0)))

    monkeypatch.setitem(export_module.WRITERS, "state_dict", dies_halfway)
    model, meta = _other_student()
    with pytest.raises(OSError, match="No space left"):  # a full disk, not the format: the CLI says so in one line
        export_student(model, meta, out, ["torchscript", "state_dict"], batch)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files  # the new torchscript file was not moved in
    assert load_student(out / "student.ts").format == "torchscript"


# ---------------------------------------------------------------- 3. corrupt or foreign artifacts

def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage, message", [
    (_truncate, "is corrupt or not a checkpoint"),
    (lambda p: p.write_bytes(b"\x00 not a model " * 50), "is corrupt or not a checkpoint"),
    (lambda p: torch.save({"weights": [1, 2]}, p), "is not an ensemble-kd model file"),
])
def test_a_corrupt_generalist_is_an_error_naming_the_file_not_retrained(
        reference: Path, config_file: Path, tmp_path: Path, damage, message: str) -> None:
    run_dir = copy_run(reference, tmp_path)
    model = run_dir / "generalist" / "model.pt"
    damage(model)
    damaged = model.read_bytes()
    code, err = run_cli(config_file, run_dir, "--resume")
    assert code == 2 and err.startswith("error: ")
    assert str(model) in err and message in err and "rerun with --resume" in err
    assert model.read_bytes() == damaged and not (run_dir / "generalist" / "checkpoint.pt").exists()


def test_a_generalist_of_another_architecture_is_refused_with_what_differs(
        reference: Path, config_file: Path, tmp_path: Path) -> None:
    run_dir = copy_run(reference, tmp_path)
    before, config = model_files(run_dir), (run_dir / "config.toml").read_bytes()
    code, err = run_cli(config_file, run_dir, "--resume", "--set", "generalist.model.hidden=[12]")
    assert code == 2 and err.startswith("error: generalist.model.hidden cannot change when resuming")
    assert str(run_dir / "generalist" / "model.pt") in err  # the work made with the old setting
    assert "= [16]" in err and "not [12]" in err  # what the run has, what was asked
    assert "--out" in err and "--overwrite" in err
    assert model_files(run_dir) == before and (run_dir / "config.toml").read_bytes() == config

    (run_dir / "config.toml").write_text(to_toml(tiny_config("generalist.model.hidden=[12]")))  # edited by hand
    code, err = run_cli(config_file, run_dir, "--resume")
    assert code == 2 and "--config" in err and "generalist.model.hidden" in err
    code, err = cli("run", "--out", str(run_dir), "--resume", "--quiet")
    assert code == 2 and str(run_dir / "generalist" / "model.pt") in err and "another configuration" in err
    assert "'hidden': [16]" in err and "'hidden': [12]" in err  # what the file has, what this run has
    assert model_files(run_dir) == before


def test_garbage_clusters_json_is_an_error_naming_the_file(reference: Path, config_file: Path, tmp_path: Path) -> None:
    run_dir = copy_run(reference, tmp_path)
    (run_dir / "clusters.json").write_text('{"clusters": [{"ids": [0, 1')
    before = model_files(run_dir)
    code, err = run_cli(config_file, run_dir, "--resume")
    assert code == 2 and err.startswith("error: ")
    assert str(run_dir / "clusters.json") in err and "not valid JSON" in err and "--resume" in err
    assert model_files(run_dir) == before
    (run_dir / "clusters.json").write_text('{"clusters": 1}')  # JSON, but not a clusters file
    code, err = cli("clusters", str(run_dir))
    assert code == 2 and str(run_dir / "clusters.json") in err and "--until clusters" in err


def test_a_specialist_of_another_cluster_is_refused_before_any_specialist_trains(
        reference: Path, config_file: Path, tmp_path: Path) -> None:
    run_dir = copy_run(reference, tmp_path)
    shutil.rmtree(specialist_dir(run_dir, 0))  # unfinished: would be trained on resume
    foreign = specialist_dir(run_dir, 1) / "model.pt"
    shutil.copyfile(specialist_dir(reference, 0) / "model.pt", foreign)
    code, err = run_cli(config_file, run_dir, "--resume")
    assert code == 2 and err.startswith("error: ")
    assert str(foreign) in err and "another configuration" in err and "subset: file has" in err
    assert not specialist_dir(run_dir, 0).exists()  # the error came before training specialist 0


# ---------------------------------------------------------------- 4. no silent overwrite

def test_overwrite_replaces_the_run_and_refuses_folders_that_are_not_runs(
        reference: Path, config_file: Path, tmp_path: Path) -> None:
    run_dir = copy_run(reference, tmp_path)
    manifest = (run_dir / "manifest.json").read_bytes()
    code, err = run_cli(config_file, run_dir, "--resume", "--overwrite")
    assert code == 2 and "contradict" in err and (run_dir / "manifest.json").read_bytes() == manifest

    old_generalist = (run_dir / "generalist" / "model.pt").stat().st_mtime_ns
    run_cli_ok(config_file, run_dir, "--overwrite", "--until", "generalist")
    assert not (run_dir / "specialists").exists()  # a file of the user's would refuse it: test_run_folder_safety.py
    assert (run_dir / "generalist" / "model.pt").stat().st_mtime_ns != old_generalist  # trained anew
    assert_same_weights(run_dir / "generalist" / "model.pt", reference / "generalist" / "model.pt")

    other = tmp_path / "my-folder"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    for flag in ("--overwrite", "--resume"):
        code, err = run_cli(config_file, other, flag)
        assert code == 2 and "does not look like an ensemble-kd run" in err, flag
    assert [p.name for p in other.iterdir()] == ["thesis.tex"]


# ---------------------------------------------------------------- 4b. a resumed run keeps its own settings

def _until_clusters(reference: Path, tmp_path: Path) -> Path:
    """A copy of the reference run as `run --until clusters` leaves it, in tmp_path/run: generalist and clusters."""
    return until_clusters(reference, tmp_path / "run")


def test_resume_without_config_reads_the_runs_own_settings(reference: Path, tmp_path: Path) -> None:
    run_dir = _until_clusters(reference, tmp_path)
    config = (run_dir / "config.toml").read_bytes()
    code, err = cli("run", "--out", str(run_dir), "--resume", "--quiet")  # the command `--until clusters` suggests
    assert code == 0, err
    assert (run_dir / "config.toml").read_bytes() == config
    for name in ("specialists/specialist_01", *STUDENTS):  # the same as the run that never stopped
        assert_same_weights(run_dir / name / "model.pt", reference / name / "model.pt")


@pytest.mark.parametrize("setting, stage", [
    ("seed=1", "generalist"), ("data.val_fraction=0.3", "generalist"), ("clusters.k=3", "specialists"),
    ("specialists.soft_lr=0.1", "specialists"), ("ensemble.top_n=2", "student"), ("student.alpha=0.3", "student"),
])
def test_resume_refuses_settings_that_finished_work_was_made_with_and_keeps_config_toml(
        reference: Path, tmp_path: Path, setting: str, stage: str) -> None:
    run_dir = copy_run(reference, tmp_path)
    config, models = (run_dir / "config.toml").read_bytes(), model_files(run_dir)
    code, err = cli("run", "--out", str(run_dir), "--resume", "--quiet", "--set", setting)
    key = setting.split("=")[0]
    assert code == 2 and err.startswith(f"error: {key} cannot change when resuming {run_dir}: its {stage} stage")
    assert "--out" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert (run_dir / "config.toml").read_bytes() == config and model_files(run_dir) == models


def test_resume_may_change_runtime_settings_and_stages_that_hold_no_work_yet(
        reference: Path, tmp_path: Path) -> None:
    run_dir = _until_clusters(reference, tmp_path)
    code, err = cli("run", "--out", str(run_dir), "--resume", "--quiet", "--until", "clusters",
                    "--set", "clusters.k=3", "--set", "student.train.epochs=2", "--set", "specialists.n_jobs=2",
                    "--set", "export.formats=state_dict")
    assert code == 0, err
    saved = load_config(run_dir / "config.toml")  # the run records what it continues with
    assert (saved.clusters.k, saved.student.train.epochs, saved.specialists.n_jobs) == (3, 2, 2)
    assert saved.export.formats == ["state_dict"]
    assert len(artifacts.read_json(run_dir / "clusters.json")["clusters"]) == 3


# ---------------------------------------------------------------- 5. bad data: an error before training

def _image(path: Path, size: tuple[int, int] = (4, 4)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, 128).save(path)


def _mixed_sizes(root: Path) -> None:
    _image(root / "train" / "b" / "big.png", (6, 6))


def _unreadable(root: Path) -> None:
    (root / "train" / "b" / "broken.png").write_bytes(b"not a png")


def _empty_class(root: Path) -> None:
    (root / "train" / "c").mkdir()


def _test_only_class(root: Path) -> None:
    _image(root / "test" / "z" / "0.png")


@pytest.mark.parametrize("defect, message", [
    (_mixed_sizes, "images differ in size"), (_unreadable, "cannot read image train/b/broken.png"),
    (_empty_class, "train/c"), (_test_only_class, "test/z"),
])
def test_a_bad_imagefolder_fails_before_the_generalist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       config_file: Path, defect, message: str) -> None:
    monkeypatch.setenv("ENSEMBLE_KD_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "images"
    for split, count in (("train", 8), ("test", 2)):
        for name in ("a", "b"):
            for i in range(count):
                _image(root / split / name / f"{i}.png")
    defect(root)
    out = tmp_path / "run"
    code, err = run_cli(config_file, out, "--set", "data.name=imagefolder", "--set", f"data.root={root}",
                        "--set", "clusters.k=0")
    assert code == 2 and err.startswith("error: ") and message in err
    assert not (out / "generalist").exists()


def _nan_pixel(x_train, y_train, x_test, y_test, names):
    x_train = x_train.clone()
    x_train[3, 0] = float("nan")
    return x_train, y_train, x_test, y_test, names


def _label_out_of_range(x_train, y_train, x_test, y_test, names):
    y_test = y_test.clone()
    y_test[0] = len(names)
    return x_train, y_train, x_test, y_test, names


def _negative_test_label(x_train, y_train, x_test, y_test, names):
    y_test = y_test.clone()
    y_test[5] = -1
    return x_train, y_train, x_test, y_test, names


def _negative_train_label(x_train, y_train, x_test, y_test, names):
    y_train = y_train.clone()
    y_train[5] = -1
    return x_train, y_train, x_test, y_test, names


def _float_labels(x_train, y_train, x_test, y_test, names):
    return x_train, y_train.float(), x_test, y_test, names


@pytest.mark.parametrize("corrupt, message", [
    (_nan_pixel, "NaN or infinite"), (_label_out_of_range, "test labels must be in [0, 6)"),
    (_negative_test_label, "test labels must be in [0, 6); found 1 label outside, e.g. -1 at index 5"),
    (_negative_train_label, "train labels must be in [0, 6)"),
    (_float_labels, "labels must be integer class ids"),
])
def test_bad_values_from_any_loader_fail_before_the_generalist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               config_file: Path, corrupt, message: str) -> None:
    real = data_module._load_synthetic
    monkeypatch.setattr(data_module, "_load_synthetic", lambda cfg, seed: corrupt(*real(cfg, seed)))
    code, err = run_cli(config_file, tmp_path / "run")
    assert code == 2 and err.startswith("error: ") and message in err
    assert not (tmp_path / "run" / "generalist").exists()


# ---------------------------------------------------------------- 6. impossible configs: an error before any work

@pytest.mark.parametrize("overrides, message", [
    (["clusters.k=2", "clusters.max_size=2", "clusters.min_confusion=0"],
     "at most clusters.max_size = 2 classes hold 4 classes, the data has 6"),
    (["student.model.hidden=[64]"], "more than student.max_params_ratio"),
])
def test_impossible_settings_known_after_loading_the_data_fail_before_the_generalist(
        tmp_path: Path, config_file: Path, overrides: list[str], message: str) -> None:
    out = tmp_path / "run"
    code, err = run_cli(config_file, out, *(a for o in overrides for a in ("--set", o)))
    assert code == 2 and err.startswith("error: ") and message in err
    assert sorted(p.name for p in out.iterdir()) == [".ensemble-kd-run", ".lock", "config.toml"]  # no generalist/
    start_run(tiny_config(), out)  # holding no work, the folder is reused without --resume


@pytest.mark.parametrize("override, message", [
    ("generalist.train.epochz=3", "unknown config key 'generalist.train.epochz'"),
    ("clusters.k=two", "clusters.k must be of type int"),
    ("specialists.n_jobs=1.5", "specialists.n_jobs must be of type int"),
    ("data.storage=stream", "data.storage = 'stream' reads image files from disk, and data.name = 'synthetic'"),
    ("data.mix=cutmix", "data.mix augments images, and the synthetic data are flat features"),
])
def test_unknown_keys_and_wrong_types_fail_before_the_run_directory_exists(
        tmp_path: Path, config_file: Path, override: str, message: str) -> None:
    code, err = run_cli(config_file, tmp_path / "run", "--set", override)
    assert code == 2 and err.startswith("error: ") and message in err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- 7. non-finite training

def test_a_nan_loss_names_stage_epoch_step_and_the_fix_and_keeps_the_checkpoint(
        reference: Path, config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    real = train_module.cross_entropy

    def nan_from_epoch_2(label_smoothing: float = 0.0):
        loss = real(label_smoothing)
        return lambda logits, y, t: loss(logits, y, t) * (
            float("nan") if (out / "generalist" / "checkpoint.pt").exists() else 1.0)

    monkeypatch.setattr(train_module, "cross_entropy", nan_from_epoch_2)
    code, err = run_cli(config_file, out)
    assert code == 2 and err.startswith("error: generalist: loss became nan at epoch 2, in steps 1-")
    assert "learning rate" in err and "--resume" in err
    assert artifacts.load_torch(out / "generalist" / "checkpoint.pt")["epoch"] == 1
    assert not (out / "generalist" / "model.pt").exists()

    monkeypatch.undo()
    run_cli_ok(config_file, out, "--resume", "--until", "generalist")
    assert_same_weights(out / "generalist" / "model.pt", reference / "generalist" / "model.pt")


# ---------------------------------------------------------------- 8. a specialist worker that dies

WORKER_DIES = """
import os, signal, sys, time
from ensemble_kd import specialists
from ensemble_kd.config import load_config

def worker(cfg, run_dir, cluster_id, *args):  # defined in __main__, so loky ships it to the worker by value
    from ensemble_kd import specialists as spec
    if cluster_id == 1:
        real_fit = spec.fit

        def fit(*args):  # specialist 1 dies in its soft phase, once specialist 0 is done
            if args[-1].stage.endswith("soft"):
                deadline = time.time() + 120
                while not spec.is_finished(run_dir, 0) and time.time() < deadline:
                    time.sleep(0.05)
                os.kill(os.getpid(), signal.SIGKILL)
            return real_fit(*args)

        spec.fit = fit
    return spec._worker(cfg, run_dir, cluster_id, *args)

specialists._worker = worker
try:
    specialists.train_all_specialists(load_config(sys.argv[1], ["specialists.n_jobs=2"]), sys.argv[2])
except specialists.SpecialistError as err:  # what the CLI reports as "error: ..." with exit code 2
    sys.exit(f"error: {err}")
"""


def test_a_dead_worker_names_its_specialist_keeps_the_others_and_resume_trains_only_it(
        reference: Path, config_file: Path, tmp_path: Path) -> None:
    run_dir = copy_run(reference, tmp_path)
    shutil.rmtree(run_dir / "specialists")
    died = run_script(tmp_path, WORKER_DIES, str(config_file), str(run_dir))
    error = [line for line in died.stderr.splitlines() if line.startswith("error: ")]
    assert died.returncode == 1 and error, died.stderr
    assert error[0].startswith("error: specialist(s) 1 stopped: a worker process died (TerminatedWorkerError")
    assert "rerun with --resume" in error[0] and "kept (0)" in error[0]
    finished = specialist_dir(run_dir, 0) / "model.pt"
    assert_same_weights(finished, specialist_dir(reference, 0) / "model.pt")
    assert (specialist_dir(run_dir, 1) / "STARTED").exists() and not (specialist_dir(run_dir, 1) / "model.pt").exists()
    saved = finished.read_bytes(), finished.stat().st_mtime_ns

    cfg = tiny_config()
    train_all_specialists(cfg, run_dir, load_data(cfg.data, cfg.seed))
    assert (finished.read_bytes(), finished.stat().st_mtime_ns) == saved
    assert_same_weights(specialist_dir(run_dir, 1) / "model.pt", specialist_dir(reference, 1) / "model.pt")


# -------------------------------------------------------------- 9. Ctrl-C, SIGTERM, SIGKILL during parallel specialists

STALLED_SPECIALISTS = """
import signal, sys, time
from pathlib import Path
from ensemble_kd import specialists
from ensemble_kd.cli import main

# Ctrl-C as in a terminal, also when pytest itself runs as a background job (`make test &`),
# whose children inherit SIGINT ignored and so would never see the signal this test sends
signal.signal(signal.SIGINT, signal.default_int_handler)

def worker(cfg, run_dir, cluster_id, *args):  # pickled by value: runs in the worker process
    from ensemble_kd import specialists as spec
    real_train = spec.train_specialist

    def train_specialist(*train_args, **kwargs):  # waits for the file "go" beside the run directory first
        (Path(run_dir).parent / f"waiting-{cluster_id}").touch()
        go, deadline = Path(run_dir).parent / "go", time.time() + 300
        while not go.exists() and time.time() < deadline:
            time.sleep(0.05)
        return real_train(*train_args, **kwargs)

    spec.train_specialist = train_specialist
    library_worker = getattr(spec, "library_worker", spec._worker)  # in a loky worker, _worker is the library's
    return library_worker(cfg, run_dir, cluster_id, *args)

specialists.library_worker, specialists._worker = specialists._worker, worker  # in this process: n_jobs = 1
sys.exit(main(["run", *sys.argv[1:]]))
"""


def _wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def _alive(processes: list) -> list:
    import psutil  # the dask extra brings it; the test calling this has already skipped without it

    def running(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    return [p for p in processes if running(p)]


def _start_stalled_run(config_file: Path, out: Path, *flags: str, n_jobs: int = 2) -> subprocess.Popen:
    """A `run` subprocess whose specialists wait for the file "go" beside `out` before they start training."""
    script = out.parent / "stalled.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(STALLED_SPECIALISTS)
    return subprocess.Popen([sys.executable, str(script), "--config", str(config_file), "--out", str(out), "--quiet",
                             "--set", f"specialists.n_jobs={n_jobs}", *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=SUBPROCESS_ENV, start_new_session=True)


def _children_once_waiting(proc: subprocess.Popen, out: Path, specialists: int) -> list:
    """The run's child processes (loky workers and their resource tracker) once `specialists` of them wait."""
    psutil = pytest.importorskip("psutil", reason="psutil (installed with the dask extra) lists the workers")
    waiting = [out.parent / f"waiting-{k}" for k in range(specialists)]
    if not _wait_for(lambda: all(p.exists() for p in waiting) or proc.poll() is not None, 180):
        os.killpg(proc.pid, signal.SIGKILL)
    assert proc.poll() is None, proc.communicate()[1]
    return psutil.Process(proc.pid).children(recursive=True)


def _files(run_dir: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _nothing_changes(run_dirs) -> bool:
    """Let any worker still alive go on (the file "go" beside each run) and see whether a run directory changes."""
    before = [_files(run_dir) for run_dir in run_dirs]
    for run_dir in run_dirs:
        (run_dir.parent / "go").touch()
    time.sleep(1)  # a surviving worker would start loading, training and writing its specialist at once
    return [_files(run_dir) for run_dir in run_dirs] == before


def test_ctrl_c_during_parallel_specialists_exits_130_leaves_no_workers_and_resume_finishes(
        reference: Path, config_file: Path, tmp_path: Path) -> None:
    out = _until_clusters(reference, tmp_path)  # a run stopped after its clusters, continued
    proc = _start_stalled_run(config_file, out, "--resume")
    try:
        children = _children_once_waiting(proc, out, specialists=2)
        assert len(children) >= 2  # the loky workers (and their resource tracker)
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
        _, stderr = proc.communicate(timeout=30)
        assert time.monotonic() - sent < 15
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "rerun with --resume" in stderr and "Traceback" not in stderr
    assert _wait_for(lambda: not _alive(children), 5), [p.cmdline() for p in _alive(children)]
    assert (out / "generalist" / "model.pt").is_file()

    run_cli_ok(config_file, out, "--resume", "--set", "specialists.n_jobs=1")
    for name in ("specialists/specialist_01", *STUDENTS):
        assert_same_weights(out / name / "model.pt", reference / name / "model.pt")


def test_sigterm_and_sigkill_end_a_run_and_nothing_is_written_after(
        reference: Path, config_file: Path, tmp_path: Path) -> None:
    """Two runs stopped while their specialists train, side by side so that they wait in the same seconds;
    each continues one stopped after its clusters.

    SIGTERM (`kill PID`, a batch scheduler) raises the same KeyboardInterrupt as Ctrl-C in the run, so it
    ends like Ctrl-C with exit code 143 and one line (its specialist trains in the run's own process:
    stopping loky workers is the Ctrl-C test's part). SIGKILL (out of memory, say) gives the run no chance
    to stop its loky workers: they stop themselves. While the killed run lived, a second run into its
    directory was refused naming its pid; afterwards no file changes in either run directory."""
    term, kill = (_until_clusters(reference, tmp_path / name) for name in ("sigterm", "sigkill"))
    procs = [_start_stalled_run(config_file, term, "--resume", n_jobs=1),
             _start_stalled_run(config_file, kill, "--resume")]
    try:
        _children_once_waiting(procs[0], term, specialists=1)
        workers = _children_once_waiting(procs[1], kill, specialists=2)
        assert len(workers) >= 2  # the loky workers (and their resource tracker)
        for flags in (["--resume"], ["--overwrite"]):  # the lock: one run at a time in a directory
            code, err = run_cli(config_file, kill, *flags)
            assert code == 2 and err.startswith(f"error: {kill} is in use by another ensemble-kd run "
                                                f"(pid {procs[1].pid})"), err
        procs[0].terminate()  # SIGTERM to the run alone, not its process group
        procs[1].kill()  # SIGKILL to the run alone
        _, stderr = procs[0].communicate(timeout=30)
        procs[1].wait(timeout=30)
        assert _wait_for(lambda: not _alive(workers), 10), [p.cmdline() for p in _alive(workers)]
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    assert procs[0].returncode == 143, stderr
    assert [line for line in stderr.splitlines() if line.strip()] == [
        "terminated (SIGTERM); finished work is saved: rerun with --resume to continue"]
    assert _nothing_changes([term, kill])  # a worker that went on would now train and write its specialist
    assert (term / "generalist" / "model.pt").is_file() and (term / "clusters.json").is_file()
    assert artifacts.lock_run_dir(kill)  # the kernel released the dead run's lock
    artifacts.unlock_run_dir(kill)
