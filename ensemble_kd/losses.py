"""Distillation losses and the specialist "dustbin" helpers, as pure functions.

- `kd_loss`: Hinton's distillation loss, hard-label cross-entropy plus the T^2-scaled
  KL divergence between temperature-softened teacher and student distributions;
  `kd_loss_from_log_probs` takes the teacher's side precomputed (`teacher_log_probs`). Both
  compute the loss and its gradient in one autograd node (`_KDLoss`, the gradient written out by
  `kd_value_and_grad`), so that a distillation step costs little more than a hard-label one.
  `KDLoss(alpha, temperature)` is the latter as the per-step `loss_fn` of fit, its settings
  checked once; fit trains through its `value_and_grad`, with no loss node at all.
- `fold_probs` / `fold_labels`: map a C-class distribution or class ids onto a
  specialist's |S| + 1 outputs (its classes in the order of `subset`, then the dustbin).
- `dustbin_log_correction`: the prior correction of a specialist's dustbin logit after
  training on a set where its own classes were oversampled.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None,
            alpha: float, temperature: float) -> Tensor:
    """Knowledge-distillation loss (Hinton et al. 2015), averaged over the batch.

        loss = alpha * CE(labels, softmax(s))
             + (1 - alpha) * T^2 * KL(softmax(t / T) || softmax(s / T))

    with s = student_logits, t = teacher_logits (both (N, C)) and T = temperature. The
    KL term is computed from log-softmaxes (`F.kl_div(..., log_target=True,
    reduction="batchmean")`) so it stays finite for very confident teachers; T^2 keeps
    its gradient on the same scale as the hard term when T changes. The teacher is
    detached: gradients reach the student only. A term whose weight is zero is not
    computed, so `labels` may be None when alpha == 0. `labels` are class ids (N,) or class
    probabilities (N, C), e.g. the mixed labels of MixUp / CutMix.
    """
    return kd_loss_from_log_probs(student_logits, teacher_log_probs(teacher_logits, temperature), labels, alpha,
                                  temperature)


def teacher_log_probs(teacher_logits: Tensor, temperature: float) -> Tensor:
    """log softmax(t / T) over the last dimension, detached: the teacher's side of `kd_loss`.

    Row by row, so computing it once over cached logits of any shape gives exactly the values
    `kd_loss` computes batch by batch (a distillation step then skips two of its ops)."""
    _check_temperature(temperature)
    return F.log_softmax(teacher_logits.detach() / temperature, dim=-1)


def kd_loss_from_log_probs(student_logits: Tensor, teacher_log_probs: Tensor, labels: Tensor | None,
                           alpha: float, temperature: float) -> Tensor:
    """`kd_loss` with the teacher given as `teacher_log_probs(t, temperature)`; the same value, bit for bit."""
    loss = KDLoss(alpha, temperature)  # checks alpha and T
    if student_logits.ndim != 2 or student_logits.shape != teacher_log_probs.shape:
        raise ValueError(f"student and teacher logits must both be (N, C) with the same shape, got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_log_probs.shape)}; "
                         "check that the teacher and student predict the same classes")
    if alpha > 0:
        if labels is None:
            raise ValueError(f"labels are required when alpha > 0 (alpha = {alpha}); "
                             "pass the hard labels or set alpha = 0 for a pure soft-target loss")
        if labels.shape not in (student_logits.shape[:1], student_logits.shape):
            raise ValueError(f"labels must be class ids (N,) = ({student_logits.shape[0]},) or class probabilities "
                             f"(N, C) = {tuple(student_logits.shape)}, got {tuple(labels.shape)}")
    return loss(student_logits, labels, teacher_log_probs)


@dataclasses.dataclass(frozen=True)
class KDLoss:
    """`kd_loss_from_log_probs` as fit's `loss_fn(student_logits, labels, teacher_log_probs)`, called at every step.

    alpha and T are checked once, when it is made; a call goes straight to the loss's autograd node, and
    `value_and_grad` gives the loss and its gradient without one (fit uses that: the Python node's forward
    and backward calls cost a small student's step about 30 µs).
    It leaves out the per-call checks of shapes and labels (3.5 of the 50 µs a call took on the digits
    student's 64 x 10 logits): `distill` builds the teacher's targets and the student for the same
    classes, and fit always passes labels.
    """

    alpha: float  # weight of the hard-label cross-entropy; the soft term gets 1 - alpha
    temperature: float  # T: both distributions of the soft term are softmax(logits / T)

    def __post_init__(self) -> None:
        _check_alpha(self.alpha)
        _check_temperature(self.temperature)

    def __call__(self, student_logits: Tensor, labels: Tensor | None, teacher_log_probs: Tensor) -> Tensor:
        if self.alpha == 1:
            return F.cross_entropy(student_logits, labels)
        return _KDLoss.apply(student_logits, teacher_log_probs, labels, self.alpha, self.temperature)  # student only

    def value_and_grad(self, student_logits: Tensor, labels: Tensor,
                       teacher_log_probs: Tensor) -> tuple[Tensor, Tensor]:
        """The loss (no autograd history) and its gradient with respect to `student_logits`: fit then runs
        `student_logits.backward(grad)`, and no loss node runs in the backward pass."""
        logits = student_logits.detach()  # the ops below record no autograd history
        if self.alpha == 1:  # plain cross-entropy: torch's own gradient, on a leaf of its own
            with torch.enable_grad():
                leaf = logits.requires_grad_()
                loss = F.cross_entropy(leaf, labels)
                (grad,) = torch.autograd.grad(loss, leaf)
            return loss.detach(), grad
        return kd_value_and_grad(logits, teacher_log_probs, labels, self.alpha, self.temperature)


@functools.lru_cache(maxsize=64)
def _kd_factors(alpha: float, temperature: float, n: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, float, Tensor]:
    """The constant factors of `kd_value_and_grad` for a batch of n: 1 / T, the soft term's gradient weight,
    hard / soft weight, and the loss's last scale. Those that multiply a tensor are 0-d tensors, made once:
    a Python number there is wrapped in a new tensor at every call (about 1.5 µs each in a tight loop).
    They have the logits' dtype: float32 factors would round float64 losses at 1e-8."""
    soft_weight = (1 - alpha) * temperature / n  # of the soft term's gradient; its loss weighs T times more (T^2 / n)
    hard_over_soft = alpha / n / soft_weight
    return (torch.tensor(1 / temperature, dtype=dtype), torch.tensor(soft_weight, dtype=dtype), hard_over_soft,
            torch.tensor(soft_weight * temperature, dtype=dtype))


def kd_value_and_grad(student_logits: Tensor, teacher_log_probs: Tensor, labels: Tensor | None, alpha: float,
                      temperature: float) -> tuple[Tensor, Tensor]:
    """`kd_loss_from_log_probs` (alpha < 1) and its gradient with respect to `student_logits`, both computed
    outside autograd, the gradient written out:

        d loss / d s = [alpha (softmax(s) - y) + (1 - alpha) T (softmax(s / T) - softmax(t / T))] / N

    The softmaxes run over contiguous (C, N) copies: over a short last dimension (C classes) torch's CPU
    softmax pays per row, and the step of a small student, which has few classes, noticed it.
    """
    inv_t, soft_weight, hard_over_soft, loss_scale = _kd_factors(alpha, temperature, student_logits.shape[0],
                                                                 student_logits.dtype)
    logits = student_logits.t().contiguous()  # (C, N); so are the softmaxes below
    teacher = teacher_log_probs.t().contiguous()  # the same layout: elementwise ops on mixed layouts cost more
    log_q = torch.log_softmax(logits * inv_t, dim=0)  # the student, softened
    p_teacher = teacher.exp()
    loss = torch.sub(teacher, log_q).mul_(p_teacher).sum()  # KL, summed over the batch
    grad = log_q.exp_().sub_(p_teacher)  # the gradient / soft_weight, until the last line
    if alpha > 0:
        log_p = torch.log_softmax(logits, dim=0)
        if labels.ndim == 1:  # class ids
            ids = labels.unsqueeze(0)
            log_likelihood = log_p.gather(0, ids).sum()
            grad.scatter_(0, ids, -hard_over_soft, reduce="add")
        else:  # class probabilities (MixUp / CutMix)
            mixed = labels.t()
            log_likelihood = torch.mul(mixed, log_p).sum()
            grad.sub_(mixed, alpha=hard_over_soft)
        loss.sub_(log_likelihood, alpha=hard_over_soft / temperature)  # the hard term, before the last scaling
        grad.add_(log_p.exp_(), alpha=hard_over_soft)
    return loss.mul_(loss_scale), grad.mul_(soft_weight).t()


class _KDLoss(torch.autograd.Function):
    """`kd_loss` and its gradient as one autograd node. As a chain of tensor ops (cross-entropy,
    log-softmax, KL, three scalar products) the loss cost a small student's step three times what
    cross-entropy does, most of it autograd bookkeeping; here `kd_value_and_grad` computes the gradient in
    the forward pass, and the backward pass only scales it.
    """

    @staticmethod
    def forward(ctx, student_logits: Tensor, teacher_log_probs: Tensor, labels: Tensor | None,  # type: ignore[override]
                alpha: float, temperature: float) -> Tensor:
        loss, grad = kd_value_and_grad(student_logits, teacher_log_probs, labels, alpha, temperature)
        ctx.grad = grad  # d loss / d student_logits, computed here: the backward pass only scales it
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return ctx.grad * grad_loss, None, None, None, None


def view_mean_logits(view_logits: Tensor, temperature: float) -> Tensor:
    """A teacher averaged over views of each example: (V, N, C) logits -> (N, C) logits z with

        softmax(z / T) = mean over the V views of softmax(logits_v / T),

    so `teacher_log_probs(z, T)` is the log of the teacher's mean distribution at T (z = T log of it)."""
    _check_temperature(temperature)
    log_mean = torch.logsumexp(F.log_softmax(view_logits / temperature, dim=-1), dim=0) - math.log(
        view_logits.shape[0])
    return temperature * log_mean


def dkd_loss(student_logits: Tensor, labels: Tensor, teacher_log_probs: Tensor, alpha: float, temperature: float,
             beta: float) -> Tensor:
    """Decoupled knowledge distillation (Zhao et al., CVPR 2022), averaged over the batch:

        loss = alpha * CE(labels, softmax(s))
             + (1 - alpha) * T^2 * [TCKD + beta * NCKD]

    TCKD is the KL divergence between the teacher's and the student's binary (target class, all others)
    distributions at temperature T; NCKD the KL divergence between their distributions over the
    non-target classes alone (each renormalised). Hinton's soft term is TCKD + (1 - p_t) * NCKD, with p_t
    the teacher's probability of the true class: a confident teacher mutes what it knows about the other
    classes, and beta > 1 gives that knowledge its weight back. `labels` are class ids (N,): the split needs
    one true class per example. `teacher_log_probs` is `teacher_log_probs(t, temperature)`.
    """
    _check_alpha(alpha)
    _check_temperature(temperature)
    if labels.ndim != 1:
        raise ValueError("dkd_loss needs class ids (N,), not class probabilities: it splits each distribution at "
                         "the one true class (MixUp / CutMix labels have none); use student.loss = 'kd' with mixing")
    target = F.one_hot(labels, student_logits.shape[-1]).bool()
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    tckd = _binary_kl(teacher_log_probs, log_q, target)
    others = -torch.inf  # the true class left out: the distribution over the other classes
    nckd = _kl_rows(F.log_softmax(teacher_log_probs.masked_fill(target, others), dim=-1),
                    F.log_softmax(log_q.masked_fill(target, others), dim=-1))
    soft = (tckd + beta * nckd).mean() * temperature ** 2
    if alpha == 0:
        return soft
    return alpha * F.cross_entropy(student_logits, labels) + (1 - alpha) * soft


def _binary_kl(log_p: Tensor, log_q: Tensor, target: Tensor) -> Tensor:
    """Per row, KL between the (true class, every other class) splits of two distributions given as log-probs."""
    binary = lambda lp: torch.stack([lp[target], torch.logsumexp(lp.masked_fill(target, -torch.inf), -1)], -1)  # noqa: E731
    return _kl_rows(binary(log_p), binary(log_q))


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) of each row, from log-probabilities; terms where p is 0 count 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


@dataclasses.dataclass(frozen=True)
class DKDLoss:
    """`dkd_loss` as fit's `loss_fn(student_logits, labels, teacher_log_probs)`, its settings checked once."""

    alpha: float  # weight of the hard-label cross-entropy; the decoupled soft term gets 1 - alpha
    temperature: float  # T of both distributions
    beta: float  # weight of the non-target term (NCKD); TCKD weighs 1

    def __post_init__(self) -> None:
        _check_alpha(self.alpha)
        _check_temperature(self.temperature)
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"the DKD beta must be a finite number >= 0, got {self.beta}; Zhao et al. use 1-8")

    def __call__(self, student_logits: Tensor, labels: Tensor, teacher_log_probs: Tensor) -> Tensor:
        return dkd_loss(student_logits, labels, teacher_log_probs, self.alpha, self.temperature, self.beta)


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}; it is the weight of the hard-label term")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; 1 means no softening, Hinton used 2-20")


def _as_subset(subset: Tensor | Sequence[int], num_classes: int, device: torch.device) -> Tensor:
    """`subset` as a 1-D long tensor on `device`, checked: non-empty, in range, no repeats."""
    subset = torch.as_tensor(subset, dtype=torch.long, device=device).reshape(-1)
    if subset.numel() == 0:
        raise ValueError("subset is empty; a specialist needs at least one class of its own")
    if int(subset.min()) < 0 or int(subset.max()) >= num_classes:
        raise ValueError(f"subset class ids must be in [0, {num_classes}); got {subset.tolist()}; "
                         "check the clusters against the number of classes")
    if torch.unique(subset).numel() != subset.numel():
        raise ValueError(f"subset has repeated class ids: {subset.tolist()}; each class may appear once")
    return subset


def fold_probs(probs: Tensor, subset: Tensor | Sequence[int]) -> Tensor:
    """Fold a distribution over C classes onto a specialist's outputs.

    probs (N, C) -> (N, |S| + 1): column i is probs[:, subset[i]] (the order of `subset`),
    the last column is the dustbin, sum of probs over every class not in S.
    """
    if probs.ndim != 2:
        raise ValueError(f"probs must be (N, C), got shape {tuple(probs.shape)}")
    subset = _as_subset(subset, probs.shape[1], probs.device)
    in_subset = torch.zeros(probs.shape[1], dtype=torch.bool, device=probs.device)
    in_subset[subset] = True
    dustbin = probs.masked_fill(in_subset, 0.0).sum(dim=1, keepdim=True)
    return torch.cat([probs[:, subset], dustbin], dim=1)


def fold_labels(labels: Tensor, subset: Tensor | Sequence[int], num_classes: int) -> Tensor:
    """Class ids -> specialist targets.

    A label y becomes its position i in `subset` (subset[i] == y) when y is in S, and
    |S| (the dustbin) otherwise. Done with a lookup table of num_classes entries.
    """
    subset = _as_subset(subset, num_classes, labels.device)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = ((labels < 0) | (labels >= num_classes)).nonzero().flatten()
        raise ValueError(f"labels must be in [0, {num_classes}); found {bad.numel()} outside, e.g. "
                         f"{int(labels.flatten()[bad[0]])} at index {int(bad[0])}; check num_classes")
    table = torch.full((num_classes,), subset.numel(), dtype=torch.long, device=labels.device)
    table[subset] = torch.arange(subset.numel(), device=labels.device)
    return table[labels.long()]


def dustbin_log_correction(subset_prior: float, in_cluster_fraction: float) -> float:
    """Amount to add to a specialist's dustbin logit to undo oversampling of its classes.

    With pi = subset_prior (true share of examples whose class is in S) and
    f = in_cluster_fraction (their share in the specialist's training set), Bayes' rule
    moves each logit by log(true prior / training prior): log((1 - pi) / (1 - f)) for the
    dustbin and log(pi / f) for the classes of S. Softmax ignores a common shift, so only
    the dustbin moves, by

        shift = log((1 - pi) / (1 - f)) - log(pi / f) = log(((1 - pi) * f) / ((1 - f) * pi)).

    Positive when S was oversampled (f > pi); e.g. pi = 0.1, f = 0.5 gives log 9.
    """
    for name, value in (("subset_prior", subset_prior), ("in_cluster_fraction", in_cluster_fraction)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be strictly between 0 and 1, got {value}; it is a share of examples "
                             "(a cluster with all or none of the data has no dustbin to correct)")
    pi, f = subset_prior, in_cluster_fraction
    return math.log(((1.0 - pi) * f) / ((1.0 - f) * pi))


def fit_dustbin_shift(logits: Tensor, targets: Tensor, iterations: int = 50, tolerance: float = 1e-7) -> float:
    """The shift d of the last (dustbin) logit that minimises the mean cross-entropy of `targets`.

    Convex in d: Newton's method with gradient mean(p_dust - [t = dust]) and curvature
    mean(p_dust * (1 - p_dust)), steps clipped to +-2. Used to set a specialist's dustbin
    bias on held-out data with the natural class mix, where the fixed prior correction
    over-corrects a specialist already fine-tuned on the generalist's (natural-prior)
    soft targets.
    """
    if logits.ndim != 2 or logits.shape[0] != targets.shape[0] or logits.shape[0] == 0:
        raise ValueError(f"logits must be (N, K) and targets (N,) with N > 0, got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    logits = logits.double()
    is_dust = (targets == logits.shape[1] - 1).double()
    shift = 0.0
    for _ in range(iterations):
        shifted = logits.clone()
        shifted[:, -1] += shift
        p_dust = torch.softmax(shifted, dim=1)[:, -1]
        gradient = float((p_dust - is_dust).mean())
        curvature = float((p_dust * (1 - p_dust)).mean())
        step = max(-2.0, min(2.0, gradient / max(curvature, 1e-12)))
        shift -= step
        if abs(step) < tolerance:
            break
    return shift
