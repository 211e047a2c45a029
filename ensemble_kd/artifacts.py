"""The run directory: where each stage's outputs live, how they are written, the run lock, the manifest.

Every file is written atomically (`atomic_write`: a temporary name beside its final one,
flushed, fsynced, then `os.replace`d), so a crash leaves either the old file or the new
one, never half; except the per-epoch metrics logs (`metrics.jsonl`), which are appended
to one line per epoch (a line torn by a crash is dropped when read, and a resumed stage
cuts the log back to its checkpoint), and the lock file `.lock`.

A run directory carries a marker, `.ensemble-kd-run`, from its creation: --overwrite deletes
only a folder that has it, and in it only the names a run writes (`RUN_ENTRIES`), refusing a
run whose own folders hold anything its stages do not write (`foreign_files`). A run made by
an older version (no marker) is resumed only when it holds a model or checkpoint ensemble-kd
made (`made_by_ensemble_kd`).
"""
from __future__ import annotations

import csv
import datetime
import io
import json
import logging
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

try:
    import fcntl  # the run lock (flock); POSIX only
except ImportError:  # Windows: no lock
    fcntl = None

from .errors import EnsembleKDError

log = logging.getLogger(__name__)


class ArtifactError(EnsembleKDError, RuntimeError):
    """An artifact is missing, corrupt, or belongs to another configuration."""


# Layout of artifacts/<run>/ (documented in artifacts/README.md).
CONFIG_FILE = "config.toml"
MANIFEST_FILE = "manifest.json"
GENERALIST_DIR = "generalist"
CONFUSION_DIR = "confusion"
CLUSTERS_FILE = "clusters.json"
HEATMAP_FILE = "confusion.png"
SPECIALISTS_DIR = "specialists"
STARTED_FILE = "STARTED"  # in a specialist's folder once its training starts (holds the pid)
# the three students: distilled from the ensemble, from the generalist alone, and on hard labels only
STUDENT_DIRS = ("student", "student_from_generalist", "student_hard_labels")
TEACHER_LOGITS_FILE = "teacher_logits.pt"  # in a student's folder: its teacher's logits on the transfer set
TEACHERS_FILE = "teachers.json"  # in student/: how much the two teachers differ on the transfer set
EXPORT_DIR = "export"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
MODEL_FILE = "model.pt"  # the finished model of a stage directory
CHECKPOINT_FILE = "checkpoint.pt"  # the last epoch's training state of an unfinished stage
METRICS_FILE = "metrics.jsonl"  # one JSON object per finished epoch
METRICS_CSV = "metrics.csv"  # the same metrics as a table: a header, then one row per finished epoch
LEARNING_CURVES_FILE = "learning_curves.png"  # every stage's loss and validation accuracy per epoch (report.md)
LOCK_FILE = ".lock"  # locked (flock) by the process running in the directory; holds its pid
ACCURACY_VS_SIZE_FILE = "accuracy_vs_size.png"  # report.md's plot of test accuracy against parameter count
NONFINITE_FILE = "nonfinite.json"  # in a stage's training folder: its loss became NaN or infinite (train.fit)
TRAINED_DIRS = (GENERALIST_DIR, SPECIALISTS_DIR, *STUDENT_DIRS)  # the folders of the stages that train models
RUN_MARKER_FILE = ".ensemble-kd-run"  # written when ensemble-kd creates a run directory: --overwrite needs it
RUN_MARKER_TEXT = ("ensemble-kd run directory\n"
                   "ensemble-kd wrote this file when it created this folder for a run. `ensemble-kd run --overwrite`\n"
                   "deletes a folder's contents only when this file is here, and only the files ensemble-kd writes.\n")
# every name ensemble-kd writes at the top of a run directory (and their temporary files); --overwrite deletes
# these and nothing else
RUN_ENTRIES = frozenset({
    CONFIG_FILE, MANIFEST_FILE, GENERALIST_DIR, CONFUSION_DIR, CLUSTERS_FILE, HEATMAP_FILE, SPECIALISTS_DIR,
    *STUDENT_DIRS, EXPORT_DIR, REPORT_JSON, REPORT_MD, LEARNING_CURVES_FILE, ACCURACY_VS_SIZE_FILE, LOCK_FILE,
    RUN_MARKER_FILE})
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{8}\.tmp$")  # what new_temp_file names a file being written
# what ensemble-kd writes inside a run's own folders (`run_files`): --overwrite refuses a run holding anything else
STAGE_FILES = frozenset({MODEL_FILE, CHECKPOINT_FILE, METRICS_FILE, METRICS_CSV, NONFINITE_FILE, TEACHER_LOGITS_FILE,
                         TEACHERS_FILE, STARTED_FILE})  # in a stage's training folder
_TENSORBOARD_EVENTS = re.compile(r"^events\.out\.tfevents\..+")  # SummaryWriter's event files (log.tensorboard)
SPECIALIST_PHASES = ("hard", "soft")  # a specialist's two training phases, each a folder of STAGE_FILES
_SPECIALIST_DIR = re.compile(r"^specialist_\d+$")
CONFUSION_FILES = frozenset({"matrices.npz"})  # confusion.MATRICES_FILE
EXPORT_FILES = frozenset({"student.ts", "student.pt2", "student.onnx", "student_state.pt", "student.json"})


# ---------------------------------------------------------------- a worker whose run is gone writes nothing

class WritesStopped(BaseException):
    """Raised by a write check: this process must write nothing more (the run it works for is gone).
    A BaseException, so that no `except Exception` on the way turns it into an ordinary error."""


_write_checks: list[Callable[[], None]] = []  # called before every write (parallel.stop_with_parent adds one)


def add_write_check(check: Callable[[], None]) -> None:
    """Call `check()` before each file this process writes; it raises WritesStopped to stop the write.

    A specialist worker adds one that raises once the run that started it has died, so
    nothing is written into the run directory after the run is gone (parallel.py)."""
    if check not in _write_checks:
        _write_checks.append(check)


def check_may_write() -> None:
    """Run the checks `add_write_check` added (none in the run's own process); fit also calls it every step."""
    for check in _write_checks:
        check()


def atomic_write(path: str | Path, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Call `write(f)` on a temp file next to `path`, then move it into place."""
    path = Path(path)
    check_may_write()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = new_temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        check_may_write()  # again: a worker whose run died while it wrote leaves the old file in place
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def new_temp_file(path: Path) -> tuple[int, Path]:
    """A new, empty file beside `path` (hidden, ending in .tmp), open for writing: (descriptor, path).

    Created as open() creates files, with mode 0666 less the umask, so that what is
    renamed into place is as readable as any file the user writes (mkstemp's 0600 would
    hide exported models from other users and containers)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}; remove the stale .{path.name}.*.tmp files")


def write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_torch(path: str | Path, obj: Any) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist; run the stage that writes it first")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path} is not valid JSON ({err}); delete it and rerun with --resume") from err


def load_torch(path: str | Path, mmap: bool = False) -> Any:
    """torch.load that names the file and the fix when it is missing or corrupt; with `mmap` the tensors
    are mapped from the file, not read (cheap when only the other entries are wanted)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist; run the stage that writes it first")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises many kinds on a truncated or foreign file
        raise ArtifactError(f"{path} is corrupt or not a checkpoint ({type(err).__name__}: {err}); "
                            "delete it and rerun with --resume to recreate it") from err


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one line (metrics logs are append-only; a torn last line is dropped on read)."""
    check_may_write()
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> Path:
    """The whole log at once (atomically), e.g. cut back to a checkpoint's epoch."""
    return write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def append_csv(path: str | Path, record: dict[str, Any]) -> None:
    """Append one row (csv module) with the record's keys as columns; the header first when the file is new."""
    path = Path(path)
    check_may_write()
    new = not path.is_file() or path.stat().st_size == 0
    with open(path, "a", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(record))
        if new:
            writer.writeheader()
        writer.writerow(record)


def write_csv(path: str | Path, records: list[dict[str, Any]]) -> Path:
    """The whole table at once (atomically): a header from the first record's keys, then one row each."""
    buffer = io.StringIO(newline="")
    if records:
        writer = csv.DictWriter(buffer, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return write_text(path, buffer.getvalue())


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line torn by a crash ends the log
    return records


def prepare_run_dir(run_dir: str | Path, resume: bool = False, overwrite: bool = False) -> Path:
    """Create and lock the run directory, refusing to reuse one that holds work without --resume or --overwrite.

    A new or empty directory gets the run marker (`RUN_MARKER_FILE`). A marked directory
    holding only config.toml (a run that stopped on an error before any stage began) holds
    no work and is reused as if it were empty. --overwrite deletes only a marked run's own
    entries (`RUN_ENTRIES`) and refuses anything else (`check_run_dir`). The lock
    (`lock_run_dir`) keeps a second run out while this process lives; the checks are made
    again once it is held."""
    run_dir = check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    run_dir.mkdir(parents=True, exist_ok=True)
    newly_locked = lock_run_dir(run_dir)
    try:
        check_run_dir(run_dir, resume=resume, overwrite=overwrite)  # what changed before the lock was taken
        if overwrite:
            _delete_run_entries(run_dir)
        if not _entries(run_dir):  # new, empty, or emptied by --overwrite: a folder this tool made
            mark_run(run_dir)
    except BaseException:
        if newly_locked:
            unlock_run_dir(run_dir)
        raise
    return run_dir


def check_run_dir(run_dir: str | Path, resume: bool = False, overwrite: bool = False) -> Path:
    """The checks of `prepare_run_dir` that touch nothing: flags that contradict, a file, a folder that is
    not a run, a run without --resume or --overwrite, what --overwrite may not delete, or nothing to resume."""
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise ArtifactError("--resume and --overwrite contradict each other; choose one")
    if run_dir.exists() and not run_dir.is_dir():
        raise ArtifactError(f"{run_dir} exists and is not a directory; choose another --out")
    if overwrite:
        _check_overwrite(run_dir)
        return run_dir
    if _holds_work(run_dir) and not _looks_like_run(run_dir):
        raise ArtifactError(f"{run_dir} is not empty and does not look like an ensemble-kd run (no "
                            f"{CONFIG_FILE} or {MANIFEST_FILE}); not writing into it or deleting it: "
                            "choose another --out")
    if _entries(run_dir) and not is_marked_run(run_dir) and not made_by_ensemble_kd(run_dir):
        raise ArtifactError(f"{run_dir} is not empty and ensemble-kd did not make it (no {RUN_MARKER_FILE}, and "
                            "no model or checkpoint of a run in it), so it does not look like an ensemble-kd run; "
                            "nothing was written: choose another --out")
    if resume:
        if not _holds_work(run_dir) and not (run_dir / CONFIG_FILE).is_file():
            raise ArtifactError(f"--resume given but {run_dir} holds no run to resume; drop --resume to start one")
        return run_dir
    if _holds_work(run_dir):
        raise ArtifactError(f"run directory {run_dir} already holds a run; pass --resume to continue it, "
                            "--overwrite to replace it, or --out to start a new one")
    return run_dir


def is_marked_run(run_dir: str | Path) -> bool:
    """True when `run_dir` holds the marker ensemble-kd writes into every run directory it creates."""
    marker = Path(run_dir) / RUN_MARKER_FILE
    try:
        return not marker.is_symlink() and marker.is_file() and marker.read_bytes() == RUN_MARKER_TEXT.encode()
    except OSError:
        return False


def mark_run(run_dir: str | Path) -> None:
    """Write the marker that makes `run_dir` a folder ensemble-kd made (`is_marked_run`)."""
    write_text(Path(run_dir) / RUN_MARKER_FILE, RUN_MARKER_TEXT)


def made_by_ensemble_kd(run_dir: str | Path) -> bool:
    """True when `run_dir`, without the marker (as runs made by older versions are), holds work ensemble-kd
    made: a valid manifest.json and a model.pt or checkpoint.pt (`work_files`) whose saved fingerprint (a dict
    naming the data and the seed) only ensemble-kd writes."""
    run_dir = Path(run_dir)
    try:
        if not isinstance(json.loads((run_dir / MANIFEST_FILE).read_text()), dict):
            return False
    except (OSError, ValueError):
        return False
    for path in work_files(run_dir):
        try:
            fingerprint = saved_fingerprint(path) if not path.is_symlink() else None
        except ArtifactError:  # anything torch cannot read is no proof
            continue
        if isinstance(fingerprint, dict) and "data" in fingerprint and "seed" in fingerprint:
            return True
    return False


def work_files(run_dir: str | Path, folders: Sequence[str] = TRAINED_DIRS) -> list[Path]:
    """Every model.pt and checkpoint.pt in `folders` of the run (finished and unfinished training)."""
    return [p for folder in folders for p in sorted((Path(run_dir) / folder).rglob("*.pt"))
            if p.name in (MODEL_FILE, CHECKPOINT_FILE)]


def saved_fingerprint(path: str | Path) -> dict[str, Any]:
    """The fingerprint of a model.pt or checkpoint.pt (empty if it has none), its weights left unread."""
    saved = load_torch(path, mmap=True)
    return saved.get("fingerprint", {}) if isinstance(saved, dict) else {}


def foreign_entries(run_dir: str | Path) -> list[str]:
    """The names at the top of `run_dir` that ensemble-kd does not write (sorted)."""
    return sorted(name for name in _entries(Path(run_dir)) if not _is_run_entry(name))


def remove_stale_temp_files(run_dir: str | Path) -> list[Path]:
    """Delete the temporary files (`new_temp_file`'s `.NAME.xxxxxxxx.tmp`) a killed process left anywhere in
    `run_dir`; returns them. Call it only while holding the run's lock: then no live process writes them."""
    removed = []
    for folder, dirs, files in os.walk(run_dir):  # does not follow links into other folders
        for name in files:
            if _TEMP_NAME.match(name):
                path = Path(folder) / name
                path.unlink(missing_ok=True)
                removed.append(path)
    if removed:
        log.info("removed %d temporary file%s left by a process that was killed while writing (e.g. %s)",
                 len(removed), "" if len(removed) == 1 else "s", removed[0])
    return removed


def foreign_files(run_dir: str | Path) -> list[str]:
    """Everything in `run_dir` that ensemble-kd does not write: the names at its top (`foreign_entries`), then
    the paths (relative to `run_dir`) of what its own folders hold besides the files the stages write."""
    run_dir = Path(run_dir)
    found = foreign_entries(run_dir)
    for name in sorted(_entries(run_dir)):
        entry = run_dir / name
        if name in found or entry.is_symlink() or not entry.is_dir() or _TEMP_NAME.match(name):
            continue  # a link or a file is removed as it is, never followed
        if name == GENERALIST_DIR or name in STUDENT_DIRS:
            found += _foreign_in(entry, name, STAGE_FILES)
        elif name == CONFUSION_DIR:
            found += _foreign_in(entry, name, CONFUSION_FILES)
        elif name == EXPORT_DIR:
            found += _foreign_in(entry, name, EXPORT_FILES)
        elif name == SPECIALISTS_DIR:
            found += _foreign_in(entry, name, frozenset(), _specialist_folders)
        else:
            found.append(f"{name}/")  # a folder where ensemble-kd writes a file
    return found


def _allowed_file(name: str, files: frozenset[str]) -> bool:
    """`name` is one of `files` (tensorboard events where `files` are a stage's), or a temporary file of one."""
    while (temp := _TEMP_NAME.match(name)) is not None:  # a temporary file (of a temporary file, as export makes)
        name = temp.group("name")
    return name in files or (files is STAGE_FILES and bool(_TENSORBOARD_EVENTS.match(name)))


def _foreign_in(folder: Path, shown: str, files: frozenset[str],
                subfolders: Callable[[Path, str], list[str] | None] | None = None) -> list[str]:
    """What `folder` (shown as `shown`) holds besides `files`, and besides the sub-folders `subfolders` accepts
    (it returns what they hold that ensemble-kd does not write)."""
    found = []
    for entry in sorted(folder.iterdir()):
        path = f"{shown}/{entry.name}"
        if entry.is_dir() and not entry.is_symlink():
            inside = subfolders(entry, path) if subfolders is not None else None
            found += [f"{path}/"] if inside is None else inside
        elif not _allowed_file(entry.name, files):
            found.append(path)
    return found


def _specialist_folders(entry: Path, path: str) -> list[str] | None:
    """What a specialist_NN folder of specialists/ holds that ensemble-kd does not write (None: not one)."""
    if not _SPECIALIST_DIR.match(entry.name):
        return None
    return _foreign_in(entry, path, STAGE_FILES, lambda phase, shown: _foreign_in(phase, shown, STAGE_FILES)
                       if phase.name in SPECIALIST_PHASES else None)


def _entries(run_dir: Path) -> list[str]:
    """The names in `run_dir` other than the lock file (none when it does not exist)."""
    return [p.name for p in run_dir.iterdir() if p.name != LOCK_FILE] if run_dir.is_dir() else []


def _is_run_entry(name: str) -> bool:
    """A name ensemble-kd writes at the top of a run directory, or the temporary file of one."""
    temp = _TEMP_NAME.match(name)
    return name in RUN_ENTRIES or (temp is not None and temp.group("name") in RUN_ENTRIES)


def _check_overwrite(run_dir: Path) -> None:
    """ArtifactError unless --overwrite may delete what `run_dir` holds: nothing, or a marked run's own entries."""
    entries = _entries(run_dir)
    if not entries:
        return
    if not is_marked_run(run_dir):
        if not _looks_like_run(run_dir):
            raise ArtifactError(f"{run_dir} is not empty and does not look like an ensemble-kd run (no "
                                f"{CONFIG_FILE} or {MANIFEST_FILE}); not writing into it or deleting it: "
                                "choose another --out")
        raise ArtifactError(
            f"--overwrite deletes only folders ensemble-kd made, and {run_dir} has no {RUN_MARKER_FILE} (the file "
            "it writes into every run directory it creates; runs made by older versions lack it), so it does not "
            "look like an ensemble-kd run and nothing was deleted: if it is a run you no longer need, delete it "
            "yourself; otherwise choose another --out")
    foreign = foreign_files(run_dir)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ArtifactError(f"--overwrite deletes only the files ensemble-kd writes, and {run_dir} also holds "
                            f"{shown}; nothing was deleted: move {'it' if len(foreign) == 1 else 'them'} out of "
                            "the folder and rerun, or choose another --out")


def _holds_work(run_dir: Path) -> bool:
    """Anything besides config.toml, the marker, and a manifest.json that records only the data's digest (a run
    that stopped before its first stage wrote anything)."""
    return any(name not in (CONFIG_FILE, RUN_MARKER_FILE) and not (name == MANIFEST_FILE and _digest_only(run_dir))
               for name in _entries(run_dir))


def _digest_only(run_dir: Path) -> bool:
    try:
        manifest = json.loads((run_dir / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and set(manifest) <= {"data_digest"}


def _looks_like_run(run_dir: Path) -> bool:
    return (run_dir / CONFIG_FILE).is_file() or (run_dir / MANIFEST_FILE).is_file()


def _delete_run_entries(folder: Path) -> None:
    """Delete a run's own entries in `folder` (`_check_overwrite` has found no other), but the lock this
    process holds and the marker. A link is removed, never followed."""
    for entry in folder.iterdir():
        if entry.name in (LOCK_FILE, RUN_MARKER_FILE) or not _is_run_entry(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


# ---------------------------------------------------------------- one run at a time in a directory

_locks: dict[Path, int] = {}  # run directories this process holds -> descriptor of their lock file


def lock_run_dir(run_dir: str | Path) -> bool:
    """Hold `run_dir`'s lock for the rest of this process; True if taken now, False if already held.

    An OS file lock (flock) on run_dir/.lock: the kernel releases it when the process ends,
    however it ends, so a crash never leaves a stale lock. ArtifactError naming the
    holder's pid when another process has it. Without flock (not POSIX) there is no lock."""
    if fcntl is None:
        return False
    key = Path(run_dir).resolve()
    if key in _locks:
        return False
    fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # another process holds it
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ArtifactError(f"{run_dir} is in use by another ensemble-kd run (pid {holder}); wait for it to "
                            "finish or stop it, or choose another --out") from None
    except OSError as err:  # a file system without flock (some network mounts)
        os.close(fd)
        log.warning("cannot lock %s (%s): nothing stops a second run from writing into it", run_dir, err)
        return False
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _locks[key] = fd
    return True


def holds_lock(run_dir: str | Path) -> bool:
    """True while this process holds `run_dir`'s lock (`lock_run_dir`)."""
    return Path(run_dir).resolve() in _locks


def unlock_run_dir(run_dir: str | Path) -> None:
    """Release the lock `lock_run_dir` took (a no-op if this process does not hold it)."""
    fd = _locks.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)


def require_run_dir(run_dir: str | Path) -> Path:
    """`run_dir` if it holds an ensemble-kd run (its config.toml); else an ArtifactError that says so."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        what = "does not exist" if not run_dir.exists() else f"is not an ensemble-kd run directory (no {CONFIG_FILE})"
        raise ArtifactError(f"{run_dir} {what}; give the folder `ensemble-kd run --out` wrote")
    return run_dir


def finished_stages(run_dir: str | Path) -> dict[str, Any]:
    """The stages manifest.json records as finished, in the order they finished."""
    path = Path(run_dir) / MANIFEST_FILE
    return read_json(path).get("stages", {}) if path.is_file() else {}


def mark_stage(run_dir: str | Path, stage: str, seconds: float, **details: Any) -> None:
    """Record in manifest.json that `stage` finished (and how long it took)."""
    path = Path(run_dir) / MANIFEST_FILE
    manifest = read_json(path) if path.exists() else {}
    manifest.setdefault("versions", {"torch": torch.__version__})
    manifest.setdefault("stages", {})[stage] = {
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3), **details}
    write_json(path, manifest)
