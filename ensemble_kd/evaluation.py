"""Test-set metrics of every model of a run: accuracy, per cluster, by coverage (Table 4), speed, size.

`by_coverage` is the form of Table 4 in Hinton et al. (2015): test examples grouped by
how many active specialists cover their true class, with the ensemble's gain in correct
answers over the generalist in each group.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import artifacts
from .config import Config
from .data import Splits
from .distill import load_student_model
from .ensemble import EnsembleTeacher, active_specialists
from .inference import predict_logits
from .models import count_params
from .specialists import specialist_dir
from .streaming import head


@torch.no_grad()
def ms_per_image(model: nn.Module, x: torch.Tensor, batch_size: int = 256, repeats: int = 3,
                 max_images: int = 2048) -> float:
    """Best-of-`repeats` batched inference time per image, in milliseconds."""
    model.eval()
    x = x[:max_images]
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for chunk in x.split(batch_size):
            model(chunk)
        best = min(best, time.perf_counter() - start)
    return 1000 * best / max(len(x), 1)


def per_cluster_accuracy(predictions: torch.Tensor, labels: torch.Tensor,
                         clusters: list[list[int]]) -> list[dict[str, Any]]:
    """Accuracy on the test examples whose true class lies in each cluster (None for a cluster with none)."""
    rows = []
    for k, subset in enumerate(clusters):
        mask = torch.isin(labels, torch.tensor(subset))
        n = int(mask.sum())
        acc = float((predictions[mask] == labels[mask]).double().mean()) if n else None
        rows.append({"cluster": k, "classes": list(subset), "n": n, "accuracy": acc})
    return rows


def coverage_counts(active: torch.Tensor, membership: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """For each example, how many active specialists cover its true class."""
    return (active & membership[:, labels].T).sum(1)


COVERAGE_ROWS = (0, 1, 2)  # Table 4 always shows these counts of covering specialists, and every larger one found


def by_coverage(coverage: torch.Tensor, predictions: torch.Tensor, labels: torch.Tensor,
                baseline_predictions: torch.Tensor | None = None) -> list[dict[str, Any]]:
    """Paper Table 4: per number of covering specialists, examples, accuracy and the change in correct.

    Rows for 0, 1 and 2 covering specialists are always there (with n = 0 and accuracy None
    where no example has that many), then one per larger count found. The relative change is
    None where the baseline got none right (undefined; report.json stays strict JSON)."""
    rows = []
    for count in sorted(set(coverage.tolist()) | set(COVERAGE_ROWS)):
        mask = coverage == count
        n = int(mask.sum())
        correct = int((predictions[mask] == labels[mask]).sum())
        row = {"specialists_covering": int(count), "n": n, "accuracy": correct / n if n else None}
        if baseline_predictions is not None:
            base = int((baseline_predictions[mask] == labels[mask]).sum())
            row["delta_correct"] = correct - base
            row["relative_accuracy_change"] = (correct - base) / base if base else None
        rows.append(row)
    return rows


def model_entry(predictions: torch.Tensor, labels: torch.Tensor, clusters: list[list[int]], params: int,
                ms: float, size_bytes: int, **extra: Any) -> dict[str, Any]:
    accuracy = float((predictions == labels).double().mean())
    return {"test_accuracy": accuracy, "test_errors": int((predictions != labels).sum()), "params": int(params),
            "ms_per_image": ms, "size_bytes": int(size_bytes),
            "per_cluster": per_cluster_accuracy(predictions, labels, clusters), **extra}


def _file_size(*paths: Path) -> int:
    return sum(p.stat().st_size for p in paths if p.exists())


def evaluate_run(cfg: Config, data: Splits, run_dir: str | Path, generalist: nn.Module, clusters: list[list[int]],
                 ensemble: EnsembleTeacher | None = None, with_students: bool = False) -> dict[str, Any]:
    """Report entries for the generalist, the ensemble (if given) and the students (if trained);
    `clusters` are the class ids of each cluster (none before the clusters stage).

    Everything runs on the CPU (where the test tensors are; teachers may come back from a
    GPU's student training), so ms_per_image is CPU time for every model."""
    run_dir = Path(run_dir)
    x, y = data.x_test.cpu() if isinstance(data.x_test, torch.Tensor) else data.x_test, data.y_test.cpu()
    timing = head(x, 2048)  # the images ms_per_image times each model on (in memory: read once if streamed)
    generalist = generalist.cpu()
    entries: dict[str, Any] = {}
    generalist_file = run_dir / artifacts.GENERALIST_DIR / artifacts.MODEL_FILE
    g_logits = predict_logits(generalist, x)
    g_pred = g_logits.argmax(1)
    entries["generalist"] = model_entry(g_pred, y, clusters, count_params(generalist), ms_per_image(generalist, timing),
                                        _file_size(generalist_file))
    if ensemble is not None:
        ensemble = ensemble.cpu()
        e_pred = predict_logits(ensemble, x).argmax(1)  # log q: the same argmax as q
        active = active_specialists(torch.softmax(g_logits, dim=1), ensemble.membership, ensemble.top_n)
        coverage = coverage_counts(active, ensemble.membership, y)
        files = [generalist_file] + [specialist_dir(run_dir, k) / artifacts.MODEL_FILE for k in range(len(clusters))]
        entries["ensemble"] = model_entry(e_pred, y, clusters, count_params(ensemble), ms_per_image(ensemble, timing),
                                          _file_size(*files), by_coverage=by_coverage(coverage, e_pred, y, g_pred))
        entries["generalist"]["by_coverage"] = by_coverage(coverage, g_pred, y)
    if with_students:
        teachers = run_dir / artifacts.STUDENT_DIRS[0] / artifacts.TEACHERS_FILE
        if teachers.is_file():
            entries["teachers"] = {k: v for k, v in artifacts.read_json(teachers).items() if k != "fingerprint"}
        for name in artifacts.STUDENT_DIRS[:None if cfg.student.baselines else 1]:
            student = load_student_model(cfg, data, run_dir, name)
            s_pred = predict_logits(student, x).argmax(1)
            entries[name] = model_entry(s_pred, y, clusters, count_params(student), ms_per_image(student, timing),
                                        _file_size(run_dir / name / artifacts.MODEL_FILE))
    return entries
