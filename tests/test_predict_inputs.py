"""`predict`'s inputs: paths that are missing or folders, images over the pixel limit, and large .npy files read
batch by batch with flat memory."""
from __future__ import annotations

import contextlib
import io
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_model
from PIL import Image

from ensemble_kd.cli import main
from ensemble_kd.export import export_student, load_student
from ensemble_kd.predict import iter_predictions, predict_files, write_predictions


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    model, meta = make_model("mlp")
    out = tmp_path_factory.mktemp("export")
    export_student(model, meta, out, ["state_dict"], torch.rand(4, *meta.input_shape))
    return out


def one_error_line(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and captured.out == "", captured
    return lines[0]


def test_a_missing_model_path_is_said_not_to_exist(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 8, 8), dtype=np.float32))
    line = one_error_line(["predict", str(tmp_path / "nonexistent"), str(tmp_path / "x.npy")], capsys)
    assert "nonexistent does not exist" in line and "unknown model file type" not in line


def test_a_folder_given_as_input_is_said_to_be_a_folder(model_dir, tmp_path, capsys):
    (tmp_path / "images").mkdir()
    line = one_error_line(["predict", str(model_dir), str(tmp_path / "images")], capsys)
    assert "images is a folder" in line and "does not exist" not in line and "images/*.png" in line
    line = one_error_line(["predict", str(model_dir), str(tmp_path / "nothere.png")], capsys)
    assert "nothere.png does not exist" in line


def test_an_image_over_the_pixel_limit_is_refused_naming_the_option(model_dir, tmp_path, capsys):
    Image.new("1", (20000, 20000)).save(tmp_path / "huge.png")  # 48 KB, 400 megapixels
    line = one_error_line(["predict", str(model_dir), str(tmp_path / "huge.png")], capsys)
    assert "huge.png is too large" in line and "400,000,000 pixels" in line
    assert "--max-image-pixels=400000000" in line


def test_max_image_pixels_sets_the_limit(model_dir, tmp_path, capsys):
    Image.new("L", (8, 8), 7).save(tmp_path / "small.png")
    line = one_error_line(["predict", str(model_dir), str(tmp_path / "small.png"), "--max-image-pixels", "63"], capsys)
    assert "small.png is too large: 64 pixels" in line
    assert main(["predict", str(model_dir), str(tmp_path / "small.png"), "--max-image-pixels", "64"]) == 0
    assert capsys.readouterr().out.startswith(str(tmp_path / "small.png"))
    assert "at least 1" in one_error_line(["predict", str(model_dir), str(tmp_path / "small.png"),
                                           "--max-image-pixels", "0"], capsys)


def test_a_large_npy_is_predicted_batch_by_batch_in_flat_memory(model_dir, tmp_path):
    rows = np.random.default_rng(0).random((20_000, 1, 8, 8))  # 10 MB of float64
    np.save(tmp_path / "big.npy", rows)
    out_file = tmp_path / "out.txt"
    tracemalloc.start()
    try:
        with out_file.open("w") as out, contextlib.redirect_stdout(out):
            assert main(["predict", str(model_dir), str(tmp_path / "big.npy")]) == 0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < rows.nbytes / 4, f"peak {peak} bytes for a {rows.nbytes}-byte array"
    lines = out_file.read_text().splitlines()
    assert len(lines) == len(rows) and lines[-1].startswith(f"{tmp_path / 'big.npy'}[19999]: ")
    student = load_student(model_dir)
    expected = student.meta.class_names[int(student.logits(rows[-1:]).argmax())]
    assert lines[-1].split(": ")[1].startswith(expected + " (")


def test_npy_rows_of_the_stream_equal_the_in_memory_predictions(model_dir, tmp_path):
    rows = (np.random.default_rng(1).random((2500, 1, 8, 8)) * 255).astype(np.uint8)  # three batches
    np.save(tmp_path / "rows.npy", rows)
    student = load_student(model_dir)
    streamed = list(iter_predictions(student, [tmp_path / "rows.npy"], top_k=2))
    probs = student.predict_proba(torch.from_numpy(rows.astype(np.float32) / 255.0))
    assert [r["index"] for r in streamed] == list(range(len(rows)))
    assert [r["top"][0]["class_id"] for r in streamed] == probs.argmax(1).tolist()
    assert streamed == predict_files(model_dir, [tmp_path / "rows.npy"], top_k=2)


def test_a_nan_row_is_named(model_dir, tmp_path, capsys):
    rows = np.zeros((1500, 1, 8, 8), dtype=np.float32)
    rows[1234, 0, 3, 3] = np.nan
    np.save(tmp_path / "nan.npy", rows)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["predict", str(model_dir), str(tmp_path / "nan.npy")]) == 2
    assert "NaN or infinite values (row 1234)" in capsys.readouterr().err


@pytest.mark.parametrize("count", [0, 1, 3])
def test_json_is_written_as_it_comes_exactly_as_json_dumps(count):
    results = [{"file": f"f{i}.png", "index": 0, "top": [{"class": "a", "class_id": 0, "prob": 0.5}]}
               for i in range(count)]
    out = io.StringIO()
    write_predictions(iter(results), out, as_json=True)
    assert out.getvalue() == json.dumps(results, indent=2) + "\n"
    assert json.loads(out.getvalue()) == results


def test_every_path_is_checked_before_the_first_line(model_dir, tmp_path, capsys):
    np.save(tmp_path / "good.npy", np.zeros((3, 1, 8, 8), dtype=np.float32))
    np.save(tmp_path / "wrong.npy", np.zeros((3, 2, 8, 8), dtype=np.float32))
    line = one_error_line(["predict", str(model_dir), str(tmp_path / "good.npy"), str(tmp_path / "wrong.npy")],
                          capsys)  # and nothing on stdout
    assert "wrong.npy: array of shape (3, 2, 8, 8)" in line
