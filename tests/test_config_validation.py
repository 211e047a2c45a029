"""Settings no run can use are one line and exit code 2 before any training: seeds numpy and scikit-learn
refuse, more threads than the machine runs, infinite numbers, a CNN without convolutions, config files that
are folders or not UTF-8."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli

from ensemble_kd.config import (
    MAX_SEED,
    THREADS_PER_CORE,
    Config,
    ConfigError,
    check_machine,
    flatten,
    load_config,
    usable_cores,
)


def refused(config_file: Path, out: Path, *overrides: str) -> str:
    """The one error line of `run` with `overrides`, which must fail before the run directory exists."""
    code, err = cli("run", "--config", str(config_file), "--out", str(out), "--quiet",
                    *(a for o in overrides for a in ("--set", o)))
    assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert not out.exists()  # before any training, before anything is written
    return err


def test_a_seed_numpy_and_scikit_learn_refuse_is_an_error_up_front(tmp_path: Path, config_file: Path) -> None:
    err = refused(config_file, tmp_path / "run", "seed=99999999999")
    assert "seed must be between 0 and 4294967295" in err and "99999999999" in err
    assert load_config(None, [f"seed={MAX_SEED}"]).seed == 2**32 - 1  # the largest they take is fine
    refused(config_file, tmp_path / "run", "seed=-1")


def test_more_threads_than_the_machine_runs_is_an_error_naming_the_maximum(tmp_path: Path, config_file: Path) -> None:
    """In a subprocess: torch.set_num_threads(100000) crashed the process (exit 139) before."""
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "ensemble_kd.cli", "run", "--config", str(config_file), "--out",
                           str(out), "--quiet", "--set", "threads=100000"], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    most = THREADS_PER_CORE * usable_cores()
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (f"error: threads = 100000 is more than this machine can run: at most {most} "
                                   f"({THREADS_PER_CORE} per core, {usable_cores()} cores); set threads = 0 "
                                   "(torch's default) or a number up to the cores")
    assert not out.exists()
    cfg = load_config(None, ["threads=100000"])  # a run saved on a larger machine still loads, to resume with --set
    with pytest.raises(ConfigError, match="at most"):
        check_machine(cfg)
    check_machine(load_config(None, [f"threads={most}"]))


FLOAT_SETTINGS = [key for key, value in flatten(Config()).items() if isinstance(value, float)]


@pytest.mark.parametrize("key", FLOAT_SETTINGS)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_every_float_setting_must_be_finite(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')} must be"):
        load_config(None, [f"{key}={value}"])


@pytest.mark.parametrize("key", ["generalist.train.lr", "generalist.train.weight_decay", "student.temperature",
                                 "specialists.temperature", "specialists.soft_lr"])
def test_inf_learning_rates_weight_decay_and_temperatures_are_refused_before_training(
        tmp_path: Path, config_file: Path, key: str) -> None:
    err = refused(config_file, tmp_path / "run", f"{key}=inf")
    assert f"{key} must be a finite number" in err and "got inf" in err


@pytest.mark.parametrize("section", ["generalist.model", "student.model"])
def test_a_cnn_without_channels_is_refused(tmp_path: Path, config_file: Path, section: str) -> None:
    err = refused(config_file, tmp_path / "run", f"{section}.arch=cnn", f"{section}.channels=[]",
                  "data.name=digits")
    assert f"{section}.channels = [] gives the cnn no convolution blocks" in err
    cfg = load_config(None, [f"{section}.arch=mlp", f"{section}.channels=[]"])  # unused by an mlp: fine
    assert dataclasses.asdict(cfg)[section.split(".")[0]]["model"]["channels"] == []


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes("seed = 0  # café\n".encode("latin-1"))
    code, err = cli("run", "--config", str(path), "--out", str(tmp_path / "run"), "--quiet")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: config file {path} is not UTF-8 text") and "save it as UTF-8" in err


def test_a_config_that_is_a_folder_says_so(tmp_path: Path) -> None:
    code, err = cli("run", "--config", str(tmp_path), "--out", str(tmp_path / "run"), "--quiet")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: --config {tmp_path} is a folder; pass a TOML config file")
    assert "does not exist" not in err
