"""Does bf16 keep the accuracy? fp32 against bf16 autocast on the Fashion-MNIST CNN.

    python benchmarks/precision.py [--threads 1]   # seeds 0 and 1, fp32 and bf16: about an hour on 2 cores
    python benchmarks/precision.py --quick    # 6,000 training images, 2 epochs, seed 0: a smoke run

Each (precision, seed) trains the generalist of pipelines/configs/fashion-mnist.toml as a
CNN (model.arch = "cnn", channels [32, 64], dropout 0.1, data.crop_pad = 2, 8 epochs at
lr 2e-3, batch 128) into benchmarks/cache/precision/<precision>-seed<k> (a finished or
interrupted run there is resumed) and measures its test accuracy. The runs are
interleaved (fp32 then bf16 for each seed). Target (issue 17): the mean bf16 test
accuracy within 0.2 points of fp32's over the seeds; `precision = "auto"` may pick bf16
for this model only if it is. The JSON also records what "auto" resolves to for the
model on this machine, and each run's mean epoch seconds (measured beside other work:
speed.py gives the speed ratios). Writes benchmarks/results/precision[_quick].json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import common
import torch

from ensemble_kd import artifacts
from ensemble_kd.config import load_config
from ensemble_kd.data import load_data
from ensemble_kd.generalist import load_generalist, new_generalist, train_generalist
from ensemble_kd.inference import evaluate
from ensemble_kd.pipeline import start_run
from ensemble_kd.precision import training_precision

CONFIG = common.REPO / "pipelines" / "configs" / "fashion-mnist.toml"
CACHE = common.REPO / "benchmarks" / "cache" / "precision"
CNN = ["generalist.model.arch=cnn", "generalist.model.channels=[32, 64]", "generalist.model.dropout=0.1",
       "data.crop_pad=2", "generalist.train.epochs=8", "generalist.train.lr=2e-3", "generalist.train.batch_size=128"]
QUICK = ["data.train_limit=6000", "generalist.train.epochs=2"]
TARGET_POINTS = 0.2  # largest allowed |mean bf16 accuracy - mean fp32 accuracy|, in points


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="6,000 training images, 2 epochs, one seed")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 (quick: 0)")
    p.add_argument("--data-root", type=Path, default=common.SHARED_DATA, help="folder holding FashionMNIST/raw/")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default); 1 keeps "
                   "a machine shared with other work from thrashing")
    return p.parse_args(argv)


def run_one(precision: str, seed: int, overrides: list[str], data_root: Path, quick: bool) -> dict[str, Any]:
    """Train (or resume) one generalist and measure it on the test set."""
    cfg = load_config(CONFIG, [*CNN, *overrides, f"precision={precision}", f"seed={seed}",
                               f"data.root={data_root}"])
    out = CACHE / f"{'quick-' if quick else ''}{precision}-seed{seed}"
    run_dir = start_run(cfg, out, resume=(out / artifacts.CONFIG_FILE).exists())
    data = load_data(cfg.data, cfg.seed)
    seconds, _ = common.timed(lambda: train_generalist(cfg, data, run_dir, progress=False))
    model = load_generalist(cfg, data, run_dir)
    records = artifacts.read_jsonl(run_dir / artifacts.GENERALIST_DIR / artifacts.METRICS_FILE)
    saved = artifacts.load_torch(run_dir / artifacts.GENERALIST_DIR / artifacts.MODEL_FILE)
    return {"precision": precision, "seed": seed, "run_dir": str(out.relative_to(common.REPO)),
            "test_accuracy": evaluate(model, data.x_test, data.y_test).accuracy,
            "val_accuracy_last_epoch": records[-1].get("val_accuracy"),
            "train_loss_last_epoch": records[-1]["loss"],
            "precision_in_model_file": saved.get("precision", "fp32"),
            "mean_epoch_seconds": round(statistics.mean(r["seconds"] for r in records), 1),
            "seconds_this_call": round(seconds, 1)}


def auto_choice(data_root: Path) -> str:
    """What precision = "auto" picks for this CNN at batch 128 on this machine's CPU."""
    cfg = load_config(CONFIG, [*CNN, *QUICK, f"data.root={data_root}"])
    data = load_data(cfg.data, cfg.seed)
    return training_precision("auto", "cpu", new_generalist(cfg, data), data.x_train,
                              cfg.generalist.train.batch_size)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.data_root / "FashionMNIST" / "raw").is_dir():
        common.log_to_stderr(f"FashionMNIST not found under {args.data_root}; pass --data-root")
        return 2
    seeds = args.seeds or ([0] if args.quick else [0, 1])
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    overrides = QUICK if args.quick else []
    machine = common.machine_info("cpu")
    runs = []
    for seed in seeds:
        for precision in ("fp32", "bf16"):
            common.log_to_stderr(f"{precision}, seed {seed} (load average {common.load_average()})")
            runs.append(run_one(precision, seed, overrides, args.data_root, args.quick))
            common.log_to_stderr(f"  test accuracy {runs[-1]['test_accuracy']:.4f}")
    accuracy = {p: {r["seed"]: r["test_accuracy"] for r in runs if r["precision"] == p} for p in ("fp32", "bf16")}
    per_seed = {s: round(100 * (accuracy["bf16"][s] - accuracy["fp32"][s]), 2) for s in seeds}
    difference = 100 * (statistics.mean(accuracy["bf16"].values()) - statistics.mean(accuracy["fp32"].values()))
    result = {"benchmark": "precision", "machine": machine,
              "config": {"file": str(CONFIG.relative_to(common.REPO)), "overrides": [*CNN, *overrides],
                         "seeds": seeds, "quick": args.quick, "torch_threads": torch.get_num_threads()},
              "runs": runs, "bf16_minus_fp32_points_per_seed": per_seed,
              "bf16_minus_fp32_points_mean": round(difference, 2), "target_points": TARGET_POINTS,
              "parity": abs(difference) <= TARGET_POINTS, "auto_resolves_to": auto_choice(args.data_root),
              "load_average_1min_at_end": common.load_average()}
    rows = [[r["precision"], r["seed"], 100 * r["test_accuracy"], r["mean_epoch_seconds"]] for r in runs]
    rows.append(["bf16 - fp32 (mean)", None, round(difference, 2), None])
    print(common.format_table(["precision", "seed", "test accuracy %", "s per epoch"], rows))
    print(f"parity (|difference| <= {TARGET_POINTS} points): {result['parity']}; auto -> {result['auto_resolves_to']}")
    print(f"\nresults: {common.write_result('precision_quick' if args.quick else 'precision', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
