"""The whole pipeline on a tiny synthetic set: layout, report, --until, resume, reproducibility, early errors."""
from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import MODELS, N_TEST_PER_CLASS, REPO, STUDENTS, assert_same_weights, full_run, tiny_config, weights
from PIL import Image

from ensemble_kd.artifacts import CLUSTERS_FILE, MODEL_FILE, ArtifactError, read_json, read_jsonl
from ensemble_kd.cli import main
from ensemble_kd.config import ConfigError, load_config
from ensemble_kd.confusion import ClusterError, choose_k, read_clusters
from ensemble_kd.curves import stage_curves
from ensemble_kd.data import DataError, load_data
from ensemble_kd.evaluation import by_coverage, per_cluster_accuracy
from ensemble_kd.pipeline import run_pipeline, start_run
from ensemble_kd.report import format_coverage
from ensemble_kd.specialists import dispatch_order


def _strict_json(path: Path) -> dict:
    def no_constants(name: str) -> None:
        raise AssertionError(f"{path} holds {name}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=no_constants)


def _files(run_dir: Path, pattern: str) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob(pattern))}


def test_a_full_run_writes_the_documented_layout(tiny_run: tuple[Path, dict]) -> None:
    run_dir, _ = tiny_run
    expected = ["config.toml", "manifest.json", "generalist/model.pt", "clusters.json", "confusion.png",
                "specialists/specialist_00/model.pt", "specialists/specialist_01/model.pt", "student/model.pt",
                "student_hard_labels/model.pt", "student_from_generalist/model.pt", "export/student.ts",
                "export/student_state.pt", "report.json", "report.md", "accuracy_vs_size.png", "learning_curves.png"]
    missing = [name for name in expected if not (run_dir / name).is_file()]
    assert not missing
    assert not list(run_dir.rglob("checkpoint.pt"))  # finished stages leave no checkpoint behind
    stages = _strict_json(run_dir / "manifest.json")["stages"]
    assert {"generalist", "clusters", "specialists", "student", "export"} <= set(stages)
    assert tiny_config() == load_config(run_dir / "config.toml")  # the saved config is the resolved one


def test_every_trained_stage_has_its_metrics_as_csv_and_report_md_shows_every_models_curves(
        tiny_run: tuple[Path, dict]) -> None:
    run_dir, report = tiny_run
    logs = sorted(run_dir.rglob("metrics.jsonl"))
    assert len(logs) == 1 + 2 * 2 + 3  # the generalist, two phases of two specialists, three students
    for jsonl in logs:
        rows = list(csv.DictReader((jsonl.parent / "metrics.csv").open()))
        assert rows == [{k: str(v) for k, v in r.items()} for r in read_jsonl(jsonl)], jsonl
    assert not list(run_dir.rglob("events.out.tfevents*"))  # log.tensorboard is off by default
    assert set(stage_curves(run_dir)) == {"generalist", "specialist 0", "specialist 1", *STUDENTS}
    assert "![learning curves](learning_curves.png)" in (run_dir / "report.md").read_text()
    assert report["plots"]["learning_curves"] == "learning_curves.png"


def test_report_has_every_model_with_sane_numbers(tiny_run: tuple[Path, dict]) -> None:
    run_dir, returned = tiny_run
    report = _strict_json(run_dir / "report.json")  # strict: no NaN
    assert {m: returned[m]["test_accuracy"] for m in MODELS} == {m: report[m]["test_accuracy"] for m in MODELS}
    for name in MODELS:
        entry = report[name]
        assert 0.0 <= entry["test_accuracy"] <= 1.0, name
        assert entry["params"] > 0 and entry["ms_per_image"] > 0 and entry["size_bytes"] > 0, name
        assert entry["test_errors"] == round((1 - entry["test_accuracy"]) * 6 * N_TEST_PER_CLASS), name
    # mlp 8 -> 16 -> 6: 8*16+16 + 16*6+6 = 246; student 8 -> 8 -> 6: 8*8+8 + 8*6+6 = 126
    assert report["generalist"]["params"] == 246
    assert all(report[name]["params"] == 126 for name in STUDENTS)
    assert report["student"]["params"] < report["generalist"]["params"]
    # a specialist for S keeps the 8 -> 16 body (144) and has a head of |S| + 1 rows: 17 * (|S| + 1)
    sizes = [len(c) for c in report["clusters"]]
    assert report["ensemble"]["params"] == 246 + sum(144 + 17 * (s + 1) for s in sizes)
    assert set(report["exports"]["formats"]) == {"torchscript", "state_dict"}


def test_report_ensemble_rows_per_cluster_and_by_coverage_add_up(tiny_run: tuple[Path, dict]) -> None:
    report = _strict_json(tiny_run[0] / "report.json")
    ensemble, generalist = report["ensemble"], report["generalist"]
    for row in ensemble["per_cluster"]:
        assert row["n"] == N_TEST_PER_CLASS * len(row["classes"])  # test examples whose class is in the cluster
    rows = ensemble["by_coverage"]
    assert sum(r["n"] for r in rows) == 6 * N_TEST_PER_CLASS
    assert [r["specialists_covering"] for r in rows] == [0, 1, 2]  # 0, 1 and 2 are always shown
    assert rows[2]["n"] == 0 and rows[2]["accuracy"] is None  # disjoint clusters, top-1: at most one covers
    correct = sum(round((r["accuracy"] or 0) * r["n"]) for r in rows)
    assert correct == 6 * N_TEST_PER_CLASS - ensemble["test_errors"]
    assert sum(r["delta_correct"] for r in rows) == generalist["test_errors"] - ensemble["test_errors"]
    assert "| ensemble |" in (tiny_run[0] / "report.md").read_text()


def test_coverage_rows_worked_by_hand_stay_strict_json_when_the_baseline_got_none_right() -> None:
    coverage, labels = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 2, 3])
    ensemble, baseline = torch.tensor([0, 5, 2, 3]), torch.tensor([0, 1, 5, 5])
    rows = by_coverage(coverage, ensemble, labels, baseline)
    # group 0: ensemble 1 of 2 right, baseline 2 -> -1, -50 %; group 1: 2 of 2 against 0 -> +2, undefined
    assert rows == [
        {"specialists_covering": 0, "n": 2, "accuracy": 0.5, "delta_correct": -1, "relative_accuracy_change": -0.5},
        {"specialists_covering": 1, "n": 2, "accuracy": 1.0, "delta_correct": 2, "relative_accuracy_change": None},
        {"specialists_covering": 2, "n": 0, "accuracy": None, "delta_correct": 0, "relative_accuracy_change": None}]
    json.dumps(rows, allow_nan=False)
    table = format_coverage({"ensemble": {"by_coverage": rows}})
    assert "| 0 | 2 | 50.00% | -1 | -50.00% |" in table and "| 1 | 2 | 100.00% | +2 | n/a |" in table
    assert "| 2 | 0 | n/a | +0 | n/a |" in table
    three = by_coverage(torch.tensor([3, 0]), torch.tensor([1, 1]), torch.tensor([1, 1]))
    assert [r["specialists_covering"] for r in three] == [0, 1, 2, 3]  # and every larger count found
    empty = per_cluster_accuracy(ensemble, labels, [[0, 1], [4]])  # no test example of class 4
    assert [r["accuracy"] for r in empty] == [0.5, None]


def test_until_stops_after_that_stage_and_resume_finishes_as_one_uninterrupted_run(
        tiny_run: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    cfg = tiny_config()
    run_dir = start_run(cfg, tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="ensemble_kd.pipeline"):
        report = run_pipeline(cfg, run_dir, until="generalist", progress=False)
    assert [m for m in caplog.messages if m.startswith("stage ")] == ["stage 1/1: generalist"]
    assert (run_dir / "generalist" / "model.pt").is_file() and "generalist" in report
    assert not (run_dir / "clusters.json").exists() and not (run_dir / "confusion").exists()
    assert "clusters" not in report and "ensemble" not in report

    report = run_pipeline(cfg, start_run(cfg, run_dir, resume=True), until="clusters", progress=False)
    assert (run_dir / "clusters.json").is_file() and (run_dir / "confusion.png").is_file()
    assert not (run_dir / "specialists").exists() and not (run_dir / "student").exists()
    assert "ensemble" not in report and "student" not in report

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ensemble_kd.pipeline"):
        report = run_pipeline(cfg, start_run(cfg, run_dir, resume=True), progress=False)
    assert [m for m in caplog.messages if m.startswith("stage ")] == [
        "stage 1/6: generalist", "stage 2/6: clusters", "stage 3/6: specialists", "stage 4/6: ensemble",
        "stage 5/6: student", "stage 6/6: export"]
    assert (run_dir / "export" / "student.ts").is_file() and "student" in report
    assert capsys.readouterr().out == ""  # the library logs; printing is the CLI's job
    # stopping and resuming gives the same models as one uninterrupted run
    for name in ("generalist/model.pt", "specialists/specialist_01/model.pt", "student/model.pt"):
        uninterrupted, resumed = weights(tiny_run[0] / name), weights(run_dir / name)
        assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted), name


def test_rerunning_into_a_used_directory_needs_resume_or_overwrite(tiny_run: tuple[Path, dict]) -> None:
    run_dir = tiny_run[0]
    before = (run_dir / "config.toml").read_bytes()
    with pytest.raises(ArtifactError, match="--resume"):
        start_run(tiny_config(), run_dir)
    assert (run_dir / "config.toml").read_bytes() == before


def test_resuming_a_finished_run_retrains_nothing(tiny_run: tuple[Path, dict], tmp_path: Path) -> None:
    run_dir = Path(shutil.copytree(tiny_run[0], tmp_path / "run"))
    models, metrics = _files(run_dir, "model.pt"), _files(run_dir, "metrics.jsonl")
    assert len(models) == 10  # generalist, 2 specialists x (hard, soft, final), 3 students
    stages = read_json(run_dir / "manifest.json")["stages"]
    cfg = tiny_config()
    report = run_pipeline(cfg, start_run(cfg, run_dir, resume=True), progress=False)
    assert _files(run_dir, "model.pt") == models
    assert _files(run_dir, "metrics.jsonl") == metrics  # no epoch was trained again
    resumed = read_json(run_dir / "manifest.json")["stages"]
    for stage in ("generalist", "specialists", "student"):  # the time it took to train, not to reload
        assert resumed[stage] == stages[stage], stage
    first = _strict_json(tiny_run[0] / "report.json")
    assert {m: report[m]["test_accuracy"] for m in MODELS} == {m: first[m]["test_accuracy"] for m in MODELS}


def test_the_same_config_and_seed_give_identical_clusters_specialists_and_students_however_many_at_once(
        tiny_run: tuple[Path, dict], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The one determinism test: a second run of the same config and seed, with its specialists trained two at a
    time in loky worker processes (the first ran them one after the other in this process)."""
    with caplog.at_level("INFO", logger="ensemble_kd.specialists"):
        other, _ = full_run(tmp_path / "again", "specialists.n_jobs=2")
    assert (other / "clusters.json").read_bytes() == (tiny_run[0] / "clusters.json").read_bytes()
    for name in ("specialists/specialist_00", "specialists/specialist_01", *STUDENTS):
        assert_same_weights(other / name / "model.pt", tiny_run[0] / name / "model.pt")
    cfg = tiny_config()
    longest_first = dispatch_order(cfg, dict(enumerate(read_clusters(other))), load_data(cfg.data, cfg.seed).y_train)
    assert f"training 2 specialists ({', '.join(map(str, longest_first))}), 2 at a time" in caplog.text


DIGITS_RUN = ["threads=1", "data.name=imagefolder", "generalist.model.hidden=[32]", "generalist.train.epochs=2",
              "data.flip=true", "clusters.k=2", "specialists.train.epochs=1", "specialists.soft_epochs=1"]


def test_a_streamed_run_finds_the_clusters_and_trains_the_specialists_of_the_in_memory_run(
        digits_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The digits as an image folder, in memory and streamed from disk with its specialists two at a time, each
    reading through its own loader with worker processes (after the test above, whose loky workers it reuses)."""
    monkeypatch.setenv("ENSEMBLE_KD_CACHE", str(tmp_path / "cache"))
    runs = {}
    for storage, jobs, workers in (("memory", 1, 0), ("stream", 2, 2)):
        cfg = load_config(None, [*DIGITS_RUN, f"data.root={digits_folder}", f"data.storage={storage}",
                                 f"specialists.n_jobs={jobs}", f"data.workers={workers}"])
        runs[storage] = start_run(cfg, tmp_path / storage)
        run_pipeline(cfg, runs[storage], until="specialists", progress=False)
    memory, stream = runs["memory"], runs["stream"]
    clusters = read_json(memory / CLUSTERS_FILE)["clusters"]
    assert len(clusters) == 2 and read_json(stream / CLUSTERS_FILE)["clusters"] == clusters
    assert list((tmp_path / "cache").glob("digits-*/scans/*.pt"))  # streamed: its files were read, not decoded
    for model in ("generalist", "specialists/specialist_00", "specialists/specialist_01"):
        assert_same_weights(memory / model / MODEL_FILE, stream / model / MODEL_FILE)


@pytest.mark.parametrize("overrides, message", [
    (["clusters.k=7"], "clusters.k = 7 but the data has only 6 classes"),
    (["clusters.k=4", "clusters.min_size=2"], "need 8 classes"),
])
def test_impossible_clusters_fail_before_any_training(tmp_path: Path, overrides: list[str], message: str) -> None:
    cfg = tiny_config(*overrides)
    run_dir = start_run(cfg, tmp_path / "run")
    with pytest.raises(ClusterError, match=message):
        run_pipeline(cfg, run_dir, progress=False)
    assert not (run_dir / "generalist").exists()


# ---------------------------------------------------------------- k from the number of classes, from 2 classes up

@pytest.mark.parametrize("num_classes, k", [(2, 0), (3, 0), (4, 2), (6, 2), (10, 3), (100, 10), (1000, 32)])
def test_k_zero_chooses_about_the_square_root_of_the_classes_and_none_when_no_two_clusters_fit(
        num_classes: int, k: int) -> None:
    assert choose_k(tiny_config("clusters.k=0").clusters, num_classes) == k
    assert choose_k(tiny_config("clusters.k=0", "clusters.min_size=1").clusters, 3) == 2


def test_k_zero_says_in_the_log_which_k_it_chose(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = tiny_config("clusters.k=0")
    with caplog.at_level("INFO", logger="ensemble_kd.pipeline"):
        run_pipeline(cfg, start_run(cfg, tmp_path / "run"), until="clusters", progress=False)
    assert "clusters.k = 0: chose k = 2 for 6 classes" in caplog.text
    assert json.loads((tmp_path / "run" / "clusters.json").read_text())["k"] == 2


def _two_class_folder(root: Path, per_class: int = 8) -> Path:
    """Stripes and blocks, 12x10 pixels, some of them RGB: a user's tiny image folder."""
    for split, count in (("train", per_class), ("test", 3)):
        for i in range(count):
            stripes = Image.new("L", (12, 10), 40)
            stripes.paste(220, (0, 0, 12, 3))
            stripes.paste(220, (0, 6, 12, 8))
            blocks = Image.new("RGB", (12, 10), (30, 30, 30))
            blocks.paste((200, 190, 180), (2 + i % 3, 2, 7 + i % 3, 8))
            for name, image in (("stripes", stripes), ("blocks", blocks)):
                (root / split / name).mkdir(parents=True, exist_ok=True)
                image.save(root / split / name / f"{i}.png")
    return root


def test_the_imagefolder_config_runs_end_to_end_on_two_classes_with_the_generalist_as_ensemble(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("ENSEMBLE_KD_CACHE", str(tmp_path / "cache"))
    root = _two_class_folder(tmp_path / "images")
    quick = ["threads=1", "device=cpu", f"data.root={root}", "generalist.train.epochs=2", "specialists.n_jobs=1",
             "student.train.epochs=2"]
    out = tmp_path / "run"
    with caplog.at_level("INFO"):
        code = main(["run", "--config", str(REPO / "pipelines/configs/imagefolder.toml"), "--out", str(out),
                     "--quiet", *(a for o in quick for a in ("--set", o))])
    assert code == 0
    assert "no specialists; the ensemble is the generalist alone" in caplog.text
    assert "greyscale among colour images" in caplog.text and "resized" in caplog.text  # said, not silent
    report = _strict_json(out / "report.json")
    assert report["clusters"] == [] and report["ensemble"]["test_accuracy"] == report["generalist"]["test_accuracy"]
    assert "No specialists" in (out / "report.md").read_text()
    assert (out / "export" / "student.ts").is_file() and (out / "export" / "student_state.pt").is_file()


def test_one_class_and_settings_the_data_cannot_meet_fail_before_the_generalist(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENSEMBLE_KD_CACHE", str(tmp_path / "cache"))  # the folder's decoded tensors, not in ~/.cache
    root = tmp_path / "one"
    for split in ("train", "test"):
        (root / split / "only").mkdir(parents=True)
        for i in range(6):
            Image.new("L", (4, 4), 10 * i).save(root / split / "only" / f"{i}.png")
    for overrides, error, message in [
        (["data.name=imagefolder", f"data.root={root}", "clusters.k=0"], DataError, "needs at least 2"),
        (["clusters.k=1", "clusters.min_size=1", "clusters.min_confusion=0"], ConfigError,
         "clusters.k = 1 puts every class into one cluster"),
        (["ensemble.top_n=7"], ConfigError, "ensemble.top_n = 7 but the data has only 6 classes"),
        (["generalist.model.arch=cnn"], ConfigError, "generalist.model: cnn needs image inputs"),
    ]:
        with pytest.raises(error, match=message):
            cfg = tiny_config(*overrides)
            run_pipeline(cfg, start_run(cfg, tmp_path / "run", overwrite=True), progress=False)
        assert not (tmp_path / "run" / "generalist").exists()
