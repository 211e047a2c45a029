"""How the class-level stages scale: 1,000 classes in 50 planted confusable groups.

    python benchmarks/scale.py            # 1,000 classes, 50 groups -> benchmarks/results/scale.json
    python benchmarks/scale.py --quick    # 200 classes, 10 groups   -> benchmarks/results/scale_quick.json

No model is trained. A generalist's held-out probabilities are simulated: for an
example of class c, logits are N(0, 1) plus 3 on every class of c's group plus 4 more
on c, so its mass stays inside the group (classes are dealt to groups at random, not
in blocks). Specialists' outputs are simulated the same way over their subset plus the
dustbin. Measured (best of `--repeats`, except k-means which runs once with its own
`n_init` restarts):

* build_matrices (hard, soft and covariance matrices), confusability, ClassClusterer.fit
  for each matrix kind, and whether the planted groups come back exactly (adjusted Rand
  index 1.0 and the same sets of classes);
* the heatmap (plot_confusion) and the cluster JSON;
* the enriched index streams of all specialists for one epoch (enriched_indices);
* combine (Hinton eq. 5) for one batch with top_n = 1 and 3, on `--device`.

The simulated generalist is right about 96% of the time, so 30 held-out examples per
class give the hard matrix about one error per class: too few to place most classes,
and it is not expected to recover the groups. The soft and covariance matrices use the
whole predicted distribution of every example and should recover them exactly.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from common import RESULTS, machine_info  # benchmarks/common.py (the script's folder is on sys.path)
from sklearn.metrics import adjusted_rand_score
from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

from ensemble_kd.confusion import ClassClusterer, build_matrices, clusters_to_json, confusability
from ensemble_kd.ensemble import active_specialists, combine, membership_matrix
from ensemble_kd.report import plot_confusion
from ensemble_kd.specialists import enriched_indices

GROUP_BOOST, CLASS_BOOST = 3.0, 4.0  # logit added to the true class's group, and again to the true class


def simulated_probs(num_classes: int, num_groups: int, per_class: int, seed: int = 0,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, generalist probabilities, group of each class) for `per_class` examples of each class."""
    rng = np.random.default_rng(seed)
    group_of = rng.permutation(num_classes) % num_groups
    y = np.repeat(np.arange(num_classes), per_class)
    logits = rng.normal(size=(len(y), num_classes))
    logits += GROUP_BOOST * (group_of[None, :] == group_of[y][:, None])
    logits[np.arange(len(y)), y] += CLASS_BOOST
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return y, probs / probs.sum(axis=1, keepdims=True), group_of


def simulated_specialists(y: np.ndarray, clusters: list[list[int]], seed: int = 1) -> list[torch.Tensor]:
    """Specialist k's (N, |S_k| + 1) probabilities: the true class (or the dustbin) boosted."""
    generator = torch.Generator().manual_seed(seed)
    outputs = []
    for cluster in clusters:
        column = {c: i for i, c in enumerate(cluster)}
        target = torch.tensor([column.get(int(c), len(cluster)) for c in y])
        logits = torch.randn(len(y), len(cluster) + 1, generator=generator)
        logits[torch.arange(len(y)), target] += CLASS_BOOST
        outputs.append(torch.softmax(logits, dim=1))
    return outputs


def best_time(work: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Smallest wall time over `repeats` runs (the least disturbed by other load), and the last result."""
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = work()
        if isinstance(result, torch.Tensor) and result.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return min(times), result


def clustering_results(y: np.ndarray, probs: np.ndarray, group_of: np.ndarray, k: int, repeats: int,
                       ) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
    num_classes = probs.shape[1]
    seconds, matrices = best_time(lambda: build_matrices(y, probs, num_classes), repeats)
    planted = {tuple(np.flatnonzero(group_of == g).tolist()) for g in range(k)}
    kinds, fitted = {}, {}
    for kind in ("soft", "hard", "covariance"):
        affinity_s, affinity = best_time(lambda: confusability(matrices[kind], kind), repeats)
        started = time.perf_counter()
        clusterer = ClassClusterer(k=k, min_size=2).fit(affinity)
        fit_s = time.perf_counter() - started
        kinds[kind] = {"confusability_s": affinity_s, "cluster_fit_s": fit_s,
                       "adjusted_rand_index": float(adjusted_rand_score(group_of, clusterer.labels_)),
                       "exact_recovery": {tuple(c) for c in clusterer.clusters_} == planted,
                       "repair_moves": int(clusterer.repair_moves_)}
        fitted[kind] = (clusterer, affinity)
    clusterer, affinity = fitted["soft"]
    names = [f"class_{i}" for i in range(num_classes)]
    json_s, report = best_time(lambda: clusters_to_json(clusterer, names, "soft", affinity), repeats)
    with tempfile.TemporaryDirectory() as tmp:
        plot_s, _ = best_time(lambda: plot_confusion(matrices["soft"], report, names, Path(tmp) / "h.png"), 1)
    timings = {"build_matrices_s": seconds, "clusters_json_s": json_s, "heatmap_s": plot_s, "by_matrix": kinds}
    return timings, matrices, report


def enrichment_seconds(y_train: torch.Tensor, clusters: list[list[int]], repeats: int) -> float:
    """One epoch's enriched index stream for every specialist."""
    def all_streams() -> int:
        generator = torch.Generator().manual_seed(0)
        return sum(len(enriched_indices(torch.isin(y_train, torch.tensor(c)), 0.5, generator)) for c in clusters)
    return best_time(all_streams, repeats)[0]


def combine_results(y: np.ndarray, probs: np.ndarray, clusters: list[list[int]], batch: int, device: torch.device,
                    repeats: int) -> dict[str, Any]:
    rows = np.random.default_rng(2).choice(len(y), size=batch, replace=False)
    generalist = torch.from_numpy(probs[rows]).float().to(device)
    specialists = [p.to(device) for p in simulated_specialists(y[rows], clusters)]
    membership = membership_matrix(clusters, probs.shape[1]).to(device)
    results = {}
    for top_n in (1, 3):
        active = active_specialists(generalist, membership, top_n)
        active_s, _ = best_time(lambda: active_specialists(generalist, membership, top_n), repeats)
        seconds, _ = best_time(lambda: combine(generalist, specialists, membership, active), repeats)
        results[f"top_n={top_n}"] = {"combine_s": seconds, "active_specialists_s": active_s,
                                     "mean_active_specialists": float(active.sum(dim=1).float().mean())}
    return results


def format_table(result: dict[str, Any]) -> str:
    case, t = result["case"], result["timings"]
    lines = [f"{case['classes']} classes in {case['groups']} planted groups, {case['held_out_examples']:,} held-out "
             f"examples (simulated generalist accuracy {case['simulated_generalist_accuracy']:.1%}), "
             f"combine batch {case['combine_batch']} on {result['machine']['device']} "
             f"({result['machine']['cpu']}, {result['machine']['cores']} cores, "
             f"load {result['machine']['load_average_1min']})",
             "| step | seconds | recovered (ARI) |", "|---|---:|---|",
             f"| build_matrices (hard + soft + covariance) | {t['build_matrices_s']:.3f} | |"]
    for kind, row in t["by_matrix"].items():
        lines.append(f"| confusability ({kind}) | {row['confusability_s']:.4f} | |")
        lines.append(f"| ClassClusterer(k={case['groups']}).fit ({kind}) | {row['cluster_fit_s']:.3f} | "
                     f"{'exact' if row['exact_recovery'] else 'NOT exact'} ({row['adjusted_rand_index']:.3f}) |")
    lines += [f"| clusters_to_json | {t['clusters_json_s']:.4f} | |",
              f"| plot_confusion (heatmap PNG) | {t['heatmap_s']:.3f} | |",
              f"| enriched_indices, all {case['groups']} specialists, one epoch of {case['train_examples']:,} | "
              f"{t['enrichment_s']:.3f} | |"]
    for name, row in t["combine"].items():
        lines.append(f"| combine, {name} ({row['mean_active_specialists']:.2f} active per input) | "
                     f"{row['combine_s']:.4f} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 classes in 10 groups instead of 1,000 in 50")
    parser.add_argument("--per-class", type=int, default=30, help="held-out examples per class")
    parser.add_argument("--train-per-class", type=int, default=100, help="training examples per class (enrichment)")
    parser.add_argument("--batch", type=int, default=1024, help="inputs per combine batch")
    parser.add_argument("--repeats", type=int, default=3, help="runs per timing; the fastest counts")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch, BLAS and OpenMP threads; 0 = their defaults. On a machine shared with other "
                             "jobs use 1: with more threads than free cores small ops wait for each other")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where combine runs")
    parser.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/scale[_quick].json)")
    args = parser.parse_args(argv)
    num_classes, groups = (200, 10) if args.quick else (1000, 50)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    machine = machine_info(device)

    with threadpool_limits(args.threads or None):
        y, probs, group_of = simulated_probs(num_classes, groups, args.per_class)
        timings, _, report = clustering_results(y, probs, group_of, groups, args.repeats)
        clusters = [c["ids"] for c in report["clusters"]]
        y_train = torch.arange(num_classes).repeat_interleave(args.train_per_class)
        timings["enrichment_s"] = enrichment_seconds(y_train, clusters, args.repeats)
        timings["combine"] = combine_results(y, probs, clusters, args.batch, device, args.repeats)

    result = {"benchmark": "scale", "case": {"classes": num_classes, "groups": groups,
                                             "held_out_examples": len(y), "train_examples": len(y_train),
                                             "combine_batch": args.batch, "repeats": args.repeats,
                                             "threads": args.threads or "default",
                                             "simulated_generalist_accuracy": float((probs.argmax(1) == y).mean())},
              "machine": machine, "timings": timings}
    out = args.out or RESULTS / ("scale_quick.json" if args.quick else "scale.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
