"""Stages 2 and 3: which classes the generalist confuses (confusability), grouped into clusters for specialists.

Stages 2 and 3 of DESIGN.md. From the generalist's predictions on held-out data we build
a C x C matrix (`hard_confusion`, `soft_confusion` or Hinton's label-free
`prediction_covariance`), turn it into a symmetric non-negative affinity between classes
(`confusability`), and let `ClassClusterer` (k-means from scikit-learn, plus a repair step
for size limits) group the classes into k clusters of mutually confusable classes. The
clusters are written as JSON (`clusters_to_json`) and shown as a text table
(`format_cluster_table`); report.py draws them as a heatmap reordered so the clusters sit
as blocks on the diagonal (`reorder_by_cluster`).

Choices worth knowing:

* Covariance affinity. For probability vectors every off-diagonal covariance is pulled
  below zero by the sum-to-one constraint: two classes the generalist never confuses still
  co-vary at about -mu_i * mu_j (when one is predicted the other is not). Within the
  examples of a confusable pair p_i and p_j trade mass, so they co-vary negatively there
  too, but over *all* examples the pair is predicted together (both non-zero on the same
  inputs) far more than a pair that is never confused, so its covariance sits *above*
  that floor. We undo the floor without labels: v_i solving v_i (1 - v_i) = Var_i is the
  rate class i would be predicted at if predictions were one-hot, Cov_ij + v_i v_j then
  estimates the co-prediction E[p_i p_j], and dividing by sqrt(v_i v_j) makes it a cosine
  between the classes' prediction columns, so frequent classes do not dominate. Soft
  predictions make v a slight underestimate, which shifts every pair about equally, so
  we measure each pair from the least co-predicted pair:
  A_ij = c_ij - min_{k != l} c_kl, diagonal zero. Never-confused pairs land near 0. On
  simulated predictions this recovered planted groups more reliably than shifted raw
  covariances or correlations, notably with imbalanced classes and confident models.
  Its limit: classes predicted far more sharply than the rest look a little co-predicted
  with each other; the hard and soft matrices, which use labels, have no such bias.
* Features for k-means. Each class is described by its row of the affinity matrix with a
  self-loop as strong as its strongest link, normalised to sum to one (a lazy random walk
  step). Without the self-loop the two members of a confusable pair would have disjoint
  rows (i points at j, j at i) and k-means would split them.
* Confusion share (for `min_confusion`): a class's row sum of the affinity divided by the
  largest row sum, so 1.0 is the most confused class and the same threshold means the same
  thing for all three matrix kinds.
* Inside share: the part of a class's affinity that goes to members of its own cluster. A
  class with no confusion at all, or one excluded from every cluster, gets 0.0, so a
  cluster of classes the generalist never confuses does not look perfect.
* Size limits keep k fixed (k is the number of specialists): too large clusters give away
  their least attached classes to the cluster with room they are most attached to, too
  small ones take the classes most attached to them from clusters that can spare one.
"""
from __future__ import annotations

import io
import json
import logging
import math
import textwrap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import sparse  # a dependency of scikit-learn
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning

from . import artifacts
from .choices import MATRIX_KINDS
from .config import ClustersConfig, Config
from .data import Splits
from .errors import EnsembleKDError, plural
from .inference import predict_probs

log = logging.getLogger(__name__)

LOW_INSIDE_SHARE = 0.25  # a cluster whose classes keep less of their confusion among themselves is flagged
_DECIMALS = 6  # floats in the JSON report are rounded to this many decimals (deterministic bytes)


class ClusterError(EnsembleKDError, ValueError):
    """The classes cannot be clustered as asked: bad inputs or limits no clustering can meet."""


# ---------------------------------------------------------------- input checks

def _check_labels(y_true: np.ndarray, num_classes: int, what: str = "y_true") -> np.ndarray:
    labels = np.asarray(y_true)
    if labels.ndim != 1:
        raise ClusterError(f"{what} must be a 1-D array of class ids, got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ClusterError(f"{what} must hold integer class ids, got dtype {labels.dtype}; "
                           "pass labels, not probabilities or one-hot rows")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise ClusterError(f"{what} must be in [0, {num_classes}); found {plural(bad.size, 'label')} outside, "
                           f"e.g. {labels[bad[0]]} at index {bad[0]}; check num_classes and the label column")
    return labels.astype(np.int64)


def _check_probs(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 1:
        raise ClusterError(f"probs must be a 2-D array (examples x classes), got shape {probs.shape}")
    if not np.all(np.isfinite(probs)):
        raise ClusterError("probs contains NaN or infinite values; check the generalist's outputs")
    if probs.size and (probs.min() < 0 or np.abs(probs.sum(axis=1) - 1).max() > 1e-3):
        raise ClusterError("probs rows must be probability vectors (non-negative, summing to 1); "
                           "apply softmax to the logits first")
    return probs


# ---------------------------------------------------------------- the matrices (pure functions)

def _mean_rows_by_class(y_true: np.ndarray, rows: np.ndarray, num_classes: int) -> np.ndarray:
    """Row i = mean of `rows` over the examples of class i (a zero row for a class with none).

    The per-class sums are one sparse (classes x examples) indicator times `rows`: linear in
    the number of entries, several times faster than `np.add.at` for 1,000 classes."""
    n = len(y_true)
    indicator = sparse.csr_matrix((np.ones(n), (y_true, np.arange(n))), shape=(num_classes, n))
    sums = np.asarray(indicator @ rows, dtype=np.float64)
    counts = np.bincount(y_true, minlength=num_classes).astype(np.float64)
    return sums / np.maximum(counts, 1.0)[:, None]


def hard_confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(i, j) = fraction of the examples of true class i predicted as j; rows sum to 1 (0 if no examples)."""
    y_true = _check_labels(y_true, num_classes)
    y_pred = _check_labels(y_pred, num_classes, "y_pred")
    if y_true.shape != y_pred.shape:
        raise ClusterError(f"y_true has {plural(y_true.size, 'label')} but y_pred has {y_pred.size}; "
                           "pass one prediction per example")
    pairs = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)  # no N x C one-hot
    counts = np.bincount(y_true, minlength=num_classes).astype(np.float64)
    return pairs.reshape(num_classes, num_classes) / np.maximum(counts, 1.0)[:, None]


def soft_confusion(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """(i, j) = mean predicted probability of class j over the examples of true class i."""
    probs = _check_probs(probs)
    y_true = _check_labels(y_true, probs.shape[1])
    if y_true.size != probs.shape[0]:
        raise ClusterError(f"y_true has {plural(y_true.size, 'label')} but probs has {plural(probs.shape[0], 'row')}; "
                           "pass one row per example")
    return _mean_rows_by_class(y_true, probs, probs.shape[1])


def prediction_covariance(probs: np.ndarray) -> np.ndarray:
    """Hinton's label-free matrix: covariance (ddof=1) of the predicted probability vectors, C x C."""
    probs = _check_probs(probs)
    if probs.shape[0] < 2:
        raise ClusterError(f"the covariance of predictions needs at least 2 examples, got {probs.shape[0]}")
    centred = probs - probs.mean(axis=0)
    return centred.T @ centred / (probs.shape[0] - 1)


def _covariance_affinity(covariance: np.ndarray) -> np.ndarray:
    """Label-free co-prediction, measured from the least co-predicted pair (see the module docstring)."""
    variance = np.clip(np.diag(covariance), 0.0, 0.25)
    rate = (1.0 - np.sqrt(1.0 - 4.0 * variance)) / 2.0  # v with v (1 - v) = variance: the one-hot prediction rate
    off_diagonal = ~np.eye(len(covariance), dtype=bool)
    scale = np.sqrt(np.outer(rate, rate))
    with np.errstate(divide="ignore", invalid="ignore"):
        co_prediction = (covariance + np.outer(rate, rate)) / scale
    never_predicted = rate <= 1e-12  # constant predictions carry no information about confusion
    valid = off_diagonal & ~never_predicted[:, None] & ~never_predicted[None, :]
    floor = co_prediction[valid].min() if valid.any() else 0.0
    co_prediction[~valid] = floor
    return np.where(off_diagonal, co_prediction - floor, 0.0)


def confusability(matrix: np.ndarray, kind: str) -> np.ndarray:
    """Symmetric, non-negative class-to-class affinity with a zero diagonal, the input of clustering.

    hard / soft: (M + M.T) / 2, the confusion of i as j and of j as i averaged.
    covariance: estimated co-prediction cosine, shifted so the least co-predicted pair is 0.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ClusterError(f"a confusability matrix must be square (C x C), got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise ClusterError("the confusability matrix contains NaN or infinite values; "
                           "rebuild it from finite predictions")
    if kind == "covariance":
        affinity = _covariance_affinity(matrix)
    elif kind in ("hard", "soft"):
        if matrix.min() < 0:
            raise ClusterError(f"a {kind} confusion matrix cannot have negative entries; "
                               "did you mean kind='covariance'?")
        affinity = (matrix + matrix.T) / 2
    else:
        raise ClusterError(f"matrix kind {kind!r} is not one of {', '.join(MATRIX_KINDS)}")
    np.fill_diagonal(affinity, 0.0)
    return np.clip((affinity + affinity.T) / 2, 0.0, None)


def build_matrices(y_true: np.ndarray, probs: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """All three matrices from held-out labels and the generalist's probabilities."""
    probs = _check_probs(probs)
    if probs.shape[1] != num_classes:
        raise ClusterError(f"probs has {probs.shape[1]} columns but num_classes is {num_classes}; "
                           "pass the generalist's probabilities over all classes")
    return {
        "hard": hard_confusion(y_true, probs.argmax(axis=1), num_classes),
        "soft": soft_confusion(y_true, probs),
        "covariance": prediction_covariance(probs),
    }


def confusion_share(affinity: np.ndarray) -> np.ndarray:
    """Each class's row sum of the affinity over the largest row sum (1.0 = the most confused class)."""
    totals = np.asarray(affinity, dtype=np.float64).sum(axis=1)
    return totals / totals.max() if totals.size and totals.max() > 0 else np.zeros_like(totals)


def inside_shares(affinity: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per class: its affinity to its own cluster's members over its total (0 if none or excluded)."""
    labels = np.asarray(labels)
    return inside_shares_of(affinity, (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0))


def inside_shares_of(affinity: np.ndarray, together: np.ndarray) -> np.ndarray:
    """Per class i: sum of affinity[i, j] over the j with together[i, j], over i's total affinity."""
    affinity = np.asarray(affinity, dtype=np.float64)
    inside = (affinity * together).sum(axis=1)
    totals = affinity.sum(axis=1)
    return np.divide(inside, totals, out=np.zeros_like(totals), where=totals > 0)


# ---------------------------------------------------------------- clustering

def _class_features(affinity: np.ndarray) -> np.ndarray:
    """Row i = class i's affinity plus a self-loop as strong as its strongest link, summing to 1."""
    augmented = affinity + np.diag(affinity.max(axis=1))
    totals = augmented.sum(axis=1, keepdims=True)
    features = np.divide(augmented, totals, out=np.zeros_like(augmented), where=totals > 0)
    unconfused = totals[:, 0] <= 0
    features[unconfused, unconfused.nonzero()[0]] = 1.0  # a class with no confusion stands alone
    return features


def _attachment(affinity: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(classes x k): each class's total affinity to the members of each cluster."""
    return affinity @ np.eye(k)[labels]


def _shrink_large_clusters(affinity: np.ndarray, labels: np.ndarray, k: int, max_size: int) -> int:
    """Move the least attached classes out of clusters above max_size; returns the number of moves."""
    moves = 0
    while True:
        sizes = np.bincount(labels, minlength=k)
        too_large = np.flatnonzero(sizes > max_size)
        if not too_large.size:
            return moves
        source = too_large[0]
        members = np.flatnonzero(labels == source)
        attachment = _attachment(affinity, labels, k)[members]
        to_roomy = np.where(sizes < max_size, attachment, -np.inf)
        destination = to_roomy.argmax(axis=1)
        gain = to_roomy[np.arange(len(members)), destination] - attachment[:, source]
        pick = int(gain.argmax())  # ties go to the lowest class id
        labels[members[pick]] = destination[pick]
        moves += 1


def _fill_small_clusters(affinity: np.ndarray, labels: np.ndarray, k: int, min_size: int) -> int:
    """Pull the most attached classes into clusters below min_size; returns the number of moves."""
    moves = 0
    while True:
        sizes = np.bincount(labels, minlength=k)
        too_small = np.flatnonzero(sizes < min_size)
        if not too_small.size:
            return moves
        target = too_small[0]
        candidates = np.flatnonzero(sizes[labels] > min_size)  # their cluster can spare one
        attachment = _attachment(affinity, labels, k)[candidates]
        gain = attachment[:, target] - attachment[np.arange(len(candidates)), labels[candidates]]
        labels[candidates[int(gain.argmax())]] = target
        moves += 1


class ClassClusterer:
    """k-means over classes' confusability, with size limits and exclusion of unconfused classes.

    With `overlap` > 0 the clusters may overlap: after the partition, a class also joins
    every other cluster whose members hold at least that share of its confusion (at most
    `max_size` classes, and never all classes, so every specialist keeps a dustbin).

    Fitted attributes: `clusters_` (sorted lists of class ids, ordered by their smallest
    primary member; with overlap a class is in several), `labels_` (primary cluster per class,
    -1 = excluded), `also_in_` (per class, the other clusters it joined), `inside_share_`,
    `confusion_share_`, `excluded_` (class ids in no cluster), `repair_moves_` (classes moved
    to meet size limits).
    """

    def __init__(self, k: int, min_size: int = 1, max_size: int = 0, min_confusion: float = 0.0,
                 n_init: int = 20, random_state: int = 0, overlap: float = 0.0) -> None:
        self.k = k
        self.min_size = min_size
        self.max_size = max_size
        self.min_confusion = min_confusion
        self.overlap = overlap
        self.n_init = n_init
        self.random_state = random_state

    def fit(self, affinity: np.ndarray) -> "ClassClusterer":
        affinity = self._validate_affinity(affinity)
        self._validate_params()
        num_classes = len(affinity)
        self.confusion_share_ = confusion_share(affinity)
        eligible = np.flatnonzero(self.confusion_share_ >= self.min_confusion)
        self.excluded_ = [int(i) for i in np.flatnonzero(self.confusion_share_ < self.min_confusion)]
        self.check_feasible(num_classes, len(eligible))
        if not affinity.any():
            log.warning("the affinity is all zeros (no class is ever confused): the clusters are arbitrary")
        sub_affinity = affinity[np.ix_(eligible, eligible)]
        sub_labels = self._kmeans(_class_features(sub_affinity))
        self.repair_moves_ = 0
        if self.max_size:
            self.repair_moves_ += _shrink_large_clusters(sub_affinity, sub_labels, self.k, self.max_size)
        self.repair_moves_ += _fill_small_clusters(sub_affinity, sub_labels, self.k, self.min_size)
        clusters = [sorted(int(i) for i in eligible[sub_labels == c]) for c in range(self.k)]
        if any(len(members) == num_classes for members in clusters):
            raise ClusterError(f"k={self.k} leaves one cluster holding all {num_classes} classes (none is confused "
                               f"less than min_confusion={self.min_confusion}), so its specialist would have no other "
                               "classes to tell apart; raise clusters.k or clusters.min_confusion")
        primary = sorted(clusters, key=lambda members: members[0])
        self.labels_ = np.full(num_classes, -1, dtype=np.int64)
        for cluster_id, members in enumerate(primary):
            self.labels_[members] = cluster_id
        self.inside_share_ = inside_shares(affinity, self.labels_)
        self.also_in_ = overlapping_memberships(affinity, self.labels_, self.overlap, self.max_size or num_classes - 1)
        self.clusters_ = [sorted(members + [i for i in range(num_classes) if cluster_id in self.also_in_[i]])
                          for cluster_id, members in enumerate(primary)]
        log.info("clustered %d classes into %d clusters of sizes %s (%d excluded, %d moved to meet size limits, "
                 "%d extra memberships)", len(eligible), self.k, [len(c) for c in self.clusters_],
                 len(self.excluded_), self.repair_moves_, sum(map(len, self.also_in_)))
        return self

    def _validate_affinity(self, affinity: np.ndarray) -> np.ndarray:
        affinity = np.array(affinity, dtype=np.float64)  # a copy: the diagonal is zeroed below
        if affinity.ndim != 2 or affinity.shape[0] != affinity.shape[1] or affinity.shape[0] == 0:
            raise ClusterError(f"the affinity must be a non-empty square matrix (C x C), got shape {affinity.shape}")
        if not np.all(np.isfinite(affinity)):
            raise ClusterError("the affinity contains NaN or infinite values; rebuild it with confusability()")
        np.fill_diagonal(affinity, 0.0)  # a class's affinity to itself carries no information
        if affinity.min() < 0 or not np.allclose(affinity, affinity.T, rtol=1e-6, atol=1e-12):
            raise ClusterError("the affinity must be symmetric and non-negative; "
                               "build it with confusability(matrix, kind), not from the raw matrix")
        return affinity

    def _validate_params(self) -> None:
        checks = [
            (isinstance(self.k, (int, np.integer)) and self.k >= 1, f"k must be an integer >= 1, got {self.k!r}"),
            (self.min_size >= 1, f"min_size must be >= 1, got {self.min_size}"),
            (self.max_size == 0 or self.max_size >= self.min_size,
             f"max_size must be 0 (no limit) or >= min_size ({self.min_size}), got {self.max_size}"),
            (0.0 <= self.min_confusion <= 1.0, f"min_confusion must be in [0, 1], got {self.min_confusion}"),
            (0.0 <= self.overlap <= 1.0, f"overlap must be in [0, 1] (0 = a partition), got {self.overlap}"),
            (self.n_init >= 1, f"n_init must be >= 1, got {self.n_init}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ClusterError(message)

    def check_feasible(self, num_classes: int, num_eligible: int | None = None) -> None:
        """ClusterError when no clustering of `num_eligible` of `num_classes` classes (those not excluded by
        min_confusion) meets k and the size limits. Before the confusion is known (`num_eligible` None, as
        before any training) what holds whatever is excluded: max_size only when nothing can be."""
        eligible = num_classes if num_eligible is None else num_eligible
        excluded = num_classes - eligible
        have = (f"only {eligible} of the {num_classes} classes {'is' if eligible == 1 else 'are'} confused enough "
                f"to cluster (clusters.min_confusion = {self.min_confusion:g})" if excluded else
                f"the data has {num_classes} classes")
        fewer = "clusters.min_confusion, " if excluded else ""
        if self.k > eligible:
            only = have if excluded else f"the data has only {num_classes} classes"
            raise ClusterError(f"clusters.k = {self.k} but {only}; lower {fewer}clusters.k (to at most {eligible})")
        if self.k * self.min_size > eligible:
            raise ClusterError(f"clusters.k = {self.k} clusters of at least clusters.min_size = {self.min_size} "
                               f"classes need {self.k * self.min_size} classes, {have}; lower {fewer}clusters.k "
                               "or clusters.min_size")
        if self.max_size and self.k * self.max_size < eligible and (num_eligible is not None or not self.min_confusion):
            raise ClusterError(f"clusters.k = {self.k} clusters of at most clusters.max_size = {self.max_size} "
                               f"classes hold {self.k * self.max_size} classes, {have}; raise clusters.k, "
                               "clusters.max_size (0 = no limit) or clusters.min_confusion (which leaves "
                               "unconfused classes out)")

    def _kmeans(self, features: np.ndarray) -> np.ndarray:
        kmeans = KMeans(n_clusters=self.k, n_init=self.n_init, random_state=self.random_state)
        with warnings.catch_warnings():
            # duplicate rows can leave fewer distinct clusters than k; the size repair fills them
            warnings.simplefilter("ignore", ConvergenceWarning)
            return kmeans.fit_predict(features).astype(np.int64)


def overlapping_memberships(affinity: np.ndarray, labels: np.ndarray, threshold: float,
                            max_size: int) -> list[list[int]]:
    """Per class, the clusters other than its own (`labels`, -1 = none) that hold at least
    `threshold` of its affinity, strongest first. A cluster grows to at most `max_size`
    classes; the most attached candidates join first. threshold 0 means no overlap."""
    num_classes, k = len(labels), int(labels.max()) + 1 if len(labels) and labels.max() >= 0 else 0
    also_in: list[list[int]] = [[] for _ in range(num_classes)]
    if threshold <= 0 or k == 0:
        return also_in
    clustered = labels >= 0
    share = affinity[:, clustered] @ np.eye(k)[labels[clustered]]  # (classes x k) affinity to each cluster's members
    totals = affinity.sum(axis=1, keepdims=True)
    share = np.divide(share, totals, out=np.zeros_like(share), where=totals > 0)
    sizes = np.bincount(labels[clustered], minlength=k)
    candidates = [(share[i, c], i, c) for i in np.flatnonzero(clustered) for c in range(k)
                  if c != labels[i] and share[i, c] >= threshold]
    for _, i, c in sorted(candidates, key=lambda t: (-t[0], t[1], t[2])):
        if sizes[c] < max_size:
            also_in[int(i)].append(int(c))
            sizes[c] += 1
    return also_in


def clusterer_from_config(cfg: ClustersConfig, random_state: int = 0, k: int | None = None) -> ClassClusterer:
    """A ClassClusterer with the limits of the `[clusters]` config section (and `k` instead of cfg.k if given)."""
    return ClassClusterer(k=cfg.k if k is None else k, min_size=cfg.min_size, max_size=cfg.max_size,
                          min_confusion=cfg.min_confusion, n_init=cfg.n_init, random_state=random_state,
                          overlap=cfg.overlap)


def choose_k(cfg: ClustersConfig, num_classes: int) -> int:
    """`clusters.k`, or for k = 0 about sqrt(C) clusters within the size limits.

    0 when no two clusters fit (2 classes, or 3 with min_size 2): a single cluster would
    hold every class and leave its specialist nothing to tell apart, so there are no
    specialists and the ensemble is the generalist alone."""
    if cfg.k > 0:
        return cfg.k
    k = min(max(2, round(math.sqrt(num_classes))), num_classes // cfg.min_size)
    if cfg.max_size:
        k = max(k, math.ceil(num_classes / cfg.max_size))
    return k if k >= 2 and k * cfg.min_size <= num_classes else 0


# ---------------------------------------------------------------- the report

def _round(value: float) -> float:
    return round(float(value), _DECIMALS) + 0.0  # + 0.0 turns -0.0 into 0.0


def clusters_to_json(clusterer: ClassClusterer, class_names: list[str], matrix_kind: str,
                     affinity: np.ndarray) -> dict[str, Any]:
    """The clusters as plain, rounded Python values: identical bytes for identical fits."""
    if not hasattr(clusterer, "labels_"):
        raise ClusterError("the clusterer is not fitted; call clusterer.fit(affinity) first")
    num_classes = len(clusterer.labels_)
    if len(class_names) != num_classes:
        raise ClusterError(f"{len(class_names)} class names for {num_classes} classes; pass one name per class")
    affinity = np.asarray(affinity, dtype=np.float64)
    if affinity.shape != (num_classes, num_classes):
        raise ClusterError(f"the affinity has shape {affinity.shape} but the clusterer was fitted on "
                           f"{num_classes} classes; pass the affinity it was fitted on")
    confusion = confusion_share(affinity)
    in_cluster = np.zeros((num_classes, len(clusterer.clusters_)), dtype=bool)
    for cluster_id, members in enumerate(clusterer.clusters_):
        in_cluster[members, cluster_id] = True
    shares = _shares_inside(affinity, in_cluster)
    clusters = [{
        "id": cluster_id,
        "ids": [int(i) for i in members],
        "names": [str(class_names[i]) for i in members],
        "inside_share": _round(_shares_inside(affinity, in_cluster[:, [cluster_id]])[members].mean()),
    } for cluster_id, members in enumerate(clusterer.clusters_)]
    also_in = getattr(clusterer, "also_in_", [[] for _ in range(num_classes)])
    classes = [{
        "id": i,
        "name": str(class_names[i]),
        "cluster": int(clusterer.labels_[i]) if clusterer.labels_[i] >= 0 else None,
        "also_in": [int(c) for c in also_in[i]],
        "inside_share": _round(shares[i]),
        "confusion_share": _round(confusion[i]),
    } for i in range(num_classes)]
    return {"matrix": str(matrix_kind), "k": int(clusterer.k), "min_confusion": _round(clusterer.min_confusion),
            "overlap": _round(getattr(clusterer, "overlap", 0.0)), "clusters": clusters,
            "classes": classes, "excluded": [int(i) for i in clusterer.excluded_]}


def _shares_inside(affinity: np.ndarray, in_cluster: np.ndarray) -> np.ndarray:
    """Per class: its affinity to the classes sharing one of its clusters (`in_cluster`, classes x
    clusters) over its total affinity; 0 for a class in none of them or with no confusion."""
    shares_a_cluster = (in_cluster.astype(np.float64) @ in_cluster.T.astype(np.float64)) > 0
    np.fill_diagonal(shares_a_cluster, False)
    return inside_shares_of(affinity, shares_a_cluster)


def no_clusters_json(class_names: list[str], matrix_kind: str, affinity: np.ndarray) -> dict[str, Any]:
    """The clusters file when `choose_k` finds none: every class in no cluster, nothing excluded."""
    confusion = confusion_share(affinity)
    classes = [{"id": i, "name": str(name), "cluster": None, "also_in": [], "inside_share": 0.0,
                "confusion_share": _round(confusion[i])} for i, name in enumerate(class_names)]
    return {"matrix": str(matrix_kind), "k": 0, "min_confusion": 0.0, "overlap": 0.0, "clusters": [],
            "classes": classes, "excluded": []}


def format_cluster_table(clusters_json: dict[str, Any]) -> str:
    """A readable table: one block per cluster with its size, mean inside share and classes."""
    share_by_id = {c["id"]: c["inside_share"] for c in clusters_json["classes"]}
    name_by_id = {c["id"]: c["name"] for c in clusters_json["classes"]}
    primary_of = {c["id"]: c.get("cluster") for c in clusters_json["classes"]}
    lines = [f"clusters of confusable classes ({clusters_json['matrix']} matrix, k={clusters_json['k']}); "
             "inside = share of a class's confusion that stays in its cluster(s)",
             f"{'cluster':>8}  {'size':>4}  {'inside':>6}  classes (inside share)"]
    if any(c.get("also_in") for c in clusters_json["classes"]):
        lines.insert(1, f"+ = also in this cluster: a class that holds at least clusters.overlap = "
                        f"{clusters_json.get('overlap', 0):g} of its confusion here joins it too "
                        "(overlapping clusters)")
    indent = " " * 24
    if not clusters_json["clusters"]:
        lines.append(f"{'none':>8}  too few classes for two clusters: no specialists, the ensemble is the "
                     "generalist alone")
    for cluster in clusters_json["clusters"]:
        members = ", ".join(f"{name_by_id[i]}{'' if primary_of[i] == cluster['id'] else '+'} ({share_by_id[i]:.2f})"
                            for i in cluster["ids"])
        head = f"{cluster['id']:>8}  {len(cluster['ids']):>4}  {cluster['inside_share']:>6.2f}  "
        lines.append(textwrap.fill(members, width=100, initial_indent=head, subsequent_indent=indent))
    hardly = [c["id"] for c in clusters_json["clusters"] if c["inside_share"] < LOW_INSIDE_SHARE]
    if hardly:
        lines.append(f"cluster {', '.join(map(str, hardly))}: its classes are hardly confused with each other (inside "
                     f"share below {LOW_INSIDE_SHARE:g}), so its specialist has little to tell apart; consider "
                     "another clusters.k or clusters.matrix")
    excluded = clusters_json.get("excluded", [])
    if excluded:
        share_of = {c["id"]: c["confusion_share"] for c in clusters_json["classes"]}
        names = ", ".join(f"{name_by_id[i]} ({share_of[i]:.2f})" for i in excluded)
        lines.append(textwrap.fill(names, width=100, initial_indent=f"{'excluded':>8}  {len(excluded):>4}  {'':>6}  ",
                                   subsequent_indent=indent))
        lines.append(f"excluded classes are left to the generalist: their confusion (in brackets, relative to the "
                     "most confused class) is below clusters.min_confusion = "
                     f"{clusters_json.get('min_confusion', 0):g}")
    return "\n".join(lines)


def reorder_by_cluster(clusters_json: dict[str, Any], num_classes: int) -> list[int]:
    """Class ids with each cluster's own (primary) members as a contiguous block, in cluster order;
    excluded classes last. A class that also joined other clusters (overlap) appears once, in its own."""
    primary_of = {c["id"]: c.get("cluster") for c in clusters_json.get("classes", [])}
    order = [i for cluster_id, cluster in enumerate(clusters_json["clusters"]) for i in cluster["ids"]
             if primary_of.get(i, cluster_id) == cluster_id]
    order += [i for i in clusters_json.get("excluded", []) if i not in order]
    if len(set(order)) != len(order) or any(not 0 <= i < num_classes for i in order):
        raise ClusterError(f"the clusters JSON names a class twice or one outside [0, {num_classes}); "
                           "recreate it with clusters_to_json for this data set")
    seen = set(order)
    return order + [i for i in range(num_classes) if i not in seen]


def primary_sizes(clusters_json: dict[str, Any]) -> list[int]:
    """Per cluster, how many classes have it as their own (primary) cluster."""
    primary_of = {c["id"]: c.get("cluster") for c in clusters_json.get("classes", [])}
    return [sum(primary_of.get(i, cluster_id) == cluster_id for i in cluster["ids"])
            for cluster_id, cluster in enumerate(clusters_json["clusters"])]


# ---------------------------------------------------------------- stages 2 and 3 of a run

MATRICES_FILE = "matrices.npz"  # in the run's confusion/ folder: the three matrices, affinity, val labels


def _save_npz(path: Path, **arrays: np.ndarray) -> Path:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return artifacts.write_bytes(path, buffer.getvalue())


def find_clusters(cfg: Config, data: Splits, run_dir: str | Path, generalist: torch.nn.Module) -> dict[str, Any]:
    """Stages 2 and 3: the confusability matrices of the generalist on the validation split (saved in
    confusion/matrices.npz) and the clusters (clusters.json, logged as a table); returns the clusters."""
    run_dir = Path(run_dir)
    probs = predict_probs(generalist, data.x_val).double().numpy()
    y_val = data.y_val.numpy()
    matrices = build_matrices(y_val, probs, data.num_classes)
    kind = cfg.clusters.matrix
    affinity = confusability(matrices[kind], kind)
    k = choose_k(cfg.clusters, data.num_classes)
    if k == 0:
        clusters = no_clusters_json(list(data.class_names), kind, affinity)
    else:
        clusterer = clusterer_from_config(cfg.clusters, random_state=cfg.seed, k=k).fit(affinity)
        clusters = clusters_to_json(clusterer, list(data.class_names), kind, affinity)
    _save_npz(run_dir / artifacts.CONFUSION_DIR / MATRICES_FILE, affinity=affinity, y_val=y_val, **matrices)
    path = run_dir / artifacts.CLUSTERS_FILE
    if path.exists() and artifacts.read_json(path) != json.loads(json.dumps(clusters)):
        log.warning("the clusters differ from those in %s (config changed?): writing the new ones", path)
    artifacts.write_json(path, clusters)
    log.info("clusters:\n%s", format_cluster_table(clusters))
    return clusters


def read_clusters_json(run_dir: str | Path) -> dict[str, Any]:
    """A run's clusters.json, checked to be a clusters file (ArtifactError naming the fix if not)."""
    path = Path(run_dir) / artifacts.CLUSTERS_FILE
    clusters = artifacts.read_json(path)
    missing = [key for key in ("matrix", "classes", "clusters")
               if not isinstance(clusters, dict) or key not in clusters]
    if missing:
        raise artifacts.ArtifactError(f"{path} is not an ensemble-kd clusters file (no {', '.join(missing)}); "
                                      f"rerun the clusters stage: ensemble-kd run --out {run_dir} --resume "
                                      "--until clusters")
    return clusters


def read_clusters(run_dir: str | Path) -> list[list[int]]:
    """The class ids of each cluster of a run (from its clusters.json), in cluster order."""
    return [list(c["ids"]) for c in read_clusters_json(run_dir)["clusters"]]


def read_matrix(run_dir: str | Path, kind: str) -> np.ndarray:
    """The `kind` matrix the clusters stage saved in confusion/matrices.npz."""
    path = Path(run_dir) / artifacts.CONFUSION_DIR / MATRICES_FILE
    if not path.is_file():
        raise artifacts.ArtifactError(f"{path} is missing; rerun the clusters stage: "
                                      f"ensemble-kd run --out {run_dir} --resume --until clusters")
    with np.load(path) as saved:
        return saved[kind]
