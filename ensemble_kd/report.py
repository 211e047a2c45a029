"""The run's report: report.json and report.md, with the cluster heatmap and the accuracy-versus-size chart.

`report.json` holds the run (name, data, seed, class names, the clusters and how much of
their classes' confusion stays inside each) and one object per model (`generalist`,
`ensemble`, `student`, `student_from_generalist`, `student_hard_labels`) with test accuracy
and errors, parameters, size on disk, CPU inference time per image and accuracy per
cluster (computed by evaluation.py); `by_coverage` (Table 4 of Hinton et al. 2015),
`teachers` and `exports` where those stages ran. `report.md` shows the same as tables: the
models, with a line naming the best one and saying when distillation did not beat hard
labels; accuracy per cluster, flagging a cluster whose classes are hardly confused with
each other; the ensemble's gain by number of covering specialists; the exported files.
The images are drawn here: `confusion.png` (the clusters stage's matrix reordered by
cluster, `write_heatmap`), `accuracy_vs_size.png` and `learning_curves.png` (every
trained model's loss and validation accuracy per epoch, from its stage's metrics).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from . import artifacts
from .artifacts import ArtifactError
from .confusion import LOW_INSIDE_SHARE, primary_sizes, read_clusters_json, read_matrix, reorder_by_cluster
from .curves import stage_curves

MODEL_ORDER = ("generalist", "ensemble", *artifacts.STUDENT_DIRS)
_MIN_LABEL_POINTS = 4.0  # heatmap cells smaller than this (about 300+ classes) get cluster labels, not class names
_MARKERS = {"generalist": "o", "ensemble": "s", "student": "^", "student_from_generalist": "v",
            "student_hard_labels": "D"}  # distinct shapes, so models at the same size stay apart in the chart
ACCURACY_VS_SIZE_FILE = artifacts.ACCURACY_VS_SIZE_FILE


def _fmt_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _pct(value: float | None, sign: str = "") -> str:
    """A share as a percentage; "n/a" where it is undefined (None)."""
    return "n/a" if value is None else f"{100 * value:{sign}.2f}%"


def _save_png(fig: Figure, path: str | Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return artifacts.write_bytes(path, buffer.getvalue())


# ---------------------------------------------------------------- tables

def format_table(report: dict[str, Any]) -> str:
    """The models of a report side by side, as a Markdown table."""
    lines = ["| model | test accuracy | errors | params | size | ms / image |", "|---|---:|---:|---:|---:|---:|"]
    for name in MODEL_ORDER:
        if name in report:
            m = report[name]
            lines.append(f"| {name} | {100 * m['test_accuracy']:.2f}% | {m.get('test_errors', '')} | "
                         f"{m['params']:,} | {_fmt_size(m.get('size_bytes', 0))} | {m['ms_per_image']:.4f} |")
    return "\n".join(lines)


def verdict(report: dict[str, Any]) -> list[str]:
    """What the table means, in at most two lines: the best model (and the best student when that is not
    a student), and a line saying so when the distilled student does not beat the hard-label one (and why,
    when the ensemble does not beat the generalist)."""
    models = [name for name in MODEL_ORDER if name in report]
    if not models:
        return []
    accuracy = {name: report[name]["test_accuracy"] for name in models}
    best = max(models, key=lambda name: accuracy[name])  # the first of MODEL_ORDER on a tie
    line = f"Best: {best} ({_pct(accuracy[best])} test accuracy)"
    students = [name for name in artifacts.STUDENT_DIRS if name in accuracy]
    if students and best not in students:
        best_student = max(students, key=lambda name: accuracy[name])
        line += f"; best student: {best_student} ({_pct(accuracy[best_student])})"
    lines = [line + "."]
    student, hard = accuracy.get("student"), accuracy.get("student_hard_labels")
    if student is not None and hard is not None and student <= hard:
        why = ""
        if "ensemble" in accuracy and "generalist" in accuracy and accuracy["ensemble"] <= accuracy["generalist"]:
            why = (" Here the specialists did not lift the ensemble above the generalist, so the student had nothing"
                   " more to learn from it; README.md, 'What the specialists buy', shows data where they do"
                   " (Fashion-MNIST).")
        lines.append(f"Distillation did not pay on this run: the student distilled from the ensemble "
                     f"({_pct(student)}) does not beat the same student trained on hard labels ({_pct(hard)})."
                     + why)
    return lines


def format_cluster_accuracy(report: dict[str, Any]) -> str:
    """Accuracy per cluster for the generalist and the ensemble, with each cluster's inside share."""
    if "generalist" not in report or "ensemble" not in report:
        return ""
    shares = report.get("cluster_inside_share", [])
    lines = ["| cluster | classes | inside share | n | generalist | ensemble |", "|---|---|---:|---:|---:|---:|"]
    names = report.get("class_names", [])
    for g, e in zip(report["generalist"]["per_cluster"], report["ensemble"]["per_cluster"]):
        classes = ", ".join(names[i] if i < len(names) else str(i) for i in g["classes"])
        share = shares[g["cluster"]] if g["cluster"] < len(shares) else None
        flag = " (hardly confused with each other)" if share is not None and share < LOW_INSIDE_SHARE else ""
        lines.append(f"| {g['cluster']} | {classes} | {'n/a' if share is None else f'{share:.2f}'}{flag} | "
                     f"{g['n']} | {_pct(g['accuracy'])} | {_pct(e['accuracy'])} |")
    return "\n".join(lines)


CLUSTER_NOTE = (
    "Inside share: the part of its classes' confusion (the clusters matrix) that stays among the cluster's own "
    f"classes. A cluster below {LOW_INSIDE_SHARE:g} is flagged: its classes are hardly confused with each other, "
    "so its specialist has little to learn that the generalist does not know; another `clusters.k` or "
    "`clusters.matrix` may group the classes better.")


def format_coverage(report: dict[str, Any]) -> str:
    rows = report.get("ensemble", {}).get("by_coverage", [])
    if not rows:
        return ""
    lines = ["| specialists covering | examples | ensemble accuracy | change in correct | relative change |",
             "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['specialists_covering']} | {r['n']} | {_pct(r['accuracy'])} | "
                     f"{r.get('delta_correct', 0):+d} | {_pct(r.get('relative_accuracy_change', 0), '+')} |")
    return "\n".join(lines)


COVERAGE_NOTE = (
    "The form of Table 4 in Hinton et al. (2015): test images grouped by how many *active* specialists "
    "(those woken because one of the generalist's top `ensemble.top_n` guesses is in their cluster) hold the "
    "true class. The row \"0\" holds the images whose true class no active specialist knows: either the true "
    "class is in no cluster (left to the generalist, `clusters.min_confusion`), or none of the generalist's top "
    "guesses shares a cluster with it, so its top guess is wrong. Where no specialist is active the ensemble "
    "answers as the generalist does (a change of 0); where specialists of other classes are active they can "
    "move probability only through their dustbins, which is how the ensemble still gains or loses answers in "
    "this row. With overlapping clusters (`clusters.overlap`) a class can be covered by 2 or more.")


# ---------------------------------------------------------------- images

def plot_confusion(matrix: np.ndarray, clusters_json: dict[str, Any], class_names: list[str],
                   path: str | Path) -> Path:
    """Heatmap of `matrix` reordered by cluster, cluster blocks outlined, diagonal hidden; PNG at `path`."""
    matrix = np.asarray(matrix, dtype=np.float64)
    num_classes = len(class_names)
    if matrix.shape != (num_classes, num_classes):
        raise ArtifactError(f"the matrix has shape {matrix.shape} but there are {num_classes} class names; "
                           "pass one name per class")
    order = reorder_by_cluster(clusters_json, num_classes)
    shown = matrix[np.ix_(order, order)]
    np.fill_diagonal(shown, np.nan)  # the diagonal (accuracy / variance) would swamp the confusion
    off_diagonal = shown[np.isfinite(shown)]
    low, high = (float(off_diagonal.min()), float(off_diagonal.max())) if off_diagonal.size else (0.0, 1.0)
    if low < 0:  # covariance: blue below zero, red above, white at zero
        bound = max(abs(low), high, 1e-12)
        cmap, norm = "RdBu_r", TwoSlopeNorm(vmin=-bound, vcenter=0.0, vmax=bound)
    else:
        cmap, norm = "viridis", None
    side = min(4.0 + 0.2 * num_classes, 22.0)  # inches; 100 classes fill about 2,200 pixels
    cell_points = side * 72 * 0.75 / max(num_classes, 1)  # the axes take about 3/4 of the figure
    fontsize = float(np.clip(0.7 * cell_points, 3.0, 10.0))
    fig = Figure(figsize=(side + 1.5, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, norm=norm,
                      vmin=None if norm else 0.0, vmax=None if norm else max(high, 1e-12))
    ax.set_facecolor("#d9d9d9")  # the masked diagonal shows as grey
    sizes = primary_sizes(clusters_json)
    starts = np.cumsum([0, *sizes[:-1]]).astype(int)
    for start, size in zip(starts, sizes):
        ax.add_patch(Rectangle((start - 0.5, start - 0.5), size, size, fill=False, edgecolor="#ff7f0e", linewidth=2))
    position = {class_id: p for p, class_id in enumerate(order)}
    for entry in clusters_json.get("classes", []):  # overlap: a dashed bar where a class also joined a cluster
        for cluster_id in entry.get("also_in", []):
            row, start, size = position[entry["id"]], starts[cluster_id], sizes[cluster_id]
            for xy, width, height in (((start - 0.5, row - 0.5), size, 1), ((row - 0.5, start - 0.5), 1, size)):
                ax.add_patch(Rectangle(xy, width, height, fill=False, edgecolor="#ff7f0e", linewidth=1.2,
                                       linestyle="--"))
    if cell_points >= _MIN_LABEL_POINTS:
        names = [str(class_names[i]) for i in order]
        ax.set_xticks(range(num_classes), names, rotation=90, fontsize=fontsize)
        ax.set_yticks(range(num_classes), names, fontsize=fontsize)
    else:  # too many classes to name each one legibly (and thousands of labels take seconds): name the blocks
        centres = starts + (np.asarray(sizes) - 1) / 2
        labels = [f"cluster {cluster['id']}" for cluster in clusters_json["clusters"]]
        block_fontsize = float(np.clip(0.7 * cell_points * np.median(sizes), 3.0, 8.0))
        ax.set_xticks(centres, labels, rotation=90, fontsize=block_fontsize)
        ax.set_yticks(centres, labels, fontsize=block_fontsize)
    ax.set_xlabel("predicted / co-predicted class")
    ax.set_ylabel("true class" if clusters_json.get("matrix") != "covariance" else "class")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    overlaps = any(c.get("also_in") for c in clusters_json.get("classes", []))
    overlap = " dashed: also in that cluster;" if overlaps else ""
    ax.set_title(f"{clusters_json.get('matrix', '')} confusability, reordered by cluster "
                 f"(k={clusters_json.get('k', len(clusters_json['clusters']))};{overlap} diagonal hidden)")
    fig.tight_layout()
    return _save_png(fig, path)


def write_heatmap(run_dir: str | Path) -> Path:
    """Draw a run's clusters over the matrix they were found in, as confusion.png in the run directory."""
    run_dir = Path(run_dir)
    clusters = read_clusters_json(run_dir)
    names = [c["name"] for c in clusters["classes"]]
    return plot_confusion(read_matrix(run_dir, clusters["matrix"]), clusters, names,
                          run_dir / artifacts.HEATMAP_FILE)


def plot_accuracy_vs_size(report: dict[str, Any], path: str | Path) -> Path:
    """Test accuracy against parameter count (log scale), one marker shape per model, named in a legend below the
    axes (labels beside the points would overlap for models of the same size, such as the three students);
    models on the very same point are drawn side by side."""
    fig = Figure(figsize=(6.4, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    shown = [name for name in MODEL_ORDER if name in report]
    points = [(report[name]["params"], 100 * report[name]["test_accuracy"]) for name in shown]
    for name, (params, accuracy) in zip(shown, points):
        same = [other for other, point in zip(shown, points) if point == (params, accuracy)]
        nudge = 1.06 ** (same.index(name) - (len(same) - 1) / 2)  # models on the very same point side by side
        ax.scatter(params * nudge, accuracy, s=60, marker=_MARKERS[name], alpha=0.75,
                   label=f"{name}: {_pct(report[name]['test_accuracy'])}, {params:,} params")
    ax.set_xscale("log")
    ax.margins(x=0.15, y=0.2)  # room around points at the edge, and a visible spread when all accuracies agree
    ax.set_xlabel("parameters")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy vs size")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=7, frameon=False)
    fig.tight_layout()
    return _save_png(fig, path)


_STUDENT_COLOURS = dict(zip(artifacts.STUDENT_DIRS, ("tab:red", "tab:orange", "tab:purple")))
_NAMED_SPECIALISTS = 8  # up to this many specialists get a legend entry each; more share one


def _curve_style(name: str, index: int, n_specialists: int) -> dict[str, Any]:
    """Colour, width and legend label of model `name` (the index-th specialist, for specialists)."""
    if name.startswith("specialist"):
        label = name if n_specialists <= _NAMED_SPECIALISTS else (f"specialists ({n_specialists})" if index == 0
                                                                  else None)
        return {"color": colormaps["Blues"](0.45 + 0.5 * index / max(n_specialists - 1, 1)), "linewidth": 1.0,
                "label": label}
    return {"color": _STUDENT_COLOURS.get(name, "black"), "linewidth": 2.0, "label": name}


def plot_learning_curves(curves: dict[str, list[dict[str, Any]]], path: str | Path) -> Path:
    """One figure, two panels: training loss (log scale) and validation accuracy per epoch of every model in
    `curves` (`curves.stage_curves`); a specialist's soft-target phase is dashed. PNG at `path`."""
    fig = Figure(figsize=(10.0, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    loss_ax, acc_ax = fig.subplots(1, 2)
    specialists = [name for name in curves if name.startswith("specialist")]
    for name, records in curves.items():
        style = _curve_style(name, specialists.index(name) if name in specialists else 0, len(specialists))
        before: list[dict[str, Any]] = []
        for phase in dict.fromkeys(r.get("phase", "") for r in records):
            part = before[-1:] + [r for r in records if r.get("phase", "") == phase]  # phases joined up
            dashes = "--" if phase == "soft" else "-"
            epochs = [r["epoch"] for r in part]
            marker = "o" if len(part) == 1 else None  # a one-epoch curve is a point
            loss_ax.plot(epochs, [r["loss"] for r in part], linestyle=dashes, marker=marker, **style)
            if all("val_accuracy" in r for r in part):
                acc_ax.plot(epochs, [100 * r["val_accuracy"] for r in part], linestyle=dashes, marker=marker,
                            **style)
            style, before = dict(style, label=None), part  # one legend entry per model
    if all(r["loss"] > 0 for records in curves.values() for r in records):
        loss_ax.set_yscale("log")
    for ax, title, ylabel in ((loss_ax, "training loss", "loss"),
                              (acc_ax, "validation accuracy", "accuracy (%)")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    handles, labels = loss_ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.045 * ((len(labels) - 1) // 4), 1, 1))
    return _save_png(fig, path)


CURVES_NOTE = (
    "Training loss and validation accuracy per epoch of every model trained (each stage folder's `metrics.csv`). "
    "A specialist's soft-target phase (dashed) continues its epochs with the distillation loss, and its "
    "validation accuracy is on its own held-out mix of its classes and the dustbin; the distilled students' "
    "loss holds the distillation term too. Compare shapes across models, not levels.")


# ---------------------------------------------------------------- report.md and report.json

def render_markdown(report: dict[str, Any]) -> str:
    parts = [f"# ensemble-kd report: {report.get('run', '')}", "",
             f"Data: `{report.get('data', '')}`, {report.get('num_classes', '?')} classes, seed {report.get('seed')}.",
             "", "## Models (test set)", "", format_table(report), "", *verdict(report), ""]
    if report.get("clusters") == []:
        parts += [f"No specialists: with {report.get('num_classes', '?')} classes `clusters.k = 0` found no two "
                  "clusters that leave each specialist other classes to tell apart, so the ensemble is the "
                  "generalist alone and `student` is distilled from it.", ""]
    clusters = format_cluster_accuracy(report)
    if clusters:
        parts += ["## Clusters of confusable classes", "", CLUSTER_NOTE, "", clusters, "",
                  f"![clusters]({artifacts.HEATMAP_FILE})", ""]
    coverage = format_coverage(report)
    if coverage:
        parts += ["## Ensemble gain by number of specialists covering the true class", "", COVERAGE_NOTE, "",
                  coverage, ""]
    if (report.get("plots") or {}).get("accuracy_vs_size"):
        parts += ["## Accuracy vs size", "", f"![accuracy vs size]({report['plots']['accuracy_vs_size']})", ""]
    if (report.get("plots") or {}).get("learning_curves"):
        parts += ["## Learning curves", "", CURVES_NOTE, "",
                  f"![learning curves]({report['plots']['learning_curves']})", ""]
    exports = report.get("exports", {}).get("formats", {})
    if exports:
        parts += ["## Exported student", "", "| format | file | size | max abs diff vs eager |", "|---|---|---:|---:|"]
        parts += [f"| {fmt} | `{e['path']}` | {_fmt_size(e['bytes'])} | {e['max_abs_diff']:.2e} |"
                  for fmt, e in exports.items()]
        parts.append("")
    return "\n".join(parts)


def write_report(run_dir: str | Path, report: dict[str, Any]) -> tuple[Path, Path]:
    """Write report.json, the accuracy-vs-size plot, the learning curves and report.md into the run directory."""
    run_dir = Path(run_dir)
    if any(name in report for name in MODEL_ORDER):
        plot_accuracy_vs_size(report, run_dir / ACCURACY_VS_SIZE_FILE)
        report.setdefault("plots", {})["accuracy_vs_size"] = ACCURACY_VS_SIZE_FILE
    curves = stage_curves(run_dir)
    if curves:
        plot_learning_curves(curves, run_dir / artifacts.LEARNING_CURVES_FILE)
        report.setdefault("plots", {})["learning_curves"] = artifacts.LEARNING_CURVES_FILE
    json_path = artifacts.write_json(run_dir / artifacts.REPORT_JSON, report)
    md_path = artifacts.write_text(run_dir / artifacts.REPORT_MD, render_markdown(report))
    return json_path, md_path
