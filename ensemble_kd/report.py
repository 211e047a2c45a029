"""Evaluation of every model of a run on the test set, and the run's report files.

`report.json` holds one object per model (`generalist`, `ensemble`, `student`,
`student_hard_labels`, `student_from_generalist`) with `test_accuracy`, `params`,
`ms_per_image`, `size_bytes` and per-cluster accuracies; `report.md` shows the same as
tables with the cluster heatmap and an accuracy-versus-size chart.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from . import artifacts

MODEL_ORDER = ("generalist", "ensemble", "student", "student_from_generalist", "student_hard_labels")


def _fmt_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _pct(value: float | None, sign: str = "") -> str:
    """A share as a percentage; "n/a" where it is undefined (None)."""
    return "n/a" if value is None else f"{100 * value:{sign}.2f}%"


def format_table(report: dict[str, Any]) -> str:
    """The models of a report side by side, as a Markdown table."""
    lines = ["| model | test accuracy | errors | params | size | ms / image |", "|---|---:|---:|---:|---:|---:|"]
    for name in MODEL_ORDER:
        if name in report:
            m = report[name]
            lines.append(f"| {name} | {100 * m['test_accuracy']:.2f}% | {m.get('test_errors', '')} | "
                         f"{m['params']:,} | {_fmt_size(m.get('size_bytes', 0))} | {m['ms_per_image']:.4f} |")
    return "\n".join(lines)


def format_cluster_accuracy(report: dict[str, Any]) -> str:
    """Accuracy per cluster for the generalist and the ensemble."""
    if "generalist" not in report or "ensemble" not in report:
        return ""
    lines = ["| cluster | classes | n | generalist | ensemble |", "|---|---|---:|---:|---:|"]
    names = report.get("class_names", [])
    for g, e in zip(report["generalist"]["per_cluster"], report["ensemble"]["per_cluster"]):
        classes = ", ".join(names[i] if i < len(names) else str(i) for i in g["classes"])
        lines.append(f"| {g['cluster']} | {classes} | {g['n']} | {_pct(g['accuracy'])} | {_pct(e['accuracy'])} |")
    return "\n".join(lines)


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
    "(those woken by the generalist's top guesses, `ensemble.top_n`) hold the true class. With 0, no active "
    "specialist knows the true class: either none was woken, or the ones woken hold other classes and can only "
    "move probability through their dustbins, so these images show what the combination does when the "
    "generalist's guess is wrong and no specialist can correct it. With overlapping clusters "
    "(`clusters.overlap`) a class can be covered by 2 or more.")


def plot_accuracy_vs_size(report: dict[str, Any], path: str | Path) -> Path:
    """Scatter of test accuracy against parameter count (log scale), one point per model."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.add_subplot()
    for name in MODEL_ORDER:
        if name in report:
            m = report[name]
            ax.scatter(m["params"], 100 * m["test_accuracy"], s=40)
            ax.annotate(name, (m["params"], 100 * m["test_accuracy"]), textcoords="offset points",
                        xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy vs size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return artifacts.write_bytes(path, buffer.getvalue())


def render_markdown(report: dict[str, Any]) -> str:
    parts = [f"# ensemble-kd report: {report.get('run', '')}", "",
             f"Data: `{report.get('data', '')}`, {report.get('num_classes', '?')} classes, seed {report.get('seed')}.",
             "", "## Models (test set)", "", format_table(report), ""]
    if report.get("clusters") == []:
        parts += [f"No specialists: with {report.get('num_classes', '?')} classes `clusters.k = 0` found no two "
                  "clusters that leave each specialist other classes to tell apart, so the ensemble is the "
                  "generalist alone and `student` is distilled from it.", ""]
    clusters = format_cluster_accuracy(report)
    if clusters:
        parts += ["## Clusters of confusable classes", "", clusters, "", f"![clusters]({artifacts.HEATMAP_FILE})", ""]
    coverage = format_coverage(report)
    if coverage:
        parts += ["## Ensemble gain by number of specialists covering the true class", "", COVERAGE_NOTE, "",
                  coverage, ""]
    if (report.get("plots") or {}).get("accuracy_vs_size"):
        parts += ["## Accuracy vs size", "", f"![accuracy vs size]({report['plots']['accuracy_vs_size']})", ""]
    exports = report.get("exports", {}).get("formats", {})
    if exports:
        parts += ["## Exported student", "", "| format | file | size | max abs diff vs eager |", "|---|---|---:|---:|"]
        parts += [f"| {fmt} | `{e['path']}` | {_fmt_size(e['bytes'])} | {e['max_abs_diff']:.2e} |"
                  for fmt, e in exports.items()]
        parts.append("")
    return "\n".join(parts)


def write_report(run_dir: str | Path, report: dict[str, Any]) -> tuple[Path, Path]:
    """Write report.json, the accuracy-vs-size plot and report.md into the run directory."""
    run_dir = Path(run_dir)
    if any(name in report for name in MODEL_ORDER):
        plot_accuracy_vs_size(report, run_dir / "accuracy_vs_size.png")
        report.setdefault("plots", {})["accuracy_vs_size"] = "accuracy_vs_size.png"
    json_path = artifacts.write_json(run_dir / artifacts.REPORT_JSON, report)
    md_path = artifacts.write_text(run_dir / artifacts.REPORT_MD, render_markdown(report))
    return json_path, md_path
