"""Nothing a file can do to a user: planted pickles in every model format, archives' modes and leftovers,
images too large, dangling links, archives that explain themselves, classes missing from test/."""
from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
import signal
import stat
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_model
from PIL import Image

from ensemble_kd import export as export_module
from ensemble_kd import imagefolder
from ensemble_kd.cli import main
from ensemble_kd.config import DataConfig
from ensemble_kd.data import load_data
from ensemble_kd.errors import DataError
from ensemble_kd.export import ExportError, export_student, load_student

REPO = Path(__file__).resolve().parents[1]


class Planted:
    """A pickle that creates `marker` when it is unpickled (what an attacker's os.system would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def planted_pickle(marker: Path, protocol: int = 2) -> bytes:
    return pickle.dumps(Planted(marker), protocol=protocol)


def planted_torch_file(marker: Path, payload: dict | None = None) -> bytes:
    buffer = io.BytesIO()
    torch.save({**(payload or {}), "planted": Planted(marker)}, buffer)
    return buffer.getvalue()


def replace_member(source: Path, target: Path, member: str, data: bytes) -> Path:
    """A copy of the zip `source` at `target` with `member` (a name ending the member's path) replaced or added."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        names = zin.namelist()
        full = next((n for n in names if n.endswith("/" + member)), f"{names[0].split('/')[0]}/{member}")
        for info in zin.infolist():
            zout.writestr(info, data if info.filename == full else zin.read(info.filename))
        if full not in names:
            zout.writestr(full, data)
    return target


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """(an export folder of every torch format, inputs, the clean .pt2's logits on them)."""
    model, meta = make_model("mlp")
    out = tmp_path_factory.mktemp("export")
    export_student(model, meta, out, ["state_dict", "torchscript", "export"], torch.rand(6, *meta.input_shape))
    x = torch.rand(4, *meta.input_shape)
    return out, x, load_student(out / "student.pt2").logits(x)


def cli_error(argv: list[str], capsys) -> str:
    """The one error line of `ensemble-kd argv`, which must exit with code 2."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def npy_input(tmp_path: Path) -> Path:
    np.save(tmp_path / "x.npy", np.random.rand(2, 1, 8, 8).astype(np.float32))
    return tmp_path / "x.npy"


# ---------------------------------------------------------------- planted pickles, every model format


def test_a_pt2_with_a_planted_sample_inputs_pickle_is_refused_without_running_it(exported, tmp_path, capsys):
    out, _, _ = exported
    marker = tmp_path / "ran"
    evil = replace_member(out / "student.pt2", tmp_path / "evil" / "student.pt2", "data/sample_inputs/model.pt",
                          planted_torch_file(marker))
    with pytest.raises(ExportError, match="sample_inputs.*refusing"):
        load_student(evil)
    for model in (evil, evil.parent):  # the file, and a folder holding only it
        line = cli_error(["predict", str(model), str(npy_input(tmp_path))], capsys)
        assert "student.pt2" in line and "could run code" in line
    assert not marker.exists()


@pytest.mark.parametrize("member", ["data/weights/model.pt", "data/constants/model.pt"])
def test_a_pt2_with_a_legacy_pickle_torch_would_load_unsafely_is_refused(member, exported, tmp_path):
    out, _, _ = exported
    marker = tmp_path / "ran"
    evil = replace_member(out / "student.pt2", tmp_path / "student.pt2", member, planted_torch_file(marker))
    with pytest.raises(ExportError, match="refusing"):
        load_student(evil)
    assert not marker.exists()


def test_a_pt2_with_pickled_weights_or_custom_objects_is_refused(exported, tmp_path):
    out, _, _ = exported
    marker = tmp_path / "ran"
    with zipfile.ZipFile(out / "student.pt2") as z:
        config = json.loads(z.read("archive/data/weights/model_weights_config.json"))
    first = next(iter(config["config"]))
    config["config"][first]["use_pickle"] = True
    evil = replace_member(out / "student.pt2", tmp_path / "a" / "student.pt2", "data/weights/model_weights_config.json",
                          json.dumps(config).encode())
    evil = replace_member(evil, tmp_path / "b" / "student.pt2", "data/weights/weight_0", planted_torch_file(marker))
    with pytest.raises(ExportError, match=f"pickled object '{re.escape(first)}'"):
        load_student(evil)
    constants = {"config": {"obj": {"path_name": "custom_obj_0", "is_param": False, "use_pickle": False}}}
    evil = replace_member(out / "student.pt2", tmp_path / "c" / "student.pt2",
                          "data/constants/model_constants_config.json", json.dumps(constants).encode())
    evil = replace_member(evil, tmp_path / "d" / "student.pt2", "data/constants/custom_obj_0",
                          planted_pickle(marker))
    with pytest.raises(ExportError, match="pickled object 'obj'"):
        load_student(evil)
    assert not marker.exists()


def test_a_pt2_with_compiled_code_is_refused(exported, tmp_path):
    out, _, _ = exported
    evil = replace_member(out / "student.pt2", tmp_path / "student.pt2", "data/aotinductor/model/model.so",
                          b"\x7fELF not really")
    with pytest.raises(ExportError, match="data/aotinductor/model/model.so.*refusing"):
        load_student(evil)


def test_a_pt2_program_with_python_in_its_shapes_is_never_evaluated(exported, tmp_path):
    """torch.export.load evaluates the program's symbolic shapes with sympy (eval): the program is not loaded."""
    out, x, clean = exported
    marker = tmp_path / "ran"
    with zipfile.ZipFile(out / "student.pt2") as z:
        program = z.read("archive/models/model.json").decode()
    evil_program, count = re.subn(r"Symbol\('", f"__import__('builtins').open({str(marker)!r}, 'w') or Symbol('",
                                  program, count=1)
    assert count == 1
    evil = replace_member(out / "student.pt2", tmp_path / "student.pt2", "models/model.json", evil_program.encode())
    assert torch.equal(load_student(evil).logits(x), clean)  # the student is rebuilt from its weights alone
    assert not marker.exists()


def test_the_pt2_reader_agrees_with_torch_on_dtype_codes():
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

    assert {code: _SERIALIZE_TO_TORCH_DTYPE[code] for code in export_module.PT2_DTYPES} == export_module.PT2_DTYPES


def test_a_state_dict_with_a_planted_pickle_is_refused(exported, tmp_path, capsys):
    out, _, _ = exported
    marker = tmp_path / "ran"
    blob = torch.load(out / "student_state.pt", weights_only=True)
    (tmp_path / "student_state.pt").write_bytes(planted_torch_file(marker, blob))
    with pytest.raises(ExportError, match="not plain tensors.*refusing"):
        load_student(tmp_path / "student_state.pt")
    line = cli_error(["predict", str(tmp_path), str(npy_input(tmp_path))], capsys)
    assert "student_state.pt" in line and "could run code" in line
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated
@pytest.mark.parametrize("member", ["data.pkl", "constants.pkl"])
def test_torchscript_with_a_planted_pickle_is_refused(member, exported, tmp_path, capsys):
    out, _, _ = exported
    marker = tmp_path / "ran"
    evil = replace_member(out / "student.ts", tmp_path / "student.ts", member, planted_pickle(marker))
    with pytest.raises(ExportError, match="student.ts"):
        load_student(evil)
    assert "student.ts" in cli_error(["predict", str(evil), str(npy_input(tmp_path))], capsys)
    assert not marker.exists()


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory) -> Path:
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    model, meta = make_model("mlp")
    out = tmp_path_factory.mktemp("onnx")
    export_student(model, meta, out, ["onnx"], torch.rand(4, *meta.input_shape))
    return out / "student.onnx"


def test_onnx_metadata_holding_a_pickle_is_never_unpickled(onnx_export, tmp_path, capsys):
    """ONNX is protobuf: nothing in it is unpickled. Its embedded metadata is JSON, and a pickle there is refused."""
    onnx = pytest.importorskip("onnx")
    marker = tmp_path / "ran"
    proto = onnx.load(str(onnx_export))
    entry = next(e for e in proto.metadata_props if e.key == export_module.META_KEY)
    entry.value = planted_pickle(marker, protocol=0).decode("latin-1")
    onnx.save(proto, str(tmp_path / "student.onnx"))
    with pytest.raises(ExportError, match="unreadable metadata"):
        load_student(tmp_path / "student.onnx")
    assert "student.onnx" in cli_error(["predict", str(tmp_path / "student.onnx"), str(npy_input(tmp_path))], capsys)
    assert not marker.exists()


def test_onnx_weights_outside_its_folder_are_never_read(onnx_export, tmp_path):
    onnx = pytest.importorskip("onnx")
    (tmp_path / "secret.bin").write_bytes(b"\0" * 8192)
    proto = onnx.load(str(onnx_export))
    weight = proto.graph.initializer[0]
    weight.ClearField("raw_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    location = weight.external_data.add()
    location.key, location.value = "location", "../secret.bin"
    (tmp_path / "model").mkdir()
    onnx.save(proto, str(tmp_path / "model" / "student.onnx"))
    with pytest.raises(ExportError, match="student.onnx is corrupt.*escapes model directory"):
        load_student(tmp_path / "model" / "student.onnx")


def test_a_pt2_export_logs_no_torch_warning_about_its_temporary_name(tmp_path, caplog, capfd):
    model, meta = make_model("mlp")
    with caplog.at_level(logging.WARNING):
        export_student(model, meta, tmp_path, ["export"], torch.rand(4, *meta.input_shape))
    said = caplog.text + "".join(capfd.readouterr())
    assert "Unable to load package" not in said and ".tmp" not in said
    assert load_student(tmp_path / "student.pt2").format == "export"


# ---------------------------------------------------------------- archives


def png_bytes(size: tuple[int, int] = (8, 8), mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, "PNG")
    return buffer.getvalue()


def write_tar(path: Path, files: dict[str, bytes], modes: dict[str, int] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), (modes or {}).get(name, 0o644)
            tar.addfile(info, io.BytesIO(data))
    return path


LAYOUT = {f"{split}/{c}/{i}.png": png_bytes() for split in ("train", "test") for c in ("a", "b") for i in range(2)}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ENSEMBLE_KD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_extraction_without_tarfiles_data_filter_drops_setuid_setgid_sticky_and_write_bits(tmp_path, cache,
                                                                                           monkeypatch):
    monkeypatch.delattr(tarfile, "data_filter")  # a Python before 3.10.12 / 3.11.4
    archive = write_tar(tmp_path / "data.tar.gz", {**LAYOUT, "train/a/run.sh": b"#!/bin/sh\n"},
                        modes={"train/a/0.png": 0o7666, "train/a/run.sh": 0o6777})
    listing = imagefolder.list_imagefolder(DataConfig(name="imagefolder", root=str(archive)))
    for name, expected in (("train/a/0.png", 0o644), ("train/a/run.sh", 0o755), ("train/b/0.png", 0o644)):
        mode = stat.S_IMODE((listing.folder / name).stat().st_mode)
        assert mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | 0o022) == 0, (name, oct(mode))
        assert mode == expected, (name, oct(mode))


def killed_extraction(archive: Path, cache: Path) -> Path:
    """The temporary folder left by a process killed with SIGKILL while it extracted `archive` into `cache`."""
    code = ("import os, signal, sys, tarfile; from ensemble_kd import imagefolder; from ensemble_kd.config import "
            "DataConfig\n"
            "def killed(tar, target):\n"
            "    tar.extract(tar.getmembers()[0], target)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "imagefolder._safe_extract = killed\n"
            "imagefolder.list_imagefolder(DataConfig(name='imagefolder', root=sys.argv[1]))\n")
    done = subprocess.run([sys.executable, "-c", code, str(archive)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "ENSEMBLE_KD_CACHE": str(cache)}, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    (staging,) = [p for p in cache.glob("*/.extracting-*") if p.is_dir()]
    assert any(staging.rglob("*.png"))
    return staging


def test_a_killed_extractions_leftover_is_removed_on_the_next_run(tmp_path, cache):
    archive = write_tar(tmp_path / "data.tar.gz", LAYOUT)
    staging = killed_extraction(archive, cache)
    listing = imagefolder.list_imagefolder(DataConfig(name="imagefolder", root=str(archive)))
    assert len(listing.train) == 4
    assert not staging.exists() and not list(cache.glob("*/.extracting-*"))


def test_an_extraction_in_progress_is_never_removed(tmp_path, cache):
    (cache / "x").mkdir(parents=True)
    staging, lock = imagefolder.new_staging(cache / "x")  # held by this process, as by a concurrent run
    old = cache / "x" / ".extracting-0ldf01de"  # an older version's (no lock file): removed once a day old
    young = cache / "x" / ".extracting-y0un9000"
    old.mkdir(), young.mkdir()
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    imagefolder.remove_stale_extractions(cache)
    assert staging.is_dir() and young.is_dir() and not old.exists()
    os.close(lock)  # its process dies: the kernel releases the lock, the lock file stays
    imagefolder.remove_stale_extractions(cache)
    assert not staging.exists() and sorted(p.name for p in (cache / "x").iterdir()) == [young.name]


def test_an_archive_of_absolute_paths_says_why_it_has_no_train_folder(tmp_path, cache):
    archive = write_tar(tmp_path / "abs.tar.gz", {f"/data/set/{name}": data for name, data in LAYOUT.items()})
    with pytest.raises(DataError) as caught:
        imagefolder.list_imagefolder(DataConfig(name="imagefolder", root=str(archive)))
    message = str(caught.value)
    assert "has no train/ folder" in message and "\n" not in message
    assert "8 of its 8 members have absolute paths (e.g. /data/set/" in message
    assert "tar -C" in message


def test_an_archive_member_the_data_filter_refuses_is_named_as_unsafe(tmp_path, cache):
    if not hasattr(tarfile, "data_filter"):
        pytest.skip("this Python's tarfile has no data filter")
    archive = write_tar(tmp_path / "up.tar.gz", {**LAYOUT, "../escape.png": png_bytes()})
    with pytest.raises(DataError, match=r"'\.\./escape\.png'.*refuses such members as unsafe") as caught:
        imagefolder.list_imagefolder(DataConfig(name="imagefolder", root=str(archive)))
    assert "complete" not in str(caught.value)  # not "check that the archive is complete"


# ---------------------------------------------------------------- folders


def image_folder(root: Path, classes: dict[str, tuple[str, ...]] | None = None) -> Path:
    """train/<class>/ and test/<class>/ with two small PNGs each (`classes`: split -> class names)."""
    for split, names in (classes or {"train": ("a", "b"), "test": ("a", "b")}).items():
        for name in names:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(2):
                Image.new("L", (8, 8), 40 * i).save(root / split / name / f"{i}.png")
    return root


def folder_config(root: Path, *, storage: str = "memory", **data: object) -> DataConfig:
    return DataConfig(**{"name": "imagefolder", "root": str(root), "storage": storage, "workers": 0,
                         "val_fraction": 0.5, **data})


@pytest.mark.parametrize("storage", ["memory", "stream"])
def test_an_image_over_the_pixel_limit_is_one_line_naming_it_and_the_setting(storage, tmp_path, cache):
    root = image_folder(tmp_path / "images")
    Image.new("1", (20000, 20000)).save(root / "train" / "a" / "huge.png")  # 48 KB, 400 megapixels
    with pytest.raises(DataError) as caught:
        load_data(folder_config(root, storage=storage), seed=0)
    message = str(caught.value)
    assert "huge.png" in message and "too large" in message and "400,000,000 pixels" in message
    assert "--set data.max_image_pixels=400000000" in message and "\n" not in message


def test_data_max_image_pixels_sets_the_limit(tmp_path, cache):
    root = image_folder(tmp_path / "images")
    with pytest.raises(DataError, match=r"0\.png.*64 pixels, more than data\.max_image_pixels = 63"):
        load_data(folder_config(root, max_image_pixels=63), seed=0)
    assert load_data(folder_config(root, max_image_pixels=64), seed=0).x_train.shape[1:] == (1, 8, 8)


def test_the_pixel_limit_applies_in_streams_worker_processes(tmp_path, cache):
    root = image_folder(tmp_path / "images")
    with pytest.raises(DataError, match=r"64 pixels, more than data\.max_image_pixels = 10"):
        load_data(folder_config(root, storage="stream", max_image_pixels=10, workers=1), seed=0)


@pytest.mark.parametrize("storage", ["memory", "stream", "auto"])
def test_a_dangling_symlink_is_one_line_naming_it(storage, tmp_path, cache):
    root = image_folder(tmp_path / "images")
    (root / "train" / "a" / "gone.png").symlink_to(tmp_path / "moved-away.png")
    with pytest.raises(DataError) as caught:
        load_data(folder_config(root, storage=storage), seed=0)
    message = str(caught.value)
    assert "gone.png" in message and "symbolic link" in message and "moved-away.png" in message
    assert "remove the link" in message


def test_a_class_missing_from_test_is_said_once(tmp_path, cache, caplog):
    root = image_folder(tmp_path / "images", {"train": ("a", "b", "c"), "test": ("a",)})
    with caplog.at_level(logging.WARNING, logger="ensemble_kd"):
        load_data(folder_config(root), seed=0)
        load_data(folder_config(root), seed=0)
    said = [r.getMessage() for r in caplog.records if "test/ lacks" in r.getMessage()]
    assert len(said) == 1 and "2 classes" in said[0] and "(b, c)" in said[0]


def test_every_class_in_test_says_nothing(tmp_path, cache, caplog):
    root = image_folder(tmp_path / "images")
    with caplog.at_level(logging.WARNING, logger="ensemble_kd"):
        load_data(folder_config(root), seed=0)
    assert "lacks" not in caplog.text
