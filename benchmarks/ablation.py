"""Where does the gain come from? The committed recipe, each lever switched off, and the MLP recipe.

    python benchmarks/ablation.py                          # fashion-mnist, seed 0, every row
    python benchmarks/ablation.py --rows recipe no_overlap # some rows
    python benchmarks/ablation.py --quick                  # digits, a smoke test of the script

Each row is one full `ensemble-kd` run of pipelines/configs/<data>.toml with the row's
overrides, in benchmarks/cache/ablation/<data>-<row>-seed<k>; the recipe row is the run of
benchmarks/specialists.py for that seed (benchmarks/cache/runs/<data>-seed<k>), shared
with it. A row starts from copies of the recipe run's work that its lever leaves the same
(`borrowed_folders`): the generalist, the specialists when only the students change, and the
students taught by the generalist or by hard labels when only the clusters or the specialists
change (each copy's fingerprint is checked when it is loaded). So only what the lever changes
is trained again, and the borrowed stages' recorded seconds are the recipe run's. Every run
resumes where it stopped, so the script can be stopped and restarted at any time. `--jobs N`
runs N rows side by side once the recipe's generalist is there (on one GPU, small models
leave room for several).

For each row: the test accuracy of the generalist, the ensemble and the three students
(the pipeline's students and `--student-seeds` more of each, averaged), the ensemble's
relative error cut, the student from the ensemble minus the student from the generalist
(paired by student seed), the teachers' top-1 disagreement on the transfer set, and the
time of each stage. Writes benchmarks/results/ablation_<data>.json, keeping the rows of an earlier run
with the same settings that this one does not run again (so rows can be run a few at a time).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

import common
import torch
from joblib import Parallel, delayed

from ensemble_kd import artifacts
from ensemble_kd.choices import STAGES
from ensemble_kd.config import Config, load_config
from ensemble_kd.data import load_data
from ensemble_kd.distill import FROM_GENERALIST, HARD_LABELS, STUDENT
from ensemble_kd.generalist import load_generalist
from ensemble_kd.inference import predict_logits
from ensemble_kd.parallel import effective_jobs
from ensemble_kd.pipeline import run_pipeline, start_run
from ensemble_kd.resume import changed_settings, stage_of
from ensemble_kd.specialists import specialist_threads
from ensemble_kd.train import resolve_device

STUDENTS = (STUDENT, FROM_GENERALIST, HARD_LABELS)
CACHE = common.REPO / "benchmarks" / "cache" / "ablation"
BORROWED_FILE = "borrowed.json"  # in a row's run folder: the folders it copied from the recipe's run
WHOLE_STAGES = {artifacts.GENERALIST_DIR: "generalist", artifacts.SPECIALISTS_DIR: "specialists"}  # folder -> stage

# row -> (what it changes, overrides of the committed recipe, config file or None for the recipe's)
ROWS: dict[str, tuple[str, list[str], str | None]] = {
    "recipe": ("the committed recipe", [], None),
    "init_scratch": ("specialists start from fresh weights instead of the generalist's", ["specialists.init=scratch"],
                     None),
    "soft_phase": ("specialists end with an epoch on the generalist's soft targets (Hinton's pull back)",
                   ["specialists.soft_epochs=1"], None),
    "no_overlap": ("clusters partition the classes", ["clusters.overlap=0"], None),
    "transfer_dataset": ("students learn the teachers' logits on the plain training images",
                         ["student.transfer=dataset"], None),
    "transfer_live": ("the teachers run live on every augmented batch instead of fixed views",
                      ["student.transfer=live"], None),
    "plain_epochs": ("students end with 6 of their 20 epochs on the plain images (the teachers' logits on them)",
                     ["student.plain_epochs=6"], None),
    "mlp": ("the earlier MLP recipe (MLP generalist, fine-tuned specialists, MLP student)", [],
            "fashion-mnist-mlp"),
    "plain_ensemble": ("no specialists: independently seeded generalists averaged, given the CPU seconds the recipe "
                       "spent on its generalist and specialists", [], None),
}
PLAIN_ENSEMBLE = "plain_ensemble"  # the row that is not one run: generalists of runs seed, seed + 1, ...
QUICK_ROWS = ("recipe", "init_scratch", "no_overlap", "transfer_dataset")


def row_config(data: str, row: str, seed: int, quick: bool, extra: list[str]) -> Config:
    _, overrides, config_name = ROWS[row]
    name = config_name or data
    quick_overrides = ["specialists.init=generalist", "specialists.soft_epochs=0", "clusters.overlap=0.2",
                       "data.crop_pad=1", "student.transfer=views"] if quick else []
    return load_config(common.REPO / "pipelines" / "configs" / f"{name}.toml",
                       [f"seed={seed}", *quick_overrides, *overrides, *extra])


def row_dir(data: str, row: str, seed: int, quick: bool = False) -> Path:
    """The row's run folder; the recipe's is benchmarks/specialists.py's (not in --quick, whose recipe differs)."""
    if row == "recipe" and not quick:
        return common.REPO / "benchmarks" / "cache" / "runs" / f"{data}-seed{seed}"
    return CACHE / f"{data}-{row}-seed{seed}"


def borrowed_folders(cfg: Config, recipe_cfg: Config) -> list[str]:
    """Folders of the recipe's run whose work a run of `cfg` would repeat exactly: those of every
    stage before the first one that `cfg` changes, and the students that neither the clusters,
    the specialists nor the ensemble teach when `cfg` changes only those."""
    changed = {stage_of(key) for key in changed_settings(recipe_cfg, cfg)} - {None}
    first = min((STAGES.index(stage) for stage in changed), default=len(STAGES))
    kept = lambda stage: first > STAGES.index(stage)  # noqa: E731
    folders = [folder for folder, stage in WHOLE_STAGES.items() if kept(stage)]
    if kept("generalist") and "student" not in changed:
        folders += [kind for kind in STUDENTS if kind != STUDENT or kept("student")]
    return folders


def run_row(cfg: Config, out: Path, donor: Path | None, borrowable: list[str]) -> tuple[dict[str, Any], list[str]]:
    """One full run (resumed if started), and the folders it borrowed: a fresh run starts from
    copies of those of `borrowable` that `donor` has finished."""
    fresh = not (out / artifacts.CONFIG_FILE).exists()
    run_dir = start_run(cfg, out, resume=not fresh)
    try:
        if fresh:
            artifacts.write_json(run_dir / BORROWED_FILE, borrow(donor, run_dir, borrowable) if donor else [])
        borrowed = artifacts.read_json(run_dir / BORROWED_FILE) if (run_dir / BORROWED_FILE).is_file() else []
        return run_pipeline(cfg, run_dir, progress=False), borrowed
    finally:  # the next rows of this process run elsewhere: let another process open this one meanwhile
        artifacts.unlock_run_dir(run_dir)


def borrow(donor: Path, run_dir: Path, folders: list[str]) -> list[str]:
    """Copy those of `folders` that the run `donor` has finished into `run_dir` (a whole stage copied
    keeps its seconds); returns them."""
    donor_stages = artifacts.finished_stages(donor)
    done = [folder for folder in folders if (WHOLE_STAGES[folder] in donor_stages if folder in WHOLE_STAGES
                                             else (donor / folder / artifacts.MODEL_FILE).is_file())]
    for folder in done:
        shutil.copytree(donor / folder, run_dir / folder)
        if folder in WHOLE_STAGES:
            artifacts.mark_stage(run_dir, WHOLE_STAGES[folder], donor_stages[WHOLE_STAGES[folder]]["seconds"],
                                 borrowed_from=donor.name)
    return done


def row_result(row: str, run_dir: Path, report: dict[str, Any], student_seeds: list[int], donor: Path | None,
               borrowed: list[str]) -> dict[str, Any]:
    stages = artifacts.read_json(run_dir / artifacts.MANIFEST_FILE)["stages"]
    result: dict[str, Any] = {"row": row, "changes": ROWS[row][0], "overrides": ROWS[row][1],
                              "run": str(run_dir.relative_to(common.REPO)), "clusters": report["clusters"],
                              "borrowed_from_recipe": borrowed,
                              "generalist": report["generalist"]["test_accuracy"],
                              "ensemble": report["ensemble"]["test_accuracy"],
                              "teachers_top1_disagreement": report.get("teachers", {}).get("top1_disagreement"),
                              "stage_seconds": {name: stage["seconds"] for name, stage in stages.items()}}
    result["seconds"] = round(sum(result["stage_seconds"].values()), 1)
    g_err, e_err = 1 - result["generalist"], 1 - result["ensemble"]
    result["ensemble_relative_error_cut"] = (g_err - e_err) / g_err
    for kind in STUDENTS:
        accuracies = [report[kind]["test_accuracy"]]
        teacher_run = donor if donor is not None and kind in borrowed else run_dir  # borrowed: the recipe's students
        accuracies += [common.train_extra_student(teacher_run, kind, s)[0] for s in student_seeds]
        result[kind] = {"accuracies": accuracies, "mean": statistics.fmean(accuracies)}
    differences = [a - b for a, b in zip(result[STUDENT]["accuracies"], result[FROM_GENERALIST]["accuracies"])]
    result["student_minus_from_generalist"] = statistics.fmean(differences)
    result["student_minus_hard_labels"] = statistics.fmean(
        a - b for a, b in zip(result[STUDENT]["accuracies"], result[HARD_LABELS]["accuracies"]))
    return result


def run_and_measure(data: str, row: str, seed: int, quick: bool, extra: list[str], donor: Path | None,
                    borrowable: list[str], student_seeds: list[int]) -> dict[str, Any]:
    common.log_to_stderr(f"{row}: {ROWS[row][0]} ...")
    if row == PLAIN_ENSEMBLE:
        return plain_ensemble_result(data, seed, quick, extra)
    out = row_dir(data, row, seed, quick)
    report, borrowed = run_row(row_config(data, row, seed, quick, extra), out, donor, borrowable)
    return row_result(row, out, report, student_seeds, donor, borrowed)


def cpu_seconds(run_dir: Path, stage: str) -> float:
    """CPU seconds a finished stage of a run took: its wall seconds times the threads that trained it (the
    specialists: workers at once times each one's threads, `specialists.specialist_threads`)."""
    cfg = load_config(run_dir / artifacts.CONFIG_FILE)
    threads = cfg.threads or torch.get_num_threads()
    if stage == "specialists":
        n_clusters = len(artifacts.read_json(run_dir / artifacts.CLUSTERS_FILE)["clusters"])
        threads = effective_jobs(cfg, n_clusters) * specialist_threads(cfg, n_clusters)
    return artifacts.read_json(run_dir / artifacts.MANIFEST_FILE)["stages"][stage]["seconds"] * threads


def member_generalist(data: str, seed: int, quick: bool, extra: list[str]) -> Path:
    """The run folder holding a trained generalist of run seed `seed`: that seed's recipe run when it has one,
    else a run of the recipe stopped after its generalist."""
    recipe = row_dir(data, "recipe", seed, quick)
    if (recipe / artifacts.GENERALIST_DIR / artifacts.MODEL_FILE).is_file():
        return recipe
    out = CACHE / f"{data}-generalist-seed{seed}"
    cfg = row_config(data, "recipe", seed, quick, extra)
    run_dir = start_run(cfg, out, resume=(out / artifacts.CONFIG_FILE).exists())
    try:
        run_pipeline(cfg, run_dir, until="generalist", progress=False)
    finally:
        artifacts.unlock_run_dir(run_dir)
    return out


def plain_ensemble_result(data: str, seed: int, quick: bool, extra: list[str]) -> dict[str, Any]:
    """Generalists of runs seed, seed + 1, ... averaged (mean of their softmaxes) until they have spent the CPU
    seconds of the recipe's generalist and specialists, against the recipe's ensemble: accuracy, and points
    gained over one generalist per CPU-hour."""
    recipe = row_dir(data, "recipe", seed, quick)
    budget = cpu_seconds(recipe, "generalist") + cpu_seconds(recipe, "specialists")
    members, spent, probs, accuracies = [], 0.0, None, []
    while spent < budget:
        run = member_generalist(data, seed + len(members), quick, extra)
        cfg = load_config(run / artifacts.CONFIG_FILE)
        split = load_data(cfg.data, cfg.seed)
        member = torch.softmax(predict_logits(load_generalist(cfg, split, run), split.x_test), 1)
        probs = member if probs is None else probs + member
        members.append(common.relative(run))
        spent += cpu_seconds(run, "generalist")
        accuracies.append(float((probs.argmax(1) == split.y_test).double().mean()))
    report = artifacts.read_json(recipe / "report.json")
    single, ensemble = report["generalist"]["test_accuracy"], report["ensemble"]["test_accuracy"]
    per_hour = lambda gain, seconds: 100 * gain / (seconds / 3600)  # noqa: E731 - points per CPU-hour
    return {"row": PLAIN_ENSEMBLE, "changes": ROWS[PLAIN_ENSEMBLE][0], "overrides": [], "members": members,
            "generalist": single, "ensemble": accuracies[-1], "accuracy_by_members": accuracies,
            "ensemble_relative_error_cut": ((1 - single) - (1 - accuracies[-1])) / (1 - single),
            "cpu_seconds": round(spent), "recipe_cpu_seconds": round(budget),
            "points_per_cpu_hour": per_hour(accuracies[-1] - single, spent),
            "recipe_points_per_cpu_hour": per_hour(ensemble - single, budget),
            "teachers_top1_disagreement": None, "seconds": round(spent),
            **{kind: None for kind in STUDENTS}, "student_minus_from_generalist": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="fashion-mnist", help="the recipe: a config name in pipelines/configs/")
    parser.add_argument("--seed", type=int, default=0, help="run seed of every row")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), help="rows to run (default: all)")
    parser.add_argument("--student-seeds", type=int, nargs="*", default=[11],
                        help="extra student seeds per row, besides the pipeline's own students")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config override for every row, e.g. data.root=... (repeatable)")
    parser.add_argument("--jobs", type=int, default=1, help="rows run side by side (worker processes)")
    parser.add_argument("--quick", action="store_true", help="digits, a smoke test of the script")
    args = parser.parse_args()
    data = "digits" if args.quick else args.data
    rows = args.rows or (list(QUICK_ROWS) if args.quick else list(ROWS))
    name = "ablation_quick" if args.quick else f"ablation_{data}"
    settings = {"data": data, "seed": args.seed, "student_seeds": args.student_seeds, "overrides": args.overrides}
    kept = kept_rows(common.RESULTS / f"{name}.json", settings, rows)  # before any training: it may refuse
    recipe_cfg = row_config(data, "recipe", args.seed, args.quick, args.overrides)
    recipe_dir = row_dir(data, "recipe", args.seed, args.quick)
    if not (recipe_dir / artifacts.GENERALIST_DIR / artifacts.MODEL_FILE).is_file():
        common.log_to_stderr("recipe: training its generalist first (the other rows borrow it) ...")
        run_pipeline(recipe_cfg,
                     start_run(recipe_cfg, recipe_dir, resume=(recipe_dir / artifacts.CONFIG_FILE).exists()),
                     until="generalist", progress=False)
    extra = [f"threads={max(1, (os.cpu_count() or 1) // args.jobs)}"] * (args.jobs > 1) + args.overrides
    tasks = []
    for row in rows:
        cfg = row_config(data, row, args.seed, args.quick, extra)
        borrowable = borrowed_folders(cfg, recipe_cfg) if row != "recipe" else []
        donor = recipe_dir if borrowable else None
        tasks.append(delayed(run_and_measure)(data, row, args.seed, args.quick, extra, donor, borrowable,
                                              args.student_seeds))
    results = kept  # the table: the kept rows, and each row of this run as it finishes
    for result in Parallel(n_jobs=args.jobs, return_as="generator_unordered")(tasks):
        results.append(result)
        results.sort(key=lambda r: list(ROWS).index(r["row"]))
        path = common.write_result(name, {"machine": common.machine_info(_device(recipe_cfg)), **settings,
                                          "rows": results})
    print(format_rows(results))
    print(f"wrote {path.relative_to(common.REPO)}")


def kept_rows(path: Path, settings: dict[str, Any], rows: list[str]) -> list[dict[str, Any]]:
    """The rows of the results file at `path` that this run keeps: those it does not run again, when the
    file was made with the same `settings` (data, seed, student seeds, overrides). A file made with other
    settings stops the script, so that rows of two settings never share a table and none is lost."""
    if not path.is_file():
        return []
    previous = artifacts.read_json(path)
    differing = [f"{key} {previous.get(key)!r} there, {value!r} here" for key, value in settings.items()
                 if previous.get(key) != value]
    if differing:
        print(f"{common.relative(path)} holds rows made with other settings ({'; '.join(differing)}); rerun with "
              "those settings, or move the file away to start a new table", file=sys.stderr)
        raise SystemExit(2)
    return [row for row in previous.get("rows", []) if row["row"] in ROWS and row["row"] not in rows]


def format_rows(results: list[dict[str, Any]]) -> str:
    headers = ["row", "generalist", "ensemble", "error cut", "student", "from gen.", "hard", "ens-gen",
               "disagree", "minutes"]
    table = [[r["row"], f"{100 * r['generalist']:.2f}%", f"{100 * r['ensemble']:.2f}%",
              f"{100 * r['ensemble_relative_error_cut']:.1f}%",
              *("-" if r[k] is None else f"{100 * r[k]['mean']:.2f}%" for k in STUDENTS),
              "-" if r["student_minus_from_generalist"] is None else f"{100 * r['student_minus_from_generalist']:+.2f}",
              "-" if r["teachers_top1_disagreement"] is None else f"{100 * r['teachers_top1_disagreement']:.2f}%",
              f"{r['seconds'] / 60:.1f}"] for r in results]
    return common.format_table(headers, table)


def _device(cfg: Config) -> str:
    return str(resolve_device(cfg.device))


if __name__ == "__main__":
    main()
