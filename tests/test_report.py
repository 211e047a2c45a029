"""The report: the closing verdict, flagged clusters, the accuracy-versus-size chart, the learning curves, report.md."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ensemble_kd import report as report_module
from ensemble_kd.confusion import format_cluster_table
from ensemble_kd.report import format_cluster_accuracy, render_markdown, verdict, write_report


def _entry(accuracy: float, params: int) -> dict:
    return {"test_accuracy": accuracy, "test_errors": round((1 - accuracy) * 450), "params": params,
            "ms_per_image": 0.01, "size_bytes": 4 * params, "per_cluster": []}


def _report(student: float, hard_labels: float) -> dict:
    """Five models; the three students have the same size, so their points coincide on the size axis."""
    return {"run": "r", "data": "digits", "seed": 0, "num_classes": 10,
            "generalist": _entry(0.98, 85_002), "ensemble": _entry(0.9778, 335_125),
            "student": _entry(student, 4_810), "student_from_generalist": _entry(0.9711, 4_810),
            "student_hard_labels": _entry(hard_labels, 4_810)}


def test_the_verdict_names_the_best_model_and_says_when_distillation_did_not_pay() -> None:
    lines = verdict(_report(student=0.9711, hard_labels=0.98))
    assert lines == [
        "Best: generalist (98.00% test accuracy); best student: student_hard_labels (98.00%).",
        "Distillation did not pay on this run: the student distilled from the ensemble (97.11%) does not beat "
        "the same student trained on hard labels (98.00%). Here the specialists did not lift the ensemble above "
        "the generalist, so the student had nothing more to learn from it; README.md, 'What the specialists "
        "buy', shows data where they do (Fashion-MNIST)."]
    assert verdict(_report(student=0.9822, hard_labels=0.98)) == ["Best: student (98.22% test accuracy)."]
    lifted = dict(_report(student=0.9711, hard_labels=0.98), ensemble=_entry(0.99, 335_125))
    assert verdict(lifted)[1].endswith("trained on hard labels (98.00%).")  # no why: the ensemble gained
    assert verdict({"run": "r"}) == []


def test_a_cluster_whose_classes_are_hardly_confused_with_each_other_is_flagged() -> None:
    clusters = {"matrix": "soft", "k": 2, "overlap": 0.0, "excluded": [], "clusters": [
        {"id": 0, "ids": [0, 1], "names": ["a", "b"], "inside_share": 0.9},
        {"id": 1, "ids": [2, 3], "names": ["c", "d"], "inside_share": 0.1}],
        "classes": [{"id": i, "name": n, "cluster": i // 2, "also_in": [], "inside_share": s, "confusion_share": 1.0}
                    for i, (n, s) in enumerate(zip("abcd", (0.9, 0.9, 0.1, 0.1)))]}
    table = format_cluster_table(clusters)
    assert "cluster 1: its classes are hardly confused with each other" in table and "cluster 0:" not in table
    report = dict(_report(0.97, 0.98), class_names=list("abcd"), cluster_inside_share=[0.9, 0.1])
    per_cluster = [{"cluster": k, "classes": [2 * k, 2 * k + 1], "n": 10, "accuracy": 0.9} for k in range(2)]
    report["generalist"]["per_cluster"] = report["ensemble"]["per_cluster"] = per_cluster
    rows = format_cluster_accuracy(report).splitlines()
    assert "hardly confused" in rows[3] and "hardly confused" not in rows[2]
    assert "| 0 | a, b | 0.90 |" in rows[2]


def test_the_accuracy_chart_keeps_every_label_inside_and_coinciding_points_apart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    figures = []
    real_save = report_module._save_png
    monkeypatch.setattr(report_module, "_save_png", lambda fig, path: figures.append(fig) or real_save(fig, path))
    path = report_module.plot_accuracy_vs_size(_report(0.98, 0.98), tmp_path / "chart.png")  # students tie too
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = figures[0]
    renderer = fig.canvas.get_renderer()
    legend = fig.axes[0].get_legend()
    labels = [text.get_text() for text in legend.get_texts()]
    assert [label.split(":")[0] for label in labels] == list(report_module.MODEL_ORDER)  # one entry per model
    assert len(set(report_module._MARKERS.values())) == 5  # five shapes: tied students stay distinguishable
    drawn = [tuple(points.get_offsets()[0]) for points in fig.axes[0].collections]
    assert len(set(drawn)) == 5  # student and student_hard_labels (same size, same accuracy) drawn side by side
    figure_box = fig.bbox
    for text in [*legend.get_texts(), fig.axes[0].title, fig.axes[0].xaxis.label, fig.axes[0].yaxis.label]:
        box = text.get_window_extent(renderer)
        assert figure_box.x0 <= box.x0 and box.x1 <= figure_box.x1, text.get_text()  # nothing cut off
        assert figure_box.y0 <= box.y0 and box.y1 <= figure_box.y1, text.get_text()


def test_report_md_explains_table_4_and_the_verdict(tmp_path: Path) -> None:
    report = _report(0.9711, 0.98)
    report["ensemble"]["by_coverage"] = [{"specialists_covering": 0, "n": 50, "accuracy": 0.5, "delta_correct": 2,
                                          "relative_accuracy_change": 0.08}]
    write_report(tmp_path, report)
    text = (tmp_path / "report.md").read_text()
    assert "Distillation did not pay on this run" in text
    assert "The row \"0\" holds the images whose true class no active specialist knows" in text
    assert "in no cluster" in text and "dustbins" in text
    assert render_markdown(report) == text
    assert (tmp_path / "accuracy_vs_size.png").is_file()


def _records(losses: list[float], accuracies: list[float], phase: str | None = None) -> list[dict]:
    return [dict({"epoch": e, "loss": loss, "val_accuracy": acc}, **({"phase": phase} if phase else {}))
            for e, (loss, acc) in enumerate(zip(losses, accuracies), start=1)]


def test_the_learning_curves_are_one_figure_with_loss_and_val_accuracy_of_every_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    figures = []
    real_save = report_module._save_png
    monkeypatch.setattr(report_module, "_save_png", lambda fig, path: figures.append(fig) or real_save(fig, path))
    specialist = _records([1.0, 0.8], [0.6, 0.7], "hard") + [dict(_records([0.5], [0.75], "soft")[0], epoch=3)]
    curves = {"generalist": _records([2.0, 1.5, 1.2], [0.5, 0.6, 0.65]), "specialist 0": specialist,
              "student": _records([0.9, 0.7, 0.6], [0.55, 0.6, 0.62])}
    path = report_module.plot_learning_curves(curves, tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = figures
    loss_ax, acc_ax = fig.axes
    assert (loss_ax.get_title(), acc_ax.get_title()) == ("training loss", "validation accuracy")
    labels = [text.get_text() for text in fig.legends[0].get_texts()]
    assert labels == ["generalist", "specialist 0", "student"]  # one entry per model, its two phases one
    drawn = {(line.get_label(), line.get_linestyle()): list(line.get_ydata()) for line in acc_ax.get_lines()}
    assert drawn[("generalist", "-")] == pytest.approx([50.0, 60.0, 65.0])
    soft = [line for line in acc_ax.get_lines() if line.get_linestyle() == "--"]
    assert len(soft) == 1 and list(soft[0].get_xdata()) == [2, 3]  # the soft phase continues from epoch 2
    assert loss_ax.get_yscale() == "log"


def test_report_md_links_the_learning_curves_of_the_run(tmp_path: Path) -> None:
    (tmp_path / "generalist").mkdir()
    for record in _records([2.0, 1.5], [0.5, 0.6]):
        (tmp_path / "generalist" / "metrics.jsonl").open("a").write(json.dumps(record) + "\n")
    report = _report(0.97, 0.98)
    write_report(tmp_path, report)
    assert report["plots"]["learning_curves"] == "learning_curves.png"
    assert (tmp_path / "learning_curves.png").is_file()
    assert "## Learning curves" in (tmp_path / "report.md").read_text()
    assert "![learning curves](learning_curves.png)" in (tmp_path / "report.md").read_text()
