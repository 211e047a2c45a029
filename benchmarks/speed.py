"""How close to the machine ensemble-kd runs, as ratios measured within one run.

    python benchmarks/speed.py           # Fashion-MNIST + digits demo, ~5 min on 2 idle cores -> results/speed.json
    python benchmarks/speed.py --quick   # digits only, under a minute                    -> results/speed_quick.json

Ratios, not absolute times, because the machine may be shared: both sides of a ratio
are measured in the same run, interleaved round by round (the order rotated each round),
and the ratio of the best (least disturbed) times is reported, with the median of the
per-round ratios beside it in the JSON.

1. fit vs plain loop: images/s of `train.fit` on the generalist against a plain PyTorch
   loop (same model and initial weights, batch size, in-memory data, AdamW). Variants of
   the plain loop that add one thing fit does at a time (gradient clipping, or a cheaper
   clipping that rescales only when the norm is over the limit; the finite check,
   loss.item() and accuracy bookkeeping; the LR scheduler), fit with its tqdm bar on, and
   fit without clipping say where any difference goes. Target >= 0.95.
2. FLOP/s: the generalist's training FLOPs (analytic, 3 x 2 x sum(in x out) per image
   for an mlp) per second, divided by a large fp32 matmul's FLOP/s measured in the same
   run; again with other batch sizes, 1 thread, and bf16 autocast.
3. distillation vs hard labels: a student epoch on kd_loss with cached teacher logits
   against a hard-label epoch of the same student. Target <= 1.15.
4. specialists: `train_all_specialists` with n_jobs=2 against n_jobs=1 on a run prepared
   up to the clusters. Target <= 0.65. The per-specialist durations of the n_jobs=1 run
   give the best ratio joblib's in-order dispatch could reach with those tasks.
5. inference: per-image time and parameters of the exported student (TorchScript and
   ONNX, through export.load_student) against the ensemble (ensemble.build_ensemble),
   at batch 1 and batch 256.
6. the demo: wall time of `ensemble-kd run --config pipelines/configs/digits.toml` as a
   subprocess. Target under 60 s. Its run directory feeds part 5.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import common
from ensemble_kd.artifacts import read_jsonl
from ensemble_kd.config import Config, load_config
from ensemble_kd.data import Splits, load_data
from ensemble_kd.losses import kd_loss
from ensemble_kd.models import build_model, count_params
from ensemble_kd.inference import predict_logits
from ensemble_kd.train import FitOptions, TrainSet, cross_entropy, fit, lr_factor, set_seed

log = logging.getLogger("speed")

CONFIGS = common.REPO / "pipelines" / "configs"
TARGETS = {"fit_over_plain": 0.95, "distill_over_hard": 1.15, "specialists_2_over_1": 0.65, "demo_seconds": 60.0}


@dataclasses.dataclass
class Plan:
    """What each part runs on and how long."""

    config: str  # pipelines/configs/<config>.toml for parts 1-3
    timing_limit: int  # training images used by parts 1-3 (0 = all)
    rounds: int  # interleaved rounds of each comparison
    epochs: int  # epochs per timed fit in parts 1 and 2
    distill_epochs: int  # epochs per timed fit in part 3
    batch_sizes: list[int]  # part 2 sweep
    flops_repeats: int  # part 2: best of this many runs of each variant
    matmul_size: int  # n of the n x n x n matmul that stands for the machine's peak
    specialists_config: str  # config of the run prepared for part 4
    specialists_overrides: list[str]  # to keep part 4 short
    specialists_repeats: int  # 1: n_jobs 1 then 2; 2: 1, 2, 2, 1 (cancels a linear drift in load)


DEFAULT = Plan(config="fashion-mnist", timing_limit=20000, rounds=5, epochs=1, distill_epochs=3,
               batch_sizes=[64, 128, 256, 512, 1024], flops_repeats=2, matmul_size=2048,
               specialists_config="fashion-mnist",
               specialists_overrides=["data.train_limit=20000", "generalist.train.epochs=3"],
               specialists_repeats=1)
QUICK = Plan(config="digits", timing_limit=0, rounds=3, epochs=15, distill_epochs=40, batch_sizes=[64, 256],
             flops_repeats=1, matmul_size=1024, specialists_config="digits", specialists_overrides=[],
             specialists_repeats=1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="digits only, fewer variants: a smoke test")
    p.add_argument("--skip", action="append", default=[], choices=["fit", "flops", "distill", "specialists",
                                                                  "inference", "demo"], help="leave a part out")
    p.add_argument("--data-root", type=Path, default=common.SHARED_DATA, help="folder holding FashionMNIST/raw/")
    return p.parse_args(argv)


def load_plan_config(name: str, data_root: Path, overrides: list[str] = ()) -> Config:
    cfg = load_config(CONFIGS / f"{name}.toml", list(overrides))
    if cfg.data.name != "digits":
        cfg.data.root = str(data_root)
    return cfg


# ---------------------------------------------------------------- part 1: fit vs a plain loop

@dataclasses.dataclass
class LoopParts:
    """What a hand-written loop adds on top of forward / backward / step."""

    clip: float = 0.0  # clip_grad_norm_ to this (0 = off)
    bookkeeping: bool = False  # fit's finite check, loss.item() and accuracy count per step
    scheduler: bool = False  # a LambdaLR stepped per batch
    scale_only_when_over: bool = False  # clip by computing the norm, and rescaling only when it exceeds `clip`


def clip_when_over(model: nn.Module, max_norm: float) -> None:
    """The cheaper clipping proposed for fit() on CPU: one read pass for the norm, a rescale only when
    the norm exceeds max_norm (clip_grad_norm_ always rescales, a second pass over every gradient)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    if norm > max_norm:
        torch._foreach_mul_(grads, max_norm / (norm + 1e-6))


def plain_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, weight_decay: float,
               batch_size: int, epochs: int, parts: LoopParts, seed: int = 0) -> float:
    """Seconds of `epochs` epochs of the plainest PyTorch loop over in-memory tensors."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(y) / batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, 0, "cosine"))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    started = time.perf_counter()
    for _ in range(epochs):
        loss_sum, correct = 0.0, 0
        for idx in torch.randperm(len(y), generator=generator).split(batch_size):
            xb, yb = x[idx], y[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            if parts.bookkeeping and not torch.isfinite(loss):
                raise FloatingPointError("loss is not finite")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if parts.clip > 0 and parts.scale_only_when_over:
                clip_when_over(model, parts.clip)
            elif parts.clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), parts.clip)
            optimizer.step()
            if parts.scheduler:
                scheduler.step()
            if parts.bookkeeping:
                loss_sum += loss.item() * len(idx)
                correct += int((logits.argmax(1) == yb).sum())
    return time.perf_counter() - started


def _quiet(work: Callable[[], Any]) -> Any:
    """Run `work` with stderr sent to /dev/null (tqdm still formats its bar, nobody sees it)."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        return work()


def timed_fit(model: nn.Module, train: TrainSet, cfg: Any, progress: bool = False, precision: str = "fp32",
              loss_fn: Callable | None = None) -> dict[str, float]:
    """Wall seconds of a whole fit() call (with its checkpoints) and of its epochs alone."""
    with tempfile.TemporaryDirectory(prefix="speed_fit_") as stage_dir:
        started = time.perf_counter()
        fit(model, train, cfg, stage_dir, FitOptions(stage="bench", seed=0, progress=progress, precision=precision,
                                                     loss_fn=loss_fn))
        wall = time.perf_counter() - started
        loop = sum(r["seconds"] for r in read_jsonl(Path(stage_dir) / "metrics.jsonl"))
    return {"wall": wall, "loop": loop}


def fit_vs_plain(cfg: Config, data: Splits, plan: Plan) -> dict[str, Any]:
    train_cfg = dataclasses.replace(cfg.generalist.train, epochs=plan.epochs, warmup_epochs=0)
    x, y = data.x_train, data.y_train
    set_seed(cfg.seed)
    initial = build_model(cfg.generalist.model, data.input_shape, data.num_classes, data.mean, data.std)
    fresh = lambda: copy.deepcopy(initial)  # noqa: E731  every run starts from the same weights
    plain = lambda parts: lambda: plain_loop(fresh(), x, y, train_cfg.lr, train_cfg.weight_decay,  # noqa: E731
                                             train_cfg.batch_size, plan.epochs, parts)
    variants: dict[str, Callable[[], float]] = {
        "plain": plain(LoopParts()),
        "plain + clip": plain(LoopParts(clip=train_cfg.grad_clip)),
        "plain + clip, rescale only when over": plain(LoopParts(clip=train_cfg.grad_clip, scale_only_when_over=True)),
        "plain + clip + bookkeeping": plain(LoopParts(clip=train_cfg.grad_clip, bookkeeping=True)),
        "plain + clip + bookkeeping + scheduler": plain(LoopParts(train_cfg.grad_clip, True, True)),
        "fit (progress off)": lambda: timed_fit(fresh(), TrainSet(x, y), train_cfg),
        "fit (tqdm on)": lambda: timed_fit(fresh(), TrainSet(x, y), train_cfg, progress=True),
        "fit (grad_clip = 0)": lambda: timed_fit(fresh(), TrainSet(x, y),
                                                 dataclasses.replace(train_cfg, grad_clip=0.0)),
    }
    for work in variants.values():  # warm-up: thread pools, allocator, oneDNN kernels
        _quiet(work)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    loop_seconds: dict[str, list[float]] = {name: [] for name in variants if name.startswith("fit")}
    names = list(variants)
    for r in range(plan.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotated: no variant always runs first
            out = _quiet(variants[name])
            seconds[name].append(out["wall"] if isinstance(out, dict) else out)
            if isinstance(out, dict):
                loop_seconds[name].append(out["loop"])
        common.log_to_stderr(f"  fit vs plain, round {r + 1}/{plan.rounds}: " +
                             ", ".join(f"{k} {v[-1]:.2f}s" for k, v in seconds.items()))
    images = plan.epochs * len(y)
    best = {name: min(v) for name, v in seconds.items()}  # the least-disturbed run of each variant
    rows = {name: {"best_seconds": round(best[name], 3), "images_per_s": round(images / best[name], 1),
                   "speed_vs_plain": round(best["plain"] / best[name], 3),
                   "median_round_ratio": round(common.median(
                       [seconds["plain"][i] / v[i] for i in range(plan.rounds)]), 3)}
            for name, v in seconds.items()}
    for name, v in loop_seconds.items():  # fit's epochs alone: without its checkpoint and model.pt writes
        rows[name]["epoch_loop_only_speed_vs_plain"] = round(best["plain"] / min(v), 3)
    ratio = rows["fit (progress off)"]["speed_vs_plain"]
    return {"model": dataclasses.asdict(cfg.generalist.model), "batch_size": train_cfg.batch_size,
            "grad_clip": train_cfg.grad_clip, "images_per_epoch": len(y), "epochs_per_timing": plan.epochs,
            "rounds": plan.rounds, "variants": rows, "fit_over_plain": ratio, "target": TARGETS["fit_over_plain"],
            "met": ratio >= TARGETS["fit_over_plain"],
            "seconds_raw": {k: [round(t, 3) for t in v] for k, v in seconds.items()},
            "fit_loop_seconds_raw": {k: [round(t, 3) for t in v] for k, v in loop_seconds.items()},
            "note": "ratios of the best (least disturbed) of `rounds` interleaved runs; speed = plain time / time"}


# ---------------------------------------------------------------- part 2: FLOP/s

def mlp_train_flops_per_image(model: nn.Module) -> int:
    """3 x forward FLOPs, forward = 2 x sum(in x out) over the Linear layers (biases, ReLU, loss ignored)."""
    forward = sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    return 3 * forward


def matmul_flops(n: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n @ n x n matmul over `repeats` (one warm-up)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best


def with_threads(threads: int, work: Callable[[], Any]) -> Any:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return work()
    finally:
        torch.set_num_threads(previous)


def measure_peaks(n: int, threads: int) -> dict[str, float]:
    """FLOP/s of an n^3 matmul in fp32 and bf16, with 1 thread and with `threads`."""
    return {f"{name}_{t}t": with_threads(t, lambda: matmul_flops(n, dtype))
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)) for t in sorted({1, threads})}


def flops(cfg: Config, data: Splits, plan: Plan) -> dict[str, Any]:
    threads = torch.get_num_threads()
    peaks = measure_peaks(plan.matmul_size, threads)
    set_seed(cfg.seed)
    initial = build_model(cfg.generalist.model, data.input_shape, data.num_classes, data.mean, data.std)
    per_image = mlp_train_flops_per_image(initial) if cfg.generalist.model.arch == "mlp" else None
    base = cfg.generalist.train.batch_size
    variants = [(f"batch {b}", b, threads, "fp32") for b in plan.batch_sizes]
    variants += [(f"batch {base}, 1 thread", base, 1, "fp32"), (f"batch {base}, bf16 autocast", base, threads, "bf16"),
                 (f"batch {max(plan.batch_sizes)}, bf16 autocast", max(plan.batch_sizes), threads, "bf16")]
    loops: dict[str, list[float]] = {name: [] for name, *_ in variants}
    for _ in range(plan.flops_repeats):
        for name, batch, n_threads, precision in variants:
            train_cfg = dataclasses.replace(cfg.generalist.train, epochs=plan.epochs, batch_size=batch, warmup_epochs=0)
            out = with_threads(n_threads, lambda: timed_fit(
                copy.deepcopy(initial), TrainSet(data.x_train, data.y_train), train_cfg, precision=precision))
            loops[name].append(out["loop"])
            common.log_to_stderr(f"  flops: {name}: {plan.epochs * len(data.y_train) / out['loop']:.0f} img/s")
    for key, value in measure_peaks(plan.matmul_size, threads).items():  # again: keep the best of both
        peaks[key] = max(peaks[key], value)
    rows = []
    for name, batch, n_threads, precision in variants:
        images_per_s = plan.epochs * len(data.y_train) / min(loops[name])
        achieved = images_per_s * per_image if per_image else None
        rows.append({"variant": name, "batch_size": batch, "threads": n_threads, "precision": precision,
                     "images_per_s": round(images_per_s, 1),
                     "gflops": round(achieved / 1e9, 2) if achieved else None,
                     "fraction_of_fp32_matmul": round(achieved / peaks[f"fp32_{n_threads}t"], 3) if achieved else None,
                     "fraction_of_bf16_matmul": round(achieved / peaks[f"bf16_{n_threads}t"], 3)
                     if achieved and precision == "bf16" else None})
    return {"model": dataclasses.asdict(cfg.generalist.model), "train_flops_per_image": per_image,
            "matmul_n": plan.matmul_size, "matmul_gflops": {k: round(v / 1e9, 1) for k, v in peaks.items()},
            "images_per_epoch": len(data.y_train), "variants": rows,
            "epochs_per_variant": plan.epochs, "repeats": plan.flops_repeats,
            "note": "images/s from fit's epoch loops (metrics.jsonl seconds, checkpoints excluded), best of "
                    "`repeats`; matmul peaks: best of a measurement before and one after"}


# ---------------------------------------------------------------- part 3: distillation vs hard labels

def distill_vs_hard(cfg: Config, data: Splits, plan: Plan) -> dict[str, Any]:
    train_cfg = dataclasses.replace(cfg.student.train, epochs=plan.distill_epochs, warmup_epochs=0)
    set_seed(cfg.seed)
    teacher = build_model(cfg.generalist.model, data.input_shape, data.num_classes, data.mean, data.std).eval()
    started = time.perf_counter()
    cached = predict_logits(teacher, data.x_train)  # the cost paid once per run, outside the epochs
    cache_seconds = time.perf_counter() - started
    set_seed(cfg.seed + 1)
    initial = build_model(cfg.student.model, data.input_shape, data.num_classes, data.mean, data.std)
    alpha, temperature = cfg.student.alpha, cfg.student.temperature
    kd = lambda s, y, t: kd_loss(s, t, y, alpha, temperature)  # noqa: E731
    hard, soft = [], []
    for r in range(plan.rounds):
        hard.append(timed_fit(copy.deepcopy(initial), TrainSet(data.x_train, data.y_train), train_cfg,
                              loss_fn=cross_entropy())["loop"])
        soft.append(timed_fit(copy.deepcopy(initial), TrainSet(data.x_train, data.y_train, cached), train_cfg,
                              loss_fn=kd)["loop"])
        common.log_to_stderr(f"  distill vs hard, round {r + 1}/{plan.rounds}: hard {hard[-1]:.2f}s, "
                             f"distill {soft[-1]:.2f}s")
    ratio = min(soft) / min(hard)  # the least-disturbed epoch of each
    return {"student": dataclasses.asdict(cfg.student.model), "params": count_params(initial),
            "batch_size": train_cfg.batch_size, "alpha": alpha, "temperature": temperature,
            "images_per_epoch": len(data.y_train), "epochs_per_timing": plan.distill_epochs,
            "hard_seconds": [round(v, 3) for v in hard], "distill_seconds": [round(v, 3) for v in soft],
            "teacher_logits_once_seconds": round(cache_seconds, 3), "distill_over_hard": round(ratio, 3),
            "median_round_ratio": round(common.median([s / h for s, h in zip(soft, hard)]), 3),
            "target": TARGETS["distill_over_hard"], "met": ratio <= TARGETS["distill_over_hard"]}


# ---------------------------------------------------------------- part 4: specialists in parallel

def specialists_parallel(plan: Plan, data_root: Path, workdir: Path) -> dict[str, Any]:
    from ensemble_kd import artifacts
    from ensemble_kd.pipeline import run_pipeline, start_run
    from ensemble_kd.specialists import (read_clusters, specialist_dir, specialist_threads,
                                         train_all_specialists)

    cfg = load_plan_config(plan.specialists_config, data_root, plan.specialists_overrides)
    run_dir = start_run(cfg, workdir / "specialists_run", overwrite=True)
    started = time.perf_counter()
    run_pipeline(cfg, run_dir, until="clusters", progress=False)
    prepare_seconds = time.perf_counter() - started
    data = load_data(cfg.data, cfg.seed)
    clusters = read_clusters(run_dir)
    order = [1, 2] if plan.specialists_repeats == 1 else [1, 2, 2, 1]
    seconds: dict[int, list[float]] = {1: [], 2: []}
    durations: dict[int, list[float]] = {}
    first_start: dict[int, float] = {}
    for n_jobs in order:
        shutil.rmtree(run_dir / artifacts.SPECIALISTS_DIR, ignore_errors=True)
        run_cfg = copy.deepcopy(cfg)
        run_cfg.specialists.n_jobs = n_jobs
        began = time.time()
        elapsed, _ = common.timed(lambda: train_all_specialists(run_cfg, run_dir, data))
        seconds[n_jobs].append(elapsed)
        # STARTED is written when a specialist starts (after its data and generalist are loaded), model.pt at its end
        starts = [(specialist_dir(run_dir, k) / "STARTED").stat().st_mtime for k in range(len(clusters))]
        durations[n_jobs] = [(specialist_dir(run_dir, k) / artifacts.MODEL_FILE).stat().st_mtime - t
                             for k, t in enumerate(starts)]
        first_start[n_jobs] = min(starts) - began
        common.log_to_stderr(f"  specialists n_jobs={n_jobs}: {elapsed:.1f}s")
    ratio = common.median(seconds[2]) / common.median(seconds[1])
    best = in_order_makespan(durations[1], 2) / sum(durations[1])
    return {"config": plan.specialists_config, "overrides": plan.specialists_overrides,
            "clusters": clusters, "train_examples": len(data.y_train),
            "threads_per_specialist": specialist_threads(cfg, len(clusters)),
            "prepare_seconds": round(prepare_seconds, 1),
            "seconds_n_jobs_1": [round(v, 2) for v in seconds[1]],
            "seconds_n_jobs_2": [round(v, 2) for v in seconds[2]],
            "specialist_seconds_n_jobs_1": [round(d, 2) for d in durations[1]],
            "specialist_seconds_n_jobs_2": [round(d, 2) for d in durations[2]],
            "seconds_to_first_start": {n: round(v, 2) for n, v in first_start.items()},
            "best_possible_ratio_in_order_dispatch": round(best, 3),
            "specialists_2_over_1": round(ratio, 3), "target": TARGETS["specialists_2_over_1"],
            "met": ratio <= TARGETS["specialists_2_over_1"]}


def in_order_makespan(durations: list[float], workers: int) -> float:
    """Finish time when tasks start in list order on whichever worker frees up first (joblib's dispatch)."""
    free_at = [0.0] * workers
    for d in durations:
        i = free_at.index(min(free_at))
        free_at[i] += d
    return max(free_at)


# ---------------------------------------------------------------- part 5: inference

@torch.no_grad()
def per_image_ms(run: Callable[[torch.Tensor], Any], x: torch.Tensor, batch_size: int, images: int,
                 repeats: int = 3) -> float:
    """Best-of-`repeats` milliseconds per image over `images` images in batches of `batch_size`."""
    x = x[:images]
    best = math.inf
    for attempt in range(repeats + 2):  # two warm-up passes: TorchScript profiles and re-optimises first calls
        started = time.perf_counter()
        for chunk in x.split(batch_size):
            run(chunk)
        if attempt >= 2:
            best = min(best, time.perf_counter() - started)
    return 1000 * best / len(x)


def inference(run_dir: Path) -> dict[str, Any]:
    from ensemble_kd.distill import load_student_model
    from ensemble_kd.ensemble import build_ensemble
    from ensemble_kd.export import load_student
    from ensemble_kd.generalist import load_generalist

    cfg = load_config(run_dir / "config.toml")
    data = load_data(cfg.data, cfg.seed)
    ensemble = build_ensemble(cfg, data, run_dir, load_generalist(cfg, data, run_dir))
    student_params = count_params(load_student_model(cfg, data, run_dir))
    runners: dict[str, Callable[[torch.Tensor], Any]] = {"ensemble (eager)": ensemble}
    for fmt, file in (("torchscript", "student.ts"), ("onnx", "student.onnx")):
        if (run_dir / "export" / file).exists():
            runners[f"student ({fmt})"] = load_student(run_dir / "export" / file).logits
    x = data.x_test
    rows = {}
    for name, run in runners.items():
        rows[name] = {"ms_per_image_batch_1": round(per_image_ms(run, x, 1, 200), 4),
                      "ms_per_image_batch_256": round(per_image_ms(run, x, 256, len(x)), 5),
                      "params": count_params(ensemble) if name.startswith("ensemble") else student_params}
    ens = rows["ensemble (eager)"]
    for name, row in rows.items():
        row["speedup_vs_ensemble_batch_1"] = round(ens["ms_per_image_batch_1"] / row["ms_per_image_batch_1"], 1)
        row["speedup_vs_ensemble_batch_256"] = round(ens["ms_per_image_batch_256"] / row["ms_per_image_batch_256"], 1)
        row["params_ratio_vs_ensemble"] = round(row["params"] / ens["params"], 4)
    return {"run_dir_config": cfg.data.name, "test_images": len(x), "models": rows}


# ---------------------------------------------------------------- part 6: the demo

def demo(out_dir: Path) -> dict[str, Any]:
    cli = Path(sys.executable).parent / "ensemble-kd"
    command = [str(cli)] if cli.exists() else [sys.executable, "-m", "ensemble_kd.cli"]
    command += ["run", "--config", str(CONFIGS / "digits.toml"), "--out", str(out_dir), "--overwrite", "--quiet"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=common.REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"the demo failed (exit {done.returncode}): {done.stderr[-2000:]}")
    stages = {}
    manifest = out_dir / "manifest.json"
    if manifest.exists():
        from ensemble_kd.artifacts import read_json
        stages = {k: round(v.get("seconds", 0), 1) for k, v in read_json(manifest).get("stages", {}).items()
                  if isinstance(v, dict)}
    return {"command": " ".join(command[:1] + command[1:]).replace(str(common.REPO) + "/", ""),
            "seconds": round(seconds, 1), "stage_seconds": stages, "target": TARGETS["demo_seconds"],
            "met": seconds < TARGETS["demo_seconds"]}


# ---------------------------------------------------------------- the report

def table(result: dict[str, Any]) -> str:
    parts = result["parts"]
    rows: list[list[Any]] = []
    if "fit" in parts:
        p = parts["fit"]
        for name, v in p["variants"].items():
            rows.append([f"1. {name}", v["images_per_s"], "img/s", v["speed_vs_plain"],
                         ">= 0.95" if name == "fit (progress off)" else "", None if name != "fit (progress off)"
                         else p["met"]])
    if "flops" in parts:
        p = parts["flops"]
        for k, v in p["matmul_gflops"].items():
            rows.append([f"2. matmul {p['matmul_n']}^3 {k}", v, "GFLOP/s", None, "", None])
        for v in p["variants"]:
            rows.append([f"2. generalist {v['variant']}", v["gflops"], "GFLOP/s", v["fraction_of_fp32_matmul"],
                         "of fp32 matmul", None])
    if "distill" in parts:
        p = parts["distill"]
        rows.append(["3. distill epoch / hard-label epoch", common.median(p["distill_seconds"]), "s",
                     p["distill_over_hard"], "<= 1.15", p["met"]])
    if "specialists" in parts:
        p = parts["specialists"]
        rows.append(["4. specialists n_jobs=2 / n_jobs=1", common.median(p["seconds_n_jobs_2"]), "s",
                     p["specialists_2_over_1"], "<= 0.65", p["met"]])
        rows.append(["4. (best possible, in-order dispatch)", None, "", p["best_possible_ratio_in_order_dispatch"],
                     "", None])
    if "inference" in parts:
        for name, v in parts["inference"]["models"].items():
            rows.append([f"5. {name} batch 1", v["ms_per_image_batch_1"], "ms/img",
                         v["speedup_vs_ensemble_batch_1"], "x faster", None])
            rows.append([f"5. {name} batch 256", v["ms_per_image_batch_256"], "ms/img",
                         v["speedup_vs_ensemble_batch_256"], "x faster", None])
            rows.append([f"5. {name} parameters", v["params"], "", v["params_ratio_vs_ensemble"], "of ensemble", None])
    if "demo" in parts:
        p = parts["demo"]
        rows.append(["6. digits demo (ensemble-kd run)", p["seconds"], "s", None, "< 60 s", p["met"]])
    return common.format_table(["measure", "value", "unit", "ratio", "target / meaning", "met"], rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    plan = dataclasses.replace(QUICK if args.quick else DEFAULT)
    cfg = load_plan_config(plan.config, args.data_root)
    if cfg.data.name != "digits" and not (args.data_root / "FashionMNIST" / "raw").is_dir():
        common.log_to_stderr(f"FashionMNIST not found under {args.data_root}; using digits for parts 1-4")
        plan = dataclasses.replace(QUICK, rounds=plan.rounds)
        cfg = load_plan_config(plan.config, args.data_root)
    cfg.data.train_limit = plan.timing_limit
    started = time.perf_counter()
    machine = common.machine_info("cpu")
    parts: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="speed_") as tmp:
        workdir = Path(tmp)
        demo_dir = workdir / "demo"
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("demo", lambda: demo(demo_dir)),
            ("inference", lambda: inference(demo_dir)),
            ("fit", lambda: fit_vs_plain(cfg, data(), plan)),
            ("flops", lambda: flops(cfg, data(), plan)),
            ("distill", lambda: distill_vs_hard(cfg, data(), plan)),
            ("specialists", lambda: specialists_parallel(plan, args.data_root, workdir)),
        ]
        loaded: list[Splits] = []

        def data() -> Splits:
            if not loaded:
                loaded.append(load_data(cfg.data, cfg.seed))
            return loaded[0]

        for name, work in steps:
            if name in args.skip or (name == "inference" and "demo" in args.skip):
                continue
            common.log_to_stderr(f"{name} (load average {common.load_average()})")
            seconds, parts[name] = common.timed(work)
            parts[name]["part_seconds"] = round(seconds, 1)
            parts[name]["load_average_1min_after"] = common.load_average()
    result = {"benchmark": "speed", "machine": machine,
              "config": {"quick": args.quick, "plan": dataclasses.asdict(plan), "data": cfg.data.name,
                         "timing_train_limit": plan.timing_limit, "skip": args.skip},
              "parts": parts, "total_seconds": round(time.perf_counter() - started, 1)}
    print(table(result))
    path = common.write_result("speed_quick" if args.quick else "speed", result)
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
