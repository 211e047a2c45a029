"""Student size against accuracy: the student from the ensemble, from the generalist, and on hard labels.

    python benchmarks/students.py                                  # fashion-mnist runs 0 1 2, every size
    python benchmarks/students.py --sizes compact --student-seeds 11 12 13 --jobs 2
    python benchmarks/students.py --quick                          # digits runs 0 1 (after specialists.py --quick)

Takes the finished runs of benchmarks/specialists.py (benchmarks/cache/runs/<data>-seed<k>; a
run stopped after its ensemble, `--until ensemble`, will do) and, for each student size and
each run and student seed, trains three students of that size that differ only in their
teacher: the run's ensemble, its generalist, and none (hard labels). Every student trains
for the same number of epochs (the recipe's `student.train.epochs`). The student from the
ensemble uses the committed recipe's student settings (pipelines/configs/<data>.toml, which
may be newer than the runs) and its transfer method; each baseline is trained with every method of
METHODS (the recipe's, and the plain training images) and reported at its best, so that no
baseline is handicapped by a transfer chosen for the ensemble.

Sizes: the recipe's compact student, one in between, and the generalist's own architecture.
For each: parameters, CPU latency for one image (one thread, batch of one), and the mean test
accuracy over runs and student seeds of each teacher's student; the compact size also gets the
95% confidence interval of the paired difference, student from the ensemble minus the best
hard-label student. The generalist and the ensemble are the reference points.

Students are trained in benchmarks/cache/students/<run>/ and reused, so the script can be
stopped and restarted. Writes benchmarks/results/students_<data>.json and a plot beside it
(accuracy against parameters and against latency).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
from pathlib import Path
from typing import Any

import common
import torch
from joblib import Parallel, delayed
from scipy import stats

from ensemble_kd import artifacts
from ensemble_kd.config import Config, flatten, load_config
from ensemble_kd.data import load_data
from ensemble_kd.distill import FROM_GENERALIST, HARD_LABELS, STUDENT, new_student
from ensemble_kd.ensemble import build_ensemble
from ensemble_kd.evaluation import ms_per_image
from ensemble_kd.generalist import load_generalist
from ensemble_kd.inference import evaluate
from ensemble_kd.models import count_params

KINDS = {STUDENT: "from_ensemble", FROM_GENERALIST: "from_generalist", HARD_LABELS: "hard_labels"}
METHODS = {"recipe": [], "plain": ["student.transfer=dataset", "student.plain_epochs=0"]}  # the baselines' transfers
CACHE = common.REPO / "benchmarks" / "cache"


def sizes(cfg: Config) -> dict[str, list[str]]:
    """Size name -> overrides of the student's architecture: the recipe's, one in between (the geometric mean
    of each width), and the generalist's own architecture (every setting of generalist.model)."""
    widths = "channels" if cfg.student.model.arch == "cnn" else "hidden"
    compact, big = getattr(cfg.student.model, widths), getattr(cfg.generalist.model, widths)
    # the generalist's depth, each width the geometric mean of the compact student's and the generalist's
    middle = [round((compact[min(i, len(compact) - 1)] * b) ** 0.5) for i, b in enumerate(big)]
    same = [f"student.model.{f.name}={_toml(getattr(cfg.generalist.model, f.name))}"
            for f in dataclasses.fields(cfg.generalist.model)]
    return {"compact": [], "middle": [f"student.model.{widths}={_toml(middle)}"], "generalist": same}


def _toml(value: Any) -> str:
    """A setting's value as `--set` reads it."""
    return json.dumps(value, separators=(",", ":")) if not isinstance(value, str) else value


def run_dir(data: str, seed: int) -> Path:
    path = CACHE / "runs" / f"{data}-seed{seed}"
    if not (path / artifacts.SPECIALISTS_DIR).is_dir():
        raise SystemExit(f"{path} holds no run with specialists; make it first with "
                         f"`python benchmarks/specialists.py --data {data} --seeds {seed}`")
    return path


def plans(kinds_methods: dict[str, list[str]], size_names: list[str], runs: list[int],
          seeds: list[int]) -> list[tuple[str, str, str, int, int]]:
    """(size, kind, method, run, student seed) of every student to train."""
    return [(size, kind, method, run, seed) for size in size_names for kind, methods in kinds_methods.items()
            for method in methods for run in runs for seed in seeds]


def hard_label_methods(data: str, run: int) -> list[str]:
    """The methods that train a hard-label student differently: without a teacher, the recipe's transfer is the
    plain images already when it is "dataset" or "view_mean" (the teacher's views only shape its targets)."""
    transfer = load_config(run_dir(data, run) / artifacts.CONFIG_FILE, recipe_student(data)).student.transfer
    return ["plain"] if transfer in ("dataset", "view_mean") else list(METHODS)


def recipe_student(data: str) -> list[str]:
    """The committed recipe's student settings (pipelines/configs/<data>.toml, all but its architecture) as
    overrides: the runs may have been made with an earlier recipe, and every student here trains as today's."""
    cfg = load_config(common.REPO / "pipelines" / "configs" / f"{data}.toml")
    return [f"{key}={_toml(value)}" for key, value in flatten(cfg.student, "student.").items()
            if not key.startswith("student.model.")]


def train_one(data: str, size: str, kind: str, method: str, run: int, seed: int, threads: int) -> dict[str, Any]:
    """One student's test accuracy (trained, or read back from the cache)."""
    torch.set_num_threads(threads)
    path = run_dir(data, run)
    overrides = [*recipe_student(data), *sizes(load_config(path / artifacts.CONFIG_FILE))[size], *METHODS[method]]
    accuracy, _ = common.train_extra_student(path, kind, seed, overrides, folder=f"{size}-{method}-{kind}-seed{seed}")
    return {"size": size, "kind": kind, "method": method, "run": run, "student_seed": seed, "accuracy": accuracy}


def cells(results: list[dict[str, Any]], size: str, kind: str) -> dict[str, dict[str, Any]]:
    """method -> mean accuracy and the students, for one size and teacher."""
    out = {}
    for method in METHODS:
        rows = [r for r in results if (r["size"], r["kind"], r["method"]) == (size, kind, method)]
        if rows:
            out[method] = {"mean": statistics.fmean(r["accuracy"] for r in rows), "students": rows}
    return out


def paired_ci(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Mean paired difference (ours minus theirs, paired by run and student seed) and its 95% t interval."""
    by_key = {(r["run"], r["student_seed"]): r["accuracy"] for r in theirs}
    diffs = [r["accuracy"] - by_key[r["run"], r["student_seed"]] for r in ours
             if (r["run"], r["student_seed"]) in by_key]
    if len(diffs) < 2:
        return None
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = float(stats.t.ppf(0.975, len(diffs) - 1)) * sd / len(diffs) ** 0.5
    return {"pairs": len(diffs), "mean": mean, "ci95": [mean - half, mean + half], "wins": sum(d > 0 for d in diffs)}


@torch.no_grad()
def latency_ms(model: torch.nn.Module, input_shape: tuple[int, ...]) -> float:
    """CPU milliseconds for one image, batch of one, one thread (best of a few repeats)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return ms_per_image(model.cpu().eval(), torch.rand(64, *input_shape), batch_size=1, repeats=5)
    finally:
        torch.set_num_threads(threads)


def references(data: str, runs: list[int]) -> dict[str, dict[str, Any]]:
    """The generalist and the ensemble: parameters, latency and mean test accuracy over the runs."""
    out: dict[str, dict[str, Any]] = {}
    for run in runs:
        path = run_dir(data, run)
        cfg = load_config(path / artifacts.CONFIG_FILE)
        split = load_data(cfg.data, cfg.seed)
        generalist = load_generalist(cfg, split, path)
        ensemble = build_ensemble(cfg, split, path, generalist)
        for name, model in (("generalist", generalist), ("ensemble", ensemble)):
            entry = out.setdefault(name, {"accuracies": []})
            entry["accuracies"].append(evaluate(model.cpu(), split.x_test, split.y_test).accuracy)
            if "params" not in entry:
                entry["params"] = count_params(model)
                entry["ms_per_image"] = latency_ms(model, split.input_shape)
    for entry in out.values():
        entry["accuracy"] = statistics.fmean(entry["accuracies"])
    return out


def size_model(cfg_path: Path, size: str, data: Any) -> torch.nn.Module:
    """A fresh student of `size` (for its parameters and latency)."""
    cfg = load_config(cfg_path, sizes(load_config(cfg_path))[size])
    return new_student(cfg, data, load_weights=False)


def size_entry(size: str, model: torch.nn.Module, input_shape: tuple[int, ...], generalist_params: int,
               results: list[dict[str, Any]]) -> dict[str, Any]:
    """One size's row: its model, each teacher's student at its best method, and the comparisons."""
    entry: dict[str, Any] = {"size": size, "params": count_params(model),
                             "ms_per_image": latency_ms(model, input_shape)}
    if entry["params"] == generalist_params and size == "generalist":
        entry["same_architecture_as_generalist"] = True
    best_method = {}
    for kind, key in KINDS.items():
        per_method = cells(results, size, kind)
        if per_method:
            best_method[key] = max(per_method, key=lambda m: per_method[m]["mean"])
            entry[key] = per_method[best_method[key]]["mean"]
            entry[f"{key}_by_method"] = {m: c["mean"] for m, c in per_method.items()}
            entry[f"{key}_students"] = len(per_method[best_method[key]]["students"])
    entry["best_method"] = best_method
    ours = cells(results, size, STUDENT).get("recipe")
    for key, kind in (("hard_labels", HARD_LABELS), ("from_generalist", FROM_GENERALIST)):
        if ours and key in best_method:
            theirs = cells(results, size, kind)[best_method[key]]["students"]
            entry[f"ci95_vs_{key}"] = paired_ci(ours["students"], theirs)
    return entry


def plot(result: dict[str, Any], path: Path) -> Path:
    """Accuracy against parameters and against one-image CPU latency, with the teachers as reference points."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, x_key, label in ((axes[0], "params", "parameters"), (axes[1], "ms_per_image", "CPU ms for one image")):
        for key, style in (("from_ensemble", "^-"), ("from_generalist", "v--"), ("hard_labels", "D:")):
            points = [(s[x_key], 100 * s[key]) for s in result["sizes"] if key in s]
            if points:
                ax.plot(*zip(*points), style, label=f"student {key.replace('_', ' ')}")
        for name, marker in (("generalist", "o"), ("ensemble", "s")):
            ref = result[name]
            ax.plot(ref[x_key], 100 * ref["accuracy"], marker, color="black", markerfacecolor="none", markersize=9)
            ax.annotate(name, (ref[x_key], 100 * ref["accuracy"]), textcoords="offset points", xytext=(6, 4))
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # the log axis' minor labels overlap
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{result['data']}: students by size (mean over {result['students_per_cell']} students a cell)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="fashion-mnist", help="a config name in pipelines/configs/")
    parser.add_argument("--runs", type=int, nargs="+", default=[0, 1, 2], help="seeds of finished runs")
    parser.add_argument("--student-seeds", type=int, nargs="+", default=[11, 12, 13])
    parser.add_argument("--sizes", nargs="+", choices=["compact", "middle", "generalist"],
                        default=["compact", "middle", "generalist"])
    parser.add_argument("--jobs", type=int, default=2,
                        help="students trained at once (cores / jobs torch threads each)")
    parser.add_argument("--quick", action="store_true", help="digits runs 0 and 1, student seeds 11 and 12")
    args = parser.parse_args()
    data, runs, seeds = ("digits", [0, 1], [11, 12]) if args.quick else (args.data, args.runs, args.student_seeds)
    tasks = plans({STUDENT: ["recipe"], FROM_GENERALIST: list(METHODS), HARD_LABELS: hard_label_methods(data, runs[0])},
                  args.sizes, runs, seeds)
    common.log_to_stderr(f"{len(tasks)} students, {args.jobs} at a time ...")
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    results = list(Parallel(n_jobs=args.jobs)(delayed(train_one)(data, *task, threads) for task in tasks))
    cfg_path = run_dir(data, runs[0]) / artifacts.CONFIG_FILE
    split = load_data(load_config(cfg_path).data, 0)
    result: dict[str, Any] = {"machine": common.machine_info(), "data": data, "runs": runs, "student_seeds": seeds,
                              "students_per_cell": len(runs) * len(seeds),
                              "epochs": load_config(cfg_path, recipe_student(data)).student.train.epochs,
                              **references(data, runs)}
    result["sizes"] = sorted((size_entry(size, size_model(cfg_path, size, split), split.input_shape,
                                         result["generalist"]["params"], results) for size in args.sizes),
                             key=lambda e: e["params"])
    result["students"] = results
    print(format_result(result))
    name = "students_quick" if args.quick else f"students_{data}"
    path = common.write_result(name, result)
    print(f"wrote {path} and {plot(result, path.with_suffix('.png'))}")


def format_result(result: dict[str, Any]) -> str:
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    rows = [[s["size"], s["params"], s["ms_per_image"], pct(s.get("from_ensemble")), pct(s.get("from_generalist")),
             pct(s.get("hard_labels")), _ci_text(s.get("ci95_vs_hard_labels"))] for s in result["sizes"]]
    rows += [[name, result[name]["params"], result[name]["ms_per_image"], pct(result[name]["accuracy"]), "", "", ""]
             for name in ("generalist", "ensemble")]
    return common.format_table(["size", "params", "ms / image", "from ensemble", "from generalist (best)",
                                "hard labels (best)", "ens - hard, 95% CI"], rows)


def _ci_text(ci: dict[str, Any] | None) -> str:
    if not ci:
        return "-"
    low, high = ci["ci95"]
    return f"{100 * ci['mean']:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}] ({ci['pairs']} pairs)"


if __name__ == "__main__":
    main()
