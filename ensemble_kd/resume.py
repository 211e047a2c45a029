"""What a resumed run may change: its settings come from its own config.toml.

`ensemble-kd run --out DIR --resume` reads DIR/config.toml; `--set` may then change

* runtime settings (`config.RUNTIME_SETTINGS`), which never change finished work: `device`,
  `precision`, `threads`, `data.root` and `data.download` (where the data is read from: the
  data fingerprint in every model file still refuses other data), `specialists.n_jobs`,
  `.backend`, `.scheduler`, and every `export.*` setting (the export is redone on each run);
* the settings of a stage that holds no work yet, and of no later stage that does. A
  stage holds work once it has a model.pt or a checkpoint.pt. The clusters stage keeps
  none of its own (it is recomputed on every run), so after `--until clusters` the
  clusters may change until the first specialist starts training; the ensemble is built
  on every run, so its settings may change until the students start.

Anything else is refused by name, saying which stage already holds work made with it
and what to do (a new --out, or --overwrite). `--config` with `--resume` must be the
run's own config apart from runtime settings. A refused resume writes nothing.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from . import artifacts
from .choices import STAGES
from .config import RUNTIME_SETTINGS, Config, ConfigError, apply_overrides, flatten, load_config

log = logging.getLogger(__name__)

_STAGE_OF_SECTION = {"clusters": "clusters", "specialists": "specialists", "ensemble": "ensemble",
                     "student": "student"}  # seed, data.* and generalist.* belong to the generalist
_WORK_FILES = (artifacts.MODEL_FILE, artifacts.CHECKPOINT_FILE)
# the stages that train models, and the folders that keep them (a resumed run reloads them)
STAGE_FOLDERS = {"generalist": [artifacts.GENERALIST_DIR], "specialists": [artifacts.SPECIALISTS_DIR],
                 "student": list(artifacts.STUDENT_DIRS)}


def stage_of(key: str) -> str | None:
    """The first stage whose work depends on setting `key`; None for runtime settings."""
    if key in RUNTIME_SETTINGS or key.startswith("export."):
        return None
    return _STAGE_OF_SECTION.get(key.split(".")[0], "generalist")


def stages_with_work(run_dir: str | Path) -> dict[str, Path]:
    """Stages of the run that hold a model.pt or checkpoint.pt: stage -> one such file."""
    found = {}
    for stage, folders in STAGE_FOLDERS.items():
        for folder in folders:
            files = [p for p in sorted((Path(run_dir) / folder).rglob("*.pt")) if p.name in _WORK_FILES]
            if files:
                found[stage] = files[0]
                break
    return found


def changed_settings(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """{key: (old value, new value)} of every setting that differs."""
    before, after = flatten(old), flatten(new)
    return {key: (value, after[key]) for key, value in before.items() if after[key] != value}


def check_resume(run_dir: str | Path, saved: Config, cfg: Config) -> None:
    """ConfigError naming the first setting `cfg` changes that work already in `run_dir` was made with."""
    work = stages_with_work(run_dir)
    for key, (old, new) in changed_settings(saved, cfg).items():
        stage = stage_of(key)
        if stage is None:
            continue
        holding = [s for s in STAGES[STAGES.index(stage):] if s in work]
        if holding:
            raise ConfigError(
                f"{key} cannot change when resuming {run_dir}: its {holding[0]} stage already holds work made "
                f"with {key} = {old!r} ({work[holding[0]]}), not {new!r}; use a new --out for the new setting, "
                "or --overwrite to start this run again")
    for key, (old, new) in changed_settings(saved, cfg).items():
        log.info("resuming with %s = %r (the run had %r)", key, new, old)


def resume_config(run_dir: str | Path, config_path: str | Path | None = None,
                  overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The config of `ensemble-kd run --resume`: the run's config.toml, then `overrides`.

    `config_path`, when given, must hold the run's config (its runtime settings may
    differ, and then apply); otherwise a ConfigError names the first difference."""
    run_dir = artifacts.check_run_dir(run_dir, resume=True)
    saved_path = run_dir / artifacts.CONFIG_FILE
    if not saved_path.is_file():
        raise artifacts.ArtifactError(f"--resume given but {run_dir} holds no run to resume (no "
                                      f"{artifacts.CONFIG_FILE}); drop --resume to start one")
    saved = load_config(saved_path)
    base = saved
    if config_path is not None:
        base = load_config(config_path)
        for key, (old, new) in changed_settings(saved, base).items():
            if stage_of(key) is not None:
                raise ConfigError(
                    f"--config {config_path} is not the config of the run in {run_dir}: {key} is {new!r} there "
                    f"but {old!r} in the run; drop --config (--resume reads the run's own {saved_path}) and "
                    "change settings with --set")
    return apply_overrides(base, overrides)
