"""How close to the machine ensemble-kd runs, as ratios measured within one run.

    python benchmarks/speed.py                    # Fashion-MNIST + digits demo, ~15 min on 2 idle cores
    python benchmarks/speed.py --quick            # digits (and a small CNN row), a few minutes
    python benchmarks/speed.py --device cuda [--quick] [--compile]   # the ratios on a GPU
    python benchmarks/speed.py --baseline 4762fcc # also time the demo of that commit, interleaved

Writes benchmarks/results/speed[_cuda][_quick].json. Ratios, not absolute times, because
the machine may be shared: both sides of a ratio are measured in the same run,
interleaved round by round (the order rotated each round), and the ratio of the best
(least disturbed) times is reported, with the median of the per-round ratios beside it
in the JSON and the load average before and after each part.

1. fit vs plain loop (`fit_over_plain_clipped`, `clip_cost_ratio`): images/s of
   `train.fit` on the generalist against a plain PyTorch loop over the same in-memory
   tensors that clips the same way (same model, initial weights, batch size, precision,
   optimizer from `train.make_optimizer`, `train.clip_grad_norm`). fit's time is its epoch
   loop (metrics.jsonl seconds: everything per epoch but the checkpoint and metrics
   writes); its whole call, checkpoints and model.pt included, is reported beside it.
   Variants say where any difference goes: no clipping, a LambdaLR, torch's default
   AdamW and clip_grad_norm_, fit with its tqdm bar, fit without clipping.
   Targets: >= 0.95 (full), >= 0.9 (--quick); clipping >= 0.9.
2. FLOP/s: the generalist's training FLOPs (torch's FlopCounterMode on a forward and
   backward pass) per second, against an n x n matmul in the same precision measured in
   the same run; other batch sizes, 1 thread, bf16 autocast.
3. CNN: the Fashion-MNIST CNN ([32, 64], batch 128, 2-pixel crops) through fit: fp32 as
   it trained before issue 17 (contiguous memory format), fp32 channels-last, bf16
   contiguous, and `precision = "auto"`; images/s and the share of the matching matmul
   peak. `cnn_auto_over_fp32_today` >= 1.8. A CIFAR ResNet-8 checks channels-last there.
4. distillation vs hard labels: a student epoch on kd_loss with cached teacher logits
   (their log-probabilities at T computed once, as distill does) against a hard-label
   epoch of the same student. Target <= 1.15.
5. specialists (CPU): `train_all_specialists` with n_jobs=2 against n_jobs=1 on a run of
   the committed pipelines/configs/<specialists_config>.toml prepared up to the clusters
   (the full mode: fashion-mnist.toml, the CNN recipe, on 20,000 images with 2 specialist
   epochs instead of 8). Target <= 0.62. Each specialist trains on its fixed share of the
   cores in both (`specialist_threads`), so the ratio is the balance of the longest-first
   dispatch (`best_possible_ratio_longest_first`) times how much a specialist slows down
   beside another (`slowdown_beside_another`: its time at n_jobs=2 over its time alone).
6. inference (CPU): per-image time and parameters of the exported student (TorchScript
   and ONNX) against the ensemble, at batch 1 and 256.
7. the demo (CPU): wall time of `ensemble-kd run --config pipelines/configs/digits.toml`,
   and with --baseline REV the same demo from that commit (git archive), interleaved.
8. --compile: fit with `compile_model` against eager, MLP and CNN: first epoch (which
   compiles) and the best later epoch.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import logging
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import common
import torch
import torch.nn.functional as F
from joblib.externals.loky import get_reusable_executor
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ensemble_kd import artifacts
from ensemble_kd import train as train_module
from ensemble_kd.artifacts import read_json, read_jsonl
from ensemble_kd.augment import Augmentation, BatchFn
from ensemble_kd.config import Config, ModelConfig, TrainConfig, load_config
from ensemble_kd.confusion import read_clusters
from ensemble_kd.data import Splits, augment_batch, load_data
from ensemble_kd.distill import load_student_model
from ensemble_kd.ensemble import build_ensemble
from ensemble_kd.export import load_student
from ensemble_kd.generalist import load_generalist
from ensemble_kd.inference import predict_logits
from ensemble_kd.losses import KDLoss, teacher_log_probs
from ensemble_kd.models import build_model, count_params
from ensemble_kd.pipeline import run_pipeline, start_run
from ensemble_kd.precision import training_precision
from ensemble_kd.specialists import dispatch_order, specialist_dir, specialist_threads, train_all_specialists
from ensemble_kd.train import (
    FitOptions,
    TrainSet,
    clip_grad_norm,
    cross_entropy,
    fit,
    lr_factor,
    make_optimizer,
    set_seed,
)

log = logging.getLogger("speed")

CONFIGS = common.REPO / "pipelines" / "configs"
TARGETS = {"fit_over_plain_clipped": 0.95, "fit_over_plain_clipped_quick": 0.9, "clip_cost_ratio": 0.9,
           "distill_over_hard": 1.15, "cnn_auto_over_fp32_today": 1.8, "specialists_2_over_1": 0.62,
           "demo_seconds_before": 15.6}
CNN = ModelConfig(arch="cnn", channels=[32, 64], dropout=0.1)  # the Fashion-MNIST CNN of issue 17
RESNET = ModelConfig(arch="resnet", depth=8, width=16)


@dataclasses.dataclass
class Plan:
    """What each part runs on and how long."""

    config: str  # pipelines/configs/<config>.toml for parts 1, 2 and 4
    timing_limit: int  # training images used by parts 1, 2 and 4 (0 = all)
    rounds: int  # interleaved rounds of each comparison in parts 1 and 4
    epochs: int  # epochs per timed fit in parts 1 and 2
    distill_epochs: int  # epochs per timed fit in part 4
    batch_sizes: list[int]  # part 2 sweep
    flops_repeats: int  # part 2: best of this many runs of each variant
    matmul_size: int  # n of the n x n x n matmul that stands for the machine's peak
    cnn_images: int  # part 3: Fashion-MNIST training images per timed epoch of the CNN
    resnet_images: int  # part 3: CIFAR-shaped images per timed epoch of the ResNet-8
    cnn_rounds: int  # part 3: interleaved rounds
    specialists_config: str  # config of the run prepared for part 5
    specialists_overrides: list[str]  # to keep part 5 short
    specialists_repeats: int  # 1: n_jobs 1 then 2; 2: 1, 2, 2, 1 (cancels a linear drift in load)
    demo_rounds: int  # part 7: interleaved rounds (with --baseline)
    compile_epochs: int  # part 8: epochs per fit (the first one compiles)


# Parts 1, 2 and 4 on the MLP recipe (fashion-mnist-mlp.toml): the small models whose per-step overhead issue 17
# measured. Part 5 on the committed CNN recipe (fashion-mnist.toml) on 20,000 images, its specialists 2 epochs
DEFAULT = Plan(config="fashion-mnist-mlp", timing_limit=20000, rounds=5, epochs=1, distill_epochs=3,
               batch_sizes=[64, 128, 256, 512, 1024], flops_repeats=2, matmul_size=2048, cnn_images=6144,
               resnet_images=1024, cnn_rounds=3, specialists_config="fashion-mnist",
               specialists_overrides=["data.train_limit=20000", "generalist.train.epochs=2",
                                      "specialists.train.epochs=2"], specialists_repeats=2,
               demo_rounds=3,
               compile_epochs=3)
QUICK = Plan(config="digits", timing_limit=0, rounds=5, epochs=40, distill_epochs=40, batch_sizes=[64, 256],
             flops_repeats=1, matmul_size=1024, cnn_images=1536, resnet_images=256, cnn_rounds=2,
             specialists_config="digits", specialists_overrides=[], specialists_repeats=1, demo_rounds=2,
             compile_epochs=2)
PARTS = ["fit", "flops", "cnn", "distill", "specialists", "inference", "demo", "compile"]
CPU_ONLY = ("specialists", "inference", "demo")  # measures of the CPU pipeline: skipped with --device cuda


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="digits and small CNN timings: a smoke test")
    p.add_argument("--skip", action="append", default=[], choices=PARTS, help="leave a part out")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where parts 1-4 and 8 train")
    p.add_argument("--compile", action="store_true", help="part 8: torch.compile against eager (minutes on CPU)")
    p.add_argument("--baseline", default=None, help="a git revision whose demo is timed beside this one")
    p.add_argument("--data-root", type=Path, default=common.SHARED_DATA, help="folder holding FashionMNIST/raw/")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads of the in-process parts (0 = torch's "
                   "default); parts 1 and 4 use the config's `threads` where it sets one (digits: 1)")
    return p.parse_args(argv)


def load_plan_config(name: str, data_root: Path, overrides: list[str] = ()) -> Config:
    cfg = load_config(CONFIGS / f"{name}.toml", list(overrides))
    if cfg.data.name != "digits":
        cfg.data.root = str(data_root)
    return cfg


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def with_threads(threads: int, work: Callable[[], Any]) -> Any:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return work()
    finally:
        torch.set_num_threads(previous)


@dataclasses.dataclass
class Run:
    """One timed call of a variant: its training loop, and the whole call (fit: with its checkpoints).

    CPU seconds (time.process_time, all threads) tell, with one thread, what the work itself
    cost whatever else ran on the machine; wall seconds are what the issue's targets name."""

    seconds: float  # wall seconds of the training loop (fit: its epochs, from metrics.jsonl)
    cpu: float  # CPU seconds of the training loop (fit: inside train._train_epoch)
    wall: float  # wall seconds of the whole call
    cpu_call: float  # CPU seconds of the whole call


def timed_run(work: Callable[[], Any]) -> Run:
    wall, cpu = time.perf_counter(), time.process_time()
    out = _quiet(work)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if isinstance(out, dict):  # timed_fit
        return Run(out["loop"], out["loop_cpu"], wall, cpu)
    loop_wall, loop_cpu = out  # plain_loop
    return Run(loop_wall, loop_cpu, wall, cpu)


def interleaved(variants: dict[str, Callable[[], Any]], rounds: int, label: str) -> dict[str, list[Run]]:
    """Each variant once per round, the order rotated each round, after one warm-up run of each."""
    for work in variants.values():  # thread pools, allocator, oneDNN kernels
        _quiet(work)
    results: dict[str, list[Run]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # no variant always runs first
            results[name].append(timed_run(variants[name]))
        common.log_to_stderr(f"  {label}, round {r + 1}/{rounds}: " + ", ".join(
            f"{k} {v[-1].seconds:.2f}s ({v[-1].cpu:.2f} cpu)" for k, v in results.items()))
    return results


def _quiet(work: Callable[[], Any]) -> Any:
    """Run `work` with stderr sent to /dev/null (tqdm still formats its bar, nobody sees it)."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        return work()


def best_ratio(numerator: list[Run], denominator: list[Run], whole_call: bool = False) -> dict[str, float]:
    """min(numerator) / min(denominator) of the loops' wall seconds (`whole_call`: of the whole calls), the
    median of the per-round ratios, and the same ratio of the least CPU seconds."""
    num = [r.wall if whole_call else r.seconds for r in numerator]
    den = [r.wall if whole_call else r.seconds for r in denominator]
    num_cpu = [r.cpu_call if whole_call else r.cpu for r in numerator]
    den_cpu = [r.cpu_call if whole_call else r.cpu for r in denominator]
    return {"best": round(min(num) / min(den), 3),
            "median_round": round(common.median([a / b for a, b in zip(num, den)]), 3),
            "cpu": round(min(num_cpu) / min(den_cpu), 3)}


def raw_seconds(runs: dict[str, list[Run]]) -> dict[str, dict[str, list[float]]]:
    return {k: {field: [round(getattr(r, field), 4) for r in v] for field in ("seconds", "cpu", "wall", "cpu_call")}
            for k, v in runs.items()}


def timed_fit(model: nn.Module, train: TrainSet, cfg: TrainConfig, device: torch.device, progress: bool = False,
              precision: str = "fp32", loss_fn: Callable | None = None, augment: BatchFn | None = None,
              compile_model: bool = False) -> dict[str, Any]:
    """Wall seconds of a whole fit() call (with its checkpoints), of its epochs alone and of each epoch, and the
    CPU seconds of its epochs. `augment` is a batched augmentation (flips, padded crops)."""
    augmentation = None if augment is None else Augmentation(batch=augment)
    with tempfile.TemporaryDirectory(prefix="speed_fit_") as stage_dir, epoch_cpu_seconds() as epoch_cpu:
        started = time.perf_counter()
        fit(model, train, cfg, stage_dir, FitOptions(stage="bench", seed=0, progress=progress, precision=precision,
                                                     loss_fn=loss_fn, augment=augmentation, device=device,
                                                     compile_model=compile_model))
        synchronize(device)
        wall = time.perf_counter() - started
        epochs = [r["seconds"] for r in read_jsonl(Path(stage_dir) / "metrics.jsonl")]
    return {"wall": wall, "loop": sum(epochs), "loop_cpu": epoch_cpu[0], "epochs": epochs}


@contextlib.contextmanager
def epoch_cpu_seconds() -> Iterator[list[float]]:
    """CPU seconds spent inside fit's epochs (train._train_epoch: no checkpoint, metrics or validation)."""
    spent, real = [0.0], train_module._train_epoch

    def counted(*args: Any, **kwargs: Any) -> Any:
        started = time.process_time()
        try:
            return real(*args, **kwargs)
        finally:
            spent[0] += time.process_time() - started

    train_module._train_epoch = counted
    try:
        yield spent
    finally:
        train_module._train_epoch = real


def train_flops_per_image(model: nn.Module, example: torch.Tensor) -> int:
    """Matmul and convolution FLOPs of a forward and backward pass on one example (FlopCounterMode)."""
    model = copy.deepcopy(model).train()
    with FlopCounterMode(display=False) as counter:
        model(example[:1]).float().sum().backward()
    return int(counter.get_total_flops())


# ---------------------------------------------------------------- part 1: fit vs a plain loop

@dataclasses.dataclass
class LoopParts:
    """What a hand-written loop adds on top of forward / backward / step."""

    clip: float = 0.0  # clip the gradient norm to this (0 = off), with train.clip_grad_norm
    scheduler: bool = False  # a LambdaLR stepped per batch, as fit uses
    torch_defaults: bool = False  # torch's default AdamW (no fused kernel) and nn.utils.clip_grad_norm_


def plain_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, epochs: int,
               parts: LoopParts, device: torch.device, seed: int = 0) -> tuple[float, float]:
    """Wall and CPU seconds of `epochs` epochs of the plainest PyTorch loop over tensors already on `device`."""
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay) if parts.torch_defaults
                 else make_optimizer(model, cfg))
    steps = epochs * math.ceil(len(y) / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, 0, "cosine"))
    generator = torch.Generator().manual_seed(seed)
    synchronize(device)
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=generator).to(device).split(cfg.batch_size):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if parts.clip > 0 and parts.torch_defaults:
                nn.utils.clip_grad_norm_(params, parts.clip)
            elif parts.clip > 0:
                clip_grad_norm(params, parts.clip)
            optimizer.step()
            if parts.scheduler:
                scheduler.step()
    synchronize(device)
    return time.perf_counter() - started, time.process_time() - cpu


def fit_vs_plain(cfg: Config, data: Splits, plan: Plan, device: torch.device, quick: bool) -> dict[str, Any]:
    train_cfg = dataclasses.replace(cfg.generalist.train, epochs=plan.epochs, warmup_epochs=0)
    x, y = data.x_train.to(device), data.y_train.to(device)
    set_seed(cfg.seed)
    initial = build_model(cfg.generalist.model, data.input_shape, data.num_classes, data.mean, data.std)
    fresh = lambda: copy.deepcopy(initial)  # noqa: E731  every run starts from the same weights
    plain = lambda parts: lambda: plain_loop(fresh(), x, y, train_cfg, plan.epochs, parts, device)  # noqa: E731
    clip = train_cfg.grad_clip
    optimizer = make_optimizer(copy.deepcopy(initial).to(device), train_cfg)
    variants: dict[str, Callable[[], Any]] = {
        "plain": plain(LoopParts()),
        "plain + clip": plain(LoopParts(clip=clip)),
        "plain + clip + LambdaLR": plain(LoopParts(clip=clip, scheduler=True)),
        "plain + clip, torch defaults": plain(LoopParts(clip=clip, torch_defaults=True)),
        "fit": lambda: timed_fit(fresh(), TrainSet(x, y), train_cfg, device),
        "fit (tqdm on)": lambda: timed_fit(fresh(), TrainSet(x, y), train_cfg, device, progress=True),
        "fit (grad_clip = 0)": lambda: timed_fit(fresh(), TrainSet(x, y), dataclasses.replace(train_cfg, grad_clip=0.0),
                                                 device),
    }
    runs = interleaved(variants, plan.rounds, "fit vs plain")
    images = plan.epochs * len(y)
    rows = {name: {"best_seconds": round(min(r.seconds for r in v), 3),
                   "images_per_s": round(images / min(r.seconds for r in v), 1),
                   "best_cpu_seconds": round(min(r.cpu for r in v), 3),
                   "speed_vs_plain_clipped": best_ratio(runs["plain + clip"], v)["best"]} for name, v in runs.items()}
    for name, v in runs.items():
        if name.startswith("fit"):
            rows[name]["best_wall_seconds_with_checkpoints"] = round(min(r.wall for r in v), 3)
    target = TARGETS["fit_over_plain_clipped_quick" if quick else "fit_over_plain_clipped"]
    ratios = {
        "fit_over_plain_clipped": best_ratio(runs["plain + clip"], runs["fit"]),
        "fit_over_plain_clipped_wall": best_ratio(runs["plain + clip"], runs["fit"], whole_call=True),
        "clip_cost_ratio": best_ratio(runs["plain"], runs["plain + clip"]),
        "lambdalr_cost_ratio": best_ratio(runs["plain + clip"], runs["plain + clip + LambdaLR"]),
        "fit_no_clip_over_plain": best_ratio(runs["plain"], runs["fit (grad_clip = 0)"]),
        "fit_tqdm_over_plain_clipped": best_ratio(runs["plain + clip"], runs["fit (tqdm on)"]),
        "torch_defaults_over_plain_clipped": best_ratio(runs["plain + clip"], runs["plain + clip, torch defaults"]),
    }
    return {"model": dataclasses.asdict(cfg.generalist.model), "batch_size": train_cfg.batch_size, "grad_clip": clip,
            "optimizer": type(optimizer).__name__, "fused": bool(optimizer.defaults.get("fused")),
            "threads": torch.get_num_threads(), "images_per_epoch": len(y), "epochs_per_timing": plan.epochs,
            "rounds": plan.rounds, "variants": rows, **{k: v["best"] for k, v in ratios.items()},
            "median_round_ratios": {k: v["median_round"] for k, v in ratios.items()},
            "cpu_time_ratios": {k: v["cpu"] for k, v in ratios.items()},
            "targets": {"fit_over_plain_clipped": target, "clip_cost_ratio": TARGETS["clip_cost_ratio"]},
            "met": {"fit_over_plain_clipped": ratios["fit_over_plain_clipped"]["best"] >= target,
                    "fit_over_plain_clipped_cpu": ratios["fit_over_plain_clipped"]["cpu"] >= target,
                    "clip_cost_ratio": ratios["clip_cost_ratio"]["best"] >= TARGETS["clip_cost_ratio"],
                    "clip_cost_ratio_cpu": ratios["clip_cost_ratio"]["cpu"] >= TARGETS["clip_cost_ratio"]},
            "seconds_raw": raw_seconds(runs),
            **({"cuda_synchronizing_calls": cuda_syncs(fresh(), TrainSet(x, y), train_cfg, device)}
               if device.type == "cuda" else {}),
            "note": "best of `rounds` interleaved runs; fit's time is its epoch loop (metrics.jsonl seconds); "
                    "speed ratio = other time / this time; cpu_time_ratios: of the whole calls' CPU seconds"}


def cuda_syncs(model: nn.Module, train: TrainSet, cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """Calls that wait for the GPU during one fit() of 2 epochs (torch.cuda.set_sync_debug_mode): fit reads the
    device every NONFINITE_CHECK_STEPS steps and a few times per epoch (the epoch's order, its sums, the
    checkpoint), never per step."""
    cfg = dataclasses.replace(cfg, epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            timed_fit(model, train, cfg, device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught
                                if "synchroniz" in str(w.message).lower())
    steps = cfg.epochs * math.ceil(len(train) / cfg.batch_size)
    return {"epochs": cfg.epochs, "steps": steps, "calls": sum(sites.values()),
            "calls_per_step": round(sum(sites.values()) / steps, 3), "sites": dict(sites.most_common(20))}


# ---------------------------------------------------------------- part 2: FLOP/s

def matmul_flops(n: int, dtype: torch.dtype, device: torch.device, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n @ n x n matmul over `repeats` (one warm-up)."""
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    a @ b
    synchronize(device)
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best


def measure_peaks(n: int, device: torch.device) -> dict[str, float]:
    """FLOP/s of an n^3 matmul in fp32 and bf16; on CPU with 1 thread and with all of torch's threads."""
    threads = sorted({1, torch.get_num_threads()}) if device.type == "cpu" else [torch.get_num_threads()]
    return {f"{name}_{t}t": with_threads(t, lambda: matmul_flops(n, dtype, device))
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)) for t in threads}


def peak_for(peaks: dict[str, float], precision: str, threads: int) -> float:
    """The matmul peak matching a precision (fp32 | bf16) and thread count."""
    return peaks.get(f"{precision}_{threads}t") or max(v for k, v in peaks.items() if k.startswith(precision))


def flops(cfg: Config, data: Splits, plan: Plan, device: torch.device) -> dict[str, Any]:
    threads = torch.get_num_threads()
    peaks = measure_peaks(plan.matmul_size, device)
    set_seed(cfg.seed)
    initial = build_model(cfg.generalist.model, data.input_shape, data.num_classes, data.mean, data.std)
    per_image = train_flops_per_image(initial, data.x_train)
    base = cfg.generalist.train.batch_size
    variants = [(f"batch {b}", b, threads, "fp32") for b in plan.batch_sizes]
    if device.type == "cpu" and threads > 1:
        variants.append((f"batch {base}, 1 thread", base, 1, "fp32"))
    variants += [(f"batch {base}, bf16 autocast", base, threads, "bf16"),
                 (f"batch {max(plan.batch_sizes)}, bf16 autocast", max(plan.batch_sizes), threads, "bf16")]
    loops: dict[str, list[float]] = {name: [] for name, *_ in variants}
    for _ in range(plan.flops_repeats):
        for name, batch, n_threads, precision in variants:
            train_cfg = dataclasses.replace(cfg.generalist.train, epochs=plan.epochs, batch_size=batch, warmup_epochs=0)
            train = TrainSet(data.x_train, data.y_train)
            out = with_threads(n_threads, lambda: timed_fit(copy.deepcopy(initial), train, train_cfg, device,
                                                            precision=precision))
            loops[name].append(out["loop"])
            common.log_to_stderr(f"  flops: {name}: {plan.epochs * len(data.y_train) / out['loop']:.0f} img/s")
    for key, value in measure_peaks(plan.matmul_size, device).items():  # again: keep the best of both
        peaks[key] = max(peaks[key], value)
    rows = []
    for name, batch, n_threads, precision in variants:
        images_per_s = plan.epochs * len(data.y_train) / min(loops[name])
        achieved = images_per_s * per_image
        rows.append({"variant": name, "batch_size": batch, "threads": n_threads, "precision": precision,
                     "train_mflop_per_step": round(per_image * batch / 1e6, 1),
                     "images_per_s": round(images_per_s, 1), "gflops": round(achieved / 1e9, 2),
                     "fraction_of_fp32_matmul": round(achieved / peak_for(peaks, "fp32", n_threads), 3),
                     "fraction_of_matching_matmul": round(achieved / peak_for(peaks, precision, n_threads), 3)})
    return {"model": dataclasses.asdict(cfg.generalist.model), "train_flops_per_image": per_image,
            "matmul_n": plan.matmul_size, "matmul_gflops": {k: round(v / 1e9, 1) for k, v in peaks.items()},
            "images_per_epoch": len(data.y_train), "variants": rows,
            "epochs_per_variant": plan.epochs, "repeats": plan.flops_repeats,
            "note": "images/s from fit's epoch loops, best of `repeats`; matmul peaks: best of a measurement "
                    "before and one after"}


# ---------------------------------------------------------------- part 3: the CNN

def cnn_data(data_root: Path, images: int) -> tuple[TrainSet, str]:
    """`images` Fashion-MNIST training images when the files are there, else random ones of that shape."""
    if (data_root / "FashionMNIST" / "raw").is_dir():
        cfg = load_plan_config("fashion-mnist", data_root, [f"data.train_limit={images + images // 8}"])
        data = load_data(cfg.data, cfg.seed)
        return TrainSet(data.x_train[:images], data.y_train[:images]), "fashion-mnist"
    generator = torch.Generator().manual_seed(0)
    return TrainSet(torch.rand(images, 1, 28, 28, generator=generator),
                    torch.randint(10, (images,), generator=generator)), "random 1x28x28"


@contextlib.contextmanager
def contiguous_training() -> Any:
    """fit as before issue 17 trained conv models: in the contiguous (NCHW) memory format."""
    real = train_module.training_memory_format
    train_module.training_memory_format = lambda model, device: torch.contiguous_format
    try:
        yield
    finally:
        train_module.training_memory_format = real


def conv_rows(name: str, model_cfg: ModelConfig, train: TrainSet, rounds: int, device: torch.device,
              peaks: dict[str, float], crop_pad: int) -> dict[str, Any]:
    """Images/s of one epoch of fit on `train` in fp32 and bf16, contiguous and channels-last, and under auto."""
    set_seed(0)
    shape = tuple(train.x.shape[1:])
    initial = build_model(model_cfg, shape, 10, [0.5] * shape[0], [0.3] * shape[0])
    cfg = TrainConfig(epochs=1, batch_size=128, lr=2e-3)
    augment = (lambda x, gen: augment_batch(x, False, crop_pad, gen)) if crop_pad else None
    auto = training_precision("auto", device, initial.to(device), train.x, cfg.batch_size)

    def run(precision: str, contiguous: bool) -> Callable[[], dict[str, Any]]:
        def work() -> dict[str, Any]:
            with contiguous_training() if contiguous else contextlib.nullcontext():
                return timed_fit(copy.deepcopy(initial), train, cfg, device, precision=precision, augment=augment)
        return work

    variants = {"fp32, contiguous (fp32 today)": run("fp32", True), "fp32, channels-last": run("fp32", False),
                "bf16, contiguous": run("bf16", True), "bf16, channels-last": run("bf16", False)}
    runs = interleaved(variants, rounds, name)
    per_image = train_flops_per_image(initial, train.x.to(device))
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    today = runs["fp32, contiguous (fp32 today)"]
    rows = {}
    for variant, v in runs.items():
        precision = variant.split(",")[0]
        images_per_s = len(train) / min(r.seconds for r in v)
        rows[variant] = {"images_per_s": round(images_per_s, 1), "best_seconds": round(len(train) / images_per_s, 2),
                         "gflops": round(images_per_s * per_image / 1e9, 2),
                         "fraction_of_matching_matmul": round(images_per_s * per_image
                                                              / peak_for(peaks, precision, threads), 3),
                         "speed_vs_fp32_today": best_ratio(today, v)["best"],
                         "cpu_time_speed_vs_fp32_today": best_ratio(today, v)["cpu"]}
    auto_variant = f"{auto}, channels-last"
    rows[f"auto (= {auto_variant})"] = dict(rows[auto_variant])
    contiguous = {"fp32": "fp32, contiguous (fp32 today)", "bf16": "bf16, contiguous"}
    return {"model": dataclasses.asdict(model_cfg), "input_shape": list(shape), "images_per_epoch": len(train),
            "batch_size": cfg.batch_size, "crop_pad": crop_pad, "auto_resolves_to": auto, "threads": threads,
            "train_flops_per_image": per_image, "rounds": rounds, "variants": rows,
            "auto_over_fp32_today": best_ratio(today, runs[auto_variant]),
            "channels_last_gain": {p: best_ratio(runs[c], runs[f"{p}, channels-last"]) for p, c in contiguous.items()},
            "seconds_raw": raw_seconds(runs)}


def cnn(plan: Plan, data_root: Path, device: torch.device) -> dict[str, Any]:
    peaks = measure_peaks(plan.matmul_size, device)
    train, source = cnn_data(data_root, plan.cnn_images)
    fashion = conv_rows("cnn", CNN, train, plan.cnn_rounds, device, peaks, crop_pad=2)
    generator = torch.Generator().manual_seed(0)
    cifar = TrainSet(torch.rand(plan.resnet_images, 3, 32, 32, generator=generator),
                     torch.randint(10, (plan.resnet_images,), generator=generator))
    resnet = conv_rows("resnet-8", RESNET, cifar, plan.cnn_rounds, device, peaks, crop_pad=4)
    ratio = fashion["auto_over_fp32_today"]["best"]
    return {"data": source, "matmul_n": plan.matmul_size,
            "matmul_gflops": {k: round(v / 1e9, 1) for k, v in peaks.items()},
            "fashion_mnist_cnn": fashion, "cifar_resnet8": resnet, "cnn_auto_over_fp32_today": ratio,
            "target": TARGETS["cnn_auto_over_fp32_today"], "met": ratio >= TARGETS["cnn_auto_over_fp32_today"],
            "note": "fp32 today = fp32 in the contiguous format, as fit trained conv models before issue 17; its "
                    "per-step host reads are gone too, a negligible share of a 0.2-0.4 s CNN step"}


# ---------------------------------------------------------------- part 4: distillation vs hard labels

def distill_vs_hard(cfg: Config, data: Splits, plan: Plan, device: torch.device) -> dict[str, Any]:
    train_cfg = dataclasses.replace(cfg.student.train, epochs=plan.distill_epochs, warmup_epochs=0)
    set_seed(cfg.seed)
    teacher = build_model(cfg.generalist.model, data.input_shape, data.num_classes, data.mean, data.std).to(device)
    started = time.perf_counter()
    alpha, temperature = cfg.student.alpha, cfg.student.temperature
    logits = predict_logits(teacher.eval(), data.x_train, device=device)  # paid once per run, outside the epochs
    cached = teacher_log_probs(logits, temperature)  # as distill() does: the teacher's side of the loss, once
    cache_seconds = time.perf_counter() - started
    set_seed(cfg.seed + 1)
    initial = build_model(cfg.student.model, data.input_shape, data.num_classes, data.mean, data.std)
    kd = KDLoss(alpha, temperature)  # distill()'s loss_fn
    variants = {
        "hard": lambda: timed_fit(copy.deepcopy(initial), TrainSet(data.x_train, data.y_train), train_cfg, device,
                                  loss_fn=cross_entropy()),
        "distill": lambda: timed_fit(copy.deepcopy(initial), TrainSet(data.x_train, data.y_train, cached), train_cfg,
                                     device, loss_fn=kd),
    }
    runs = interleaved(variants, plan.rounds, "distill vs hard")
    ratio = best_ratio(runs["distill"], runs["hard"])
    return {"student": dataclasses.asdict(cfg.student.model), "params": count_params(initial),
            "batch_size": train_cfg.batch_size, "alpha": alpha, "temperature": temperature,
            "images_per_epoch": len(data.y_train), "epochs_per_timing": plan.distill_epochs, "rounds": plan.rounds,
            "threads": torch.get_num_threads(), "seconds_raw": raw_seconds(runs),
            "teacher_logits_once_seconds": round(cache_seconds, 3), "distill_over_hard": ratio["best"],
            "median_round_ratio": ratio["median_round"], "cpu_time_ratio": ratio["cpu"],
            "target": TARGETS["distill_over_hard"], "met": ratio["best"] <= TARGETS["distill_over_hard"]}


# ---------------------------------------------------------------- part 5: specialists in parallel

def specialists_parallel(plan: Plan, data_root: Path, workdir: Path) -> dict[str, Any]:
    cfg = load_plan_config(plan.specialists_config, data_root, plan.specialists_overrides)
    run_dir = start_run(cfg, workdir / "specialists_run", overwrite=True)
    started = time.perf_counter()
    run_pipeline(cfg, run_dir, until="clusters", progress=False)
    prepare_seconds = time.perf_counter() - started
    data = load_data(cfg.data, cfg.seed)
    clusters = read_clusters(run_dir)
    order = dispatch_order(cfg, dict(enumerate(clusters)), data.y_train)
    timings: list[dict[str, Any]] = []
    for n_jobs in [1, 2] if plan.specialists_repeats == 1 else [1, 2, 2, 1]:
        shutil.rmtree(run_dir / artifacts.SPECIALISTS_DIR, ignore_errors=True)
        run_cfg = copy.deepcopy(cfg)
        run_cfg.specialists.n_jobs = n_jobs
        get_reusable_executor().shutdown(wait=True)  # each timing starts its workers, as a pipeline run does
        began = time.time()
        elapsed, _ = common.timed(lambda: train_all_specialists(run_cfg, run_dir, data))
        # STARTED is written when a specialist starts (after its data and generalist are loaded), model.pt at its end
        starts = [(specialist_dir(run_dir, k) / "STARTED").stat().st_mtime for k in range(len(clusters))]
        each = [(specialist_dir(run_dir, k) / artifacts.MODEL_FILE).stat().st_mtime - t for k, t in enumerate(starts)]
        timings.append({"n_jobs": n_jobs, "seconds": round(elapsed, 2), "to_first_start": round(min(starts) - began, 2),
                        "specialist_seconds": [round(d, 2) for d in each]})
        common.log_to_stderr(f"  specialists n_jobs={n_jobs}: {elapsed:.1f}s (first start after "
                             f"{min(starts) - began:.1f}s; each {', '.join(f'{d:.1f}' for d in each)}s)")
    seconds = {n: [t["seconds"] for t in timings if t["n_jobs"] == n] for n in (1, 2)}
    last = {t["n_jobs"]: t for t in timings}  # the last timing of each n_jobs
    ratio = common.median(seconds[2]) / common.median(seconds[1])
    alone, beside = last[1]["specialist_seconds"], last[2]["specialist_seconds"]
    return {"config": plan.specialists_config, "overrides": plan.specialists_overrides,
            "config_file": str((CONFIGS / f"{plan.specialists_config}.toml").relative_to(common.REPO)),
            "generalist_arch": cfg.generalist.model.arch, "clusters": clusters, "dispatch_order": order,
            "train_examples": len(data.y_train), "threads_per_specialist": specialist_threads(cfg, len(clusters)),
            "prepare_seconds": round(prepare_seconds, 1),
            "seconds_n_jobs_1": seconds[1],
            "seconds_n_jobs_2": seconds[2],
            "specialist_seconds_n_jobs_1": alone,
            "specialist_seconds_n_jobs_2": beside,
            "seconds_to_first_start": {n: t["to_first_start"] for n, t in last.items()},
            "best_possible_ratio_longest_first": round(makespan([alone[k] for k in order], 2) / sum(alone), 3),
            "slowdown_beside_another": [round(b / a, 3) for a, b in zip(alone, beside)],
            "best_possible_ratio_cluster_order": round(makespan(alone, 2) / sum(alone), 3),
            "specialists_2_over_1": round(ratio, 3), "target": TARGETS["specialists_2_over_1"],
            "met": ratio <= TARGETS["specialists_2_over_1"],
            "timings": timings,
            "note": "ratio of the medians of the timings of each n_jobs (order 1, 2 or 1, 2, 2, 1); durations of "
                    "the last timing of each, from the STARTED and model.pt file times"}


def makespan(durations: list[float], workers: int) -> float:
    """Finish time when tasks start in list order on whichever worker frees up first (joblib's dispatch)."""
    free_at = [0.0] * workers
    for d in durations:
        i = free_at.index(min(free_at))
        free_at[i] += d
    return max(free_at)


# ---------------------------------------------------------------- part 6: inference

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


# ---------------------------------------------------------------- part 7: the demo

def demo_command(repo: Path, out_dir: Path) -> list[str]:
    return [sys.executable, "-m", "ensemble_kd.cli", "run", "--config", str(repo / "pipelines/configs/digits.toml"),
            "--out", str(out_dir), "--overwrite", "--quiet"]


def run_demo(repo: Path, out_dir: Path) -> tuple[float, float]:
    """Wall seconds of the demo pipeline of the code in `repo` (a subprocess importing ensemble_kd from there),
    and the CPU seconds of its processes (the worker processes included once they are reaped)."""
    env = dict(os.environ, PYTHONPATH=str(repo))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(demo_command(repo, out_dir), cwd=repo, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"the demo of {repo} failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return seconds, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def checkout(revision: str, into: Path) -> Path:
    """The tree of `revision` (git archive), to run its code beside this one."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", revision], cwd=common.REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def demo(out_dir: Path, plan: Plan, baseline: str | None, workdir: Path) -> dict[str, Any]:
    variants = {"this tree": lambda: run_demo(common.REPO, out_dir)}
    if baseline:
        before = checkout(baseline, workdir / "baseline")
        variants[f"baseline {baseline}"] = lambda: run_demo(before, workdir / "baseline_demo")
    rounds = plan.demo_rounds if baseline else 1
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):  # no warm-up run: each demo is a fresh process, as `make demo` is
        names = list(variants)
        for name in names[r % len(names):] + names[:r % len(names)]:
            wall, used = variants[name]()
            seconds[name].append(wall)
            cpu[name].append(used)
        common.log_to_stderr("  demo: " + ", ".join(f"{k} {v[-1]:.1f}s ({cpu[k][-1]:.1f} cpu)"
                                                    for k, v in seconds.items()))
    manifest = read_json(out_dir / "manifest.json")
    stages = {k: round(v.get("seconds", 0), 1) for k, v in manifest.get("stages", {}).items() if isinstance(v, dict)}
    best = min(seconds["this tree"])
    result = {"command": "python -m ensemble_kd.cli run --config pipelines/configs/digits.toml --out <tmp>/demo "
                         "--overwrite --quiet", "rounds": rounds, "seconds": round(best, 1),
              "seconds_raw": {k: [round(t, 2) for t in v] for k, v in seconds.items()},
              "cpu_seconds_raw": {k: [round(t, 2) for t in v] for k, v in cpu.items()}, "stage_seconds": stages,
              "seconds_before_issue_17_as_reported": TARGETS["demo_seconds_before"]}
    if baseline:
        before_best = min(seconds[f"baseline {baseline}"])
        result.update({"baseline": baseline, "baseline_seconds": round(before_best, 1),
                       "speedup_vs_baseline": round(before_best / best, 3),
                       "cpu_seconds": round(min(cpu["this tree"]), 1),
                       "baseline_cpu_seconds": round(min(cpu[f"baseline {baseline}"]), 1),
                       "cpu_time_speedup_vs_baseline": round(min(cpu[f"baseline {baseline}"]) / min(cpu["this tree"]),
                                                             3),
                       "median_round_speedup": round(common.median(
                           [b / a for a, b in zip(seconds["this tree"], seconds[f"baseline {baseline}"])]), 3),
                       "faster": best < before_best})
    return result


# ---------------------------------------------------------------- part 8: torch.compile

def compile_vs_eager(cfg: Config, data: Splits, plan: Plan, device: torch.device,
                     data_root: Path) -> dict[str, Any]:
    generalist = TrainSet(data.x_train, data.y_train)
    models = {"generalist": (cfg.generalist.model, generalist, cfg.generalist.train.batch_size, None)}
    cnn_train, _ = cnn_data(data_root, plan.cnn_images)
    models["cnn"] = (CNN, cnn_train, 128, lambda x, gen: augment_batch(x, False, 2, gen))
    rows = {}
    for name, (model_cfg, train, batch, augment) in models.items():
        set_seed(0)
        shape = tuple(train.x.shape[1:])
        initial = build_model(model_cfg, shape, 10, [0.5] * shape[0], [0.3] * shape[0])
        train_cfg = TrainConfig(epochs=plan.compile_epochs, batch_size=batch, lr=1e-3)
        precision = training_precision("auto", device, initial.to(device), train.x, batch)
        runs = {mode: _quiet(lambda mode=mode: timed_fit(copy.deepcopy(initial), train, train_cfg, device,
                                                          precision=precision, augment=augment,
                                                          compile_model=mode == "compiled"))
                for mode in ("eager", "compiled")}
        rows[name] = {"precision": precision, "epochs": plan.compile_epochs,
                      **{f"{mode}_epoch_seconds": [round(s, 3) for s in out["epochs"]] for mode, out in runs.items()},
                      "first_epoch_extra_seconds": round(runs["compiled"]["epochs"][0] - runs["eager"]["epochs"][0], 2),
                      "compiled_over_eager_after_first_epoch": round(
                          min(runs["eager"]["epochs"][1:]) / min(runs["compiled"]["epochs"][1:]), 3)}
        common.log_to_stderr(f"  compile: {name}: {rows[name]}")
    return {"models": rows, "note": "speed ratio of the best epoch after the first (which compiles); one run each"}


# ---------------------------------------------------------------- the report

def summary(parts: dict[str, Any]) -> dict[str, Any]:
    """The headline ratios of issue 17: `value` from wall seconds (best of `rounds` interleaved rounds),
    `cpu_time` from CPU seconds (the least of the same rounds), `target`."""
    out: dict[str, Any] = {}
    if "fit" in parts:
        p = parts["fit"]
        targets = {**p["targets"], "fit_over_plain_clipped_wall": p["targets"]["fit_over_plain_clipped"]}
        for key in ("fit_over_plain_clipped", "fit_over_plain_clipped_wall", "clip_cost_ratio", "lambdalr_cost_ratio"):
            out[key] = {"value": p[key], "cpu_time": p["cpu_time_ratios"][key], "rounds": p["rounds"],
                        "target": targets.get(key)}
    if "cnn" in parts:
        p = parts["cnn"]["fashion_mnist_cnn"]
        out["cnn_auto_over_fp32_today"] = {"value": parts["cnn"]["cnn_auto_over_fp32_today"],
                                           "cpu_time": p["auto_over_fp32_today"]["cpu"], "rounds": p["rounds"],
                                           "target": TARGETS["cnn_auto_over_fp32_today"]}
        out["cnn_rows"] = {k: {"images_per_s": v["images_per_s"],
                               "fraction_of_matching_matmul": v["fraction_of_matching_matmul"]}
                           for k, v in p["variants"].items()}
    if "distill" in parts:
        p = parts["distill"]
        out["distill_over_hard"] = {"value": p["distill_over_hard"], "cpu_time": p["cpu_time_ratio"],
                                    "rounds": p["rounds"], "target": TARGETS["distill_over_hard"]}
    if "specialists" in parts:
        out["specialists_2_over_1"] = {"value": parts["specialists"]["specialists_2_over_1"],
                                       "rounds": len(parts["specialists"]["seconds_n_jobs_1"]),
                                       "target": TARGETS["specialists_2_over_1"]}
    if "demo" in parts:
        out["demo_seconds"] = {"value": parts["demo"]["seconds"], "rounds": parts["demo"]["rounds"],
                               "speedup_vs_baseline": parts["demo"].get("speedup_vs_baseline")}
    return out


def table(result: dict[str, Any]) -> str:
    parts = result["parts"]
    rows: list[list[Any]] = []
    if "fit" in parts:
        p = parts["fit"]
        for name, v in p["variants"].items():
            rows.append([f"1. {name}", v["images_per_s"], "img/s", v["speed_vs_plain_clipped"], "vs plain + clip",
                         None])
        cpu = p["cpu_time_ratios"]
        rows.append(["1. fit / plain + clip (fit_over_plain_clipped)", cpu["fit_over_plain_clipped"], "cpu ratio",
                     p["fit_over_plain_clipped"], f">= {p['targets']['fit_over_plain_clipped']}",
                     p["met"]["fit_over_plain_clipped"]])
        rows.append(["1. ... with checkpoints and model.pt", cpu["fit_over_plain_clipped_wall"], "cpu ratio",
                     p["fit_over_plain_clipped_wall"], "", None])
        rows.append(["1. plain + clip / plain (clip_cost_ratio)", cpu["clip_cost_ratio"], "cpu ratio",
                     p["clip_cost_ratio"], ">= 0.9", p["met"]["clip_cost_ratio"]])
    if "flops" in parts:
        p = parts["flops"]
        for k, v in p["matmul_gflops"].items():
            rows.append([f"2. matmul {p['matmul_n']}^3 {k}", v, "GFLOP/s", None, "", None])
        for v in p["variants"]:
            rows.append([f"2. generalist {v['variant']}", v["gflops"], "GFLOP/s", v["fraction_of_matching_matmul"],
                         "of matching matmul", None])
    if "cnn" in parts:
        for label, key in (("cnn", "fashion_mnist_cnn"), ("resnet-8", "cifar_resnet8")):
            for name, v in parts["cnn"][key]["variants"].items():
                rows.append([f"3. {label} {name}", v["images_per_s"], "img/s", v["fraction_of_matching_matmul"],
                             "of matching matmul", None])
        p = parts["cnn"]
        rows.append(["3. cnn auto / fp32 today", p["fashion_mnist_cnn"]["auto_over_fp32_today"]["cpu"], "cpu ratio",
                     p["cnn_auto_over_fp32_today"], ">= 1.8", p["met"]])
    if "distill" in parts:
        p = parts["distill"]
        rows.append(["4. distill epoch / hard-label epoch", min(p["seconds_raw"]["distill"]["seconds"]), "s",
                     p["distill_over_hard"], "<= 1.15", p["met"]])
    if "specialists" in parts:
        p = parts["specialists"]
        rows.append(["5. specialists n_jobs=2 / n_jobs=1", min(p["seconds_n_jobs_2"]), "s", p["specialists_2_over_1"],
                     "<= 0.62", p["met"]])
        rows.append(["5. (best possible, longest first)", None, "", p["best_possible_ratio_longest_first"], "", None])
    if "inference" in parts:
        for name, v in parts["inference"]["models"].items():
            rows.append([f"6. {name} batch 1", v["ms_per_image_batch_1"], "ms/img",
                         v["speedup_vs_ensemble_batch_1"], "x faster", None])
            rows.append([f"6. {name} batch 256", v["ms_per_image_batch_256"], "ms/img",
                         v["speedup_vs_ensemble_batch_256"], "x faster", None])
    if "demo" in parts:
        p = parts["demo"]
        rows.append(["7. digits demo (ensemble-kd run)", p["seconds"], "s", p.get("speedup_vs_baseline"),
                     "x faster than baseline", p.get("faster")])
    if "compile" in parts:
        for name, v in parts["compile"]["models"].items():
            rows.append([f"8. {name} compiled / eager (after epoch 1)", v["first_epoch_extra_seconds"],
                         "s to compile", v["compiled_over_eager_after_first_epoch"], "speed ratio", None])
    return common.format_table(["measure", "value", "unit", "ratio", "target / meaning", "met"], rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        common.log_to_stderr("--device cuda, but no CUDA GPU is visible")
        return 2
    plan = dataclasses.replace(QUICK if args.quick else DEFAULT)
    cfg = load_plan_config(plan.config, args.data_root)
    if cfg.data.name != "digits" and not (args.data_root / "FashionMNIST" / "raw").is_dir():
        common.log_to_stderr(f"FashionMNIST not found under {args.data_root}; using digits for parts 1, 2 and 4")
        plan = dataclasses.replace(plan, config="digits", timing_limit=0, epochs=QUICK.epochs,
                                   distill_epochs=QUICK.distill_epochs, specialists_config="digits",
                                   specialists_overrides=[])
        cfg = load_plan_config(plan.config, args.data_root)
    cfg.data.train_limit = plan.timing_limit
    skip = set(args.skip) | ({"compile"} if not args.compile else set()) | (set(CPU_ONLY) if device.type == "cuda"
                                                                             else set())
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    threads = cfg.threads or torch.get_num_threads()  # the digits config trains its tiny models on one thread
    started = time.perf_counter()
    machine = common.machine_info(device)
    parts: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="speed_") as tmp:
        workdir = Path(tmp)
        demo_dir = workdir / "demo"
        loaded: list[Splits] = []

        def data() -> Splits:
            if not loaded:
                loaded.append(load_data(cfg.data, cfg.seed))
            return loaded[0]

        steps: list[tuple[str, Callable[[], Any]]] = [
            ("demo", lambda: demo(demo_dir, plan, args.baseline, workdir)),
            ("inference", lambda: inference(demo_dir)),
            ("fit", lambda: with_threads(threads, lambda: fit_vs_plain(cfg, data(), plan, device, args.quick))),
            ("flops", lambda: flops(cfg, data(), plan, device)),
            ("cnn", lambda: cnn(plan, args.data_root, device)),
            ("distill", lambda: with_threads(threads, lambda: distill_vs_hard(cfg, data(), plan, device))),
            ("specialists", lambda: specialists_parallel(plan, args.data_root, workdir)),
            ("compile", lambda: compile_vs_eager(cfg, data(), plan, device, args.data_root)),
        ]
        for name, work in steps:
            if name in skip or (name == "inference" and "demo" in skip):
                continue
            before = common.load_average()
            common.log_to_stderr(f"{name} (load average {before})")
            seconds, parts[name] = common.timed(work)
            parts[name].update(part_seconds=round(seconds, 1), load_average_1min_before=before,
                               load_average_1min_after=common.load_average())
    result = {"benchmark": "speed", "machine": machine,
              "config": {"quick": args.quick, "device": str(device), "plan": dataclasses.asdict(plan),
                         "data": cfg.data.name, "timing_train_limit": plan.timing_limit, "skip": sorted(skip),
                         "baseline": args.baseline},
              "summary": summary(parts), "parts": parts, "total_seconds": round(time.perf_counter() - started, 1)}
    print(table(result))
    name = "speed" + ("_cuda" if device.type == "cuda" else "") + ("_quick" if args.quick else "")
    print(f"\nresults: {common.write_result(name, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
