"""Configuration: one dataclass per stage, loaded from TOML, overridden with `--set a.b=v`.

Precedence is defaults < TOML file < command line. Every field has a one-line comment;
the defaults are the values that work on the built-in `digits` data.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import tomli_w

from . import choices
from .errors import EnsembleKDError

_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = _SHOWN.maxlong = 80
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = _SHOWN.maxset = 10
_SHOWN.maxlevel = 3


def shown(value: Any) -> str:
    """`repr(value)` for an error message, shortened ('...') when long: a 100,000-character --set value is not
    echoed whole."""
    return _SHOWN.repr(value)

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib


class ConfigError(EnsembleKDError, ValueError):
    """A configuration problem the user can fix: an unknown key, a wrong type, an impossible value."""


@dataclass
class DataConfig:
    name: str = "digits"  # digits | mnist | fashion-mnist | cifar10 | cifar100 | imagefolder | synthetic
    root: str = "data"  # folder with torchvision's files, or an imagefolder's train/ and test/ (or a .tar.gz of them)
    download: bool = False  # let torchvision download missing files (needs network)
    val_fraction: float = 0.15  # share of the training data held out (stratified) for the confusion analysis
    train_limit: int = 0  # use at most this many training examples (stratified subsample); 0 = all
    flip: bool = False  # random horizontal flips while training (photos yes, digits no)
    crop_pad: int = 0  # random crops after zero-padding by this many pixels; 0 = off
    image_size: int = 0  # resize images to this square size; 0 = keep them (an imagefolder's must then match),
    # or the size of the generalist's pretrained weights
    storage: str = "auto"  # imagefolder: memory = decode every image once into tensors |
    # stream = read the files batch by batch while training | auto = memory when it fits data.memory_budget_mb
    memory_budget_mb: int = 4096  # storage = auto: stream when all splits' decoded images (float32) would exceed this
    workers: int = 2  # loader processes that read (storage = stream) and augment (random_resized_crop, auto_augment)
    # images one at a time; 0 = in the training process
    max_image_pixels: int = 178_956_970  # imagefolder: an image of more pixels (width x height) is refused
    # as a possible decompression bomb (Pillow's limit); raise it for huge images you trust
    random_resized_crop: float = 0.0  # crop a random part of at least this share of each image's area
    # (aspect 3/4 to 4/3) and resize it back; 0 = off (torchvision's default is 0.08)
    auto_augment: str = "none"  # none | randaugment | trivialaugment: torchvision's per-image augmentation policy
    # (RandAugment: 2 ops of magnitude 9)
    mix: str = "none"  # none | mixup | cutmix | mixup_cutmix (either, at random): mixes the images and labels
    # of each training batch
    mix_alpha: float = 1.0  # mix: the mixing weight is drawn from Beta(mix_alpha, mix_alpha)
    synthetic_classes: int = 12  # synthetic: number of classes
    synthetic_groups: int = 3  # synthetic: the classes fall into this many planted confusable groups
    synthetic_per_class: int = 120  # synthetic: training examples per class (the test set has half as many)
    synthetic_dim: int = 32  # synthetic: feature dimension


@dataclass
class ModelConfig:
    arch: str = "mlp"  # mlp | cnn | resnet | torchvision | timm (the library's model.name; timm needs the timm extra)
    name: str = ""  # torchvision | timm: the library's model name, e.g. resnet18, mobilenet_v3_small (torchvision),
    # mobilenetv3_small_100 (timm)
    pretrained: bool | str = False  # torchvision | timm: false = fresh weights |
    # true = the library's own download (needs network) | the path of a local weights file
    normalize: str = "auto"  # auto: the pretrained weights' mean and std when model.pretrained is set,
    # else the training data's | data | weights
    hidden: list[int] = field(default_factory=lambda: [256, 256])  # mlp: widths of the hidden layers
    channels: list[int] = field(default_factory=lambda: [32, 64])  # cnn: channels per conv block (each halves the size)
    pool: int = 1  # cnn: feature maps are average-pooled to pool x pool before the head (1 = global pooling)
    depth: int = 20  # resnet: 6n+2 layers (20, 32, 44, 56)
    width: int = 16  # resnet: channels of the first stage (doubles in each of three stages)
    dropout: float = 0.2  # dropout before the classifier head (and between mlp layers)


@dataclass
class TrainConfig:
    epochs: int = 30  # passes over the training data
    batch_size: int = 64  # examples per optimisation step
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 2e-3  # peak learning rate
    momentum: float = 0.9  # sgd momentum (nesterov)
    weight_decay: float = 5e-4  # decoupled weight decay
    schedule: str = "cosine"  # cosine | step | constant
    warmup_epochs: int = 0  # linear warm-up before the schedule
    label_smoothing: float = 0.0  # for hard-label cross-entropy
    grad_clip: float = 5.0  # clip the gradient norm to this; 0 = off
    early_stopping_patience: int = 0  # stop once this many epochs in a row have not raised validation accuracy; 0 = off
    keep_best: bool = False  # keep the weights of the epoch with the best validation accuracy, not the last epoch's


@dataclass
class GeneralistConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # the generalist's architecture
    train: TrainConfig = field(default_factory=TrainConfig)  # how it is trained


@dataclass
class ClustersConfig:
    k: int = 3  # number of clusters of confusable classes (one specialist each); 0 = choose from the number of classes
    matrix: str = "soft"  # soft | hard | covariance: which confusability matrix k-means sees
    min_size: int = 2  # smallest allowed cluster (in classes)
    max_size: int = 0  # largest allowed cluster; 0 = no limit
    min_confusion: float = 0.1  # classes confused less than this (relative to the most confused class, 0-1)
    # join no cluster: left to the generalist
    overlap: float = 0.0  # a class also joins other clusters with at least this share of its confusion; 0 = partition
    n_init: int = 20  # k-means restarts (the best inertia wins)


@dataclass
class SpecialistsConfig:
    init: str = "generalist"  # generalist: start as a copy of the generalist |
    # scratch: fresh weights of specialists.model (errors of their own)
    model: ModelConfig = field(  # init = scratch: their architecture; arch "generalist" = the generalist's
        default_factory=lambda: ModelConfig(arch="generalist"))
    train: TrainConfig = field(  # phase 1: hard labels
        default_factory=lambda: TrainConfig(epochs=8, lr=5e-4, warmup_epochs=0))
    soft_epochs: int = 0  # phase 2: epochs of fine-tuning on the generalist's soft targets (pulls a specialist back)
    soft_lr: float = 2e-4  # phase 2 learning rate
    temperature: float = 2.0  # temperature of the soft targets in phase 2
    soft_alpha: float = 0.3  # phase 2: weight of the hard-label term (the rest is the soft term)
    in_cluster_fraction: float = 0.5  # share of each batch drawn from the specialist's own classes
    dustbin_correction: str = "validation"  # validation: fit the dustbin bias on the held-out split |
    # prior: + log oversampling ratio (the paper) | none
    n_jobs: int = 2  # specialists trained at once (-1 = one per core)
    backend: str = "loky"  # loky (processes on this machine) | dask (an existing dask.distributed cluster)
    scheduler: str = ""  # dask: address of the scheduler, e.g. tcp://host:8786; workers write into the run directory:
    # it must be on storage all workers share


@dataclass
class EnsembleConfig:
    top_n: int = 1  # the generalist's top-n classes select the active specialists
    iterations: int = 50  # fixed-point (EM) iterations of the eq. 5 solve
    tolerance: float = 1e-6  # stop early once q moves less than this


@dataclass
class StudentConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(hidden=[64]))  # the compact student
    train: TrainConfig = field(default_factory=TrainConfig)  # how it is trained
    transfer: str = "view_mean"  # view_mean: the plain images, against the teacher averaged over fixed augmented
    # views of each and the image itself | views: those views, one per epoch | live: the teacher labels every augmented
    # batch the student sees | dataset: its logits on the plain images (all: data.flip / crop_pad make the views)
    views: int = 10  # transfer = views / view_mean: how many fixed augmented views of the training set;
    # views: epoch e trains on view (e - 1) % views
    plain_epochs: int = 0  # transfer = views: the last plain_epochs epochs train on the plain training images instead
    # (the teacher's logits on them), so the student ends on the images it is tested on
    alpha: float = 0.5  # weight of the hard-label term; 1 - alpha goes to the distillation term
    temperature: float = 2.0  # distillation temperature T
    loss: str = "kd"  # kd: Hinton's soft term | dkd: decoupled KD (Zhao et al. 2022; non-target classes weigh dkd_beta)
    dkd_beta: float = 8.0  # loss = dkd: weight of the non-target classes' term (the target-class term weighs 1)
    baselines: bool = True  # also train the student from the generalist and the hard-label student,
    # to show what the specialists add
    max_params_ratio: float = 1.0  # the student may have at most this fraction of the generalist's parameters


@dataclass
class ExportConfig:
    formats: list[str] = field(  # torchscript | export | onnx (needs the onnx extra) | state_dict
        default_factory=lambda: ["torchscript", "state_dict"])
    parity_atol: float = 1e-4  # largest allowed |exported - eager| on a check batch


@dataclass
class LogConfig:
    tensorboard: bool = False  # also write each stage's per-epoch metrics as TensorBoard events (the tensorboard extra)


@dataclass
class Config:
    seed: int = 0  # seeds data splits, initialisation, shuffling and clustering
    device: str = "cpu"  # cpu | cuda | auto
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (only on CUDA): autocast for training and teacher inference;
    # auto: bf16 where native and it pays
    compile: bool = False  # torch.compile every model fit() trains (opt-in: compiling takes seconds to minutes)
    threads: int = 0  # torch CPU threads; 0 = torch's default
    data: DataConfig = field(default_factory=DataConfig)  # which data and how it is split
    generalist: GeneralistConfig = field(default_factory=GeneralistConfig)  # stage 1
    clusters: ClustersConfig = field(default_factory=ClustersConfig)  # stages 2 and 3
    specialists: SpecialistsConfig = field(default_factory=SpecialistsConfig)  # stage 4
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)  # stage 5
    student: StudentConfig = field(default_factory=StudentConfig)  # stage 6
    export: ExportConfig = field(default_factory=ExportConfig)  # stage 7
    log: LogConfig = field(default_factory=LogConfig)  # what to log besides each stage's metrics.jsonl and metrics.csv


# ---------------------------------------------------------------- building from dicts

def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """Check `value` against the annotation `kind`; ints are accepted where floats are wanted."""
    origin = typing.get_origin(kind)
    if origin is list:
        (item,) = typing.get_args(kind)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {shown(value)}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):  # bool | str: true, false or a path
        if any(isinstance(value, option) and (option is not int or not isinstance(value, bool))
               for option in typing.get_args(kind)):
            return value
        names = " or ".join("true/false" if option is bool else f"a {option.__name__}"
                            for option in typing.get_args(kind))
        raise ConfigError(f"{key} must be {names}, got {shown(value)} ({type(value).__name__})")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {shown(value)}")
    if kind in (int, float, str) and (not isinstance(value, kind) or isinstance(value, bool)):
        raise ConfigError(f"{key} must be of type {kind.__name__}, got {shown(value)} ({type(value).__name__})")
    return value


def _merge(base: Any, values: dict[str, Any], prefix: str) -> Any:
    """Apply a (partial) dict onto an existing dataclass instance, keeping its other fields."""
    types_by_name = _field_types(type(base))
    unknown = sorted(set(values) - set(types_by_name))
    if unknown:
        valid = ", ".join(prefix + name for name in types_by_name)
        raise ConfigError(f"unknown config key {shown(prefix + unknown[0])}; valid keys here: {valid}")
    for name, value in values.items():
        kind = types_by_name[name]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix + name} is a section; give it as a table, not {shown(value)}")
            _merge(getattr(base, name), value, prefix + name + ".")
        else:
            setattr(base, name, _coerce(value, kind, prefix + name))
    return base


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {shown(text)} must look like section.key=value")
    key, raw = text.split("=", 1)
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as fashion-mnist is taken as a string
    return key.strip().split("."), value


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    for part in reversed(path):
        value = {part: value}
    return value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the TOML file at `path`, then each `section.key=value` override."""
    cfg = Config()
    if path is not None:
        _merge(cfg, _read_toml(Path(path)), "")
    return apply_overrides(cfg, overrides)


def _read_toml(path: Path) -> dict[str, Any]:
    """The TOML file at `path` as a dict; ConfigError naming the file when it is missing, a folder,
    unreadable, not UTF-8 (as TOML must be) or not TOML."""
    if path.is_dir():
        raise ConfigError(f"--config {path} is a folder; pass a TOML config file (e.g. pipelines/configs/digits.toml)")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing .toml (see pipelines/configs/)")
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                          f"{err.start}), and TOML files must be; save it as UTF-8") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from err
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from err


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """A copy of `cfg` with each `section.key=value` override applied, validated."""
    cfg = copy.deepcopy(cfg)
    for text in overrides:
        keys, value = _parse_override(text)
        _merge(cfg, _nest(keys, value), "")
    validate_config(cfg)
    return cfg


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf field of a config as {"section.key": value}, in declaration order."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            values.update(flatten(value, f"{prefix}{f.name}."))
        else:
            values[prefix + f.name] = value
    return values


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# settings that change where and how fast work runs, never what it makes: a resumed run may change them,
# and no fingerprint holds them (each model.pt's fingerprint also leaves out device, precision and threads)
RUNTIME_SETTINGS = ("device", "precision", "threads", "data.root", "data.download", "data.storage",
                    "data.max_image_pixels", "data.memory_budget_mb", "data.workers", "specialists.n_jobs",
                    "specialists.backend", "specialists.scheduler", "log.tensorboard")


# settings added after runs were first fingerprinted, at the value that trains exactly as before they
# existed: fingerprints leave them out at that value, so runs made before them still resume and are reused
NEUTRAL_SETTINGS = {"early_stopping_patience": 0, "keep_best": False, "name": "", "pretrained": False,
                    "normalize": "auto", "random_resized_crop": 0.0, "auto_augment": "none", "mix": "none",
                    "mix_alpha": 1.0}


def fingerprint_settings(section: Any) -> dict[str, Any]:
    """`dataclasses.asdict(section)`, nested sections too, without the NEUTRAL_SETTINGS at their neutral value."""
    def without_neutral(settings: dict[str, Any]) -> dict[str, Any]:
        return {k: without_neutral(v) if isinstance(v, dict) else v for k, v in settings.items()
                if k not in NEUTRAL_SETTINGS or v != NEUTRAL_SETTINGS[k]}
    return without_neutral(dataclasses.asdict(section))


def recipe(section: Any, prefix: str) -> dict[str, Any]:
    """A config section as a dict without its runtime settings (`prefix` is its dotted path with a
    trailing dot, e.g. "specialists."): the settings that change what its stage makes."""
    return {k: v for k, v in fingerprint_settings(section).items() if prefix + k not in RUNTIME_SETTINGS}


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (tomli_w; sections as tables), readable by `load_config`."""
    return tomli_w.dumps(to_dict(cfg))


# ---------------------------------------------------------------- validation

Rule = tuple[Callable[[Any], bool], str]  # (is the value allowed?, what it must be)
MAX_SEED = 2**32 - 1  # the largest seed numpy's and scikit-learn's random states accept
THREADS_PER_CORE = 4  # `threads` may be at most this many times the cores this process may use (check_machine)


def _one_of(*choices: str) -> Rule:
    return (lambda v: v in choices), "one of " + ", ".join(choices)


def _at_least(low: int | float) -> Rule:
    return (lambda v: v >= low), f">= {low}"  # False for NaN


def _above(low: float) -> Rule:
    return (lambda v: v > low), f"> {low:g}"


def _between(low: float, high: float, low_ok: bool = True, high_ok: bool = True) -> Rule:
    def check(v: float) -> bool:
        return (low <= v if low_ok else low < v) and (v <= high if high_ok else v < high)
    edges = f"{'[' if low_ok else '('}{low:g}, {high:g}{']' if high_ok else ')'}"
    return check, f"between {low:g} and {high:g}, in {edges}"


def _each(rule: Rule) -> Rule:
    check, text = rule
    return (lambda values: all(check(v) for v in values)), f"a list of values {text}"


def _resnet_depth(depth: int) -> bool:
    return depth >= 8 and (depth - 2) % 6 == 0


_SEED = ((lambda v: 0 <= v <= MAX_SEED), f"between 0 and {MAX_SEED} (2**32 - 1, the largest seed numpy and "
                                        "scikit-learn accept)")
_SCHEDULER_ADDRESS = re.compile(r"^([a-z][a-z0-9+.-]*://)?(\[[0-9a-fA-F:.]+\]|[\w.-]+)(:\d{1,5})?/?$")
_TRAIN = {
    "epochs": _at_least(1), "batch_size": _at_least(1), "optimizer": _one_of(*choices.OPTIMIZERS), "lr": _above(0),
    "momentum": _between(0, 1, high_ok=False), "weight_decay": _at_least(0),
    "schedule": _one_of(*choices.SCHEDULES), "warmup_epochs": _at_least(0),
    "label_smoothing": _between(0, 1, high_ok=False), "grad_clip": _at_least(0),
    "early_stopping_patience": _at_least(0),
}
_MODEL = {
    "arch": _one_of(*choices.ARCHITECTURES),
    "name": ((lambda v: not any(c.isspace() for c in v)), "a model name without spaces (e.g. resnet18), or empty"),
    "pretrained": ((lambda v: isinstance(v, bool) or bool(v.strip())), "true, false or the path of a weights file"),
    "normalize": _one_of(*choices.NORMALIZATIONS), "hidden": _each(_at_least(1)), "channels": _each(_at_least(1)),
    "pool": _at_least(1), "depth": (_resnet_depth, "6n+2 with n >= 1 (8, 14, 20, 32, 44, 56)"),
    "width": _at_least(1), "dropout": _between(0, 1, high_ok=False),
}
# Every leaf field of every section has a rule (bool fields: their type is their check).
# tests/test_config.py sets a bad value for each field through the CLI, so a new field
# without a rule here fails that test.
RULES: dict[type, dict[str, Rule]] = {
    Config: {"seed": _SEED, "device": _one_of(*choices.DEVICES), "precision": _one_of(*choices.PRECISIONS),
             "threads": _at_least(0)},
    DataConfig: {
        "name": _one_of(*choices.DATA_SETS),
        "root": ((lambda v: bool(v.strip())), "a path (a folder, or an archive for imagefolder)"),
        "val_fraction": _between(0, 1, False, False), "train_limit": _at_least(0), "crop_pad": _at_least(0),
        "image_size": _at_least(0), "storage": _one_of(*choices.STORAGES), "memory_budget_mb": _at_least(1),
        "workers": _at_least(0), "max_image_pixels": _at_least(1), "random_resized_crop": _between(0, 1),
        "auto_augment": _one_of(*choices.AUTO_AUGMENTS), "mix": _one_of(*choices.MIXES), "mix_alpha": _above(0),
        "synthetic_classes": _at_least(2), "synthetic_groups": _at_least(1),
        "synthetic_per_class": _at_least(2), "synthetic_dim": _at_least(1)},
    ModelConfig: _MODEL,
    TrainConfig: _TRAIN,
    GeneralistConfig: {},
    ClustersConfig: {
        "k": _at_least(0), "matrix": _one_of(*choices.MATRIX_KINDS), "min_size": _at_least(1),
        "max_size": _at_least(0), "min_confusion": _between(0, 1), "overlap": _between(0, 1),
        "n_init": _at_least(1)},
    SpecialistsConfig: {
        "init": _one_of(*choices.SPECIALIST_INITS),
        "soft_epochs": _at_least(0), "soft_lr": _above(0), "temperature": _above(0), "soft_alpha": _between(0, 1),
        "in_cluster_fraction": _between(0, 1, False, False),
        "dustbin_correction": _one_of(*choices.DUSTBIN_CORRECTIONS),
        "n_jobs": ((lambda v: v == -1 or v >= 1), "-1 (one per core) or >= 1"),
        "backend": _one_of(*choices.BACKENDS),
        "scheduler": ((lambda v: v == "" or bool(_SCHEDULER_ADDRESS.match(v))),
                      "empty or the address of a Dask scheduler, e.g. tcp://host:8786")},
    EnsembleConfig: {"top_n": _at_least(1), "iterations": _at_least(1), "tolerance": _at_least(0)},
    StudentConfig: {"transfer": _one_of(*choices.TRANSFERS), "views": _at_least(1), "plain_epochs": _at_least(0),
                    "alpha": _between(0, 1), "temperature": _above(0), "loss": _one_of(*choices.LOSSES),
                    "dkd_beta": _at_least(0), "max_params_ratio": _above(0)},
    ExportConfig: {"formats": ((lambda v: len(v) > 0 and all(f in choices.EXPORT_FORMATS for f in v)),
                               "a list of one or more of " + ", ".join(choices.EXPORT_FORMATS)),
                   "parity_atol": _at_least(0)},
    LogConfig: {},
}


# rules for one path where its section's type has another (the specialists may take the generalist's model)
PATH_RULES: dict[str, Rule] = {"specialists.model.arch": _one_of("generalist", *choices.ARCHITECTURES)}


def _check_fields(section: Any, prefix: str) -> None:
    """Each field of `section` (recursively) against its rule; ConfigError naming the first bad one."""
    rules = {**RULES[type(section)], **{k[len(prefix):]: v for k, v in PATH_RULES.items()
                                        if k.startswith(prefix) and "." not in k[len(prefix):]}}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            _check_fields(value, f"{prefix}{f.name}.")
            continue
        if f.name not in rules:
            continue
        allowed, text = rules[f.name]
        if not allowed(value):
            if text.startswith("one of "):
                raise ConfigError(f"{prefix}{f.name} = {shown(value)} is not {text}")
            raise ConfigError(f"{prefix}{f.name} must be {text}, got {shown(value)}")
        if isinstance(value, float) and not math.isfinite(value):  # every float setting, whatever its rule
            raise ConfigError(f"{prefix}{f.name} must be a finite number ({text}), got {shown(value)}")


def _model_checks(key: str, m: ModelConfig) -> list[tuple[bool, str]]:
    """Settings of the model section `key` (e.g. "generalist.model") that contradict each other."""
    named = m.arch in choices.NAMED_ARCHITECTURES
    return [
        (not named or bool(m.name), f"{key}.arch = {m.arch!r} builds a library's model by name: set {key}.name (e.g. "
                                    f"{'resnet18' if m.arch == 'torchvision' else 'resnet18, mobilenetv3_small_100'})"),
        (named or not m.name, f"{key}.name = {shown(m.name)} names a library's model, but {key}.arch = "
                              f"{m.arch!r}; set "
                              f"{key}.arch = 'torchvision' or 'timm', or leave {key}.name empty"),
        (named or m.pretrained is False, f"{key}.pretrained = {m.pretrained!r} needs {key}.arch = 'torchvision' or "
                                         f"'timm' ({m.arch!r} has no pretrained weights); set it to false"),
        (named or m.normalize != "weights", f"{key}.normalize = 'weights' needs {key}.arch = 'torchvision' or "
                                            f"'timm'; use 'auto' or 'data'"),
        (m.arch != "cnn" or len(m.channels) > 0, f"{key}.channels = [] gives the cnn no convolution blocks (only a "
                                                 f"linear head on the pooled input); give at least one, e.g. "
                                                 f"{key}.channels = [32, 64]"),
    ]


def _image_augmentations(data: DataConfig) -> list[str]:
    """The per-image and mixing augmentations `data` switches on (by field name)."""
    on = {"random_resized_crop": data.random_resized_crop > 0, "auto_augment": data.auto_augment != "none",
          "mix": data.mix != "none"}
    return [name for name, used in on.items() if used]


def _plain_epochs_checks(cfg: Config) -> list[tuple[bool, str]]:
    """student.plain_epochs against the transfer method, the augmentation and the epochs it ends."""
    s = cfg.student
    if s.plain_epochs == 0:
        return []
    return [
        (s.transfer == "views", f"student.plain_epochs = {s.plain_epochs} ends training on the plain images after the "
                                f"fixed views, and student.transfer = {shown(s.transfer)} has none; set "
                                "student.transfer = 'views', or student.plain_epochs = 0"),
        (cfg.data.flip or cfg.data.crop_pad > 0, "student.plain_epochs needs augmented views to end, and data.flip and "
                                                 "data.crop_pad are off (every epoch is on the plain images already); "
                                                 "set student.plain_epochs = 0"),
        (s.plain_epochs < s.train.epochs, f"student.plain_epochs = {s.plain_epochs} leaves none of the "
                                          f"student.train.epochs = {s.train.epochs} for the views; make it smaller"),
    ]


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS says, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def check_machine(cfg: Config) -> None:
    """ConfigError for settings this machine cannot run, whatever the data: more torch threads than
    THREADS_PER_CORE per usable core (torch and OpenMP crash or fail far above that). Not part of
    `validate_config`, so that a run saved on a larger machine still loads here and may be resumed with
    --set threads=..."""
    most = THREADS_PER_CORE * usable_cores()
    if cfg.threads > most:
        raise ConfigError(f"threads = {cfg.threads} is more than this machine can run: at most {most} "
                          f"({THREADS_PER_CORE} per core, {usable_cores()} cores); set threads = 0 (torch's default) "
                          "or a number up to the cores")


def validate_config(cfg: Config) -> None:
    """Reject values no run could use, before any work starts; each message names the field."""
    _check_fields(cfg, "")
    c = cfg.clusters
    checks = [
        *_model_checks("generalist.model", cfg.generalist.model), *_model_checks("student.model", cfg.student.model),
        *_model_checks("specialists.model", cfg.specialists.model),
        (c.max_size == 0 or c.max_size >= c.min_size, "clusters.max_size must be 0 (no limit) or >= clusters.min_size"),
        (c.k != 1 or c.min_confusion > 0,
         "clusters.k = 1 puts every class into one cluster, whose specialist would have no other classes to "
         "tell apart (no dustbin); use clusters.k >= 2, or 0 to choose k from the number of classes"),
        (cfg.data.name != "synthetic" or cfg.data.synthetic_groups <= cfg.data.synthetic_classes,
         "data.synthetic_groups must be <= data.synthetic_classes"),
        (cfg.data.storage != "stream" or cfg.data.name == "imagefolder",
         f"data.storage = 'stream' reads image files from disk, and data.name = {shown(cfg.data.name)} is not an image "
         "folder (it is held in memory); use data.storage = 'memory' or 'auto', or data.name = 'imagefolder'"),
        (cfg.data.name != "synthetic" or not _image_augmentations(cfg.data),
         f"data.{(_image_augmentations(cfg.data) or [''])[0]} augments images, and the synthetic data are flat "
         "features; switch it off (0 or 'none') for data.name = 'synthetic'"),
        (cfg.specialists.init == "scratch" or cfg.specialists.model.arch == "generalist",
         "specialists.model sets an architecture of its own, which needs specialists.init = 'scratch' "
         "(a specialist initialised from the generalist has the generalist's architecture)"),
        (cfg.specialists.backend != "dask" or cfg.specialists.scheduler,
         "specialists.backend = 'dask' needs specialists.scheduler = 'tcp://host:port'"),
        *_plain_epochs_checks(cfg),
        (cfg.student.loss != "dkd" or cfg.student.transfer != "live" or cfg.data.mix == "none",
         f"student.loss = 'dkd' splits each example at its one true class, and data.mix = {shown(cfg.data.mix)} with "
         "student.transfer = 'live' mixes the labels; use student.loss = 'kd', or data.mix = 'none'"),
        (cfg.precision != "fp16" or cfg.device != "cpu",
         "precision = 'fp16' needs a CUDA GPU (device = 'cuda' or 'auto'); on CPU use precision = 'bf16' or 'fp32'"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
