"""Named backbones (torchvision, timm): pretrained weights from a local file, heads, normalisation, input size,
export parity, and an end-to-end run on the CIFAR-10 JPEGs of ../shared/data."""
from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from ensemble_kd import backbones, pipeline
from ensemble_kd.backbones import check_name, data_config, weights_config
from ensemble_kd.cli import main
from ensemble_kd.config import ConfigError, ModelConfig, load_config
from ensemble_kd.data import resize_images
from ensemble_kd.errors import MissingExtraError
from ensemble_kd.export import StudentMeta, export_student, load_student
from ensemble_kd.models import build_model
from ensemble_kd.pipeline import run_pipeline, start_run
from ensemble_kd.specialists import new_specialist

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CIFAR_JPEG = SHARED_DATA / "cifar10-jpeg.tar.gz"
REPO_CONFIG = Path(__file__).resolve().parents[1] / "pipelines" / "configs" / "imagefolder.toml"
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
DATA_MEAN, DATA_STD = [0.5, 0.4, 0.3], [0.2, 0.2, 0.2]

pytestmark = pytest.mark.usefixtures("one_thread")


def torchvision_weights(tmp_path: Path, name: str = "resnet18") -> tuple[Path, dict[str, torch.Tensor]]:
    """A weights file of torchvision's `name` (seeded random weights, 1000 classes, as the library's files are)."""
    torch.manual_seed(123)
    state = torchvision.models.get_model(name, weights=None).state_dict()
    path = tmp_path / f"{name}.pth"
    torch.save(state, path)
    return path, state


def named(name: str = "resnet18", arch: str = "torchvision", **kwargs) -> ModelConfig:
    return ModelConfig(arch=arch, name=name, dropout=0.0, **kwargs)


# ---------------------------------------------------------------- torchvision

def test_a_local_torchvision_weights_file_arrives_with_a_new_head_and_the_weights_normalisation(tmp_path):
    path, state = torchvision_weights(tmp_path)
    model = build_model(named(pretrained=str(path)), (3, 32, 32), 5, DATA_MEAN, DATA_STD)
    features = model.features.state_dict()
    arrived = [k for k in state if not k.startswith("fc.")]
    assert all(torch.equal(features[k], state[k]) for k in arrived) and len(arrived) == len(features)
    assert tuple(model.head.weight.shape) == (5, 512)  # the classifier replaced for the task's 5 classes
    assert model.normalize.mean.flatten().tolist() == pytest.approx(IMAGENET_MEAN)  # the weights' own
    assert model.normalize.std.flatten().tolist() == pytest.approx(IMAGENET_STD)
    assert model.eval()(torch.rand(3, 3, 32, 32)).shape == (3, 5)

    fresh = build_model(named(pretrained=str(path)), (3, 32, 32), 5, DATA_MEAN, DATA_STD, load_weights=False)
    assert not torch.equal(fresh.features.conv1.weight, state["conv1.weight"])  # no weights: fresh ones
    own = build_model(named(pretrained=str(path), normalize="data"), (3, 32, 32), 5, DATA_MEAN, DATA_STD)
    assert own.normalize.mean.flatten().tolist() == pytest.approx(DATA_MEAN)  # the config's choice wins


def test_greyscale_inputs_get_the_pretrained_rgb_filters_summed(tmp_path, caplog):
    path, state = torchvision_weights(tmp_path)
    with caplog.at_level(logging.INFO, logger="ensemble_kd.backbones"):
        model = build_model(named(pretrained=str(path)), (1, 16, 16), 3, [0.5], [0.2])
    assert torch.allclose(model.features.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))
    assert model.normalize.mean.flatten().tolist() == pytest.approx([sum(IMAGENET_MEAN) / 3])
    assert "first convolution (conv1) takes 1 input channel, its pretrained RGB filters summed" in caplog.text


def test_a_specialist_of_a_named_generalist_keeps_its_backbone_and_gets_s_plus_1_outputs(tmp_path):
    path, _ = torchvision_weights(tmp_path, "mobilenet_v3_small")
    generalist = build_model(named("mobilenet_v3_small", pretrained=str(path)), (3, 32, 32), 6, DATA_MEAN, DATA_STD)
    specialist = new_specialist(generalist, [1, 4])
    assert tuple(specialist.head.weight.shape) == (3, generalist.head.in_features)  # |S| + 1
    assert torch.equal(specialist.head.weight[:2], generalist.head.weight[[1, 4]])
    assert all(torch.equal(a, b) for a, b in zip(specialist.features.parameters(), generalist.features.parameters()))


def test_a_weights_file_of_another_model_is_refused_naming_the_file(tmp_path):
    path, _ = torchvision_weights(tmp_path, "mobilenet_v3_small")
    with pytest.raises(ConfigError, match=rf"the weights in {path} do not fit this model"):
        build_model(named("resnet18", pretrained=str(path)), (3, 32, 32), 5, DATA_MEAN, DATA_STD)


def test_an_unknown_name_is_refused_with_close_matches():
    with pytest.raises(ConfigError, match=r"student.model.name = 'resnet181' is not a torchvision .*resnet18"):
        check_name(named("resnet181"), "student.model")


def test_the_weights_configuration_sets_the_input_size_unless_the_config_does(tmp_path):
    assert weights_config(named()) == backbones.WeightsConfig(224, IMAGENET_MEAN, IMAGENET_STD)
    pretrained = load_config(overrides=["generalist.model.arch=torchvision", "generalist.model.name=resnet18",
                                        f"generalist.model.pretrained={tmp_path / 'w.pth'}"])
    assert data_config(pretrained).image_size == 224
    assert data_config(load_config(overrides=["generalist.model.arch=torchvision", "generalist.model.name=resnet18",
                                              "generalist.model.pretrained=true", "data.image_size=32"])
                       ).image_size == 32
    fresh = dataclasses.replace(pretrained.generalist.model, pretrained=False)
    assert data_config(dataclasses.replace(pretrained, generalist=dataclasses.replace(
        pretrained.generalist, model=fresh))).image_size == 0  # no weights: the images keep their size


def test_the_run_says_when_pretrained_weights_set_the_image_size(tmp_path, caplog):
    cfg = load_config(overrides=["generalist.model.arch=torchvision", "generalist.model.name=resnet18",
                                 f"generalist.model.pretrained={tmp_path / 'w.pth'}"])
    with caplog.at_level(logging.INFO, logger="ensemble_kd.pipeline"):
        assert pipeline._data_config(cfg).image_size == 224
    assert "the pretrained torchvision resnet18 weights expect 224x224 inputs, so images are resized" in caplog.text


def test_a_missing_weights_file_is_one_line_before_anything_is_written(tmp_path, capsys):
    code = main(["run", "--set", "generalist.model.arch=torchvision", "--set", "generalist.model.name=resnet18",
                 "--set", f"generalist.model.pretrained={tmp_path / 'nowhere.pth'}", "--out", str(tmp_path / "run"),
                 "--quiet"])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1 and "generalist.model.pretrained" in lines[0] and "is not a file" in lines[0]
    assert not (tmp_path / "run").exists()


def test_resize_images_resizes_says_so_and_keeps_pixels_in_range(caplog):
    x = torch.rand(3, 1, 8, 8)
    with caplog.at_level(logging.INFO, logger="ensemble_kd.data"):
        out = resize_images(x, 12, "digits train")
    assert out.shape == (3, 1, 12, 12) and 0 <= float(out.min()) and float(out.max()) <= 1
    assert "data digits train: resized 3 images from 8x8 to 12x12" in caplog.text
    assert resize_images(x, 8, "digits train") is x


def _export_parity(model: torch.nn.Module, cfg: ModelConfig, out: Path) -> None:
    meta = StudentMeta(class_names=["a", "b", "c"], input_shape=[3, 32, 32], model_config=dataclasses.asdict(cfg),
                       mean=IMAGENET_MEAN, std=IMAGENET_STD)
    batch = torch.rand(4, 3, 32, 32)
    result = export_student(model, meta, out, ["torchscript", "state_dict"], batch)
    if isinstance(cfg.pretrained, str):
        Path(cfg.pretrained).unlink()  # loading the export needs every weight from the export alone
    expected = model.eval()(batch)
    for fmt, entry in result["formats"].items():
        assert entry["max_abs_diff"] <= 1e-4, fmt
        assert torch.allclose(load_student(entry["path"]).logits(batch), expected, atol=1e-4), fmt


def test_export_parity_holds_for_a_named_student(tmp_path):
    path, _ = torchvision_weights(tmp_path, "mobilenet_v3_small")
    cfg = named("mobilenet_v3_small", pretrained=str(path))
    torch.manual_seed(0)
    _export_parity(build_model(cfg, (3, 32, 32), 3, DATA_MEAN, DATA_STD).eval(), cfg, tmp_path / "export")


# ---------------------------------------------------------------- timm

def test_timm_without_its_extra_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(MissingExtraError, match=r"generalist.model.arch = 'timm' needs the timm extra: "
                                                r"pip install 'ensemble-kd\[timm\]'"):
        check_name(named("mobilenetv3_small_100", arch="timm"), "generalist.model")


def test_a_local_timm_weights_file_arrives_and_a_timm_student_exports_with_parity(tmp_path):
    timm = pytest.importorskip("timm", reason="the timm extra is not installed")
    torch.manual_seed(7)
    state = timm.create_model("mobilenetv3_small_100", pretrained=False).state_dict()
    path = tmp_path / "mobilenetv3.pth"
    torch.save(state, path)
    cfg = named("mobilenetv3_small_100", arch="timm", pretrained=str(path))
    model = build_model(cfg, (3, 32, 32), 3, DATA_MEAN, DATA_STD)
    features = model.features.state_dict()
    assert torch.equal(features["conv_stem.weight"], state["conv_stem.weight"])
    assert all(torch.equal(features[k], state[k]) for k in features)  # every backbone weight from the file
    assert tuple(model.head.weight.shape) == (3, model.head.in_features)
    assert model.normalize.mean.flatten().tolist() == pytest.approx(IMAGENET_MEAN)
    _export_parity(model.eval(), cfg, tmp_path / "export")


# ---------------------------------------------------------------- a whole run

@pytest.mark.skipif(not CIFAR_JPEG.is_file(), reason=f"no {CIFAR_JPEG} (the CIFAR-10 JPEGs of ../shared/data)")
def test_a_pretrained_torchvision_run_on_cifar10_jpegs_end_to_end(tmp_path, caplog):
    """ShuffleNet V2 1.0x from a local weights file, students the smaller fresh 0.5x, 16x16 inputs, one thread
    (the fastest on a busy 2-core machine; evaluating the 10,000 test images with every model is most of
    the time). The archive is decoded once into the user's cache (ENSEMBLE_KD_CACHE or ~/.cache/ensemble-kd),
    as runs do."""
    path, _ = torchvision_weights(tmp_path, "shufflenet_v2_x1_0")
    cfg = load_config(REPO_CONFIG, [
        f"data.root={CIFAR_JPEG}", "data.train_limit=300", "data.image_size=16", "threads=1",
        "generalist.model.arch=torchvision", "generalist.model.name=shufflenet_v2_x1_0",
        f"generalist.model.pretrained={path}", "generalist.model.dropout=0.0", "generalist.train.epochs=1",
        "clusters.k=2", "specialists.train.epochs=1", "specialists.soft_epochs=0", "specialists.n_jobs=1",
        "student.model.arch=torchvision", "student.model.name=shufflenet_v2_x0_5", "student.model.dropout=0.0",
        "student.train.epochs=1", "student.max_params_ratio=1.0"])
    run_dir = start_run(cfg, tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="ensemble_kd.backbones"):
        report = run_pipeline(cfg, run_dir, progress=False)
    assert f"loaded pretrained weights from {path}" in caplog.text
    assert report["num_classes"] == 10 and len(report["clusters"]) == 2
    for name in ("generalist", "ensemble", "student", "student_hard_labels"):
        assert 0.0 <= report[name]["test_accuracy"] <= 1.0
    assert report["student"]["params"] < report["generalist"]["params"]
    assert report["exports"]["formats"]["torchscript"]["max_abs_diff"] <= cfg.export.parity_atol
    exported = load_student(run_dir / "export")
    assert exported.meta.input_shape == [3, 16, 16] and exported.meta.model_config["name"] == "shufflenet_v2_x0_5"

