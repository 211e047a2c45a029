"""Does each stage earn its keep? Generalist, ensemble and three students over several seeds.

    python benchmarks/specialists.py                       # fashion-mnist, seeds 0 1 2
    python benchmarks/specialists.py --data cifar10-jpeg    # CIFAR-10 JPEGs (hours on 2 CPU cores)
    python benchmarks/specialists.py --quick                # digits, 2 seeds, about a minute
    python benchmarks/specialists.py --data cifar10-jpeg --jobs 3   # three seeds side by side (one GPU)

Each seed is one full `ensemble-kd` run (pipelines/configs/<data>.toml) into
benchmarks/cache/runs/<data>-seed<k>; a finished run is reused (--resume), so the script
can be stopped and restarted. `--jobs N` runs N seeds side by side in worker processes
(on one GPU, small models leave room for several); the JSON is rewritten as each seed
finishes, so a run cut short keeps the seeds it finished. Prints per-seed test accuracies, mean and spread, the gain
by number of covering specialists (Table 4 of Hinton et al. 2015) and the clusters, and
writes benchmarks/results/specialists_<data>.json. Targets (issue 5): the ensemble's test
error at least 5% lower (relative) than the generalist's, and the student distilled from
the ensemble better than both baseline students, in every seed.
"""
from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path
from typing import Any

import common
from joblib import Parallel, delayed

from ensemble_kd import artifacts
from ensemble_kd.config import load_config
from ensemble_kd.pipeline import run_pipeline, start_run
from ensemble_kd.train import resolve_device

MODELS = ("generalist", "ensemble", "student", "student_from_generalist", "student_hard_labels")


def run_seed(config: Path, seed: int, out: Path, overrides: list[str]) -> dict[str, Any]:
    common.log_to_stderr(f"{config.stem} seed {seed} ...")
    cfg = load_config(config, [f"seed={seed}", *overrides])
    resume = (out / artifacts.CONFIG_FILE).exists()
    run_dir = start_run(cfg, out, resume=resume, overwrite=False)
    elapsed, report = common.timed(lambda: run_pipeline(cfg, run_dir, progress=False))
    report["seconds"] = elapsed
    report["stage_seconds"] = {name: stage["seconds"] for name, stage in
                               artifacts.read_json(run_dir / artifacts.MANIFEST_FILE)["stages"].items()}
    report["run_dir"] = str(run_dir.relative_to(common.REPO))
    return report


def seed_row(seed: int, report: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"seed": seed, "run": report["run_dir"], "clusters": report["clusters"],
                           "stage_seconds": report["stage_seconds"],
                           "pipeline_seconds": round(sum(report["stage_seconds"].values()), 1),
                           "teachers_top1_disagreement": report.get("teachers", {}).get("top1_disagreement")}
    for name in MODELS:
        row[name] = report[name]["test_accuracy"]
    g_err, e_err = 1 - row["generalist"], 1 - row["ensemble"]
    row["ensemble_relative_error_reduction"] = (g_err - e_err) / g_err
    row["by_coverage"] = report["ensemble"]["by_coverage"]
    row["targets_met"] = {
        "ensemble_error_5pct_lower": row["ensemble_relative_error_reduction"] >= 0.05,
        "student_beats_both_baselines": row["student"] > max(row["student_from_generalist"],
                                                            row["student_hard_labels"]),
    }
    return row


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for name in MODELS + ("ensemble_relative_error_reduction",):
        values = [r[name] for r in rows]
        out[name] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="fashion-mnist", help="a config name in pipelines/configs/")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override (repeatable)")
    parser.add_argument("--quick", action="store_true", help="digits, seeds 0 and 1: a smoke test")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run side by side (worker processes)")
    args = parser.parse_args()
    data, seeds = ("digits", [0, 1]) if args.quick else (args.data, args.seeds)
    config = common.REPO / "pipelines" / "configs" / f"{data}.toml"
    runs = common.REPO / "benchmarks" / "cache" / "runs"
    threads = [f"threads={max(1, (os.cpu_count() or 1) // args.jobs)}"] if args.jobs > 1 else []
    tasks = (delayed(run_seed)(config, seed, runs / f"{data}-seed{seed}", [*threads, *args.overrides])
             for seed in seeds)
    name = "specialists_quick" if args.quick else f"specialists_{data}"
    rows: list[dict[str, Any]] = []
    for seed, report in zip(seeds, Parallel(n_jobs=args.jobs, return_as="generator")(tasks)):
        rows.append(seed_row(seed, report))
        write_results(name, data, config, args.overrides, rows)  # a run cut short keeps what finished
    headers = ["seed", *MODELS, "ens. rel. error cut", "targets met"]
    table = [[r["seed"], *(f"{100 * r[m]:.2f}%" for m in MODELS),
              f"{100 * r['ensemble_relative_error_reduction']:.1f}%",
              ", ".join(k for k, ok in r["targets_met"].items() if ok) or "none"] for r in rows]
    stats = summary(rows)
    table.append(["mean +- sd", *(f"{100 * stats[m]['mean']:.2f} +- {100 * stats[m]['std']:.2f}" for m in MODELS),
                  f"{100 * stats['ensemble_relative_error_reduction']['mean']:.1f}%", ""])
    print(common.format_table(headers, table))
    for r in rows:
        print(f"seed {r['seed']} clusters: {r['clusters']}")
    path = write_results(name, data, config, args.overrides, rows)
    print(f"wrote {path.relative_to(common.REPO)}")


def write_results(name: str, data: str, config: Path, overrides: list[str], rows: list[dict[str, Any]]) -> Path:
    return common.write_result(name, {"machine": common.machine_info(_device(config, overrides)), "data": data,
                                      "config": str(config.relative_to(common.REPO)), "overrides": overrides,
                                      "seeds": rows, "summary": summary(rows)})


def _device(config: Path, overrides: list[str]) -> str:
    return str(resolve_device(load_config(config, overrides).device))


if __name__ == "__main__":
    main()
