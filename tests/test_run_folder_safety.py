"""What --overwrite may delete, what a refused --resume writes (nothing), resuming with the same command line,
workers of a killed run, stale temporary files, and continuing a stage after a non-finite loss.

Runs use the tiny synthetic config of conftest.py (and a tiny image folder where data.root matters).
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
from conftest import REPO, STUDENTS, SUBPROCESS_ENV, assert_same_weights, cli, run_cli, until_clusters
from PIL import Image

from ensemble_kd import artifacts
from ensemble_kd import train as train_module
from ensemble_kd.config import load_config


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes), and every folder (-> b"<dir>")."""
    return {str(p.relative_to(folder)): b"<dir>" if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def copy_run(tiny_run: tuple[Path, dict], tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_run[0], tmp_path / "run"))


# ---------------------------------------------------------------- 1. --overwrite deletes only a marked run's own files

def _black_project(folder: Path) -> None:
    (folder / "config.toml").write_text("[tool.black]\nline-length = 88\n")
    (folder / "thesis.txt").write_text("years of work")
    (folder / "src").mkdir()
    (folder / "src" / "main.py").write_text("print('hello')\n")


def _browser_extension(folder: Path) -> None:
    (folder / "manifest.json").write_text('{"manifest_version": 3, "name": "mine"}')
    (folder / "background.js").write_text("chrome.runtime.onInstalled.addListener(() => {});\n")
    (folder / "icons").mkdir()
    (folder / "icons" / "icon.png").write_bytes(b"\x89PNG not really")


@pytest.mark.parametrize("make", [_black_project, _browser_extension])
def test_overwrite_refuses_a_folder_that_ensemble_kd_did_not_make(tmp_path: Path, config_file: Path, make) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    make(folder)
    before = snapshot(folder)
    code, err = run_cli(config_file, folder, "--overwrite", "--until", "generalist")
    assert snapshot(folder) == before  # not even a lock file or a marker was left
    assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "nothing was deleted" in err and ".ensemble-kd-run" in err and "delete it yourself" in err


def test_a_folder_holding_only_someone_elses_config_toml_is_not_reused(tmp_path: Path, config_file: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.toml").write_text("[tool.black]\nline-length = 88\n")
    code, err = run_cli(config_file, folder, "--until", "generalist")
    assert code == 2 and "does not look like an ensemble-kd run" in err, err
    assert snapshot(folder) == {"config.toml": b"[tool.black]\nline-length = 88\n"}


def test_overwrite_of_a_marked_run_with_a_file_of_the_user_refuses_naming_it(
        tiny_run: tuple[Path, dict], tmp_path: Path, config_file: Path) -> None:
    run_dir = copy_run(tiny_run, tmp_path)
    (run_dir / "notes.txt").write_text("mine")
    (run_dir / "plots").mkdir()
    before = snapshot(run_dir)
    code, err = run_cli(config_file, run_dir, "--overwrite", "--until", "generalist")
    assert snapshot(run_dir) == before
    assert code == 2 and "notes.txt, plots" in err and "nothing was deleted" in err and len(err.splitlines()) == 1
    assert artifacts.is_marked_run(run_dir)  # every run directory ensemble-kd makes carries the marker

    (run_dir / "notes.txt").unlink()
    (run_dir / "plots").rmdir()
    code, err = run_cli(config_file, run_dir, "--overwrite", "--until", "generalist")
    assert code == 0, err
    assert artifacts.is_marked_run(run_dir) and (run_dir / "generalist" / "model.pt").is_file()
    assert not (run_dir / "specialists").exists() and not (run_dir / "clusters.json").exists()  # the run was replaced


def test_overwrite_refuses_a_run_without_the_marker_and_says_how_to_proceed(
        tiny_run: tuple[Path, dict], tmp_path: Path, config_file: Path) -> None:
    run_dir = copy_run(tiny_run, tmp_path)
    marker = run_dir / ".ensemble-kd-run"
    marker.unlink(missing_ok=True)  # as runs made by older versions are
    before = snapshot(run_dir)
    code, err = run_cli(config_file, run_dir, "--overwrite")
    assert snapshot(run_dir) == before
    assert code == 2 and "older versions" in err and "delete it yourself" in err and "--out" in err
    marker.write_text("ensemble-kd run directory\n")  # written by hand: not the marker
    assert not artifacts.is_marked_run(run_dir)


# ---------------------------------------------------------------- 2. a refused --resume writes nothing

def _image_folder(root: Path, classes: int = 3, per_class: int = 8) -> Path:
    for split, count in (("train", per_class), ("test", 3)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.new("L", (4, 4), 40 * c + 5 * i).save(folder / f"{i}.png")
    return root


@pytest.fixture
def image_run(tmp_path: Path, config_file: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A run on a tiny image folder (data.root matters), stopped after its generalist."""
    monkeypatch.setenv("ENSEMBLE_KD_CACHE", str(tmp_path / "cache"))
    root = _image_folder(tmp_path / "images")
    out = tmp_path / "run"
    code, err = run_cli(config_file, out, "--set", "data.name=imagefolder", "--set", f"data.root={root}",
                    "--set", "clusters.k=0", "--set", "data.workers=0", "--until", "generalist")
    assert code == 0, err
    artifacts.unlock_run_dir(out)  # this process keeps the locks of the runs it made: as if that run had ended
    return out


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process holding the run's lock, as a second run would (ends when the test kills it)."""
    source = ("import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
              "fcntl.flock(fd, fcntl.LOCK_EX)\nos.write(fd, b'4242')\nprint('locked', flush=True)\ntime.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", source, str(run_dir / artifacts.LOCK_FILE)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


REFUSALS = {  # how a resume is refused -> (extra arguments, words of the one line); each also asks for a change
    "other data": (["--set", "data.root={other}"], "made from other data"),
    "missing data": (["--set", "data.root={missing}"], "does not exist"),
    "data that do not fit": (["--set", "data.root={one_class}"], "at least 2"),
    "setting with work": (["--set", "generalist.train.epochs=5", "--set", "data.workers=1"], "cannot change"),
    "bad value": (["--set", "data.workers=1", "--set", "generalist.train.lr=-1"], "generalist.train.lr must be"),
    "unknown key": (["--set", "data.workers=1", "--set", "generalist.train.epochz=3"], "unknown config key"),
    "too many threads": (["--set", "threads=100000"], "more than this machine can run"),
    "contradicting flags": (["--overwrite", "--set", "data.workers=1"], "contradict"),
    "another config file": (["--config", "{config}", "--set", "data.workers=1"], "is not the config of the run"),
    "locked": (["--set", "data.workers=1"], "in use by another ensemble-kd run"),
    "corrupt model file": (["--set", "data.workers=1"], "is corrupt"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_refused_resume_leaves_config_toml_byte_for_byte(image_run: Path, tmp_path: Path, config_file: Path,
                                                          case: str) -> None:
    other, one_class = _image_folder(tmp_path / "other", per_class=9), _image_folder(tmp_path / "one", classes=1)
    extra, words = REFUSALS[case]
    extra = [a.format(other=other, missing=tmp_path / "missing", one_class=one_class, config=config_file)
             for a in extra]
    if case == "corrupt model file":
        (image_run / "generalist" / "model.pt").write_bytes(b"not a model")
    config, holder = (image_run / "config.toml").read_bytes(), _hold_lock(image_run) if case == "locked" else None
    try:
        code, err = cli("run", "--out", str(image_run), "--resume", "--quiet", "--until", "clusters", *extra)
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
    assert (image_run / "config.toml").read_bytes() == config
    assert code == 2 and err.startswith("error: ") and words in err and len(err.splitlines()) == 1, err
    assert not (image_run / "confusion").exists()  # nothing went on either
    if case == "other data":  # and the run's own settings still resume it
        code, err = cli("run", "--out", str(image_run), "--resume", "--quiet", "--until", "clusters")
        assert code == 0, err


# ---------------------------------------------------------------- 3. the same command line, plus --resume

def test_the_same_command_with_resume_added_resumes(tmp_path: Path) -> None:
    command = ["run", "--config", str(REPO / "pipelines" / "configs" / "digits.toml"), "--out", str(tmp_path / "run"),
               "--quiet", "--set", "student.train.epochs=7", "--set", "generalist.train.epochs=1",
               "--until", "generalist"]
    code, err = cli(*command)
    assert code == 0, err
    config = (tmp_path / "run" / "config.toml").read_bytes()
    code, err = cli(*command, "--resume")
    assert code == 0, err
    assert (tmp_path / "run" / "config.toml").read_bytes() == config

    code, err = cli(*command[:-2], "--until", "clusters", "--resume")  # the file and --set still describe the run
    assert code == 0, err
    without = [a for a in command if a != "student.train.epochs=7"]
    without.remove("--set")  # the --set before it
    code, err = cli(*without, "--resume")  # the file alone is not the run's config
    assert code == 2 and "student.train.epochs is 40 there" in err and "but 7 in the run" in err


# ---------------------------------------------------------------- 4. a killed run: its workers, its temporary files

def test_resume_removes_stale_temporary_files(tiny_run: tuple[Path, dict], tmp_path: Path) -> None:
    run_dir = copy_run(tiny_run, tmp_path)
    stale = [run_dir / "specialists" / "specialist_01" / "hard" / ".checkpoint.pt.0a1b2c3d.tmp",
             run_dir / ".config.toml.deadbeef.tmp", run_dir / "generalist" / ".metrics.csv.12345678.tmp"]
    for path in stale:
        path.write_bytes(b"PK\x03\x04 torn")
    kept = run_dir / "generalist" / "notes.tmp"  # not a name ensemble-kd gives its temporary files
    kept.write_text("mine")
    code, err = cli("run", "--out", str(run_dir), "--resume", "--quiet", "--until", "generalist")
    assert code == 0, err
    assert not any(p.exists() for p in stale) and kept.exists()


def _alive(psutil, processes: list) -> list:
    def running(p) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    return [p for p in processes if running(p)]


def test_workers_of_a_killed_run_stop_at_once_and_write_nothing_after(
        clustered_run: Path, tmp_path: Path) -> None:
    psutil = pytest.importorskip("psutil", reason="psutil (installed with the dask extra) lists the workers")
    out = Path(shutil.copytree(clustered_run, tmp_path / "run"))
    proc = subprocess.Popen([sys.executable, "-m", "ensemble_kd.cli", "run", "--out", str(out), "--resume", "--quiet",
                             "--set", "specialists.n_jobs=2", "--set", "specialists.train.epochs=2000",
                             "--set", "specialists.train.batch_size=4"], env=SUBPROCESS_ENV, start_new_session=True,
                            stderr=subprocess.PIPE, text=True)
    logs = [out / "specialists" / f"specialist_0{k}" / "hard" / "metrics.jsonl" for k in (0, 1)]
    try:
        deadline = time.monotonic() + 120
        while not all(p.is_file() and p.stat().st_size for p in logs) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.05)
        assert all(p.stat().st_size for p in logs), "the specialists did not start training"
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "resource_tracker" not in " ".join(p.cmdline())]
        proc.kill()  # SIGKILL to the run alone, its workers training
        proc.wait(timeout=10)
        died = time.monotonic()
        before = {k: v for k, v in snapshot(out).items() if not k.endswith(".tmp")}
        while _alive(psutil, workers) and time.monotonic() < died + 5:
            time.sleep(0.02)
        stopped = time.monotonic() - died
        time.sleep(0.5)
        after = {k: v for k, v in snapshot(out).items() if not k.endswith(".tmp")}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert stopped < 0.5, f"workers went on for {stopped:.2f} s"  # as the README says
    assert after == before  # no metrics line, checkpoint or model written after the run died


# ---------------------------------------------------------------- 6. continuing after a non-finite loss

def _nan_while(monkeypatch: pytest.MonkeyPatch, stage_dir: Path, too_high: float) -> list[float]:
    """Losses become NaN in `stage_dir` once its first checkpoint is written, while the learning rate of the
    training being made is above `too_high`; returns the learning rates seen."""
    real_loss, real_optimizer, lrs = train_module.cross_entropy, train_module.make_optimizer, []

    def make_optimizer(model, cfg):
        lrs.append(cfg.lr)
        return real_optimizer(model, cfg)

    def cross_entropy(label_smoothing: float = 0.0):
        loss = real_loss(label_smoothing)
        return lambda logits, y, t: loss(logits, y, t) * (
            float("nan") if (stage_dir / "checkpoint.pt").exists() and lrs[-1] > too_high else 1.0)

    monkeypatch.setattr(train_module, "make_optimizer", make_optimizer)
    monkeypatch.setattr(train_module, "cross_entropy", cross_entropy)
    return lrs


def test_after_a_nan_the_advised_resume_continues_from_the_last_good_checkpoint(
        tmp_path: Path, config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    lrs = _nan_while(monkeypatch, out / "generalist", too_high=1.5e-3)
    code, err = run_cli(config_file, out, "--until", "generalist")
    assert code == 2 and err.startswith("error: generalist: loss became nan at epoch 2"), err
    advice = "--resume --set generalist.train.lr=0.001 (now 0.002)"
    assert advice in err and "last good checkpoint (epoch 1" in err and "generalist.train.grad_clip=2.5" in err
    assert artifacts.load_torch(out / "generalist" / "checkpoint.pt")["epoch"] == 1

    code, err = cli("run", "--out", str(out), "--quiet", "--until", "generalist", *advice.split()[:3])
    assert code == 0, err
    assert lrs[-1] == 1e-3 and load_config(out / "config.toml").generalist.train.lr == 1e-3
    assert [r["epoch"] for r in artifacts.read_jsonl(out / "generalist" / "metrics.jsonl")] == [1, 2, 3]
    assert artifacts.load_torch(out / "generalist" / "model.pt")["fingerprint"]["train"]["lr"] == 1e-3
    restart = artifacts.read_json(out / "manifest.json")["restarts"][0]
    assert (restart["setting"], restart["from"], restart["to"]) == ("generalist.train.lr", 2e-3, 1e-3)
    assert not (out / "generalist" / artifacts.NONFINITE_FILE).exists()
    code, err = cli("run", "--out", str(out), "--quiet", "--resume", "--until", "clusters")  # and it goes on
    assert code == 0, err


def test_a_specialist_after_a_nan_continues_with_a_lower_lr_and_its_finished_sibling_is_kept(
        tiny_run: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = until_clusters(tiny_run[0], tmp_path / "run")
    failing = out / "specialists" / "specialist_01" / "hard"
    _nan_while(monkeypatch, failing, too_high=4e-4)
    code, err = cli("run", "--out", str(out), "--resume", "--quiet")
    assert code == 2 and "specialist 1 hard: loss became nan at epoch 2" in err, err
    assert "--resume --set specialists.train.lr=0.00025 (now 0.0005)" in err
    finished = out / "specialists" / "specialist_00" / "model.pt"
    assert_same_weights(finished, tiny_run[0] / "specialists" / "specialist_00" / "model.pt")
    saved = finished.read_bytes()

    code, err = cli("run", "--out", str(out), "--resume", "--quiet", "--set", "specialists.train.lr=0.00025")
    assert code == 0, err
    assert finished.read_bytes() == saved  # made with the old lr, and still this run's
    assert (failing.parent / "model.pt").is_file() and all((out / s / "model.pt").is_file() for s in STUDENTS)
    code, err = cli("run", "--out", str(out), "--resume", "--quiet", "--set", "specialists.train.lr=0.0001")
    assert code == 2 and "specialists.train.lr cannot change" in err  # finished now: no more changes


# ---------------------------------------------------------------- 6. red-team findings: files inside a run's own
# folders, resuming a folder ensemble-kd did not make, other pixels, unwritable folders, huge models, long values

def test_overwrite_refuses_user_files_inside_the_runs_own_folders(
        tiny_run: tuple[Path, dict], tmp_path: Path, config_file: Path) -> None:
    run_dir = copy_run(tiny_run, tmp_path)
    (run_dir / "generalist" / "notes.txt").write_text("x")
    (run_dir / "export" / "my_predictions.csv").write_text("p")
    (run_dir / "specialists" / "specialist_00" / "hard" / "old").mkdir()
    before = snapshot(run_dir)
    code, err = run_cli(config_file, run_dir, "--overwrite", "--until", "generalist")
    assert snapshot(run_dir) == before  # nothing deleted
    assert code == 2 and len(err.splitlines()) == 1 and "nothing was deleted" in err, err
    assert "export/my_predictions.csv, generalist/notes.txt, specialists/specialist_00/hard/old/" in err


def test_overwrite_still_replaces_a_run_holding_every_file_ensemble_kd_writes(
        tiny_run: tuple[Path, dict], tmp_path: Path, config_file: Path) -> None:
    from ensemble_kd.confusion import MATRICES_FILE
    from ensemble_kd.export import FILE_NAMES, META_FILE

    assert artifacts.EXPORT_FILES == {*FILE_NAMES.values(), META_FILE}
    assert artifacts.CONFUSION_FILES == {MATRICES_FILE}
    run_dir = copy_run(tiny_run, tmp_path)
    extra = ["generalist/events.out.tfevents.1796692279.vm.20478.0", "generalist/checkpoint.pt",
             "generalist/nonfinite.json", "generalist/.model.pt.0123abcd.tmp", "student/.teachers.json.deadbeef.tmp",
             "specialists/specialist_01/soft/events.out.tfevents.1.h.2.3",
             "specialists/specialist_00/hard/checkpoint.pt",
             "export/student.onnx", "export/student.pt2", "export/..student.ts.0123abcd.tmp.89abcdef.tmp",
             "confusion/.matrices.npz.0123abcd.tmp", ".report.md.0123abcd.tmp"]
    for name in extra:
        (run_dir / name).write_bytes(b"")
    assert artifacts.foreign_files(run_dir) == []
    code, err = run_cli(config_file, run_dir, "--overwrite", "--until", "generalist")
    assert code == 0, err
    assert not (run_dir / "specialists").exists() and (run_dir / "generalist" / "model.pt").is_file()


def test_resume_refuses_a_folder_without_the_marker_that_holds_no_work(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    shutil.copy(REPO / "pipelines" / "configs" / "digits.toml", folder / "config.toml")
    (folder / "report.md").write_text("my report")
    (folder / "thesis.txt").write_text("years of work")
    before = snapshot(folder)
    code, err = cli("run", "--out", str(folder), "--quiet", "--until", "generalist", "--resume")
    assert snapshot(folder) == before  # no manifest.json, generalist/ or .lock; report.md untouched
    assert code == 2 and len(err.splitlines()) == 1 and "does not look like an ensemble-kd run" in err, err
    assert "nothing was written" in err
    code, err = cli("run", "--out", str(folder), "--quiet", "--until", "generalist")  # without --resume
    assert snapshot(folder) == before
    assert code == 2 and "does not look like an ensemble-kd run" in err and "--resume" not in err, err


def test_resume_adopts_a_run_made_by_an_older_version_and_marks_it(
        tiny_run: tuple[Path, dict], tmp_path: Path) -> None:
    run_dir = copy_run(tiny_run, tmp_path)
    (run_dir / ".ensemble-kd-run").unlink()  # as runs made by older versions are
    code, err = cli("run", "--out", str(run_dir), "--quiet", "--until", "generalist", "--resume")
    assert code == 0, err
    assert artifacts.is_marked_run(run_dir)
    assert_same_weights(run_dir / "generalist" / "model.pt", tiny_run[0] / "generalist" / "model.pt")


def test_resume_with_other_pixels_of_the_same_classes_and_counts_is_refused(
        image_run: Path, tmp_path: Path) -> None:
    import json

    assert "data_digest" in json.loads((image_run / "manifest.json").read_text())
    other = tmp_path / "other"
    for split, count in (("train", 8), ("test", 3)):  # as _image_folder, other pixel values
        for c in range(3):
            folder = other / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.new("L", (4, 4), 250 - 40 * c - 5 * i).save(folder / f"{i}.png")
    config, manifest = (image_run / "config.toml").read_bytes(), (image_run / "manifest.json").read_bytes()
    code, err = cli("run", "--out", str(image_run), "--resume", "--quiet", "--until", "clusters",
                    "--set", f"data.root={other}")
    assert code == 2 and len(err.splitlines()) == 1 and "other data" in err and "nothing was written" in err, err
    assert str(other) in err
    assert (image_run / "config.toml").read_bytes() == config and (image_run / "manifest.json").read_bytes() == manifest
    assert not (image_run / "confusion").exists()


def _unwritable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every atomic write fails as on a read-only file system."""
    import errno

    def refuse(path: Path):
        raise OSError(errno.EROFS, "Read-only file system", str(path))
    monkeypatch.setattr(artifacts, "new_temp_file", refuse)


@pytest.mark.parametrize("command", ["report", "clusters", "export", "export --out"])
def test_an_unwritable_run_folder_gives_one_line_not_a_traceback(
        tiny_run: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    run_dir = copy_run(tiny_run, tmp_path)
    _unwritable(monkeypatch)
    argv = [command.split()[0], str(run_dir)] + (["--out", str(tmp_path / "exported")] if "--out" in command else [])
    code, err = cli(*argv)
    assert code == 2 and err.startswith("error: cannot write ") and len(err.splitlines()) == 1, err
    assert "Read-only file system" in err


def test_an_unwritable_out_folder_gives_one_line_not_a_traceback(
        tmp_path: Path, config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    real_mkdir = Path.mkdir

    def mkdir(self: Path, *args, **kwargs) -> None:
        if "ro" in self.parts:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        real_mkdir(self, *args, **kwargs)
    monkeypatch.setattr(Path, "mkdir", mkdir)
    code, err = run_cli(config_file, tmp_path / "ro" / "sub", "--until", "generalist")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: cannot write {tmp_path / 'ro' / 'sub'}: Permission denied")


def test_a_model_too_big_for_memory_is_one_line(tmp_path: Path, config_file: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from ensemble_kd import pipeline

    real = pipeline.build_model

    def build(model, *args):
        if model.hidden == [100000000] and torch.empty(0).device.type != "meta":
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 3200000000000 bytes. Error code 12")
        return real(model, *args)
    monkeypatch.setattr(pipeline, "build_model", build)
    code, err = run_cli(config_file, tmp_path / "run", "--until", "generalist",
                        "--set", "generalist.model.hidden=[100000000]")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "generalist.model" in err and "1,500,000,006 parameters" in err and "choose a smaller model" in err


def test_a_long_value_is_not_echoed_whole(tmp_path: Path) -> None:
    code, err = cli("run", "--out", str(tmp_path / "run"), "--quiet", "--set", "generalist.train.lr=" + "x" * 100_000)
    assert code == 2 and len(err.splitlines()) == 1 and "..." in err and len(err) < 300, err
    code, err = cli("run", "--out", str(tmp_path / "run"), "--quiet", "--set", "x" * 100_000)
    assert code == 2 and "..." in err and len(err) < 300, err
