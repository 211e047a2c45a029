"""Configuration: one dataclass per stage, loaded from TOML, overridden with `--set a.b=v`.

Precedence is defaults < TOML file < command line. Every field has a one-line comment;
the defaults are the values that work on the built-in `digits` data.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib


class ConfigError(ValueError):
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
    image_size: int = 0  # imagefolder: resize images to this square size; 0 = keep (all must match)
    synthetic_classes: int = 12  # synthetic: number of classes
    synthetic_groups: int = 3  # synthetic: the classes fall into this many planted confusable groups
    synthetic_per_class: int = 120  # synthetic: training examples per class (the test set has half as many)
    synthetic_dim: int = 32  # synthetic: feature dimension


@dataclass
class ModelConfig:
    arch: str = "mlp"  # mlp | cnn | resnet (see models.py)
    hidden: list[int] = field(default_factory=lambda: [256, 256])  # mlp: widths of the hidden layers
    channels: list[int] = field(default_factory=lambda: [32, 64])  # cnn: channels of each conv block (each halves the size)
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


@dataclass
class GeneralistConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # the generalist's architecture
    train: TrainConfig = field(default_factory=TrainConfig)  # how it is trained


@dataclass
class ClustersConfig:
    k: int = 3  # number of clusters of confusable classes (one specialist each)
    matrix: str = "soft"  # soft | hard | covariance: which confusability matrix k-means sees
    min_size: int = 2  # smallest allowed cluster (in classes)
    max_size: int = 0  # largest allowed cluster; 0 = no limit
    min_confusion: float = 0.0  # classes confused less than this (relative to the most confused class, 0-1) join no cluster
    n_init: int = 20  # k-means restarts (the best inertia wins)


@dataclass
class SpecialistsConfig:
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=8, lr=5e-4, warmup_epochs=0))  # phase 1: hard labels
    soft_epochs: int = 4  # phase 2: epochs of fine-tuning on the generalist's soft targets
    soft_lr: float = 2e-4  # phase 2 learning rate
    temperature: float = 2.0  # temperature of the soft targets in phase 2
    soft_alpha: float = 0.3  # phase 2: weight of the hard-label term (the rest is the soft term)
    in_cluster_fraction: float = 0.5  # share of each batch drawn from the specialist's own classes
    dustbin_correction: str = "validation"  # validation: fit the dustbin bias on the held-out split | prior: + log oversampling ratio (the paper) | none
    n_jobs: int = 2  # specialists trained at once (-1 = one per core)
    backend: str = "loky"  # loky (processes on this machine) | dask (an existing dask.distributed cluster)
    scheduler: str = ""  # dask: address of the scheduler, e.g. tcp://host:8786; workers write into the run directory: it must be on storage all workers share


@dataclass
class EnsembleConfig:
    top_n: int = 1  # the generalist's top-n classes select the active specialists
    iterations: int = 50  # fixed-point (EM) iterations of the eq. 5 solve
    tolerance: float = 1e-6  # stop early once q moves less than this


@dataclass
class StudentConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(hidden=[64]))  # the compact student
    train: TrainConfig = field(default_factory=TrainConfig)  # how it is trained
    alpha: float = 0.1  # weight of the hard-label term; 1 - alpha goes to the distillation term
    temperature: float = 4.0  # distillation temperature T
    max_params_ratio: float = 1.0  # the student may have at most this fraction of the generalist's parameters


@dataclass
class ExportConfig:
    formats: list[str] = field(default_factory=lambda: ["torchscript", "onnx", "state_dict"])  # torchscript | export | onnx | state_dict
    parity_atol: float = 1e-4  # largest allowed |exported - eager| on a check batch


@dataclass
class Config:
    seed: int = 0  # seeds data splits, initialisation, shuffling and clustering
    device: str = "cpu"  # cpu | cuda | auto
    precision: str = "auto"  # auto | fp32 | bf16 | fp16: autocast for training and teacher inference (fp16 only on CUDA); auto: bf16 where native and it pays
    compile: bool = False  # torch.compile every model fit() trains (opt-in: compiling takes seconds to minutes)
    threads: int = 0  # torch CPU threads; 0 = torch's default
    data: DataConfig = field(default_factory=DataConfig)  # which data and how it is split
    generalist: GeneralistConfig = field(default_factory=GeneralistConfig)  # stage 1
    clusters: ClustersConfig = field(default_factory=ClustersConfig)  # stages 2 and 3
    specialists: SpecialistsConfig = field(default_factory=SpecialistsConfig)  # stage 4
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)  # stage 5
    student: StudentConfig = field(default_factory=StudentConfig)  # stage 6
    export: ExportConfig = field(default_factory=ExportConfig)  # stage 7


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
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if kind in (int, float, str) and (not isinstance(value, kind) or isinstance(value, bool)):
        raise ConfigError(f"{key} must be of type {kind.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _merge(base: Any, values: dict[str, Any], prefix: str) -> Any:
    """Apply a (partial) dict onto an existing dataclass instance, keeping its other fields."""
    types_by_name = _field_types(type(base))
    unknown = sorted(set(values) - set(types_by_name))
    if unknown:
        valid = ", ".join(prefix + name for name in types_by_name)
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r}; valid keys here: {valid}")
    for name, value in values.items():
        kind = types_by_name[name]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix + name} is a section; give it as a table, not {value!r}")
            _merge(getattr(base, name), value, prefix + name + ".")
        else:
            setattr(base, name, _coerce(value, kind, prefix + name))
    return base


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
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
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass an existing .toml (see pipelines/configs/)")
        try:
            values = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {path} is not valid TOML: {err}") from err
        _merge(cfg, values, "")
    for text in overrides:
        keys, value = _parse_override(text)
        _merge(cfg, _nest(keys, value), "")
    validate_config(cfg)
    return cfg


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a Config from `to_dict` output (e.g. a run directory's config.toml)."""
    cfg = _merge(Config(), values, "")
    validate_config(cfg)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_toml(cfg: Config) -> str:
    """Write the resolved config as TOML (sections as tables), readable by `load_config`."""
    lines: list[str] = []

    def emit(obj: Any, section: str) -> None:
        scalars = {k: v for k, v in dataclasses.asdict(obj).items() if not dataclasses.is_dataclass(getattr(obj, k))}
        if section:
            lines.append(f"\n[{section}]")
        for key, value in scalars.items():
            lines.append(f"{key} = {_toml_value(value)}")
        for f in dataclasses.fields(obj):
            child = getattr(obj, f.name)
            if dataclasses.is_dataclass(child):
                emit(child, f"{section}.{f.name}" if section else f.name)

    emit(cfg, "")
    return "\n".join(lines).lstrip() + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


# ---------------------------------------------------------------- validation

_CHOICES = {
    "data.name": ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder", "synthetic"),
    "generalist.model.arch": ("mlp", "cnn", "resnet"),
    "student.model.arch": ("mlp", "cnn", "resnet"),
    "generalist.train.optimizer": ("adamw", "sgd"),
    "specialists.train.optimizer": ("adamw", "sgd"),
    "student.train.optimizer": ("adamw", "sgd"),
    "generalist.train.schedule": ("cosine", "step", "constant"),
    "specialists.train.schedule": ("cosine", "step", "constant"),
    "student.train.schedule": ("cosine", "step", "constant"),
    "clusters.matrix": ("soft", "hard", "covariance"),
    "specialists.backend": ("loky", "dask"),
    "specialists.dustbin_correction": ("validation", "prior", "none"),
    "device": ("cpu", "cuda", "auto"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
}


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate_config(cfg: Config) -> None:
    """Reject values no run could use, before any work starts."""
    for key, choices in _CHOICES.items():
        if _get(cfg, key) not in choices:
            raise ConfigError(f"{key} = {_get(cfg, key)!r} is not one of {', '.join(choices)}")
    for fmt in cfg.export.formats:
        if fmt not in ("torchscript", "export", "onnx", "state_dict"):
            raise ConfigError(f"export.formats has {fmt!r}; choose from torchscript, export, onnx, state_dict")
    checks = [
        (0 < cfg.data.val_fraction < 1, "data.val_fraction must be between 0 and 1"),
        (cfg.data.train_limit >= 0, "data.train_limit must be >= 0 (0 = all)"),
        (cfg.data.crop_pad >= 0, "data.crop_pad must be >= 0"),
        (cfg.clusters.k >= 1, "clusters.k must be >= 1"),
        (cfg.clusters.min_size >= 1, "clusters.min_size must be >= 1"),
        (cfg.generalist.model.pool >= 1 and cfg.student.model.pool >= 1, "model.pool must be >= 1"),
        (cfg.clusters.max_size == 0 or cfg.clusters.max_size >= cfg.clusters.min_size,
         "clusters.max_size must be 0 (no limit) or >= clusters.min_size"),
        (0 < cfg.specialists.in_cluster_fraction < 1, "specialists.in_cluster_fraction must be between 0 and 1"),
        (cfg.specialists.temperature > 0 and cfg.student.temperature > 0, "temperatures must be > 0"),
        (0 <= cfg.student.alpha <= 1 and 0 <= cfg.specialists.soft_alpha <= 1, "alpha values must be in [0, 1]"),
        (cfg.specialists.soft_epochs >= 0, "specialists.soft_epochs must be >= 0"),
        (cfg.ensemble.top_n >= 1, "ensemble.top_n must be >= 1"),
        (cfg.specialists.backend != "dask" or cfg.specialists.scheduler,
         "specialists.backend = 'dask' needs specialists.scheduler = 'tcp://host:port'"),
        (cfg.student.max_params_ratio > 0, "student.max_params_ratio must be > 0"),
        (cfg.precision != "fp16" or cfg.device != "cpu",
         "precision = 'fp16' needs a CUDA GPU (device = 'cuda' or 'auto'); on CPU use precision = 'bf16' or 'fp32'"),
    ]
    for name in ("generalist", "specialists", "student"):
        section = getattr(cfg, name).train
        checks += [
            (section.epochs >= 1, f"{name}.train.epochs must be >= 1, got {section.epochs}"),
            (section.batch_size >= 1, f"{name}.train.batch_size must be >= 1, got {section.batch_size}"),
            (section.lr > 0, f"{name}.train.lr must be > 0, got {section.lr}"),
        ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
