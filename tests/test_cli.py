"""The command line: run, clusters, export, predict, report, error exits, and the pipeline script."""
from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ensemble_kd import artifacts, cli, confusion, data, errors, export, parallel, pipeline, specialists, train
from ensemble_kd.cli import main
from ensemble_kd.config import ConfigError, DataConfig
from ensemble_kd.data import load_data
from ensemble_kd.export import load_student

REPO = Path(__file__).resolve().parents[1]
TINY_DIGITS = [  # the built-in 8x8 digits (images, so predict can read a PNG), cut down to seconds
    "threads=1", "data.name=digits", "data.train_limit=300", "generalist.model.hidden=[16]",
    "generalist.train.epochs=2", "generalist.train.batch_size=32", "clusters.k=2", "specialists.train.epochs=1",
    "specialists.soft_epochs=1", "specialists.train.batch_size=32", "specialists.n_jobs=1", "student.model.hidden=[8]",
    "student.train.epochs=2", "student.train.batch_size=32", "export.formats=torchscript,state_dict",
]


def _sets(overrides: list[str]) -> list[str]:
    return [arg for text in overrides for arg in ("--set", text)]



@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str]:
    """`ensemble-kd run` on tiny digits: (run directory, exit code, stdout)."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["run", *_sets(TINY_DIGITS), "--out", str(run_dir), "--quiet"])
    return run_dir, code, stdout.getvalue()


@pytest.fixture(scope="module")
def digits_test() -> torch.Tensor:
    return load_data(DataConfig(name="digits"), 0).x_test[:3]


def _expected_top(model: Path, x: torch.Tensor) -> list[str]:
    student = load_student(model)
    return [student.meta.class_names[i] for i in student.predict_proba(x).argmax(1).tolist()]


def test_run_trains_everything_and_prints_the_table_and_exports(cli_run: tuple[Path, int, str]) -> None:
    run_dir, code, out = cli_run
    assert code == 0
    for model in ("generalist", "ensemble", "student", "student_from_generalist", "student_hard_labels"):
        assert f"| {model} |" in out
    assert str(run_dir / "export" / "student.ts") in out
    assert f"report: {run_dir / 'report.md'}" in out
    assert "digits" in (run_dir / "config.toml").read_text()  # --set reached the saved config


def test_clusters_prints_a_table_with_class_names_and_json(cli_run: tuple[Path, int, str],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = cli_run[0]
    saved = json.loads((run_dir / "clusters.json").read_text())
    assert main(["clusters", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "clusters of confusable classes" in out
    for cluster in saved["clusters"]:
        for name in cluster["names"]:
            assert f"{name} (" in out  # each class listed with its inside share
    assert f"heatmap: {run_dir / 'confusion.png'}" in out
    assert main(["clusters", str(run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["clusters"] == saved["clusters"]


def test_export_writes_the_chosen_format_into_the_chosen_folder(cli_run: tuple[Path, int, str], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str],
                                                                digits_test: torch.Tensor) -> None:
    run_dir, out_dir = cli_run[0], tmp_path / "exported"
    assert main(["export", str(run_dir), "--format", "state_dict", "--out", str(out_dir)]) == 0
    assert capsys.readouterr().out.startswith("state_dict")
    assert (out_dir / "student_state.pt").is_file() and not (out_dir / "student.ts").exists()
    exported = load_student(out_dir).logits(digits_test)
    scripted = load_student(run_dir / "export" / "student.ts").logits(digits_test)
    assert torch.allclose(exported, scripted, atol=1e-5)  # the same student as the run's own export


def test_predict_on_a_npy_batch_and_on_a_png(cli_run: tuple[Path, int, str], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str], digits_test: torch.Tensor) -> None:
    model = cli_run[0] / "export" / "student.ts"
    npy = tmp_path / "batch.npy"
    np.save(npy, digits_test.numpy())
    assert main(["predict", str(model), str(npy), "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    for i, (line, name) in enumerate(zip(lines, _expected_top(model, digits_test))):
        assert line.startswith(f"{npy}[{i}]: {name} (")
        assert line.count("(") == 2  # --top-k 2

    pixels = (digits_test[0, 0].numpy() * 255).round().astype(np.uint8)
    png = tmp_path / "digit.png"
    Image.fromarray(pixels, mode="L").save(png)
    assert main(["predict", str(model), str(png)]) == 0
    (expected,) = _expected_top(model, torch.from_numpy(pixels / np.float32(255))[None, None])
    assert capsys.readouterr().out.startswith(f"{png}: {expected} (")


def test_report_prints_the_table_and_rewrites_report_md(cli_run: tuple[Path, int, str],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = cli_run[0]
    (run_dir / "report.md").unlink()
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| model | test accuracy |") and "| student |" in out
    assert "| student |" in (run_dir / "report.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["run", "--set", "generalist.train.epochz=3"], "unknown config key 'generalist.train.epochz'"),
    (["clusters", "{tmp}/no-such-run"], "no-such-run/clusters.json does not exist"),
    (["predict", "{tmp}/no-such-export"], "no-such-export"),
    (["predict", "{tmp}/student.ts", "--top-k", "0"], "--top-k must be at least 1, got 0"),
])
def test_user_errors_exit_2_with_a_message(argv: list[str], message: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if argv[0] == "run":
        argv += ["--out", str(tmp_path / "run")]
    if argv[0] == "predict":
        argv.append(str(tmp_path / "image.png"))
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and message in captured.err
    assert "Traceback" not in captured.err


def test_run_into_a_used_directory_exits_2_and_names_resume(cli_run: tuple[Path, int, str],
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", *_sets(TINY_DIGITS), "--out", str(cli_run[0]), "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_pipeline_script_help_runs() -> None:
    result = subprocess.run([sys.executable, "pipelines/full_pipeline.py", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--until" in result.stdout and "--resume" in result.stdout


# ---------------------------------------------------------------- a new user's mistakes: one line each

def _cli(*argv: str) -> tuple[int, str, str]:
    """`ensemble-kd ARGV` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def _one_error_line(code: int, err: str, *phrases: str) -> None:
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])


def test_every_user_error_class_is_an_ensemble_kd_error_and_the_cli_catches_the_base(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for error in (ConfigError, artifacts.ArtifactError, confusion.ClusterError, data.DataError, export.ExportError,
                  export.InputError, specialists.SpecialistError, train.NonFiniteLossError, parallel.SchedulerError,
                  errors.MissingExtraError):
        assert issubclass(error, errors.EnsembleKDError), error

    class ErrorAddedLater(errors.EnsembleKDError):
        pass

    def fails(args):
        raise ErrorAddedLater("something the user can fix\nacross two lines")

    monkeypatch.setitem(cli.COMMANDS, "report", fails)
    code, _, err = _cli("report", "anywhere")
    _one_error_line(code, err, "something the user can fix across two lines")


def test_device_cuda_without_cuda_is_one_line_before_anything_is_written(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = _cli("run", "--set", "device=cuda", "--out", str(tmp_path / "run"))
    _one_error_line(code, err, "device = 'cuda'", "device=cpu")
    assert not (tmp_path / "run").exists()


def test_onnx_without_its_extra_is_refused_before_training_naming_the_extra(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "missing_onnx_modules", lambda: ["onnxscript"])
    code, _, err = _cli("run", *_sets(TINY_DIGITS), "--set", "export.formats=torchscript,onnx",
                        "--out", str(tmp_path / "run"))
    _one_error_line(code, err, "export.formats", "pip install 'ensemble-kd[onnx]'")
    assert not (tmp_path / "run").exists()


def test_tensorboard_without_its_extra_is_refused_before_training_naming_the_extra(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "tensorboard_installed", lambda: False)
    code, _, err = _cli("run", *_sets(TINY_DIGITS), "--set", "log.tensorboard=true", "--out", str(tmp_path / "run"))
    _one_error_line(code, err, "log.tensorboard", "pip install 'ensemble-kd[tensorboard]'")
    assert not (tmp_path / "run").exists()


def test_export_into_a_file_or_from_a_folder_that_is_no_run_is_one_line(cli_run: tuple[Path, int, str],
                                                                        tmp_path: Path) -> None:
    a_file = tmp_path / "model.onnx"
    a_file.write_text("mine")
    code, _, err = _cli("export", str(cli_run[0]), "--out", str(a_file))
    _one_error_line(code, err, f"{a_file} is a file, not a folder")
    assert a_file.read_text() == "mine"
    code, _, err = _cli("export", str(tmp_path))
    _one_error_line(code, err, f"{tmp_path} is not an ensemble-kd run directory")


def test_export_writes_the_runs_own_formats_by_default(cli_run: tuple[Path, int, str], tmp_path: Path) -> None:
    code, out, err = _cli("export", str(cli_run[0]), "--out", str(tmp_path / "again"))
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["student.json", "student.ts",
                                                                       "student_state.pt"]


def test_report_before_the_run_wrote_one_names_the_command_that_does(cli_run: tuple[Path, int, str],
                                                                     tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(cli_run[0], run_dir, ignore=shutil.ignore_patterns("report.*"))
    code, _, err = _cli("report", str(run_dir))
    _one_error_line(code, err, "no report yet", f"ensemble-kd run --out {run_dir} --resume", "export")


def test_predict_on_a_run_directory_uses_its_export_folder(cli_run: tuple[Path, int, str], tmp_path: Path,
                                                           digits_test: torch.Tensor) -> None:
    npy = tmp_path / "batch.npy"
    np.save(npy, digits_test.numpy())
    code, out, err = _cli("predict", str(cli_run[0]), str(npy))
    assert code == 0, err
    names = _expected_top(cli_run[0] / "export" / "student_state.pt", digits_test)
    assert [line.split(": ")[1].split(" (")[0] for line in out.splitlines()] == names


def test_predict_says_in_one_line_what_it_resized_or_converted_and_refuses_an_empty_npy(
        cli_run: tuple[Path, int, str], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    Image.new("RGB", (28, 28), (200, 30, 30)).save(tmp_path / "big.png")
    Image.new("L", (8, 8), 90).save(tmp_path / "fits.png")
    model = str(cli_run[0] / "export")
    with caplog.at_level("WARNING"):
        code, out, err = _cli("predict", model, str(tmp_path / "big.png"), str(tmp_path / "fits.png"))
    assert code == 0 and len(out.splitlines()) == 2, err
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "1 of 2 inputs" in warnings[0] and "big.png" in warnings[0] and "fits.png" not in warnings[0]
    assert "28x28 -> 8x8" in warnings[0] and "greyscale" in warnings[0]

    np.save(tmp_path / "empty.npy", np.zeros((0, 1, 8, 8), dtype=np.float32))
    code, out, err = _cli("predict", model, str(tmp_path / "empty.npy"))
    _one_error_line(code, err, "empty.npy", "holds no examples")
    assert out == ""


def test_clusters_json_into_a_pipe_that_closes_early_ends_quietly(cli_run: tuple[Path, int, str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `| head` that has read all it wanted
    stdout = io.TextIOWrapper(io.FileIO(write_end, "w"))
    monkeypatch.setattr(sys, "stdout", stdout)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["clusters", str(cli_run[0]), "--json"])
    assert code == 141 and err.getvalue() == ""  # 128 + SIGPIPE, as a shell reports such a writer
    stdout.flush()  # what Python does at exit: no second BrokenPipeError there either
    stdout.close()


def test_the_pipeline_script_run_by_a_python_without_the_package_says_which_python_to_use() -> None:
    result = subprocess.run([sys.executable, "-S", "pipelines/full_pipeline.py", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)  # -S: no site-packages, no package
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: ") and ".venv/bin/python" in result.stderr


def test_the_readme_says_how_to_reach_the_installed_command() -> None:
    readme = (REPO / "README.md").read_text()
    assert ".venv/bin/ensemble-kd" in readme and "source .venv/bin/activate" in readme
    assert ".venv/bin/python pipelines/full_pipeline.py" in readme
    assert "## Your own data" in readme and "pipelines/configs/imagefolder.toml" in readme


def test_the_readme_layout_table_lists_every_module_with_its_docstring_saying_what_it_holds() -> None:
    readme = (REPO / "README.md").read_text()
    layout = readme[readme.index("## Layout"):].split("\n\n## ")[0]
    for module in sorted((REPO / "ensemble_kd").glob("*.py")):
        assert f"| `{module.name}` |" in layout, module.name
        first_line = (ast.get_docstring(ast.parse(module.read_text())) or "").splitlines()
        assert first_line and len(first_line[0]) > 20, module.name
