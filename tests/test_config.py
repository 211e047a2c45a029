"""load_config: defaults < TOML file < --set overrides, type and value checks, and the TOML round trip."""
import contextlib
import dataclasses
import io
import typing
from pathlib import Path

import numpy as np
import pytest

from ensemble_kd import choices, confusion, data, export, generalist, models, pipeline, precision
from ensemble_kd.augment import augment_fingerprint
from ensemble_kd.cli import main
from ensemble_kd.config import (
    NEUTRAL_SETTINGS,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    fingerprint_settings,
    load_config,
    to_toml,
)
from ensemble_kd.pipeline import start_run

CONFIG_DIR = Path(__file__).resolve().parents[1] / "pipelines" / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_defaults_load_and_equal_the_dataclass_defaults():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.data.name == "digits"
    assert cfg.generalist.train.epochs == 30
    assert cfg.specialists.train.epochs == 8  # the specialists' own default, not TrainConfig's


def test_toml_file_sets_nested_sections_and_keeps_other_defaults(tmp_path):
    path = write(tmp_path, """
seed = 7
[data]
name = "mnist"
[generalist.model]
arch = "cnn"
channels = [8, 16]
[generalist.train]
epochs = 3
lr = 1
""")
    cfg = load_config(path)
    assert cfg.seed == 7
    assert cfg.data.name == "mnist"
    assert cfg.generalist.model.arch == "cnn"
    assert cfg.generalist.model.channels == [8, 16]
    assert cfg.generalist.train.epochs == 3
    assert cfg.generalist.train.lr == 1.0 and isinstance(cfg.generalist.train.lr, float)
    assert cfg.generalist.train.batch_size == 64  # untouched key keeps its default
    assert cfg.student.train.epochs == 30  # an untouched section with the same fields is not affected


def test_overrides_parse_each_kind_of_value():
    cfg = load_config(overrides=[
        "seed=3",
        "student.alpha=1",
        "data.download=true",
        "generalist.model.hidden=[32,16]",
        "data.name=fashion-mnist",
        "generalist.train.epochs=5",
        "specialists.scheduler=tcp://host:8786",
    ])
    assert cfg.seed == 3
    assert cfg.student.alpha == 1.0 and isinstance(cfg.student.alpha, float)
    assert cfg.data.download is True
    assert cfg.generalist.model.hidden == [32, 16]
    assert cfg.data.name == "fashion-mnist"
    assert cfg.generalist.train.epochs == 5
    assert cfg.specialists.scheduler == "tcp://host:8786"


def test_precedence_is_defaults_then_file_then_override(tmp_path):
    path = write(tmp_path, "[generalist.train]\nepochs = 4\nbatch_size = 16\n")
    cfg = load_config(path, ["generalist.train.epochs=9"])
    assert cfg.generalist.train.epochs == 9  # override beats file
    assert cfg.generalist.train.batch_size == 16  # file beats default
    assert cfg.generalist.train.lr == 2e-3  # default where neither says


def test_later_override_wins():
    assert load_config(overrides=["seed=1", "seed=2"]).seed == 2


def test_unknown_key_names_the_key_and_lists_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["generalist.train.epoch=5"])
    message = str(err.value)
    assert "'generalist.train.epoch'" in message
    assert "generalist.train.epochs" in message and "generalist.train.batch_size" in message
    with pytest.raises(ConfigError, match=r"unknown config key 'datta'.*valid keys here: seed, device"):
        load_config(write(tmp_path, "[datta]\nname = 'mnist'\n"))


def test_override_without_equals_sign_is_rejected():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(overrides=["seed"])


@pytest.mark.parametrize("override, pattern", [
    ("generalist.train.epochs=abc", r"generalist.train.epochs must be of type int, got 'abc'"),
    ("generalist.train.epochs=2.5", r"generalist.train.epochs must be of type int"),
    ("data.download=1", r"data.download must be true or false, got 1"),
    ("seed=true", r"seed must be of type int"),
    ("data.name=3", r"data.name must be of type str"),
    ("generalist.model.hidden=[32,\"x\"]", r"generalist.model.hidden\[1\] must be of type int"),
    ("generalist=3", r"generalist is a section"),
])
def test_wrong_types_are_rejected_with_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(overrides=[override])


@pytest.mark.parametrize("override, pattern", [
    ("data.name=foo", r"data.name = 'foo' is not one of digits, mnist, fashion-mnist"),
    ("clusters.matrix=bar", r"clusters.matrix = 'bar' is not one of hard, soft, covariance"),
    ("generalist.model.arch=vit", r"generalist.model.arch = 'vit' is not one of mlp, cnn, resnet"),
    ("export.formats=[\"tflite\"]", r"export.formats must be a list of one or more of torchscript, export, onnx"),
])
def test_values_outside_the_choices_are_rejected(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(overrides=[override])


@pytest.mark.parametrize("overrides, pattern", [
    (["data.val_fraction=1.5"], r"data.val_fraction must be between 0 and 1"),
    (["data.val_fraction=0"], r"data.val_fraction must be between 0 and 1"),
    (["generalist.train.epochs=0"], r"generalist.train.epochs must be >= 1"),
    (["student.train.lr=0"], r"student.train.lr must be > 0"),
    (["specialists.backend=dask"], r"specialists.backend = 'dask' needs specialists.scheduler"),
    (["clusters.min_size=3", "clusters.max_size=2"], r"clusters.max_size must be 0"),
    (["student.plain_epochs=-1"], r"student.plain_epochs must be >= 0"),
    (["data.flip=true", "student.transfer=live", "student.plain_epochs=2"], r"student.transfer = 'views'"),
    (["student.transfer=views", "student.plain_epochs=2"], r"data.flip and data.crop_pad are off"),
    (["data.crop_pad=2", "student.transfer=views", "student.train.epochs=3", "student.plain_epochs=3"],
     r"leaves none of the student.train.epochs = 3"),
])
def test_impossible_values_are_rejected(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(overrides=overrides)


def test_dask_backend_with_a_scheduler_is_accepted():
    cfg = load_config(overrides=["specialists.backend=dask", "specialists.scheduler=tcp://h:8786"])
    assert cfg.specialists.backend == "dask"


def test_to_toml_round_trips_through_load_config(tmp_path):
    cfg = load_config(overrides=["seed=5", "data.name=fashion-mnist", "generalist.model.hidden=[]",
                                 "student.model.hidden=[7, 3]", "ensemble.tolerance=1e-9",
                                 "data.root=a \"quoted\" \\ path", "data.flip=true"])
    text = to_toml(cfg)
    assert "[generalist.model]" in text and "[specialists.train]" in text
    assert load_config(write(tmp_path, text)) == cfg


@pytest.mark.parametrize("text", ['a "quoted" path', "back\\slash\\", "two\nlines\tand a tab", "Käse/日本語/🐈",
                                  'all at once: "\\\n é'])
def test_strings_with_quotes_backslashes_newlines_and_unicode_round_trip(tmp_path, text):
    cfg = load_config()
    cfg.data.root = text  # a path, as a user's folder may be named
    assert load_config(write(tmp_path, to_toml(cfg))) == cfg
    run_dir = start_run(cfg, tmp_path / "run")  # and the run's own config.toml, which --resume reads
    assert load_config(run_dir / "config.toml").data.root == text


def test_every_list_of_choices_is_the_one_its_registry_is_keyed_by():
    assert tuple(models.ARCHITECTURES) == choices.ARCHITECTURES
    assert tuple(export.FILE_NAMES) == tuple(export.WRITERS) == export.FORMATS == choices.EXPORT_FORMATS
    assert ("auto", *precision.PRECISIONS) == choices.PRECISIONS == precision.PRECISION_CHOICES
    assert {"digits", "synthetic", "imagefolder", *data._TORCHVISION} == set(choices.DATA_SETS)
    assert tuple(confusion.build_matrices(np.array([0, 1]), np.eye(2), 2)) == choices.MATRIX_KINDS
    assert pipeline.STAGES == choices.STAGES


def test_missing_config_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=rf"config file {missing} does not exist"):
        load_config(missing)


def test_invalid_toml_names_the_path(tmp_path):
    path = write(tmp_path, "[data\nname = \n")
    with pytest.raises(ConfigError, match=r"run.toml is not valid TOML"):
        load_config(path)


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path, tmp_path):
    cfg = load_config(path)
    assert load_config(write(tmp_path, to_toml(cfg))) == cfg


# ---------------------------------------------------------------- every field, through the command line

BAD_BY_TYPE = {  # values of the right type outside every field's range, then a value of the wrong type
    int: ["-5", "2.5"], float: ["-5.0", "nan", '"x"'], bool: ['"maybe"'], str: ['"no-such-value"', "5"],
    list[int]: ["[-5]", '["x"]'], list[str]: ['["no-such-value"]', "[5]"],
    bool | str: ['""', '"no/such/weights.pt"', "5"],  # model.pretrained: true, false or a weights file
}
BAD_BY_FIELD = {  # where the type gives no bad value: each entry is the --set values of one case
    "data.root": [["data.name=imagefolder", "data.root={tmp}/no-such-folder"]],
    "specialists.scheduler": [["specialists.scheduler=not an address"]],
    **{f"{section}.model.name": [[f"{section}.model.name=resnet 18"],  # a name the rule refuses, then one
                                 [f"{section}.model.arch=torchvision", f"{section}.model.name=no-such-model",
                                  "specialists.init=scratch"]]  # no library has (and "5": the wrong type)
       for section in ("generalist", "specialists", "student")},
}


def _leaf_fields(cls: type, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, annotation) of every leaf field of a config dataclass, recursively."""
    hints = typing.get_type_hints(cls)
    leaves = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            leaves += _leaf_fields(kind, f"{prefix}{f.name}.")
        else:
            leaves.append((prefix + f.name, kind))
    return leaves


def _bad_cases() -> list[tuple[str, list[str]]]:
    cases = []
    for key, kind in _leaf_fields(Config):
        values = BAD_BY_TYPE[kind]
        if key in BAD_BY_FIELD:
            cases += [(key, overrides) for overrides in BAD_BY_FIELD[key]]
            values = values[1:]  # the type's in-range value is fine here; its wrong type is still wrong
        cases += [(key, [f"{key}={value}"]) for value in values]
    return cases


def test_every_config_field_with_a_bad_value_exits_2_with_one_line_naming_it(tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("the generalist started training")

    monkeypatch.setattr(generalist, "train_generalist", no_training)
    cases = _bad_cases()
    assert len({key for key, _ in cases}) == len(_leaf_fields(Config)) > 80  # a new field is covered too
    failures = []
    for i, (key, overrides) in enumerate(cases):
        out, err = tmp_path / f"run{i}", io.StringIO()
        sets = [arg for text in overrides for arg in ("--set", text.replace("{tmp}", str(tmp_path)))]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = main(["run", *sets, "--out", str(out), "--quiet"])
        lines = err.getvalue().splitlines()
        if not (code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0]):
            failures.append((overrides, code, lines))
        if (out / "generalist").exists():
            failures.append((overrides, "a generalist folder was made"))
    assert not failures


def test_the_default_export_formats_need_only_the_base_install():
    assert load_config().export.formats == ["torchscript", "state_dict"]  # onnx needs the onnx extra


def test_fingerprints_leave_out_settings_at_their_neutral_value_so_older_runs_resume():
    train, model = TrainConfig(), ModelConfig()
    assert not set(NEUTRAL_SETTINGS) & (set(fingerprint_settings(train)) | set(fingerprint_settings(model)))
    assert fingerprint_settings(dataclasses.replace(train, keep_best=True))["keep_best"] is True
    assert fingerprint_settings(dataclasses.replace(model, arch="torchvision", name="resnet18"))["name"] == "resnet18"
    nested = fingerprint_settings(Config().specialists)
    assert "early_stopping_patience" not in nested["train"] and "pretrained" not in nested["model"]
    assert augment_fingerprint(DataConfig()) == {"flip": False, "crop_pad": 0}  # what fingerprints held before
    assert augment_fingerprint(DataConfig(mix="cutmix", mix_alpha=0.2)) == {
        "flip": False, "crop_pad": 0, "mix": "cutmix", "mix_alpha": 0.2}
