"""Stage 4: one specialist per cluster of confusable classes, trained in parallel.

A specialist for class subset S starts as a copy of the generalist with a head of
|S| + 1 outputs (the last is the "dustbin" for every class outside S). It trains on an
*enriched* stream (by default half its own classes, half random others), first on hard
labels, then on the generalist's soft targets folded onto S + dustbin, which keeps it
from overfitting its few classes. Finally its dustbin bias is corrected for the
oversampling of S: by default fitted on the held-out split (natural class mix);
`dustbin_correction = "prior"` adds the log of the oversampling ratio as Hinton et al.
(2015, section 5) do, which over-corrects once phase 2 has pulled the specialist towards
the generalist's natural-prior soft targets.

Specialists are independent, so `train_all_specialists` runs them in parallel
(`parallel.run_jobs`: joblib's loky processes, or a Dask cluster); a finished one is never
trained again.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import os
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch
from joblib.externals.loky.process_executor import TerminatedWorkerError

from . import artifacts
from .artifacts import STARTED_FILE, ArtifactError
from .augment import make_augment
from .backbones import data_config
from .config import Config, ModelConfig, recipe
from .confusion import read_clusters
from .data import Splits, load_data
from .errors import EnsembleKDError, plural
from .generalist import generalist_fingerprint, load_generalist
from .inference import predict_logits
from .losses import dustbin_log_correction, fit_dustbin_shift, fold_labels, fold_probs, kd_loss
from .models import Classifier, build_model, replace_head
from .parallel import effective_jobs, run_jobs, specialist_device, stop_with_parent, worker_parent
from .streaming import take
from .train import FitOptions, TrainSet, fit, load_finished, save_model, set_seed

log = logging.getLogger(__name__)


class SpecialistError(EnsembleKDError, RuntimeError):
    """A specialist failed; names its cluster id and the cause."""


def specialist_seed(seed: int, cluster_id: int) -> int:
    """Derived from the run seed and the cluster id only, so the schedule of workers does not matter."""
    digest = hashlib.sha256(f"{seed}/specialist/{cluster_id}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


def specialist_dir(run_dir: str | Path, cluster_id: int) -> Path:
    return Path(run_dir) / artifacts.SPECIALISTS_DIR / f"specialist_{cluster_id:02d}"


def enriched_indices(in_subset: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Shuffled indices with every example of S plus random others, so S makes up `fraction` of them.

    Others are drawn without replacement when there are enough, else with replacement.
    """
    inside = in_subset.nonzero().flatten()
    outside = (~in_subset).nonzero().flatten()
    n_out = round(len(inside) * (1 - fraction) / fraction)
    if n_out <= len(outside):
        picked = outside[torch.randperm(len(outside), generator=generator)[:n_out]]
    else:
        picked = outside[torch.randint(len(outside), (n_out,), generator=generator)]
    chosen = torch.cat([inside, picked])
    return chosen[torch.randperm(len(chosen), generator=generator)]


def specialist_head(generalist: Classifier, subset: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows for S copied from the generalist's head; the dustbin row starts as the mean of the
    other classes' rows with bias log-sum-exp of their biases, so its initial logit is close to
    the log of the generalist's total probability outside S (exact when those rows agree)."""
    weight, bias = generalist.head.weight.detach(), generalist.head.bias.detach()
    others = torch.ones(len(bias), dtype=torch.bool)
    others[subset] = False
    dust_w = weight[others].mean(0, keepdim=True)
    dust_b = torch.logsumexp(bias[others], 0, keepdim=True)
    return torch.cat([weight[subset], dust_w]), torch.cat([bias[subset], dust_b])


def new_specialist(generalist: Classifier, subset: list[int]) -> Classifier:
    """A copy of the generalist with the |S| + 1 head of `specialist_head` (specialists.init = generalist)."""
    model = copy.deepcopy(generalist)
    return replace_head(model, *specialist_head(generalist, subset))


def specialist_model_config(cfg: Config) -> ModelConfig:
    """The architecture of the specialists: specialists.model, or the generalist's where its arch is 'generalist'."""
    own = cfg.specialists.model
    return cfg.generalist.model if own.arch == "generalist" else own


def build_specialist(cfg: Config, data: Splits, generalist: Classifier, subset: list[int], seed: int,
                     load_weights: bool = True) -> Classifier:
    """Specialist `subset`'s starting point: the folded generalist (init = generalist) or fresh
    weights of `specialist_model_config` seeded by `seed` (init = scratch; its pretrained weights
    unless `load_weights` is False), with |S| + 1 outputs."""
    if cfg.specialists.init == "generalist":
        return new_specialist(generalist, subset)
    set_seed(seed)
    return build_model(specialist_model_config(cfg), data.input_shape, len(subset) + 1, data.mean, data.std,
                       load_weights)


def _soft_targets(generalist_logits: torch.Tensor, subset_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Teacher logits at temperature T for S + dustbin: T * log(fold(softmax(g / T)))."""
    folded = fold_probs(torch.softmax(generalist_logits / temperature, 1), subset_t)
    return temperature * folded.clamp_min(1e-12).log()


def train_specialist(cfg: Config, run_dir: str | Path, cluster_id: int, data: Splits | None = None,
                     threads: int = 0, progress: bool = False) -> Path:
    """Train specialist `cluster_id` of this run (both phases) and write its model file.

    With `threads` > 0 it trains with that many torch CPU threads; the caller's thread
    count is restored afterwards (in-process runs must not change later stages)."""
    previous = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        return _train_specialist(cfg, run_dir, cluster_id, data, progress)
    finally:
        torch.set_num_threads(previous)


def _train_specialist(cfg: Config, run_dir: str | Path, cluster_id: int, data: Splits | None,
                      progress: bool) -> Path:
    started = time.perf_counter()
    data = data or load_data(data_config(cfg), cfg.seed)
    subset = read_clusters(run_dir)[cluster_id]
    out_dir = specialist_dir(run_dir, cluster_id)
    seed = specialist_seed(cfg.seed, cluster_id)
    fingerprint = specialist_fingerprint(cfg, data, cluster_id, subset)
    generalist = load_generalist(cfg, data, run_dir)
    model = build_specialist(cfg, data, generalist, subset, seed)
    if load_finished(model, out_dir, dict(fingerprint, stage=f"specialist {cluster_id}")):
        return out_dir / artifacts.MODEL_FILE
    out_dir.mkdir(parents=True, exist_ok=True)
    artifacts.write_text(out_dir / STARTED_FILE, str(os.getpid()))
    device = specialist_device(cfg, cluster_id)
    subset_t = torch.tensor(subset)
    fraction = cfg.specialists.in_cluster_fraction
    in_subset = torch.isin(data.y_train, subset_t)
    labels = fold_labels(data.y_train, subset_t, data.num_classes)
    val_idx = enriched_indices(torch.isin(data.y_val, subset_t), fraction, torch.Generator().manual_seed(seed))
    val = TrainSet(take(data.x_val, val_idx), fold_labels(data.y_val[val_idx], subset_t, data.num_classes))
    indices = lambda epoch, gen: enriched_indices(in_subset, fraction, gen)  # noqa: E731
    options = FitOptions(stage=f"specialist {cluster_id} hard", seed=seed, fingerprint=fingerprint,
                         epoch_indices=indices, augment=make_augment(cfg.data, data.input_shape, len(subset) + 1),
                         val=val, device=device, progress=progress, precision=cfg.precision,
                         compile_model=cfg.compile, tensorboard=cfg.log.tensorboard,
                         lr_setting="specialists.train.lr", clip_setting="specialists.train.grad_clip")
    fit(model, TrainSet(data.x_train, labels), cfg.specialists.train, out_dir / "hard", options)
    if cfg.specialists.soft_epochs > 0:
        model = _soft_phase(cfg, model, generalist, data, labels, subset_t, out_dir,
                            dataclasses.replace(options, stage=f"specialist {cluster_id} soft",
                                                lr_setting="specialists.soft_lr"))
    shift = _dustbin_shift(cfg, model, data, subset_t, float(in_subset.double().mean()), device)
    with torch.no_grad():
        model.head.bias[-1] += shift
    save_model(model, out_dir, dict(fingerprint, stage=f"specialist {cluster_id}"), subset=subset,
               dustbin_shift=shift)
    log.info("specialist %d (classes %s) trained in %.1fs", cluster_id, subset, time.perf_counter() - started)
    return out_dir / artifacts.MODEL_FILE


def _dustbin_shift(cfg: Config, model: Classifier, data: Splits, subset_t: torch.Tensor, subset_prior: float,
                   device: torch.device) -> float:
    """How much to add to the dustbin logit so the specialist's prior matches the natural class mix."""
    mode = cfg.specialists.dustbin_correction
    if mode == "prior":  # Hinton et al.: the log of the oversampling ratio
        return dustbin_log_correction(subset_prior, cfg.specialists.in_cluster_fraction)
    if mode == "none":
        return 0.0
    # fitted on the whole held-out split: the phase-2 soft targets already carry the natural prior in part
    logits = predict_logits(model, data.x_val, device=device, precision=cfg.precision)
    return fit_dustbin_shift(logits, fold_labels(data.y_val, subset_t, data.num_classes))


def _soft_phase(cfg: Config, model: Classifier, generalist: Classifier, data: Splits, labels: torch.Tensor,
                subset_t: torch.Tensor, out_dir: Path, options: FitOptions) -> Classifier:
    """Phase 2: fine-tuning on the generalist's soft targets folded onto S + dustbin (the teacher runs on
    each augmented batch; without augmentation its targets are computed once)."""
    spec = cfg.specialists
    generalist = generalist.to(options.device)  # the teacher runs where the batches are
    soft_cfg = copy.deepcopy(spec.train)
    soft_cfg.epochs, soft_cfg.lr, soft_cfg.warmup_epochs = spec.soft_epochs, spec.soft_lr, 0
    teacher = None if options.augment is None else _FoldedTeacher(generalist, subset_t, spec.temperature)
    targets = None if options.augment is not None else _soft_targets(
        predict_logits(generalist, data.x_train, device=options.device, precision=cfg.precision), subset_t,
        spec.temperature)
    loss = lambda s, y, t: kd_loss(s, t, y, spec.soft_alpha, spec.temperature)  # noqa: E731
    return fit(model, TrainSet(data.x_train, labels, targets), soft_cfg, out_dir / "soft",
               dataclasses.replace(options, loss_fn=loss, teacher=teacher))


class _FoldedTeacher(torch.nn.Module):
    """The generalist's soft targets folded onto S + dustbin, for augmented batches."""

    def __init__(self, generalist: Classifier, subset_t: torch.Tensor, temperature: float) -> None:
        super().__init__()
        self.generalist, self.temperature = generalist.eval(), temperature
        self.register_buffer("subset_t", subset_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _soft_targets(self.generalist(x), self.subset_t, self.temperature)


def specialist_fingerprint(cfg: Config, data: Splits, cluster_id: int, subset: list[int]) -> dict:
    """What specialist `cluster_id`'s files must match: the generalist's fingerprint, its classes and the
    specialists settings that change its weights (not how specialists are scheduled)."""
    return dict(generalist_fingerprint(cfg, data), cluster_id=cluster_id, subset=list(subset),
                specialist=recipe(cfg.specialists, "specialists."))


def load_specialist(cfg: Config, data: Splits, run_dir: str | Path, cluster_id: int,
                    generalist: Classifier | None = None) -> Classifier:
    """A finished specialist (dustbin correction included), in eval mode."""
    subset = read_clusters(run_dir)[cluster_id]
    generalist = generalist or build_model(cfg.generalist.model, data.input_shape, data.num_classes,
                                           data.mean, data.std, load_weights=False)
    model = build_specialist(cfg, data, generalist, subset, specialist_seed(cfg.seed, cluster_id), load_weights=False)
    fingerprint = dict(specialist_fingerprint(cfg, data, cluster_id, subset), stage=f"specialist {cluster_id}")
    if not load_finished(model, specialist_dir(run_dir, cluster_id), fingerprint):
        raise ArtifactError(f"specialist {cluster_id} has not been trained ({specialist_dir(run_dir, cluster_id)}); "
                            "run `ensemble-kd run --resume`")
    return model.eval()


def is_finished(run_dir: str | Path, cluster_id: int) -> bool:
    return (specialist_dir(run_dir, cluster_id) / artifacts.MODEL_FILE).exists()


def _worker(cfg: Config, run_dir: str, cluster_id: int, threads: int, parent_pid: int | None = None) -> str:
    stop_with_parent(parent_pid)  # a loky worker must not train on after its run was killed
    try:
        return str(train_specialist(cfg, run_dir, cluster_id, threads=threads))
    except artifacts.WritesStopped:  # its run is gone: nobody is left to take a result
        os._exit(1)
    except Exception as err:
        raise SpecialistError(f"specialist {cluster_id} failed: {type(err).__name__}: {err}") from err


def train_all_specialists(cfg: Config, run_dir: str | Path, data: Splits | None = None) -> list[Path]:
    """Train every unfinished specialist, `specialists.n_jobs` at a time; returns all model paths.

    With `data`, the finished specialists are checked against this run first (an
    ArtifactError names a corrupt or foreign one before any training). When a worker
    process dies (killed, out of memory) a SpecialistError names the specialists that were
    training (on Ctrl-C joblib stops the workers itself). Finished specialists are kept."""
    run_dir = Path(run_dir).absolute()  # Dask workers resolve relative paths from their own directory
    clusters = read_clusters(run_dir)
    n_clusters = len(clusters)
    todo = [k for k in range(n_clusters) if not is_finished(run_dir, k)]
    done = [k for k in range(n_clusters) if k not in todo]
    if done:
        log.info("specialists %s already trained; not training them again", done)
        if data is not None:
            _check_finished(cfg, data, run_dir, done)
    if todo:
        n_jobs = effective_jobs(cfg, len(todo))
        labels = None if data is None else data.y_train
        if n_jobs > 1 or cfg.specialists.backend == "dask":  # one at a time, the order changes nothing
            todo = dispatch_order(cfg, {k: clusters[k] for k in todo}, labels)
        costs = specialist_costs(cfg, {k: clusters[k] for k in todo}, labels)
        threads = specialist_threads(cfg, n_clusters)
        log.info("training %s (%s), %d at a time, %s each", plural(len(todo), "specialist"),
                 ", ".join(map(str, todo)), n_jobs, plural(threads, "thread"))
        for k in todo:  # a marker left by an earlier crash would blame this run's failure on the wrong one
            (specialist_dir(run_dir, k) / STARTED_FILE).unlink(missing_ok=True)
        parent = worker_parent(cfg)
        try:
            run_jobs(cfg, n_jobs, run_dir, _worker, [(cfg, str(run_dir), k, threads, parent) for k in todo],
                     on_done=_Progress([costs[k] for k in todo], len(done), n_clusters))
        except _worker_deaths(cfg) as err:
            raise SpecialistError(_died_message(run_dir, todo, err)) from err
    return [specialist_dir(run_dir, k) / artifacts.MODEL_FILE for k in range(n_clusters)]


def specialist_costs(cfg: Config, subsets: dict[int, list[int]],
                     labels: torch.Tensor | None = None) -> dict[int, float]:
    """{cluster id: how much training its specialist takes}: its enriched stream's size (its classes' training
    examples in `labels` / in_cluster_fraction; its number of classes when the labels are not at hand) times
    the epochs of both phases."""
    epochs = cfg.specialists.train.epochs + cfg.specialists.soft_epochs

    def cost(subset: list[int]) -> float:
        inside = len(subset) if labels is None else int(torch.isin(labels, torch.tensor(subset)).sum())
        return inside / cfg.specialists.in_cluster_fraction * epochs

    return {k: cost(subset) for k, subset in subsets.items()}


def dispatch_order(cfg: Config, subsets: dict[int, list[int]], labels: torch.Tensor | None = None) -> list[int]:
    """The cluster ids of `subsets` (id -> its classes) in the order to hand them to the workers: the
    costliest first (`specialist_costs`), ties by id.

    Starting the longest first lets parallel workers finish together. The order does not
    change any specialist: each one's seed comes from the run seed and its cluster id, its
    thread count from the config."""
    costs = specialist_costs(cfg, subsets, labels)
    return sorted(costs, key=lambda k: (-costs[k], k))


def _about(seconds: float) -> str:
    """A rough duration: "40 s", "3 min", "1 h", "2 h 5 min"."""
    if seconds < 60:
        return f"{max(1, round(seconds))} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h" + (f" {minutes % 60} min" if minutes % 60 else "")


class _Progress:
    """The run-level progress of stage 4: one log line per finished specialist, with how many of all the
    run's specialists are done and about how long the rest take (this run's pace per unit of
    `specialist_costs`, so a specialist of many classes counts for more)."""

    def __init__(self, costs: list[float], finished_before: int, total: int) -> None:
        self.costs, self.finished_before, self.total = costs, finished_before, total
        self.started, self.done = time.perf_counter(), 0.0
        self.count = 0

    def __call__(self, index: int) -> None:
        """Specialist `index` (of the costs given) has finished."""
        self.count += 1
        self.done += self.costs[index]
        elapsed = time.perf_counter() - self.started
        finished = self.finished_before + self.count
        if finished == self.total:
            log.info("specialists: %d/%d done (%s for this run's %d)", finished, self.total, _about(elapsed),
                     self.count)
            return
        left = elapsed / max(self.done, 1e-9) * (sum(self.costs) - self.done)
        log.info("specialists: %d/%d done, about %s left", finished, self.total, _about(left))


def _check_finished(cfg: Config, data: Splits, run_dir: Path, finished: list[int]) -> None:
    """ArtifactError (naming the file and what differs) for a finished specialist that is corrupt or
    belongs to another configuration, before any other specialist trains."""
    for k in finished:
        load_specialist(cfg, data, run_dir, k)


def _worker_deaths(cfg: Config) -> tuple[type[BaseException], ...]:
    """The errors raised when a worker process dies rather than raising an exception (loky, Dask)."""
    deaths: tuple[type[BaseException], ...] = (TerminatedWorkerError, BrokenProcessPool)
    if cfg.specialists.backend != "dask":
        return deaths
    try:
        from distributed import KilledWorker  # the dask extra
    except ImportError:  # run_jobs has already said how to install it
        return deaths
    return (*deaths, KilledWorker)


def _died_message(run_dir: Path, todo: list[int], err: BaseException) -> str:
    """Which specialists were training when their worker died: started (STARTED written by
    train_specialist) but not finished."""
    dead = [k for k in todo if (specialist_dir(run_dir, k) / STARTED_FILE).exists() and not is_finished(run_dir, k)]
    kept = [k for k in range(len(read_clusters(run_dir))) if is_finished(run_dir, k)]
    codes = [line.strip() for line in str(err).splitlines() if "exit code" in line]
    return (f"specialist(s) {', '.join(map(str, dead)) or '?'} stopped: a worker process died "
            f"({type(err).__name__}{'; ' + codes[0] if codes else ''}), usually because it ran out of memory "
            f"(lower specialists.n_jobs) or was killed. Finished specialists are kept "
            f"({', '.join(map(str, kept)) or 'none yet'}): rerun with --resume to train the rest")


def specialist_threads(cfg: Config, n_clusters: int) -> int:
    """Torch CPU threads of each specialist: `threads`, else the cores shared out over all clusters.

    Fixed by the config and the machine, never by `n_jobs` or by how many specialists are
    left to train: the thread count changes the float rounding of CPU kernels, so a
    specialist would otherwise get other weights when trained sequentially, in parallel,
    or on resume."""
    return cfg.threads or max(1, (os.cpu_count() or 1) // max(1, n_clusters))
