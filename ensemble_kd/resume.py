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

* after a stage stopped on a non-finite loss (train.py leaves `nonfinite.json` in the
  training folder that failed), the settings that say how it continues
  (`NONFINITE_SETTINGS`: its learning rate and gradient clipping): the stage restarts from
  its last good checkpoint with the new value, config.toml records it, and manifest.json
  lists the change under "restarts", so that the stage's files made before it (its
  checkpoint, specialists or students already finished) are still accepted (`after_restarts`).

Anything else is refused by name, saying which stage already holds work made with it
and what to do (a new --out, or --overwrite). `--config` with `--resume` must describe
the run's own config (the file plus the command line's `--set`), apart from runtime
settings and what `--set` may change. A refused resume writes nothing.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from . import artifacts
from .choices import STAGES
from .config import RUNTIME_SETTINGS, Config, ConfigError, apply_overrides, flatten, load_config

log = logging.getLogger(__name__)

_STAGE_OF_SECTION = {"clusters": "clusters", "specialists": "specialists", "ensemble": "ensemble",
                     "student": "student"}  # seed, data.* and generalist.* belong to the generalist
# the stages that train models, and the folders that keep them (a resumed run reloads them)
STAGE_FOLDERS = {"generalist": [artifacts.GENERALIST_DIR], "specialists": [artifacts.SPECIALISTS_DIR],
                 "student": list(artifacts.STUDENT_DIRS)}
# what a resume may change in a stage that stopped on a non-finite loss: how its training continues
NONFINITE_SETTINGS = {
    "generalist": ("generalist.train.lr", "generalist.train.grad_clip"),
    "specialists": ("specialists.train.lr", "specialists.train.grad_clip", "specialists.soft_lr"),
    "student": ("student.train.lr", "student.train.grad_clip"),
}
_FINGERPRINT_SECTION = {"specialists": ["specialist"]}  # where a stage's settings sit in its files' fingerprints
RESTARTS = "restarts"  # manifest.json: the settings resumes changed to continue after a non-finite loss


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
            files = artifacts.work_files(run_dir, [folder])
            if files:
                found[stage] = files[0]
                break
    return found


def changed_settings(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """{key: (old value, new value)} of every setting that differs."""
    before, after = flatten(old), flatten(new)
    return {key: (value, after[key]) for key, value in before.items() if after[key] != value}


def nonfinite_failures(run_dir: str | Path, stage: str) -> list[Path]:
    """The training folders of `stage` whose loss became non-finite and that have not finished since."""
    return [record.parent for folder in STAGE_FOLDERS.get(stage, [])
            for record in sorted((Path(run_dir) / folder).rglob(artifacts.NONFINITE_FILE))
            if not (record.parent / artifacts.MODEL_FILE).exists()]


def nonfinite_restarts(run_dir: str | Path, saved: Config, cfg: Config) -> list[dict[str, Any]]:
    """The changes from `saved` to `cfg` that continue a stage after a non-finite loss: a setting of
    NONFINITE_SETTINGS whose stage has a failed training folder and whose later stages hold no work.
    Each as {"setting", "from", "to", "stage", "failed": [folders]}, as manifest.json records it."""
    work = stages_with_work(run_dir)
    restarts = []
    for key, (old, new) in changed_settings(saved, cfg).items():
        stage = stage_of(key)
        failed = nonfinite_failures(run_dir, stage) if key in NONFINITE_SETTINGS.get(stage, ()) else []
        later = [s for s in STAGES[STAGES.index(stage) + 1:] if s in work] if stage else []
        if failed and not later:
            restarts.append({"setting": key, "from": old, "to": new, "stage": stage,
                             "failed": [str(folder.relative_to(run_dir)) for folder in failed]})
    return restarts


def check_resume(run_dir: str | Path, saved: Config, cfg: Config, say: bool = True) -> None:
    """ConfigError naming the first setting `cfg` changes that work already in `run_dir` was made with
    (but the settings that continue a stage after a non-finite loss, `nonfinite_restarts`); with `say`,
    log each change made."""
    work = stages_with_work(run_dir)
    restarts = {r["setting"]: r for r in nonfinite_restarts(run_dir, saved, cfg)}
    for key, (old, new) in changed_settings(saved, cfg).items():
        stage = stage_of(key)
        if stage is None or key in restarts:
            continue
        holding = [s for s in STAGES[STAGES.index(stage):] if s in work]
        if holding:
            raise ConfigError(
                f"{key} cannot change when resuming {run_dir}: its {holding[0]} stage already holds work made "
                f"with {key} = {old!r} ({work[holding[0]]}), not {new!r}; use a new --out for the new setting, "
                "or --overwrite to start this run again")
    if not say:
        return
    for key, (old, new) in changed_settings(saved, cfg).items():
        if key in restarts:
            log.info("resuming with %s = %r (the run had %r): %s continues from its last good checkpoint after "
                     "its non-finite loss", key, new, old, ", ".join(restarts[key]["failed"]))
        else:
            log.info("resuming with %s = %r (the run had %r)", key, new, old)


def record_restarts(run_dir: str | Path, restarts: list[dict[str, Any]]) -> None:
    """Add `restarts` (`nonfinite_restarts`) to manifest.json, where `after_restarts` finds them."""
    if not restarts:
        return
    path = Path(run_dir) / artifacts.MANIFEST_FILE
    manifest = artifacts.read_json(path) if path.exists() else {}
    manifest.setdefault(RESTARTS, []).extend(restarts)
    artifacts.write_json(path, manifest)


def after_restarts(path: str | Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """`fingerprint` (of the file at `path` in a run's stage folder) as it would read had the file been made
    after the run's recorded restarts: each setting a restart changed, where it still has the old value,
    takes the new one. Unchanged when `path` is in no run directory or the run has no restarts."""
    path = Path(path).absolute()
    run_dir = next((d for d in path.parents[:4] if (d / artifacts.MANIFEST_FILE).is_file()), None)
    if run_dir is None:
        return fingerprint
    restarts = artifacts.read_json(run_dir / artifacts.MANIFEST_FILE).get(RESTARTS, [])
    top = path.relative_to(run_dir).parts[0]
    result = copy.deepcopy(fingerprint)
    for restart in restarts:
        if top not in STAGE_FOLDERS.get(restart["stage"], []):
            continue
        *parents, leaf = _FINGERPRINT_SECTION.get(restart["stage"], []) + restart["setting"].split(".")[1:]
        section = result
        for part in parents:
            section = section.get(part) if isinstance(section, dict) else None
        if isinstance(section, dict) and leaf in section and section[leaf] == restart["from"]:
            section[leaf] = restart["to"]
    return result


def resume_config(run_dir: str | Path, config_path: str | Path | None = None,
                  overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The config of `ensemble-kd run --resume`: the run's config.toml, then `overrides`.

    `config_path`, when given, must describe the run's config together with `overrides` (as
    the command that started the run did: the file plus its --set): the file may differ from
    the run's config.toml only in runtime settings (which then apply) and in what `overrides`
    set (judged by `check_resume` as any --set on resume); otherwise a ConfigError names the
    first difference."""
    run_dir = artifacts.check_run_dir(run_dir, resume=True)
    saved_path = run_dir / artifacts.CONFIG_FILE
    if not saved_path.is_file():
        raise artifacts.ArtifactError(f"--resume given but {run_dir} holds no run to resume (no "
                                      f"{artifacts.CONFIG_FILE}); drop --resume to start one")
    saved = load_config(saved_path)
    if config_path is None:
        return apply_overrides(saved, overrides)
    described = load_config(config_path, overrides)  # the config the command line describes: file plus --set
    for key, (old, new) in changed_settings(apply_overrides(saved, overrides), described).items():
        if stage_of(key) is not None:
            raise ConfigError(
                f"--config {config_path} is not the config of the run in {run_dir}: {key} is {new!r} there (with "
                f"this command's --set) but {old!r} in the run; drop --config (--resume reads the run's own "
                f"{saved_path}) and change settings with --set")
    return described
