"""Stage 5: a generalist and its specialists combined into one distribution (Hinton et al. 2015, eq. 5).

For an input, the generalist gives p_g over all C classes. Specialist m, trained on a
subset S_m, gives p_m over S_m plus a "dustbin" for every other class. A specialist is
*active* when one of the generalist's top-n classes is in its subset. The ensemble's
answer is the q over C classes that minimises

    L(q) = KL(p_g || q) + sum_{m active} KL(p_m || fold_m(q)),
    fold_m(q) = (q_c for c in S_m, in order; then sum of q_c for c outside S_m).

Up to constants L(q) = -sum_j w_j log Q(A_j), a sum over weighted "observations" j that
each say "the class is in A_j": singletons {c} with weight p_g,c, singletons {c}, c in
S_m, with weight p_m,c, and the complement of S_m with weight p_m,dustbin. The weights
total W = 1 + M (M active specialists). L is convex in q, and EM for this censored
multinomial solves it, decreasing L at every step:

    q_c <- (1 / W) * sum_j w_j * q_c * [c in A_j] / Q(A_j)
         = (p_g,c + sum_{m: c in S_m} p_m,c + q_c * sum_{m: c not in S_m} p_m,dust / Q(not S_m)) / (1 + M)

(a singleton's responsibility q_c / q_c is exactly 1, written as 1 so that q_c = 0 is no
0/0). For one active specialist the minimiser has a closed form (Lagrange, multiplier 2):
q_c = (p_g,c + p_m,c) / 2 on S and q_c = p_g,c (g_out + p_m,dust) / (2 g_out) off S, with
g_out the generalist's mass off S: the average of p_g and the specialist's distribution
with its dustbin spread over the other classes as the generalist spreads its own mass
there. Once two or more specialists are active there is no closed form, and averaging is
no longer the minimiser. EM started from p_g reaches the closed form after one step.

Everything is batched: a (K, C) membership matrix turns the per-specialist sums into
matrix products; the only Python loops are over the K specialists (to gather their
outputs) and over the EM iterations. The combination always runs in float32 or wider,
also inside a mixed-precision (autocast) region, where float16 / bfloat16 matrix
products would round small probabilities away.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Config
from .confusion import read_clusters
from .data import Splits
from .errors import plural
from .specialists import load_specialist

log = logging.getLogger(__name__)

PROB_FLOOR = 1e-12  # smallest probability EM starts from, so classes the generalist rules out can still get mass

_F = TypeVar("_F", bound=Callable)


def _without_autocast(fn: _F) -> _F:
    """Run `fn` with autocast off (CPU and CUDA), whatever region it is called from."""
    @functools.wraps(fn)
    def full_precision(*args, **kwargs):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)
    return full_precision  # type: ignore[return-value]


def membership_matrix(clusters: Sequence[Sequence[int]], num_classes: int) -> Tensor:
    """(K, C) bool matrix: row k marks the classes of cluster k. Clusters may overlap."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    membership = torch.zeros(len(clusters), num_classes, dtype=torch.bool)
    for k, cluster in enumerate(clusters):
        ids = [int(c) for c in cluster]
        if not ids:
            raise ValueError(f"cluster {k} is empty; every specialist needs at least one class")
        bad = [c for c in ids if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"cluster {k} has class ids outside [0, {num_classes}): {bad}; "
                             "check the clusters against the number of classes")
        if len(set(ids)) != len(ids):
            raise ValueError(f"cluster {k} repeats class ids: {ids}; each class may appear once per cluster")
        if len(ids) == num_classes:
            raise ValueError(f"cluster {k} holds all {num_classes} classes, so its specialist has no dustbin; "
                             "use more clusters")
        membership[k, ids] = True
    return membership


def active_specialists(generalist_probs: Tensor, membership: Tensor, top_n: int) -> Tensor:
    """(N, K) bool: specialist k is active for an input when one of the generalist's
    top-n classes for that input is in its subset."""
    num_classes = generalist_probs.shape[1]
    if membership.ndim != 2 or membership.shape[1] != num_classes:
        raise ValueError(f"membership must be (K, {num_classes}), got {tuple(membership.shape)}")
    if not 1 <= top_n <= num_classes:
        raise ValueError(f"top_n must be in [1, {num_classes}], got {top_n}")
    top_classes = generalist_probs.topk(top_n, dim=1).indices  # (N, top_n)
    return membership.to(generalist_probs.device).T[top_classes].any(dim=1)  # (N, top_n, K) -> (N, K)


def _check_combine_inputs(generalist_probs: Tensor, specialist_probs: Sequence[Tensor],
                          membership: Tensor, active: Tensor) -> None:
    if generalist_probs.ndim != 2:
        raise ValueError(f"generalist_probs must be (N, C), got shape {tuple(generalist_probs.shape)}")
    n, c = generalist_probs.shape
    if membership.ndim != 2 or membership.shape[1] != c:
        raise ValueError(f"membership must be (K, {c}), got {tuple(membership.shape)}")
    k = membership.shape[0]
    if len(specialist_probs) != k:
        raise ValueError(f"got {len(specialist_probs)} specialist outputs for {k} membership rows; "
                         "pass one (N, |S_k| + 1) tensor per specialist")
    if tuple(active.shape) != (n, k):
        raise ValueError(f"active must be (N, K) = ({n}, {k}), got {tuple(active.shape)}")
    sizes = membership.sum(dim=1).tolist()
    for i, (probs, size) in enumerate(zip(specialist_probs, sizes)):
        if tuple(probs.shape) != (n, size + 1):
            raise ValueError(f"specialist {i} output must be (N, |S| + 1) = ({n}, {size + 1}) (its classes, "
                             f"then the dustbin), got {tuple(probs.shape)}")


def _gather_specialists(specialist_probs: Sequence[Tensor], membership: Tensor, active: Tensor,
                        dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Sum the active specialists' in-subset probabilities per class, (N, C), and collect
    their dustbin probabilities, (N, K); inactive specialists contribute exact zeros
    (whatever their rows hold, NaN included)."""
    n, num_classes = active.shape[0], membership.shape[1]
    in_subset = torch.zeros(n, num_classes, dtype=dtype, device=active.device)
    dustbin = torch.zeros(n, membership.shape[0], dtype=dtype, device=active.device)
    for k, probs in enumerate(specialist_probs):
        probs = probs.to(device=active.device, dtype=dtype)
        use = active[:, k : k + 1]
        classes = membership[k].nonzero().flatten()
        in_subset[:, classes] += torch.where(use, probs[:, :-1], 0.0)
        dustbin[:, k] = torch.where(use[:, 0], probs[:, -1], 0.0)
    return in_subset, dustbin


def _prepare(generalist_probs: Tensor, specialist_probs: Sequence[Tensor], membership: Tensor,
             active: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Checked inputs on one device in at least float32: (p_g, in-subset mass, dustbin mass, outside mask, active)."""
    _check_combine_inputs(generalist_probs, specialist_probs, membership, active)
    device = generalist_probs.device
    dtype = torch.promote_types(generalist_probs.dtype, torch.float32)
    membership, active = membership.to(device), active.to(device)
    in_subset, dustbin = _gather_specialists(specialist_probs, membership, active, dtype)
    return generalist_probs.to(dtype), in_subset, dustbin, (~membership).to(dtype), active


def _em_step(q: Tensor, generalist: Tensor, in_subset: Tensor, dustbin: Tensor, outside: Tensor,
             total_weight: Tensor) -> Tensor:
    """One EM update of q (N, C); `outside` is the (K, C) float complement of membership."""
    outside_mass = (q @ outside.T).clamp_min(PROB_FLOOR)  # Q(not S_k), (N, K)
    complement_share = (dustbin / outside_mass) @ outside  # sum_k p_k,dust [c not in S_k] / Q(not S_k), (N, C)
    q_new = (generalist + in_subset + q * complement_share) / total_weight
    return q_new / q_new.sum(dim=1, keepdim=True)  # EM keeps the sum at 1; this only absorbs rounding


@_without_autocast
def combine(generalist_probs: Tensor, specialist_probs: Sequence[Tensor], membership: Tensor,
            active: Tensor, iterations: int = 50, tolerance: float = 1e-6) -> Tensor:
    """The q (N, C) minimising KL(p_g || q) + sum_{m active} KL(p_m || fold_m(q)), by EM.

    generalist_probs: (N, C). specialist_probs[k]: (N, |S_k| + 1), the classes of
    membership[k] in ascending class id, then the dustbin (`EnsembleTeacher` reorders
    heads whose cluster is listed in another order). membership: (K, C) bool.
    active: (N, K) bool. EM starts from p_g floored at PROB_FLOOR and runs at most
    `iterations` steps; a row stops moving once its largest change is below `tolerance`
    (so a row's result does not depend on the rest of the batch). Rows with no active
    specialist are returned as generalist_probs exactly. Computes in at least float32
    and returns generalist_probs' dtype.
    """
    if iterations < 0 or tolerance < 0:
        raise ValueError(f"iterations and tolerance must be >= 0, got {iterations} and {tolerance}")
    generalist, in_subset, dustbin, outside, active = _prepare(generalist_probs, specialist_probs, membership,
                                                                active)
    total_weight = 1.0 + active.to(generalist.dtype).sum(dim=1, keepdim=True)
    has_active = active.any(dim=1)

    q = generalist.clamp_min(PROB_FLOOR)
    q = q / q.sum(dim=1, keepdim=True)
    done = ~has_active
    steps = 0
    while steps < iterations and not bool(done.all()):
        q_new = _em_step(q, generalist, in_subset, dustbin, outside, total_weight)
        change = (q_new - q).abs().amax(dim=1)
        q = torch.where(done[:, None], q, q_new)
        done = done | (change < tolerance)
        steps += 1
    log.debug("ensemble EM: %d steps, %d of %d rows converged", steps, int(done.sum()), len(done))
    return torch.where(has_active[:, None], q.to(generalist_probs.dtype), generalist_probs)


class _FrozenMembers(nn.Module):
    """A generalist and its specialists, frozen: always eval mode, no gradients.

    Like mdistiller's teacher, `train()` is overridden so that putting a surrounding
    model in training mode never switches dropout or batch-norm updates on here.
    Specialists run only on the rows where they are active (faster when K is large; in
    eval mode a row's output does not depend on the rest of its batch, so the result is
    the same as running them on the whole batch).
    """

    def __init__(self, generalist: nn.Module, specialists: Sequence[nn.Module], clusters: Sequence[Sequence[int]],
                 num_classes: int, top_n: int = 1, dustbin_shift: Sequence[float] | None = None) -> None:
        super().__init__()
        if len(specialists) != len(clusters):
            raise ValueError(f"got {plural(len(specialists), 'specialist')} for {plural(len(clusters), 'cluster')}; "
                             "pass one per cluster")
        shift = [0.0] * len(clusters) if dustbin_shift is None else [float(s) for s in dustbin_shift]
        if len(shift) != len(clusters):
            raise ValueError(f"dustbin_shift has {plural(len(shift), 'value')} for "
                             f"{plural(len(clusters), 'specialist')}; give one per specialist or None")
        if not 1 <= top_n <= num_classes:
            raise ValueError(f"top_n must be in [1, {num_classes}], got {top_n}")
        self.generalist = generalist
        self.specialists = nn.ModuleList(specialists)
        self.clusters = [[int(c) for c in cluster] for cluster in clusters]
        self.num_classes = num_classes
        self.top_n = top_n
        self.register_buffer("membership", membership_matrix(self.clusters, num_classes))
        self.register_buffer("dustbin_shift", torch.tensor(shift, dtype=torch.float32))
        # head column order -> ascending class id, dustbin kept last
        self._column_order = [sorted(range(len(c)), key=c.__getitem__) + [len(c)] for c in self.clusters]
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "_FrozenMembers":
        return super().train(False)

    def _specialist_probs(self, x: Tensor, active: Tensor, dtype: torch.dtype) -> list[Tensor]:
        outputs = []
        for k, specialist in enumerate(self.specialists):
            width = len(self.clusters[k]) + 1
            probs = torch.zeros(active.shape[0], width, dtype=dtype, device=active.device)
            rows = active[:, k].nonzero().flatten()
            if rows.numel():
                logits = specialist(x[rows])
                if logits.shape[1] != width:
                    raise ValueError(f"specialist {k} outputs {logits.shape[1]} logits but its cluster has "
                                     f"{plural(width - 1, 'class')} (+1 dustbin); check that it was trained "
                                     "for this cluster")
                logits = torch.cat([logits[:, :-1], logits[:, -1:] + self.dustbin_shift[k]], dim=1)
                probs[rows] = F.softmax(logits.to(dtype), dim=1)[:, self._column_order[k]]
            outputs.append(probs)
        return outputs

    @torch.no_grad()
    def members(self, x: Tensor) -> dict[str, Tensor | list[Tensor]]:
        """The generalist's logits and probabilities, the active mask and the specialists' outputs."""
        generalist_logits = self.generalist(x)
        generalist_logits = generalist_logits.to(torch.promote_types(generalist_logits.dtype, torch.float32))
        generalist_probs = F.softmax(generalist_logits, dim=1)
        active = active_specialists(generalist_probs, self.membership, self.top_n)
        return {"generalist_logits": generalist_logits, "generalist_probs": generalist_probs,
                "active": active, "specialist_probs": self._specialist_probs(x, active, generalist_probs.dtype)}

    @staticmethod
    def _log_q(q: Tensor, generalist_logits: Tensor, active: Tensor) -> Tensor:
        """log q, finite everywhere; rows with no active specialist are the generalist's log-softmax."""
        log_q = q.clamp_min(torch.finfo(q.dtype).tiny).log()
        return torch.where(active.any(dim=1)[:, None], log_q, F.log_softmax(generalist_logits, dim=1))


class EnsembleTeacher(_FrozenMembers):
    """Generalist + specialists combined by `combine` (eq. 5); a frozen teacher.

    specialists[k] outputs |S_k| + 1 logits: the classes of clusters[k] in that order,
    then the dustbin. dustbin_shift[k] is added to specialist k's dustbin logit (the prior
    correction of `losses.dustbin_log_correction`); default zeros. forward(x) returns
    log q (N, C): softmax of it is q, so it can stand wherever teacher logits are expected.
    """

    def __init__(self, generalist: nn.Module, specialists: Sequence[nn.Module], clusters: Sequence[Sequence[int]],
                 num_classes: int, top_n: int = 1, iterations: int = 50, tolerance: float = 1e-6,
                 dustbin_shift: Sequence[float] | None = None) -> None:
        super().__init__(generalist, specialists, clusters, num_classes, top_n, dustbin_shift)
        self.iterations = iterations
        self.tolerance = tolerance

    @torch.no_grad()
    def forward_details(self, x: Tensor) -> dict[str, Tensor | list[Tensor]]:
        """`members(x)` plus "q" (N, C), for evaluation (e.g. how often specialists are active)."""
        details = self.members(x)
        details["q"] = combine(details["generalist_probs"], details["specialist_probs"], self.membership,
                               details["active"], self.iterations, self.tolerance)
        return details

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        details = self.forward_details(x)
        return self._log_q(details["q"], details["generalist_logits"], details["active"])


# ---------------------------------------------------------------- stage 5 of a run


def build_ensemble(cfg: Config, data: Splits, run_dir: str | Path, generalist: nn.Module) -> EnsembleTeacher:
    """The run's generalist and trained specialists as one frozen teacher (dustbin shifts are in the heads)."""
    clusters = read_clusters(run_dir)
    specialists = [load_specialist(cfg, data, run_dir, k, generalist) for k in range(len(clusters))]
    return EnsembleTeacher(generalist, specialists, clusters, data.num_classes, top_n=cfg.ensemble.top_n,
                           iterations=cfg.ensemble.iterations, tolerance=cfg.ensemble.tolerance)
