"""Learning curves: each fit()'s per-epoch metrics as metrics.jsonl, metrics.csv and TensorBoard events.

`EpochLog` is what fit() hands each finished epoch's metrics to. In the stage's folder it
appends a line to `metrics.jsonl` (what resume and the report read), a row to
`metrics.csv` (the same values, for a spreadsheet or pandas) and, with
`log.tensorboard = true`, one scalar per metric to a TensorBoard event file
(`tensorboard --logdir artifacts/<run>` shows each stage folder as a run). A stage that
resumes cuts both logs back to its checkpoint's epoch (`cut_back`) and tells TensorBoard
to hide the events after it (`purge_step`), so no epoch is ever listed twice.

`stage_curves` reads a run's logs back, one curve per trained model, for the
learning-curve figure of report.md (drawn in report.py).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from . import artifacts
from .errors import MissingExtraError

TENSORBOARD_EXTRA = "pip install 'ensemble-kd[tensorboard]'"
SPECIALIST_PHASES = ("hard", "soft")  # a specialist's two fit() folders, in the order they train


def tensorboard_installed() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def cut_back(stage_dir: Path, done: int) -> None:
    """Keep the metrics of epochs 1..`done` only (the checkpoint's); with done = 0 delete both logs."""
    jsonl, table = stage_dir / artifacts.METRICS_FILE, stage_dir / artifacts.METRICS_CSV
    if done == 0:  # starting afresh: lines of an epoch whose checkpoint never landed are stale
        jsonl.unlink(missing_ok=True)
        table.unlink(missing_ok=True)
        return
    kept = [r for r in artifacts.read_jsonl(jsonl) if r["epoch"] <= done]
    artifacts.write_jsonl(jsonl, kept)
    artifacts.write_csv(table, kept)  # rewritten from the JSONL lines: a row torn by a crash goes too


class EpochLog:
    """The per-epoch metrics of one fit() call, written to its stage folder (see the module docstring)."""

    def __init__(self, stage_dir: Path, tensorboard: bool = False, start: int = 0) -> None:
        self.stage_dir, self.tensorboard, self.start = stage_dir, tensorboard, start
        self._writer: Any = None  # made at the first epoch: a finished stage leaves no empty event file

    def write(self, record: dict[str, Any]) -> None:
        artifacts.append_jsonl(self.stage_dir / artifacts.METRICS_FILE, record)
        artifacts.append_csv(self.stage_dir / artifacts.METRICS_CSV, record)
        if self.tensorboard:
            writer = self._writer or self._open_writer()
            for key, value in record.items():
                if key != "epoch":
                    writer.add_scalar(key, value, record["epoch"])
            writer.flush()

    def _open_writer(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter  # the tensorboard extra: imported only when asked for
        except ImportError as err:
            raise MissingExtraError(f"log.tensorboard = true needs the tensorboard extra: {TENSORBOARD_EXTRA}") from err
        # purge_step: TensorBoard hides events an interrupted run wrote after the checkpoint it resumes from
        self._writer = SummaryWriter(str(self.stage_dir), purge_step=self.start + 1 if self.start else None)
        return self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# ---------------------------------------------------------------- reading a run's curves back

def stage_curves(run_dir: str | Path) -> dict[str, list[dict[str, Any]]]:
    """{model: its epochs' metrics} for every model of the run that trained at least one epoch, in the
    order they train: the generalist, each specialist, the students. A specialist's two phases make one
    curve: its soft-target epochs continue the numbering of its hard-label ones, each record tagged
    with its "phase"."""
    run_dir = Path(run_dir)
    curves = {artifacts.GENERALIST_DIR:
              artifacts.read_jsonl(run_dir / artifacts.GENERALIST_DIR / artifacts.METRICS_FILE)}
    for folder in sorted((run_dir / artifacts.SPECIALISTS_DIR).glob("specialist_*")):
        curves[f"specialist {int(folder.name.rsplit('_', 1)[1])}"] = _specialist_curve(folder)
    for name in artifacts.STUDENT_DIRS:
        curves[name] = artifacts.read_jsonl(run_dir / name / artifacts.METRICS_FILE)
    return {name: records for name, records in curves.items() if records}


def _specialist_curve(folder: Path) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for phase in SPECIALIST_PHASES:
        offset = records[-1]["epoch"] if records else 0
        records += [dict(r, epoch=offset + r["epoch"], phase=phase)
                    for r in artifacts.read_jsonl(folder / phase / artifacts.METRICS_FILE)]
    return records
