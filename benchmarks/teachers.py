"""Is the ensemble a better teacher than the generalist? Paired students over student seeds.

    python benchmarks/teachers.py                            # fashion-mnist runs 0 1 2, 4 student seeds
    python benchmarks/teachers.py --runs 0 --student-seeds 11 12 --jobs 1
    python benchmarks/teachers.py --quick                    # digits runs 0 1, 2 student seeds

One student differs from the next by a few tenths of a point on Fashion-MNIST just from
its initial weights and batch order, about as much as the two teachers differ, so one
pipeline run cannot say which teacher is better. This script takes the finished runs of
benchmarks/specialists.py (benchmarks/cache/runs/<data>-seed<k>), and for each student
seed trains a pair of students that differ only in their teacher: the run's ensemble and
its generalist alone. The architecture, alpha, temperature, training and transfer method
(`student.transfer`: fixed views, the teacher run live on the student's augmented batches,
or its logits on the plain training images) come from the run's config; the student seed
sets the initial weights, the batch order and the augmented views, the same for both
students of a pair. The run's own pair (the pipeline's `student` and
`student_from_generalist`) is included. Each pair also gets a hard-label student of the
same seed (no teacher), so that each run's mean student from the ensemble can be set
against its mean hard-label student.

Prints every pair and the mean paired difference (ensemble minus generalist) with its 95%
confidence interval, and writes benchmarks/results/teachers_<data>.json. Students are
trained in benchmarks/cache/students/ (shared with benchmarks/ablation.py) and reused, so the
script can be stopped and restarted. Each student trains with cores / `--jobs` torch threads.
"""
from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path
from typing import Any

import common
import torch
from joblib import Parallel, delayed
from scipy import stats

from ensemble_kd import artifacts
from ensemble_kd.distill import FROM_GENERALIST, HARD_LABELS, STUDENT

TEACHERS = {STUDENT: "ensemble", FROM_GENERALIST: "generalist", HARD_LABELS: "none"}  # run folder -> teacher
CACHE = common.REPO / "benchmarks" / "cache"


def run_dir(data: str, seed: int) -> Path:
    path = CACHE / "runs" / f"{data}-seed{seed}"
    if not (path / "report.json").is_file():
        raise SystemExit(f"{path} holds no finished run; make it first with "
                         f"`python benchmarks/specialists.py --data {data} --seeds {seed}`")
    return path


def train_student(run: Path, folder: str, student_seed: int, threads: int) -> float:
    """Test accuracy of a student taught by the teacher of `run/folder`, seeded by `student_seed`."""
    torch.set_num_threads(threads)
    return common.train_extra_student(run, folder, student_seed)[0]


def paired_rows(data: str, runs: list[int], student_seeds: list[int], jobs: int) -> list[dict[str, Any]]:
    tasks = [(run_dir(data, r), folder, s) for r in runs for s in student_seeds for folder in TEACHERS]
    common.log_to_stderr(f"training {len(tasks)} students, {jobs} at a time ...")
    threads = max(1, (os.cpu_count() or 1) // jobs)
    accuracies = Parallel(n_jobs=jobs)(delayed(train_student)(*task, threads) for task in tasks)
    by_task = {(run.name, folder, s): acc for (run, folder, s), acc in zip(tasks, accuracies)}
    rows = []
    for r in runs:
        run = run_dir(data, r)
        report = artifacts.read_json(run / "report.json")
        pairs = [("pipeline", *(report[kind]["test_accuracy"] for kind in TEACHERS))]
        pairs += [(s, *(by_task[run.name, kind, s] for kind in TEACHERS)) for s in student_seeds]
        rows += [{"run_seed": r, "student_seed": s, "from_ensemble": ens, "from_generalist": gen,
                  "hard_labels": hard, "difference": ens - gen} for s, ens, gen, hard in pairs]
    return rows


def by_run(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each run's mean student from the ensemble, from the generalist and on hard labels."""
    runs = sorted({r["run_seed"] for r in rows})
    means = [{"run_seed": run, **{key: statistics.fmean(r[key] for r in rows if r["run_seed"] == run)
                                  for key in ("from_ensemble", "from_generalist", "hard_labels")}} for run in runs]
    return [dict(m, ensemble_minus_hard_labels=m["from_ensemble"] - m["hard_labels"]) for m in means]


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean paired difference (ensemble minus generalist) and its 95% t confidence interval."""
    diffs = [r["difference"] for r in rows]
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half_width = stats.t.ppf(0.975, len(diffs) - 1) * sd / len(diffs) ** 0.5
    low, high = float(mean - half_width), float(mean + half_width)
    verdict = "ensemble better" if low > 0 else "generalist better" if high < 0 else "no difference detected"
    return {"pairs": len(diffs), "from_ensemble_mean": statistics.fmean(r["from_ensemble"] for r in rows),
            "from_generalist_mean": statistics.fmean(r["from_generalist"] for r in rows),
            "difference_mean": mean, "difference_sd": sd, "difference_ci95": [low, high],
            "ensemble_wins": sum(d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs),
            "generalist_wins": sum(d < 0 for d in diffs), "verdict": verdict,
            "hard_labels_mean": statistics.fmean(r["hard_labels"] for r in rows),
            "ensemble_beats_hard_labels_in_every_run": all(m["ensemble_minus_hard_labels"] > 0 for m in by_run(rows))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="fashion-mnist", help="a config name in pipelines/configs/")
    parser.add_argument("--runs", type=int, nargs="+", default=[0, 1, 2], help="seeds of finished runs")
    parser.add_argument("--student-seeds", type=int, nargs="+", default=[11, 12, 13, 14])
    parser.add_argument("--jobs", type=int, default=2,
                        help="students trained at once (cores / jobs torch threads each)")
    parser.add_argument("--quick", action="store_true", help="digits runs 0 and 1, student seeds 11 and 12")
    args = parser.parse_args()
    data, runs, seeds = ("digits", [0, 1], [11, 12]) if args.quick else (args.data, args.runs, args.student_seeds)
    rows = paired_rows(data, runs, seeds, args.jobs)
    table = [[r["run_seed"], r["student_seed"], f"{100 * r['from_ensemble']:.2f}%",
              f"{100 * r['from_generalist']:.2f}%", f"{100 * r['difference']:+.2f}", f"{100 * r['hard_labels']:.2f}%"]
             for r in rows]
    print(common.format_table(["run", "student seed", "from ensemble", "from generalist", "difference",
                               "hard labels"], table))
    result = summary(rows)
    low, high = result["difference_ci95"]
    print(f"\nmean difference {100 * result['difference_mean']:+.3f} points, 95% CI [{100 * low:+.3f}, "
          f"{100 * high:+.3f}] over {result['pairs']} pairs; ensemble wins {result['ensemble_wins']}, "
          f"generalist wins {result['generalist_wins']}: {result['verdict']}")
    runs_table = by_run(rows)
    print("per run, the mean student from the ensemble minus the mean hard-label student: " + ", ".join(
        f"run {m['run_seed']} {100 * m['ensemble_minus_hard_labels']:+.2f}" for m in runs_table))
    name = "teachers_quick" if args.quick else f"teachers_{data}"
    path = common.write_result(name, {"machine": common.machine_info(), "data": data, "runs": runs,
                                      "student_seeds": seeds, "pairs": rows, "by_run": runs_table,
                                      "summary": result})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
