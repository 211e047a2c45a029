"""Confusability matrices, class clustering and the cluster report (ensemble_kd.confusion)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ensemble_kd.config import ClustersConfig
from ensemble_kd.confusion import (
    ClassClusterer,
    ClusterError,
    build_matrices,
    clusterer_from_config,
    clusters_to_json,
    confusability,
    confusion_share,
    format_cluster_table,
    hard_confusion,
    inside_shares,
    prediction_covariance,
    reorder_by_cluster,
    soft_confusion,
)
from ensemble_kd.report import plot_confusion

# six examples of three classes, worked out by hand below
Y_TRUE = np.array([0, 0, 1, 1, 2, 2])
PROBS = np.array([
    [0.6, 0.3, 0.1],
    [0.8, 0.1, 0.1],
    [0.2, 0.7, 0.1],
    [0.4, 0.5, 0.1],
    [0.1, 0.1, 0.8],
    [0.0, 0.3, 0.7],
])
# planted groups, deliberately not contiguous ids
GROUPS = [[0, 3, 7, 9], [1, 5, 6, 10], [2, 4, 8, 11]]


def block_affinity(groups: list[list[int]], seed: int = 0, inside=(0.5, 1.0), across=(0.0, 0.15)) -> np.ndarray:
    """Symmetric affinity: strong and noisy within each group, weak noise between groups."""
    rng = np.random.default_rng(seed)
    num_classes = sum(len(g) for g in groups)
    group_of = np.empty(num_classes, dtype=int)
    for g, members in enumerate(groups):
        group_of[members] = g
    same = group_of[:, None] == group_of[None, :]
    values = np.where(same, rng.uniform(*inside, (num_classes,) * 2), rng.uniform(*across, (num_classes,) * 2))
    values = (values + values.T) / 2
    np.fill_diagonal(values, 0.0)
    return values


def simulate_predictions(groups: list[list[int]], seed: int, per_class: int = 60,
                         own: float | np.ndarray = 2.0, group: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Softmax outputs of a fake generalist that mixes up classes within their planted group;
    `own` (one value, or one per class) is how sharply each class's own logit stands out."""
    rng = np.random.default_rng(seed)
    num_classes = sum(len(g) for g in groups)
    group_of = np.empty(num_classes, dtype=int)
    for g, members in enumerate(groups):
        group_of[members] = g
    y = np.repeat(np.arange(num_classes), per_class)
    logits = rng.normal(0.0, 1.0, (len(y), num_classes))
    logits[np.arange(len(y)), y] += np.broadcast_to(own, (num_classes,))[y]
    logits += group * (group_of[None, :] == group_of[y][:, None])
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return y, probs / probs.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------- matrices

def test_hard_confusion_by_hand():
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 2])
    expected = np.array([
        [1 / 3, 2 / 3, 0.0],  # class 0: one right, two taken for class 1
        [0.0, 1 / 2, 1 / 2],
        [0.0, 0.0, 1.0],
        [0.0, 0.0, 0.0],  # class 3 has no examples: a zero row
    ])
    expected = np.pad(expected, ((0, 0), (0, 1)))
    np.testing.assert_allclose(hard_confusion(y_true, y_pred, 4), expected)


def test_soft_confusion_by_hand():
    expected = np.array([
        [0.7, 0.2, 0.1],
        [0.3, 0.6, 0.1],
        [0.05, 0.2, 0.75],
    ])
    np.testing.assert_allclose(soft_confusion(Y_TRUE, PROBS), expected)


def test_covariance_by_hand_and_against_numpy():
    probs = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    # mean (0.5, 0.5); centred rows (.5, -.5), (-.5, .5), (0, 0); sum of outer products / (3 - 1)
    np.testing.assert_allclose(prediction_covariance(probs), [[0.25, -0.25], [-0.25, 0.25]])
    np.testing.assert_allclose(prediction_covariance(PROBS), np.cov(PROBS, rowvar=False))


def test_build_matrices_uses_argmax_for_hard():
    matrices = build_matrices(Y_TRUE, PROBS, 3)
    assert set(matrices) == {"hard", "soft", "covariance"}
    # argmax predictions are 0, 0, 1, 1, 2, 2: every example right
    np.testing.assert_allclose(matrices["hard"], np.eye(3))
    np.testing.assert_allclose(matrices["soft"], soft_confusion(Y_TRUE, PROBS))


def test_soft_confusability_by_hand():
    affinity = confusability(soft_confusion(Y_TRUE, PROBS), "soft")
    expected = np.array([
        [0.0, 0.25, 0.075],  # (0.2 + 0.3) / 2, (0.1 + 0.05) / 2
        [0.25, 0.0, 0.15],  # (0.1 + 0.2) / 2
        [0.075, 0.15, 0.0],
    ])
    np.testing.assert_allclose(affinity, expected)


@pytest.mark.parametrize("kind", ["hard", "soft", "covariance"])
def test_confusability_is_symmetric_non_negative_with_zero_diagonal(kind):
    y, probs = simulate_predictions(GROUPS, seed=3)
    affinity = confusability(build_matrices(y, probs, 12)[kind], kind)
    np.testing.assert_allclose(affinity, affinity.T)
    assert np.all(np.diag(affinity) == 0)
    assert affinity.min() >= 0
    assert affinity.max() > 0


def test_covariance_confusability_removes_the_sum_to_one_floor():
    # one-hot predictions with imbalanced rates: Cov = diag(mu) - mu mu^T, no confusion at all
    mu = np.array([0.5, 0.3, 0.2])
    one_hot_covariance = np.diag(mu) - np.outer(mu, mu)
    np.testing.assert_allclose(confusability(one_hot_covariance, "covariance"), 0.0, atol=1e-12)
    # a generalist that hesitates between classes 0 and 1 only: that pair gets the largest affinity
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 400)
    probs = np.eye(4)[y]
    confident = rng.uniform(0.5, 1.0, len(y))  # probability of the true class when it is 0 or 1
    probs[y == 0, :2] = np.stack([confident, 1 - confident], axis=1)[y == 0]
    probs[y == 1, :2] = np.stack([1 - confident, confident], axis=1)[y == 1]
    affinity = confusability(prediction_covariance(probs), "covariance")
    others = affinity[np.triu_indices(4, k=1)][1:]  # every pair but (0, 1)
    assert affinity[0, 1] > 2 * others.max()


def test_confusion_and_inside_shares_by_hand():
    affinity = np.array([
        [0.0, 0.4, 0.1, 0.1],
        [0.4, 0.0, 0.2, 0.0],
        [0.1, 0.2, 0.0, 0.3],
        [0.1, 0.0, 0.3, 0.0],
    ])
    np.testing.assert_allclose(confusion_share(affinity), [1.0, 1.0, 1.0, 0.4 / 0.6])
    # class 2 alone in cluster 1 keeps nothing inside; class 3 is excluded (-1)
    np.testing.assert_allclose(inside_shares(affinity, np.array([0, 0, 1, -1])), [0.4 / 0.6, 0.4 / 0.6, 0.0, 0.0])


# ---------------------------------------------------------------- clustering

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clusterer_recovers_planted_blocks_exactly(seed):
    clusterer = ClassClusterer(k=3).fit(block_affinity(GROUPS, seed=seed))
    assert clusterer.clusters_ == GROUPS
    np.testing.assert_array_equal(clusterer.labels_, [0, 1, 2, 0, 2, 1, 1, 0, 2, 0, 1, 2])
    assert clusterer.excluded_ == []
    assert np.all(clusterer.inside_share_ > 0.6)  # about 3 * 0.75 inside vs 8 * 0.075 outside


@pytest.mark.parametrize("kind", ["hard", "soft", "covariance"])
@pytest.mark.parametrize("seed", [0, 1])
def test_clusterer_recovers_groups_from_simulated_predictions(kind, seed):
    y, probs = simulate_predictions(GROUPS, seed=seed)
    affinity = confusability(build_matrices(y, probs, 12)[kind], kind)
    assert ClassClusterer(k=3).fit(affinity).clusters_ == GROUPS


def test_clusters_are_canonical_sorted_lists():
    clusterer = ClassClusterer(k=3).fit(block_affinity(GROUPS, seed=4))
    firsts = [members[0] for members in clusterer.clusters_]
    assert firsts == sorted(firsts)
    assert all(members == sorted(members) for members in clusterer.clusters_)
    for cluster_id, members in enumerate(clusterer.clusters_):
        assert all(clusterer.labels_[i] == cluster_id for i in members)


def test_max_size_moves_the_least_attached_classes_out():
    groups = [[0, 1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11]]
    affinity = block_affinity(groups, seed=0)
    unlimited = ClassClusterer(k=3).fit(affinity)
    assert unlimited.clusters_ == groups
    limited = ClassClusterer(k=3, max_size=4).fit(affinity)
    assert sorted(len(c) for c in limited.clusters_) == [4, 4, 4]
    assert sorted(i for c in limited.clusters_ for i in c) == list(range(12))
    assert limited.repair_moves_ == 2
    # the small groups stay together; only members of the big one moved
    for small in groups[1:]:
        assert any(set(small) <= set(c) for c in limited.clusters_)


def test_min_size_fills_small_clusters():
    groups = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]
    affinity = block_affinity(groups, seed=1)
    assert ClassClusterer(k=3).fit(affinity).clusters_ == groups
    limited = ClassClusterer(k=3, min_size=3).fit(affinity)
    assert min(len(c) for c in limited.clusters_) == 3
    assert any({10, 11} < set(c) for c in limited.clusters_)  # the pair kept together and given a third
    assert limited.repair_moves_ == 1


@pytest.mark.parametrize("params, fragment", [
    (dict(k=13), "lower clusters.k"),
    (dict(k=4, min_size=4), "min_size"),
    (dict(k=2, max_size=5), "raise clusters.k, clusters.max_size"),
])
def test_impossible_limits_raise_with_the_fix(params, fragment):
    with pytest.raises(ClusterError, match=fragment) as err:
        ClassClusterer(**params).fit(block_affinity(GROUPS))
    assert "12 classes" in str(err.value)


def test_min_confusion_excludes_an_unconfused_class():
    affinity = block_affinity(GROUPS, seed=0)
    affinity[5, :] = affinity[:, 5] = 0.0  # class 5 is never confused with anything
    clusterer = ClassClusterer(k=3, min_confusion=0.05).fit(affinity)
    assert clusterer.excluded_ == [5]
    assert clusterer.labels_[5] == -1
    assert clusterer.inside_share_[5] == 0.0
    assert clusterer.clusters_ == [[0, 3, 7, 9], [1, 6, 10], [2, 4, 8, 11]]
    report = clusters_to_json(clusterer, [f"c{i}" for i in range(12)], "soft", affinity)
    assert report["excluded"] == [5]
    assert report["classes"][5]["cluster"] is None


def test_too_many_exclusions_say_so():
    affinity = block_affinity([[0, 1], [2, 3]], seed=0)
    affinity[2:, :] = affinity[:, 2:] = 0.0
    with pytest.raises(ClusterError, match="min_confusion"):
        ClassClusterer(k=3, min_confusion=0.5).fit(affinity)


@pytest.mark.parametrize("affinity, fragment", [
    (np.ones((3, 4)), "square"),
    (np.array([[0.0, 1.0], [0.0, 0.0]]), "symmetric"),
    (np.array([[0.0, -1.0], [-1.0, 0.0]]), "non-negative"),
    (np.array([[0.0, np.nan], [np.nan, 0.0]]), "NaN"),
])
def test_bad_affinity_is_rejected(affinity, fragment):
    with pytest.raises(ClusterError, match=fragment):
        ClassClusterer(k=1).fit(affinity)


def test_bad_inputs_name_the_fix():
    with pytest.raises(ClusterError, match=r"\[0, 3\).*index 2"):
        hard_confusion(np.array([0, 1, 5]), np.array([0, 1, 2]), 3)
    with pytest.raises(ClusterError, match="softmax"):
        soft_confusion(Y_TRUE, PROBS * 3 - 1)
    with pytest.raises(ClusterError, match="not one of"):
        confusability(np.eye(3), "cosine")


def test_clusterer_from_config_copies_the_limits():
    cfg = ClustersConfig(k=4, min_size=2, max_size=5, min_confusion=0.1, n_init=7)
    clusterer = clusterer_from_config(cfg, random_state=3)
    assert (clusterer.k, clusterer.min_size, clusterer.max_size) == (4, 2, 5)
    assert (clusterer.min_confusion, clusterer.n_init, clusterer.random_state) == (0.1, 7, 3)


# ---------------------------------------------------------------- report

def _report(seed: int = 0) -> tuple[dict, np.ndarray, list[str]]:
    y, probs = simulate_predictions(GROUPS, seed=seed)
    matrices = build_matrices(y, probs, 12)
    affinity = confusability(matrices["soft"], "soft")
    names = [f"class-{i}" for i in range(12)]
    return clusters_to_json(ClassClusterer(k=3).fit(affinity), names, "soft", affinity), matrices["soft"], names


def test_clusters_json_is_byte_identical_across_fits():
    first, _, _ = _report()
    second, _, _ = _report()
    assert json.dumps(first, indent=2).encode() == json.dumps(second, indent=2).encode()


def test_clusters_json_schema_and_plain_types():
    report, _, names = _report()
    assert report["matrix"] == "soft" and report["k"] == 3 and report["excluded"] == []
    assert [c["ids"] for c in report["clusters"]] == GROUPS
    assert report["clusters"][0]["names"] == [names[i] for i in GROUPS[0]]
    assert [c["cluster"] for c in report["classes"]] == [0, 1, 2, 0, 2, 1, 1, 0, 2, 0, 1, 2]
    mean_share = np.mean([report["classes"][i]["inside_share"] for i in GROUPS[1]])
    assert report["clusters"][1]["inside_share"] == pytest.approx(mean_share, abs=1e-6)

    def walk(value):
        assert type(value) in (dict, list, str, int, float, type(None)), type(value)
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
        for child in children:
            walk(child)
        if isinstance(value, float):
            assert value == round(value, 6)

    walk(report)


def test_format_cluster_table_lists_names_and_shares():
    report, _, names = _report()
    table = format_cluster_table(report)
    assert all(name in table for name in names)
    assert f"{report['classes'][0]['inside_share']:.2f}" in table
    assert len(table.splitlines()) == 2 + 3


def test_reorder_by_cluster_puts_blocks_first_and_excluded_last():
    report = {"clusters": [{"ids": [0, 3]}, {"ids": [1, 4]}], "excluded": [2]}
    assert reorder_by_cluster(report, 6) == [0, 3, 1, 4, 2, 5]
    with pytest.raises(ClusterError, match="twice"):
        reorder_by_cluster({"clusters": [{"ids": [0, 0]}], "excluded": []}, 3)


@pytest.mark.parametrize("kind", ["soft", "covariance"])
def test_plot_confusion_writes_a_png(tmp_path, kind):
    y, probs = simulate_predictions(GROUPS, seed=0)
    matrix = build_matrices(y, probs, 12)[kind]
    affinity = confusability(matrix, kind)
    names = [f"class-{i}" for i in range(12)]
    report = clusters_to_json(ClassClusterer(k=3).fit(affinity), names, kind, affinity)
    path = plot_confusion(matrix, report, names, tmp_path / "plots" / "confusion.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000
    assert [p.name for p in path.parent.iterdir()] == ["confusion.png"]  # no temp file left behind


# ---------------------------------------------------------------- overlap and isolated classes

def _two_groups_and_a_bridge() -> np.ndarray:
    """Groups {0, 1, 2} and {3, 4, 5} (affinity 1 inside); class 2 is also confused with 3 and 4
    (0.6 each): 1.2 / 3.2 = 0.375 of its confusion lies in the other group, 0.6 / 2.6 = 0.23 of theirs."""
    affinity = np.zeros((6, 6))
    for group in ([0, 1, 2], [3, 4, 5]):
        affinity[np.ix_(group, group)] = 1.0
    affinity[2, [3, 4]] = affinity[[3, 4], 2] = 0.6
    np.fill_diagonal(affinity, 0.0)
    return affinity


def test_overlap_adds_a_class_to_every_other_cluster_holding_enough_of_its_confusion():
    affinity = _two_groups_and_a_bridge()
    partition = ClassClusterer(k=2, overlap=0.0).fit(affinity)
    overlapping = ClassClusterer(k=2, overlap=0.3).fit(affinity)
    assert partition.clusters_ == [[0, 1, 2], [3, 4, 5]]
    assert overlapping.labels_.tolist() == partition.labels_.tolist()  # the primary clusters are unchanged
    assert overlapping.clusters_ == [[0, 1, 2], [2, 3, 4, 5]]
    assert overlapping.also_in_[2] == [1] and not any(overlapping.also_in_[i] for i in (0, 1, 3, 4, 5))
    names = [f"c{i}" for i in range(6)]
    report = clusters_to_json(overlapping, names, "soft", affinity)
    assert report["clusters"][1]["ids"] == [2, 3, 4, 5]
    assert report["classes"][2]["cluster"] == 0 and report["classes"][2]["also_in"] == [1]
    assert reorder_by_cluster(report, 6) == [0, 1, 2, 3, 4, 5]  # each class once, in its own block
    table = format_cluster_table(report)
    assert "c2+" in table and "also in this cluster" in table
    alone = clusters_to_json(partition, names, "soft", affinity)
    assert report["classes"][2]["inside_share"] > alone["classes"][2]["inside_share"]  # its 2nd cluster counts


def test_overlap_never_fills_a_cluster_beyond_max_size_or_with_every_class():
    affinity = np.full((4, 4), 0.5)
    np.fill_diagonal(affinity, 0.0)  # every class equally confused with every other
    clusterer = ClassClusterer(k=2, overlap=0.1).fit(affinity)
    assert all(len(members) <= 3 for members in clusterer.clusters_)  # a specialist keeps its dustbin
    limited = ClassClusterer(k=2, max_size=2, overlap=0.1).fit(affinity)
    assert [len(members) for members in limited.clusters_] == [2, 2]


def test_the_heatmap_marks_overlapping_memberships(tmp_path):
    affinity = _two_groups_and_a_bridge()
    names = [f"c{i}" for i in range(6)]
    paths = {}
    for overlap in (0.0, 0.3):
        report = clusters_to_json(ClassClusterer(k=2, overlap=overlap).fit(affinity), names, "soft", affinity)
        paths[overlap] = plot_confusion(affinity, report, names, tmp_path / f"overlap{overlap}.png")
    assert paths[0.3].read_bytes() != paths[0.0].read_bytes()


def test_default_min_confusion_leaves_isolated_classes_to_the_generalist():
    groups = [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    isolated = [9, 10]  # classes the generalist gets right and rarely guesses for anything else
    y, probs = simulate_predictions(groups + [[c] for c in isolated], seed=0)
    probs[:, isolated] *= np.where(np.isin(y, isolated), 1.0, 0.05)[:, None]
    probs[np.isin(y, isolated)] = np.where(np.eye(11, dtype=bool)[y[np.isin(y, isolated)]], 1.0, 0.002)
    probs /= probs.sum(axis=1, keepdims=True)
    affinity = confusability(build_matrices(y, probs, 11)["soft"], "soft")
    clusterer = clusterer_from_config(ClustersConfig(k=3)).fit(affinity)
    assert clusterer.excluded_ == isolated
    assert clusterer.clusters_ == groups
    table = format_cluster_table(clusters_to_json(clusterer, [f"c{i}" for i in range(11)], "soft", affinity))
    assert "left to the generalist" in table


def test_one_cluster_holding_every_class_is_refused():
    affinity = block_affinity([[0, 1], [2, 3]], seed=0)  # every class well confused: none excluded
    with pytest.raises(ClusterError, match="one cluster holding all 4 classes"):
        ClassClusterer(k=1, min_confusion=0.05).fit(affinity)
