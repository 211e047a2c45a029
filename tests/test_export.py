"""Export of the student to every format, loading it back, and predict on image / .npy files."""
from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch
from conftest import ARCHS, CLASS_NAMES, IMAGE_SHAPE, UPRIGHT, make_model, write_sideways
from PIL import Image

import ensemble_kd
from ensemble_kd import export as export_module
from ensemble_kd.export import FILE_NAMES, ExportError, InputError, export_student, load_student
from ensemble_kd.predict import format_predictions, load_inputs, predict_files

TORCH_FORMATS = ["torchscript", "export", "state_dict"]
ATOL = 1e-4


def eager_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        return reference(x)


_EXPORTS: dict[tuple[str, str], tuple] = {}


def exported(arch: str, group: str, tmp_path_factory) -> tuple:
    """(model, meta, out_dir, report, state before export), exported once per (arch, group) for speed."""
    if (arch, group) not in _EXPORTS:
        model, meta = make_model(arch)
        state_before = {k: v.clone() for k, v in model.state_dict().items()}
        formats = ["onnx"] if group == "onnx" else TORCH_FORMATS
        out_dir = tmp_path_factory.mktemp(f"{arch}_{group}")
        check_batch = torch.rand(6, *meta.input_shape)
        report = export_student(model, meta, out_dir, formats, check_batch, atol=ATOL)
        _EXPORTS[arch, group] = (model, meta, out_dir, report, state_before)
    return _EXPORTS[arch, group]


def onnx_exported(arch: str, tmp_path_factory) -> tuple:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    return exported(arch, "onnx", tmp_path_factory)


def check_round_trip(model, meta, out_dir, report, fmt: str) -> None:
    path = out_dir / FILE_NAMES[fmt]
    entry = report["formats"][fmt]
    assert entry["path"] == str(path) and entry["bytes"] == path.stat().st_size > 0
    assert entry["max_abs_diff"] <= ATOL and entry["top1_agreement"] == 1.0
    student = load_student(path)
    assert student.format == fmt
    assert student.meta.class_names == CLASS_NAMES and student.meta.input_shape == meta.input_shape
    assert student.meta == meta
    for batch_size in (5, 1):  # the batch dimension is dynamic, a single example works too
        x = torch.rand(batch_size, *meta.input_shape)
        expected = eager_logits(model, x)
        got = student.logits(x)
        assert got.shape == (batch_size, len(CLASS_NAMES)) and got.dtype == torch.float32
        assert torch.allclose(got, expected, atol=ATOL, rtol=0)
        assert torch.equal(got.argmax(1), expected.argmax(1))
    probs = student.predict_proba(x.numpy())
    assert torch.allclose(probs.sum(1), torch.ones(1))


@pytest.mark.parametrize("fmt", TORCH_FORMATS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_export_and_load_matches_eager(arch, fmt, tmp_path_factory):
    model, meta, out_dir, report, _ = exported(arch, "torch", tmp_path_factory)
    check_round_trip(model, meta, out_dir, report, fmt)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_onnx_export_and_load_matches_eager(arch, tmp_path_factory, capfd, caplog):
    with caplog.at_level(logging.INFO):
        model, meta, out_dir, report, _ = onnx_exported(arch, tmp_path_factory)
    out, err = capfd.readouterr()
    assert "torch.onnx" not in out + err  # the exporter's progress chatter stays out of the run's output
    assert not [r for r in caplog.records if r.name.startswith(("torch.onnx", "onnxscript", "onnx_ir"))]
    check_round_trip(model, meta, out_dir, report, "onnx")
    assert set(report["formats"]) == {"onnx"}


def test_export_leaves_caller_model_and_directory_clean(tmp_path_factory):
    model, meta, out_dir, report, state_before = exported("cnn", "torch", tmp_path_factory)
    assert model.training and all(m.training for m in model.modules())  # train stays train
    assert all(torch.equal(v, state_before[k]) for k, v in model.state_dict().items())
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == sorted(["student.json", *(FILE_NAMES[f] for f in TORCH_FORMATS)])  # no *.tmp left
    assert json.loads((out_dir / "student.json").read_text()) == meta.to_dict() == report["meta"]


def test_export_program_does_not_carry_the_check_batch(tmp_path):
    model, meta = make_model("mlp")
    big_batch = torch.rand(4096, *meta.input_shape)  # 1 MiB of float32
    batch_bytes = big_batch.numel() * big_batch.element_size()
    report = export_student(model, meta, tmp_path, ["export"], big_batch, atol=ATOL)
    assert report["formats"]["export"]["bytes"] < batch_bytes / 4  # only the 2 example rows are kept


def test_package_level_load_student_opens_an_export(tmp_path_factory):
    model, meta, out_dir, _, _ = exported("mlp", "torch", tmp_path_factory)
    student = ensemble_kd.load_student(out_dir / FILE_NAMES["state_dict"])
    x = torch.rand(3, *meta.input_shape)
    assert torch.allclose(student.logits(x), eager_logits(model, x), atol=ATOL, rtol=0)


def test_load_directory_prefers_state_dict_then_torchscript(tmp_path_factory, tmp_path):
    _, _, out_dir, _, _ = exported("mlp", "torch", tmp_path_factory)
    assert load_student(out_dir).format == "state_dict"
    (tmp_path / "student.ts").write_bytes((out_dir / "student.ts").read_bytes())
    assert load_student(tmp_path).format == "torchscript"


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated in torch 2.14
def test_metadata_read_from_student_json_when_not_embedded(tmp_path):
    model, meta = make_model("mlp")
    with torch.no_grad():
        traced = torch.jit.trace(copy.deepcopy(model).eval(), torch.rand(2, *IMAGE_SHAPE))
    torch.jit.save(traced, str(tmp_path / "bare.ts"))  # no embedded metadata
    with pytest.raises(ExportError, match="student.json"):
        load_student(tmp_path / "bare.ts")
    (tmp_path / "student.json").write_text(json.dumps(meta.to_dict()))
    assert load_student(tmp_path / "bare.ts").meta.class_names == CLASS_NAMES


def test_parity_failure_raises_and_removes_the_file(tmp_path):
    model, meta = make_model("mlp")
    with pytest.raises(ExportError, match="state_dict export differs .* atol"):
        export_student(model, meta, tmp_path, ["state_dict"], torch.rand(3, *IMAGE_SHAPE), atol=-1.0)
    assert not (tmp_path / "student_state.pt").exists()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_unknown_format_lists_valid_ones(tmp_path):
    model, meta = make_model("mlp")
    with pytest.raises(ExportError, match="unknown export format.*'tflite'.*torchscript, export, onnx, state_dict"):
        export_student(model, meta, tmp_path, ["state_dict", "tflite"], torch.rand(2, *IMAGE_SHAPE))
    assert not list(tmp_path.iterdir())  # nothing written before the formats were checked


def test_check_batch_of_wrong_shape_is_rejected(tmp_path):
    model, meta = make_model("mlp")
    with pytest.raises(ExportError, match=r"expected \(N>=1, 1, 8, 8\)"):
        export_student(model, meta, tmp_path, ["state_dict"], torch.rand(2, 3, 8, 8))


def test_missing_onnx_dependency_names_the_extra(tmp_path, monkeypatch):
    real_find_spec = export_module.importlib.util.find_spec
    monkeypatch.setattr(export_module.importlib.util, "find_spec",
                        lambda name, *args: None if name == "onnxscript" else real_find_spec(name, *args))
    model, meta = make_model("mlp")
    with pytest.raises(ExportError, match=r"pip install 'ensemble-kd\[onnx\]'.*onnxscript"):
        export_student(model, meta, tmp_path, ["onnx"], torch.rand(2, *IMAGE_SHAPE))


def test_wrong_input_shape_says_what_was_expected(tmp_path_factory):
    _, _, out_dir, _, _ = exported("mlp", "torch", tmp_path_factory)
    student = load_student(out_dir / "student.ts")
    with pytest.raises(InputError, match=r"expected input of shape \(N, 1, 8, 8\), got \(2, 3, 8, 8\)"):
        student.logits(torch.rand(2, 3, 8, 8))
    with pytest.raises(InputError, match=r"x\[None\]"):
        student.logits(torch.rand(1, 8, 8))
    with pytest.raises(InputError, match="divide 8-bit pixels by 255"):
        student.logits(np.zeros((2, 1, 8, 8), dtype=np.uint8))
    assert student.logits(torch.rand(0, 1, 8, 8)).shape == (0, len(CLASS_NAMES))


def broken_copies(path, tmp_path) -> list:
    """A truncated copy and a garbage file, each with `path`'s suffix."""
    data = path.read_bytes()
    truncated = tmp_path / f"truncated{path.suffix}"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / f"garbage{path.suffix}"
    garbage.write_bytes(b"this is not a model\x00\xff" * 20)
    return [truncated, garbage]


@pytest.mark.parametrize("fmt", TORCH_FORMATS)
def test_corrupt_files_give_an_error_naming_the_file(fmt, tmp_path_factory, tmp_path):
    _, _, out_dir, _, _ = exported("mlp", "torch", tmp_path_factory)
    for broken in broken_copies(out_dir / FILE_NAMES[fmt], tmp_path):
        with pytest.raises(ExportError, match=f"{broken.name}.*re-export"):
            load_student(broken)


def test_corrupt_onnx_gives_an_error_naming_the_file(tmp_path_factory, tmp_path):
    _, _, out_dir, _, _ = onnx_exported("mlp", tmp_path_factory)
    for broken in broken_copies(out_dir / "student.onnx", tmp_path):
        with pytest.raises(ExportError, match=f"{broken.name}.*re-export"):
            load_student(broken)


def test_missing_foreign_and_unknown_files(tmp_path):
    with pytest.raises(ExportError, match="nothere.ts does not exist"):
        load_student(tmp_path / "nothere.ts")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "model.pt")
    with pytest.raises(ExportError, match="model.pt is not an ensemble-kd student"):
        load_student(tmp_path / "model.pt")
    (tmp_path / "model.h5").write_bytes(b"x")
    with pytest.raises(ExportError, match=r"model.h5: unknown model file type '.h5'"):
        load_student(tmp_path / "model.h5")
    with pytest.raises(ExportError, match="holds no exported student"):
        load_student(tmp_path)


def test_load_inputs_scales_converts_and_resizes(tmp_path):
    grey = (np.arange(64, dtype=np.uint8) * 4).reshape(8, 8)
    Image.fromarray(grey, mode="L").save(tmp_path / "grey.png")
    Image.fromarray(np.full((16, 12, 3), 200, dtype=np.uint8), mode="RGB").save(tmp_path / "big.png")
    np.save(tmp_path / "one.npy", np.full(IMAGE_SHAPE, 0.25, dtype=np.float32))
    np.save(tmp_path / "batch.npy", np.full([3, *IMAGE_SHAPE], 51, dtype=np.uint8))
    x = load_inputs([tmp_path / "grey.png", tmp_path / "big.png", tmp_path / "one.npy", tmp_path / "batch.npy"],
                    IMAGE_SHAPE)
    assert x.shape == (6, 1, 8, 8) and x.dtype == torch.float32
    assert torch.equal(x[0, 0], torch.from_numpy(grey.astype(np.float32) / 255))
    assert torch.allclose(x[1], torch.full((1, 8, 8), 200 / 255))  # RGB grey -> L, 12x16 -> 8x8
    assert torch.equal(x[2], torch.full((1, 8, 8), 0.25)) and torch.allclose(x[3:], torch.full((3, 1, 8, 8), 0.2))
    rgb = load_inputs([tmp_path / "grey.png"], [3, 4, 4])
    assert rgb.shape == (1, 3, 4, 4) and torch.equal(rgb[0, 0], rgb[0, 2])


def test_load_inputs_reads_images_as_training_does_exif_upright_and_16_bit_scaled(tmp_path, caplog):
    write_sideways(tmp_path / "phone.png")
    Image.fromarray(np.full((3, 4), 257 * 60, dtype=np.uint16)).save(tmp_path / "deep.png")
    with caplog.at_level(logging.WARNING, logger="ensemble_kd.predict"):
        x = load_inputs([tmp_path / "phone.png", tmp_path / "deep.png"], [1, 3, 4])
    assert torch.equal(x[0, 0], torch.from_numpy(UPRIGHT / np.float32(255)))  # not a sideways copy squeezed to fit
    assert torch.allclose(x[1], torch.full((1, 3, 4), 60 / 255))
    assert caplog.text == ""  # nothing had to be changed to fit the student


def test_load_inputs_errors_name_the_file(tmp_path, caplog):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="bad.png: unreadable image"):
        load_inputs([tmp_path / "bad.png"], IMAGE_SHAPE)
    np.save(tmp_path / "wrong.npy", np.zeros((2, 3, 8, 8), dtype=np.float32))
    with pytest.raises(InputError, match=r"wrong.npy: array of shape \(2, 3, 8, 8\), expected \(1, 8, 8\)"):
        load_inputs([tmp_path / "wrong.npy"], IMAGE_SHAPE)
    with pytest.raises(InputError, match="missing.npy does not exist"):
        load_inputs([tmp_path / "missing.npy"], IMAGE_SHAPE)
    np.save(tmp_path / "loud.npy", np.full(IMAGE_SHAPE, 3.0, dtype=np.float32))
    with caplog.at_level(logging.WARNING, logger="ensemble_kd.predict"):
        load_inputs([tmp_path / "loud.npy"], IMAGE_SHAPE)
    assert "loud.npy" in caplog.text and "outside the [0, 1]" in caplog.text


def test_predict_files_on_png_and_npy(tmp_path_factory, tmp_path):
    model, _, out_dir, _, _ = exported("cnn", "torch", tmp_path_factory)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(8, 8), dtype=np.uint8)
    Image.fromarray(image, mode="L").save(tmp_path / "digit.png")
    batch = rng.random((4, *IMAGE_SHAPE), dtype=np.float32)
    np.save(tmp_path / "batch.npy", batch)
    results = predict_files(out_dir, [tmp_path / "digit.png", tmp_path / "batch.npy"], top_k=3)

    pixels = np.concatenate([image[None, None].astype(np.float32) / 255, batch])
    expected_top1 = eager_logits(model, torch.from_numpy(pixels)).argmax(1).tolist()
    assert [(r["file"], r["index"]) for r in results] == [(str(tmp_path / "digit.png"), 0)] + \
        [(str(tmp_path / "batch.npy"), i) for i in range(4)]
    for result, top1 in zip(results, expected_top1):
        probs = [t["prob"] for t in result["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert result["top"][0]["class_id"] == top1 and result["top"][0]["class"] == CLASS_NAMES[top1]
    text = format_predictions(results).splitlines()
    assert len(text) == 5 and text[0].startswith(f"{tmp_path / 'digit.png'}: {CLASS_NAMES[expected_top1[0]]} (")
    assert text[2].startswith(f"{tmp_path / 'batch.npy'}[1]: {CLASS_NAMES[expected_top1[2]]} (")
    assert len(predict_files(out_dir, [tmp_path / "batch.npy"], top_k=10)[0]["top"]) == len(CLASS_NAMES)
