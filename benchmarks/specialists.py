"""Does each stage earn its keep? Generalist, ensemble and three students over several seeds.

    python benchmarks/specialists.py                       # fashion-mnist, seeds 0 1 2
    python benchmarks/specialists.py --data cifar10-jpeg    # CIFAR-10 JPEGs (hours on 2 CPU cores)
    python benchmarks/specialists.py --quick                # digits, 2 seeds, about a minute

Each seed is one full `ensemble-kd` run (pipelines/configs/<data>.toml) into
benchmarks/cache/runs/<data>-seed<k>; a finished run is reused (--resume), so the script
can be stopped and restarted. Prints per-seed test accuracies, mean and spread, the gain
by number of covering specialists (Table 4 of Hinton et al. 2015) and the clusters, and
writes benchmarks/results/specialists_<data>.json. Targets (issue 5): the ensemble's test
error at least 5% lower (relative) than the generalist's, and the student distilled from
the ensemble better than both baseline students, in every seed.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import common

from ensemble_kd import artifacts
from ensemble_kd.config import load_config
from ensemble_kd.pipeline import run_pipeline, start_run

MODELS = ("generalist", "ensemble", "student", "student_from_generalist", "student_hard_labels")


def run_seed(config: Path, seed: int, out: Path, overrides: list[str]) -> dict[str, Any]:
    cfg = load_config(config, [f"seed={seed}", *overrides])
    resume = (out / artifacts.CONFIG_FILE).exists()
    run_dir = start_run(cfg, out, resume=resume, overwrite=False)
    elapsed, report = common.timed(lambda: run_pipeline(cfg, run_dir, progress=False))
    report["seconds"] = elapsed
    return report


def seed_row(seed: int, report: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"seed": seed, "seconds": round(report["seconds"], 1), "clusters": report["clusters"]}
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
    args = parser.parse_args()
    data, seeds = ("digits", [0, 1]) if args.quick else (args.data, args.seeds)
    config = common.REPO / "pipelines" / "configs" / f"{data}.toml"
    rows = []
    for seed in seeds:
        common.log_to_stderr(f"{data} seed {seed} ...")
        out = common.REPO / "benchmarks" / "cache" / "runs" / f"{data}-seed{seed}"
        rows.append(seed_row(seed, run_seed(config, seed, out, args.overrides)))
    headers = ["seed", *MODELS, "ens. rel. error cut", "targets met"]
    table = [[r["seed"], *(f"{100 * r[m]:.2f}%" for m in MODELS), f"{100 * r['ensemble_relative_error_reduction']:.1f}%",
              ", ".join(k for k, ok in r["targets_met"].items() if ok) or "none"] for r in rows]
    stats = summary(rows)
    table.append(["mean +- sd", *(f"{100 * stats[m]['mean']:.2f} +- {100 * stats[m]['std']:.2f}" for m in MODELS),
                  f"{100 * stats['ensemble_relative_error_reduction']['mean']:.1f}%", ""])
    print(common.format_table(headers, table))
    for r in rows:
        print(f"seed {r['seed']} clusters: {r['clusters']}")
    name = "specialists_quick" if args.quick else f"specialists_{data}"
    path = common.write_result(name, {"machine": common.machine_info(), "data": data, "config": str(config),
                                      "overrides": args.overrides, "seeds": rows, "summary": stats})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
