"""Where specialists train: joblib's loky processes or a Dask cluster, how many at once, on which device.

Specialists are independent, so stage 4 hands them to `run_jobs`, which runs them on
existing engines -- nothing here schedules work itself:

* `loky` (default): joblib's worker processes on this machine, `specialists.n_jobs` at a time.
  On CUDA there is one worker per visible GPU instead (`n_jobs` is then ignored), and
  `specialist_device` puts specialist k on GPU k % n_gpus.
* `dask`: a running `dask.distributed` cluster at `specialists.scheduler`, through
  distributed's public `Client.map`. Each task trains one specialist and its worker writes the
  model into the run directory itself, so that directory must be on storage every
  worker sees at the same absolute path (NFS, a cluster file system); `run_jobs`
  checks this before any work is sent and closes its client afterwards. Workers should
  run one thread each (`dask worker --nthreads 1 --nworkers N`): specialists side by
  side in one process would share torch's global random stream and thread count.

The weights do not depend on the backend: a specialist's seed comes from the run seed
and its cluster id, and its torch thread count from the config (`specialist_threads`).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
from joblib import Parallel, delayed, parallel_config

from . import artifacts
from .errors import EnsembleKDError, MissingExtraError, plural
from .train import resolve_device

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0  # how long to try reaching the Dask scheduler before giving up
DASK_EXTRA = "pip install 'ensemble-kd[dask]'"


class SchedulerError(EnsembleKDError, ConnectionError):
    """The Dask scheduler cannot be reached, or its workers cannot see the run directory."""


# ---------------------------------------------------------------- devices and worker counts

def cuda_device_count(cfg: Config) -> int:
    """GPUs the specialists may use: 0 unless `device` is cuda (or auto with CUDA visible)."""
    if cfg.device == "cpu" or not torch.cuda.is_available():
        return 0
    return torch.cuda.device_count()


def specialist_device(cfg: Config, cluster_id: int) -> torch.device:
    """The device of specialist `cluster_id`: cuda:(cluster_id % n_gpus) with several GPUs
    visible to this process, else the run's device (`device`, auto resolved)."""
    device = resolve_device(cfg.device)
    if device.type != "cuda":
        return device
    n_gpus = torch.cuda.device_count()
    return torch.device("cuda", cluster_id % n_gpus) if n_gpus > 1 else device


def effective_jobs(cfg: Config, n_tasks: int) -> int:
    """Specialists trained at once on this machine (the Dask backend uses its workers instead).

    loky on CUDA: one worker per visible GPU (`specialists.n_jobs` is ignored). Otherwise
    `specialists.n_jobs`, -1 meaning one per CPU core. Never more than `n_tasks`."""
    n_gpus = cuda_device_count(cfg) if cfg.specialists.backend == "loky" else 0
    if n_gpus:
        if cfg.specialists.n_jobs not in (n_gpus, -1):
            log.info("device is CUDA: training one specialist per GPU (%d at a time), not specialists.n_jobs = %d",
                     n_gpus, cfg.specialists.n_jobs)
        wanted = n_gpus
    elif cfg.specialists.n_jobs < 0:
        wanted = os.cpu_count() or 1
    else:
        wanted = max(1, cfg.specialists.n_jobs)
    return max(1, min(wanted, n_tasks))


# ---------------------------------------------------------------- workers that outlive their run

PARENT_CHECK_S = 0.1  # how often a loky worker's watcher thread checks that the run that started it is alive
_watched_parent: int | None = None  # the parent pid this worker process watches (one watcher per process)


def worker_parent(cfg: Config) -> int | None:
    """The pid a specialist worker must outlive no longer than: this process for loky, None for Dask
    (a Dask worker's parent is its nanny; when the run's client goes, Dask cancels its futures)."""
    return os.getpid() if cfg.specialists.backend == "loky" else None


def stop_with_parent(parent_pid: int | None) -> None:
    """In a worker process: stop writing and end as soon as `parent_pid` is no longer its parent.

    loky notices a dead parent only between tasks, so a worker would otherwise finish the
    specialist it is training, minutes later, and write it into the run directory. Two
    guards, both on `os.getppid()` (a dead parent's children are re-parented):
    * before every file it writes and at every training step (`artifacts.add_write_check`),
      WritesStopped is raised, so no metrics line, checkpoint or model is written after
      the run died (a half-written temporary file is deleted; `_worker` then ends the process);
    * a daemon thread checks every PARENT_CHECK_S seconds and ends the process with
      os._exit, like the SIGKILL its parent got, when it is busy elsewhere (loading data,
      evaluating). A temporary file it cuts short is removed by the next --resume.
    Nothing to do when called in the run's own process (sequential backend) or with None (Dask)."""
    global _watched_parent
    if parent_pid is None or parent_pid == os.getpid() or _watched_parent == parent_pid:
        return
    _watched_parent = parent_pid

    def check() -> None:
        if os.getppid() != parent_pid:
            raise artifacts.WritesStopped(f"the run (pid {parent_pid}) that started this worker has ended")

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_CHECK_S)
        os._exit(1)

    artifacts.add_write_check(check)
    threading.Thread(target=watch, name="ensemble-kd-parent-watch", daemon=True).start()


# ---------------------------------------------------------------- running the jobs

def run_jobs(cfg: Config, n_jobs: int, run_dir: str | Path | None, function: Callable[..., Any],
             calls: Sequence[tuple], connect_timeout: float = CONNECT_TIMEOUT_S,
             on_done: Callable[[int], None] | None = None) -> list[Any]:
    """`function(*args)` for each `args` in `calls`, on the configured backend; the results in order.
    `on_done(i)` is called here, in this process, as soon as call i has finished (in the order they finish).

    loky: joblib's worker processes, `n_jobs` at a time (in this process when n_jobs is 1),
    their results taken as they come (`return_as="generator_unordered"`).
    dask: every call is a task on the cluster at `specialists.scheduler`, through
    distributed's public `Client.map` and `as_completed` (the first task error is raised
    here). The client connects (SchedulerError after `connect_timeout` seconds), checks
    that every worker sees `run_dir` (when given) and is closed however the jobs end,
    which cancels what is still queued. Unlike joblib's Dask backend, which runs
    everything in the caller when the cluster reports a single worker thread, this never
    falls back to this process.
    """
    on_done = on_done or (lambda i: None)
    results: list[Any] = [None] * len(calls)
    if cfg.specialists.backend != "dask":
        with parallel_config(backend="loky" if n_jobs > 1 else "sequential"):
            finished = Parallel(n_jobs=n_jobs, return_as="generator_unordered")(
                delayed(_numbered)(function, i, args) for i, args in enumerate(calls))
            for i, result in finished:
                results[i] = result
                on_done(i)
        return results
    client = connect(cfg.specialists.scheduler, connect_timeout)
    try:
        if run_dir is not None:
            check_shared_run_dir(client, run_dir)
        _warn_about_threaded_workers(client)
        log.info("running %s on the Dask cluster at %s (%s)", plural(len(calls), "task"), cfg.specialists.scheduler,
                 plural(len(client.scheduler_info().get("workers", {})), "worker"))
        futures = client.map(function, *zip(*calls), pure=False) if calls else []
        for i, result in _as_completed(client, futures):
            results[i] = result
            on_done(i)
        return results
    finally:
        client.close()


def _numbered(function: Callable[..., Any], i: int, args: tuple) -> tuple[int, Any]:
    """(i, function(*args)): which call a result belongs to, when results come in the order they finish."""
    return i, function(*args)


def _as_completed(client: Any, futures: list[Any]) -> Iterator[tuple[int, Any]]:
    """(index in `futures`, result) of each of `client`'s futures as it finishes; a task's error is raised here."""
    from distributed import as_completed  # the dask extra; run_jobs has connected through it already

    index = {future.key: i for i, future in enumerate(futures)}
    for future in as_completed(futures, loop=client.loop):  # the client is not the default one
        yield index[future.key], future.result()


def connect(address: str, timeout: float = CONNECT_TIMEOUT_S) -> Any:
    """A `dask.distributed.Client` of the scheduler at `address` (not made the default client)."""
    try:
        from dask.distributed import Client  # the dask extra
    except ImportError as err:
        raise MissingExtraError(f"specialists.backend = 'dask' needs dask.distributed, which is not installed: "
                                f"{DASK_EXTRA}") from err
    try:
        return Client(address, timeout=timeout, set_as_default=False)
    except Exception as err:  # refused, timed out, a malformed address or not a Dask scheduler at all
        raise SchedulerError(
            f"cannot reach a Dask scheduler at specialists.scheduler = {address!r} within {timeout:g} s "
            f"({type(err).__name__}: {err}); start one with `dask scheduler` and workers with "
            f"`dask worker {address or 'tcp://HOST:8786'}`, or fix the address (tcp://host:port)") from err


def _warn_about_threaded_workers(client: Any) -> None:
    """Two specialists in one worker process share torch's global seed and thread count."""
    threaded = sorted(address for address, n in client.nthreads().items() if n > 1)
    if threaded:
        log.warning("%d Dask workers run several threads (e.g. %s): specialists trained side by side in one "
                    "process share torch's random stream, so their weights are not reproducible; start workers "
                    "with `dask worker --nthreads 1 --nworkers N`", len(threaded), threaded[0])


def check_shared_run_dir(client: Any, run_dir: str | Path) -> None:
    """SchedulerError unless every connected worker sees this run's clusters.json at the same path."""
    run_dir = Path(run_dir)
    if not run_dir.is_absolute():
        raise SchedulerError(f"the run directory {str(run_dir)!r} is relative, but Dask workers resolve paths "
                             f"from their own working directory; pass an absolute path ({run_dir.absolute()})")
    probe = str(run_dir / artifacts.CLUSTERS_FILE)
    seen = client.run(os.path.isfile, probe)  # {worker address: bool}, run on every worker now connected
    blind = sorted(address for address, ok in seen.items() if not ok)
    if blind:
        raise SchedulerError(
            f"{len(blind)} of {len(seen)} Dask workers cannot see {probe} (e.g. {blind[0]}): each worker writes "
            "its specialist into the run directory itself, so the run directory must be on storage shared by "
            "the workers and this machine, at the same absolute path (e.g. NFS); use --out on shared storage")
