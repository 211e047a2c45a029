"""Images streamed from disk against in-memory tensors (`data.storage`), on the CIFAR-10 JPEGs.

    python benchmarks/streaming.py           # the 60,000 JPEGs, and the same 10 times over: ~10 min on 2 idle cores
    python benchmarks/streaming.py --quick   # 6,000 of them, and 60,000: a few minutes

Writes benchmarks/results/streaming[_quick].json. The folder is ../shared/data/cifar10-jpeg.tar.gz
extracted by the library (into its cache, once); --quick takes the first 500 training and 100
test images of each class. The "10x" folder holds every image of it under 10 names (hard
links, else symbolic links, in benchmarks/cache/streaming/), so it is 10 times larger while
its files are the same.

Every measurement is a fresh process (this script with --child) that loads the data
(`load_data`) and trains the generalist of pipelines/configs/imagefolder.toml (a small CNN,
where reading the images matters most) with flips and 4-pixel crops for --epochs epochs on
--train-limit training images, on --threads torch threads (1: on a busy machine two threads
stall each other, as speed.py found): the same images and batches in both modes. Rows:

1. memory, 1x: the images decoded into tensors (from the library's tensor cache);
2. stream, 1x: read from disk batch by batch by `data.workers` loader processes;
3. stream, 10x: the same, the folder 10 times larger.

Before them each folder is loaded once in a process of its own, with the image cache
emptied first: this first load decodes (memory) or reads and checks (stream) every image
and caches what it found; its time and peak memory are reported. The training runs then
take --rounds rounds, interleaved, so that other work on the machine hits each alike:
images/s is the best epoch after the first (metrics.jsonl: the epoch loop with its loader)
of all rounds, and CPU ms per image the least CPU time (the process and its loader
workers, user + system) per trained image of a round, validation passes included.

Peak memory is sampled every 0.5 s by this process: the sum of the proportional set
sizes (PSS: each shared page counted once) of the child and its loader workers, so pages
the workers share with their parent are not counted twice (reading a PSS walks the
process's page tables: sampling more often slowed training down), so it misses spikes
shorter than that. The peak RSS of the child's own process (getrusage: exact, but it counts
none of the workers) is beside it. A run's peak is the larger of its first load's and its
training's. Ratios: stream / memory for images/s, CPU per image and both peaks, and 10x /
1x for both peaks in stream mode (target <= 1.2: memory must not grow with the data set).

Where the time goes in stream mode, in CPU microseconds per image on one core, measured in
this process: reading an image (`ImageFiles.read`: open, decode, convert to float),
collating batches of 64 (`default_collate`), the batched flips and crops; beside them the
in-memory run's CPU time per trained image.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import common
import psutil  # the dask extra brings it (make install-dev); it measures the loader workers' memory
import torch
from torch.utils.data import default_collate

from ensemble_kd import artifacts
from ensemble_kd.augment import make_augment
from ensemble_kd.config import DataConfig, load_config
from ensemble_kd.data import load_data
from ensemble_kd.generalist import train_generalist
from ensemble_kd.imagefolder import list_imagefolder
from ensemble_kd.pipeline import start_run
from ensemble_kd.streaming import ImageFiles

ARCHIVE = common.SHARED_DATA / "cifar10-jpeg.tar.gz"
CONFIG = common.REPO / "pipelines" / "configs" / "imagefolder.toml"
WORK = common.REPO / "benchmarks" / "cache" / "streaming"
CACHE = WORK / "image-cache"  # the measured runs' ENSEMBLE_KD_CACHE: emptied at the start, so first loads are first
TIMES = 10  # the larger folder holds each image under this many names
SAMPLE_S = 0.5  # how often the peak memory is sampled (reading a process's PSS takes ~15 ms and slows it down)
QUICK_PER_CLASS = (500, 100)  # --quick: training and test images per class


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="6,000 images (and 60,000 for 10x), 1,000 trained on")
    p.add_argument("--train-limit", type=int, default=0, help="data.train_limit (default 3,000; quick 1,000)")
    p.add_argument("--epochs", type=int, default=4, help="epochs of the generalist (images/s: the best but the first)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the three training runs, interleaved")
    p.add_argument("--workers", type=int, default=2, help="data.workers in stream mode")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training process (0 = torch's "
                   "default); 1, because two stall on a busy machine (see speed.py in benchmarks/README.md)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: one measurement, as JSON
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if not ARCHIVE.is_file():
        common.log_to_stderr(f"no CIFAR-10 JPEG archive at {ARCHIVE}; nothing to measure")
        return 2
    limit = args.train_limit or (1_000 if args.quick else 3_000)
    folders = {"1x": base_folder(args.quick)}
    folders["10x"] = repeated(folders["1x"], WORK / f"x{TIMES}{'-quick' if args.quick else ''}")
    runs = [("memory", "1x"), ("stream", "1x"), ("stream", "10x")]
    counts = {size: folder_images(folder) for size, folder in folders.items()}
    common.log_to_stderr(f"folders: {folders}; training on {limit} images for {args.epochs} epochs")
    shutil.rmtree(CACHE, ignore_errors=True)
    os.environ["ENSEMBLE_KD_CACHE"] = str(CACHE)  # after the archive's extraction into the usual cache
    specs = {f"{storage} {size}": {"root": str(folders[size]), "storage": storage, "limit": limit,
                                   "epochs": args.epochs, "workers": args.workers, "threads": args.threads}
             for storage, size in runs}
    rows = {}
    for name, spec in specs.items():  # decodes or scans every image once, then cached
        first = measured({**spec, "load_only": True})
        rows[name] = {"folder_images": counts[name.split()[1]], "first_load_s": first["load_s"],
                      "first_load_peak_pss_mb": first["peak_pss_mb"],
                      "first_load_child_rss_mb": first["child_peak_rss_mb"], "rounds": []}
    for round_ in range(args.rounds):  # interleaved, so that other work on the machine hits every run alike
        for name, spec in specs.items():
            rows[name]["rounds"].append(measured(spec))
            common.log_to_stderr(f"round {round_ + 1}, {name}: {rows[name]['rounds'][-1]}")
    for row in rows.values():
        summarise(row)
    breakdown = time_breakdown(folders["1x"], rows["memory 1x"]["cpu_ms_per_image"])
    ratios = ratios_of(rows)
    print(report_table(rows, ratios, breakdown))
    where = {"1x": folders["1x"] if args.quick else f"{common.relative(ARCHIVE)}, extracted", "10x": folders["10x"]}
    result = {"machine": common.machine_info(), "archive": ARCHIVE, "config": CONFIG, "train_limit": limit,
              "epochs": args.epochs, "workers": args.workers, "threads": args.threads, "folders": where,
              "runs": rows, "ratios": ratios, "stream_time_per_image_us": breakdown,
              "load_average_after": common.load_average()}
    path = common.write_result("streaming_quick" if args.quick else "streaming", result)
    common.log_to_stderr(f"wrote {path}")
    return 0


def summarise(row: dict[str, Any]) -> None:
    """A run's figures from its rounds and first load: the best images/s and CPU per image, the largest peaks."""
    rounds = row["rounds"]
    best = max(rounds, key=lambda r: r["images_per_s"])
    row.update(images_per_s=best["images_per_s"], cpu_ms_per_image=min(r["cpu_ms_per_image"] for r in rounds),
               peak_pss_mb=max(r["peak_pss_mb"] for r in rounds), most_processes=best["most_processes"],
               child_peak_rss_mb=max(r["child_peak_rss_mb"] for r in rounds), load_s=best["load_s"])
    row["run_peak_pss_mb"] = max(row["peak_pss_mb"], row["first_load_peak_pss_mb"])
    row["run_child_rss_mb"] = max(row["child_peak_rss_mb"], row["first_load_child_rss_mb"])


def ratios_of(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ratio = lambda a, b, key: rows[a][key] / rows[b][key]  # noqa: E731
    ratios = {
        "stream_over_memory_images_per_s": ratio("stream 1x", "memory 1x", "images_per_s"),
        "stream_over_memory_cpu_per_image": ratio("stream 1x", "memory 1x", "cpu_ms_per_image"),
        "stream_over_memory_peak_pss": ratio("stream 1x", "memory 1x", "run_peak_pss_mb"),
        "stream_over_memory_peak_rss": ratio("stream 1x", "memory 1x", "run_child_rss_mb"),
        "stream_10x_over_1x_peak_pss": ratio("stream 10x", "stream 1x", "run_peak_pss_mb"),
        "stream_10x_over_1x_peak_rss": ratio("stream 10x", "stream 1x", "run_child_rss_mb"),
        "stream_10x_over_1x_first_load_peak_pss": ratio("stream 10x", "stream 1x", "first_load_peak_pss_mb"),
        "stream_10x_over_1x_training_peak_pss": ratio("stream 10x", "stream 1x", "peak_pss_mb"),
    }
    ratios["memory_stays_within_20_percent"] = max(ratios["stream_10x_over_1x_peak_pss"],
                                                   ratios["stream_10x_over_1x_peak_rss"]) <= 1.2
    return ratios


# ---------------------------------------------------------------- the folders

def base_folder(quick: bool) -> Path:
    """The extracted CIFAR-10 JPEGs (the library's own extraction), or for --quick a folder linking the first
    QUICK_PER_CLASS images of each class."""
    folder = list_imagefolder(DataConfig(name="imagefolder", root=str(ARCHIVE))).folder
    if not quick:
        return folder
    target = WORK / "x1-quick"
    for split, keep in zip(("train", "test"), QUICK_PER_CLASS):
        for class_dir in sorted((folder / split).iterdir()):
            out = target / split / class_dir.name
            if not out.is_dir():
                out.mkdir(parents=True)
                for image in sorted(class_dir.iterdir())[:keep]:
                    _link(image, out / image.name)
    return target


def folder_images(folder: Path) -> int:
    listing = list_imagefolder(DataConfig(name="imagefolder", root=str(folder)))
    return len(listing.train) + len(listing.test)


def repeated(folder: Path, target: Path) -> Path:
    """`target` holding every image of `folder` (train/ and test/) under TIMES names: copy<k>-<name>."""
    done = target / ".complete"
    if done.is_file():
        return target
    common.log_to_stderr(f"linking every image of {folder} {TIMES} times into {target}")
    for split in ("train", "test"):
        for class_dir in sorted((folder / split).iterdir()):
            out = target / split / class_dir.name
            out.mkdir(parents=True, exist_ok=True)
            for image in sorted(class_dir.iterdir()):
                for k in range(TIMES):
                    copy = out / f"copy{k}-{image.name}"
                    if not copy.exists():
                        _link(image, copy)
    done.write_text("")
    return target


def _link(source: Path, link: Path) -> None:
    try:
        os.link(source, link)
    except OSError:  # another file system: a symbolic link reads the same
        link.symlink_to(source.resolve())


# ---------------------------------------------------------------- one measurement, in a fresh process

def measured(spec: dict[str, Any]) -> dict[str, Any]:
    """`child(spec)` in a fresh process, with the peak memory of it and its loader workers."""
    process = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE,
                               text=True)
    peak = {"pss": 0, "processes": 0}
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_memory, args=(process.pid, peak, stop), daemon=True)
    sampler.start()
    out, _ = process.communicate()
    stop.set()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"measurement {spec} failed (exit code {process.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    return dict(result, peak_pss_mb=round(peak["pss"] / 2**20, 1), most_processes=peak["processes"])


def _sample_memory(pid: int, peak: dict[str, int], stop: threading.Event) -> None:
    """Keep in `peak` the largest sum of PSS over process `pid` and its descendants, until `stop`."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    while not stop.is_set():
        total, count = 0, 0
        try:
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for process in processes:
            try:
                total += process.memory_full_info().pss
                count += 1
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        peak["pss"], peak["processes"] = max(peak["pss"], total), max(peak["processes"], count)
        time.sleep(SAMPLE_S)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Load the data; unless load_only, train the generalist: {"load_s", "images_per_s", ...}."""
    cfg = load_config(CONFIG, [f"data.root={spec['root']}", f"data.storage={spec['storage']}",
                               f"data.train_limit={spec['limit']}", f"data.workers={spec['workers']}",
                               "data.flip=true", "data.crop_pad=4", "device=cpu", f"threads={spec['threads']}",
                               f"generalist.train.epochs={spec['epochs']}"])
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)  # as run_pipeline does
    started = time.perf_counter()
    data = load_data(cfg.data, cfg.seed)
    result: dict[str, Any] = {"load_s": round(time.perf_counter() - started, 2),
                              "streamed": isinstance(data.x_train, ImageFiles), "train_images": len(data.y_train)}
    if not spec.get("load_only"):
        run_dir = WORK / "runs" / f"{spec['storage']}-{Path(spec['root']).name}"
        started, cpu = time.perf_counter(), _cpu_seconds()
        train_generalist(cfg, data, start_run(cfg, run_dir, overwrite=True), progress=False)
        cpu = _cpu_seconds() - cpu  # the loader workers have ended with fit: their time is counted
        epochs = artifacts.read_jsonl(run_dir / artifacts.GENERALIST_DIR / artifacts.METRICS_FILE)
        result.update(train_s=round(time.perf_counter() - started, 2), epoch_s=[e["seconds"] for e in epochs],
                      images_per_s=round(len(data.y_train) / min(e["seconds"] for e in epochs[1:] or epochs), 1),
                      cpu_ms_per_image=round(1e3 * cpu / (len(data.y_train) * len(epochs)), 3))
    result["child_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB
    return result


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its children that have ended."""
    own, ended = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + ended.ru_utime + ended.ru_stime


# ---------------------------------------------------------------- where the time goes, stream mode

def time_breakdown(folder: Path, memory_cpu_ms: float, n: int = 2_048, batch: int = 64) -> dict[str, float]:
    """CPU microseconds per image on one core: reading (ImageFiles.read), collating batches of `batch`, the
    batched flips and crops; and the in-memory run's CPU time per training image (all threads)."""
    cfg = load_config(CONFIG, [f"data.root={folder}", "data.storage=stream", "data.workers=0", "data.flip=true",
                               "data.crop_pad=4"])
    files = load_data(cfg.data, cfg.seed).x_train
    torch.set_num_threads(1)  # a loader worker runs one thread
    started = time.process_time()  # CPU time: other work on the machine does not count
    images = [files.read(i) for i in range(min(n, len(files)))]
    read = time.process_time() - started
    started = time.process_time()
    batches = [default_collate(images[i:i + batch]) for i in range(0, len(images), batch)]
    collate = time.process_time() - started
    augment = make_augment(cfg.data, files.shape[1:], 10).batch
    generator = torch.Generator().manual_seed(0)
    started = time.process_time()
    for x in batches:
        augment(x, generator)
    flips_and_crops = time.process_time() - started
    per_image = lambda seconds: round(1e6 * seconds / len(images), 1)  # noqa: E731
    return {"read": per_image(read), "collate": per_image(collate), "flips_and_crops": per_image(flips_and_crops),
            "training_in_memory": round(1e3 * memory_cpu_ms, 1)}


def report_table(rows: dict[str, dict[str, Any]], ratios: dict[str, Any], breakdown: dict[str, float]) -> str:
    table = common.format_table(
        ["run", "images", "train img/s", "CPU ms/img", "peak PSS MB", "first load PSS", "training PSS", "processes",
         "peak RSS MB", "first load s", "load s"],
        [[name, r["folder_images"], r["images_per_s"], r["cpu_ms_per_image"], r["run_peak_pss_mb"],
          r["first_load_peak_pss_mb"], r["peak_pss_mb"], r["most_processes"], r["run_child_rss_mb"],
          r["first_load_s"], r["load_s"]] for name, r in rows.items()])
    lines = [table, "", *(f"{k}: {v if isinstance(v, bool) else round(v, 3)}" for k, v in ratios.items()), "",
             "CPU microseconds per image: "
             + ", ".join(f"{k} {v:g}" for k, v in breakdown.items())]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
