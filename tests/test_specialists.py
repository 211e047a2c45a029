"""Specialists: the enriched stream, the dustbin head, seeds, parallel training, resume and failures."""
from __future__ import annotations

import logging
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from ensemble_kd import specialists
from ensemble_kd.config import ConfigError, ModelConfig, load_config
from ensemble_kd.confusion import read_clusters
from ensemble_kd.data import load_data
from ensemble_kd.generalist import load_generalist
from ensemble_kd.losses import fold_labels, fold_probs
from ensemble_kd.models import build_model
from ensemble_kd.specialists import (
    SpecialistError,
    dispatch_order,
    enriched_indices,
    new_specialist,
    specialist_dir,
    specialist_head,
    specialist_seed,
    train_all_specialists,
)


@pytest.fixture
def run_copy(clustered_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(clustered_run, tmp_path / "run"))


def _mask(n: int, inside: list[int]) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[inside] = True
    return mask


# ---------------------------------------------------------------- the enriched stream

@pytest.mark.parametrize("fraction, expected_len", [(0.5, 10), (0.25, 20), (0.2, 25)])
def test_enriched_indices_keep_every_subset_example_once_and_the_fraction(fraction: float, expected_len: int) -> None:
    inside = [1, 5, 7, 20, 33]  # 5 of 40 in S; 5 / fraction indices in all
    in_subset = _mask(40, inside)
    idx = enriched_indices(in_subset, fraction, torch.Generator().manual_seed(0))
    assert len(idx) == expected_len
    assert sorted(idx[in_subset[idx]].tolist()) == inside  # each S example exactly once
    others = idx[~in_subset[idx]].tolist()
    assert len(others) == expected_len - 5
    assert len(set(others)) == len(others)  # 35 others are enough: drawn without replacement


def test_enriched_indices_draw_others_with_replacement_when_too_few() -> None:
    in_subset = _mask(8, [0, 1, 2, 3, 4, 5])  # 6 in S, only 6 and 7 outside
    idx = enriched_indices(in_subset, 0.5, torch.Generator().manual_seed(0))
    assert len(idx) == 12  # still half from S
    assert sorted(idx[in_subset[idx]].tolist()) == [0, 1, 2, 3, 4, 5]
    others = idx[~in_subset[idx]].tolist()
    assert len(others) == 6 and set(others) <= {6, 7}


def test_enriched_indices_are_reproducible_and_shuffled_by_the_generator() -> None:
    in_subset = _mask(40, [1, 5, 7, 20, 33])
    a = enriched_indices(in_subset, 0.5, torch.Generator().manual_seed(3))
    b = enriched_indices(in_subset, 0.5, torch.Generator().manual_seed(3))
    c = enriched_indices(in_subset, 0.5, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_labels_outside_the_subset_fold_to_the_dustbin() -> None:
    # subset [4, 1]: class 4 -> 0, class 1 -> 1, every other class -> dustbin 2
    assert fold_labels(torch.tensor([0, 1, 2, 3, 4, 5]), [4, 1], 6).tolist() == [2, 1, 2, 2, 0, 2]


# ---------------------------------------------------------------- the head

def _generalist(same_rows: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden=[4], dropout=0.0), (3,), 6, [0.0] * 3, [1.0] * 3)
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).log())
        if same_rows:
            model.head.weight.copy_(model.head.weight[:1].expand(6, -1))
    return model.eval()


def test_specialist_head_copies_subset_rows_and_dustbin_bias_is_logsumexp_of_the_others() -> None:
    generalist = _generalist()
    weight, bias = specialist_head(generalist, [4, 1])
    assert weight.shape == (3, 4) and bias.shape == (3,)
    assert torch.equal(weight[:2], generalist.head.weight[[4, 1]])
    assert torch.equal(bias[:2], generalist.head.bias[[4, 1]])
    assert bias[2].item() == pytest.approx(math.log(1 + 3 + 4 + 6))  # exp(bias) of classes 0, 2, 3, 5
    assert torch.allclose(weight[2], generalist.head.weight[[0, 2, 3, 5]].mean(0))


def test_new_specialist_starts_as_the_folded_generalist_when_head_rows_agree() -> None:
    generalist = _generalist(same_rows=True)
    specialist = new_specialist(generalist, [4, 1]).eval()
    x = torch.randn(5, 3)
    with torch.no_grad():
        expected = fold_probs(torch.softmax(generalist(x), 1), torch.tensor([4, 1]))
        got = torch.softmax(specialist(x), 1)
    assert torch.allclose(got, expected, atol=1e-6)
    assert generalist.head.out_features == 6  # the generalist itself is untouched


def test_specialist_seed_depends_only_on_run_seed_and_cluster_id() -> None:
    torch.manual_seed(123)  # global RNG state must not matter
    first = specialist_seed(0, 1)
    torch.manual_seed(456)
    assert specialist_seed(0, 1) == first
    assert len({specialist_seed(0, 0), specialist_seed(0, 1), specialist_seed(1, 0), specialist_seed(1, 1)}) == 4
    assert 0 <= first < 2**63


def test_specialists_are_dispatched_longest_first() -> None:
    cfg = load_config(overrides=["specialists.in_cluster_fraction=0.5"])
    subsets = {0: [0], 1: [1, 2, 3], 2: [4, 5]}
    labels = torch.tensor([0] * 50 + [1] * 5 + [2] * 5 + [3] * 5 + [4] * 10 + [5] * 10)
    assert dispatch_order(cfg, subsets, labels) == [0, 2, 1]  # 50, 20 and 15 examples of their own classes
    assert dispatch_order(cfg, subsets) == [1, 2, 0]  # without the labels: by number of classes
    assert dispatch_order(cfg, {3: [0, 1], 1: [2, 3]}) == [1, 3]  # ties by cluster id


# ---------------------------------------------------------------- training

REAL_FIT = specialists.fit


def _stage_recorder(monkeypatch: pytest.MonkeyPatch, fail_on: str | None = None,
                    error: BaseException | None = None) -> list[str]:
    """Wrap specialists.fit: record each stage trained; raise `error` on stages starting with `fail_on`."""
    real_fit, stages = REAL_FIT, []

    def recording_fit(model, train, cfg, stage_dir, options):
        if fail_on is not None and options.stage.startswith(fail_on):
            raise error
        stages.append(options.stage)
        return real_fit(model, train, cfg, stage_dir, options)

    monkeypatch.setattr(specialists, "fit", recording_fit)
    return stages


def test_interrupted_specialists_resume_without_retraining_the_finished_one_and_say_how_many_are_done(
        run_copy: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    cfg = tiny_config()
    first_run = _stage_recorder(monkeypatch, fail_on="specialist 1", error=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt), caplog.at_level(logging.INFO, logger="ensemble_kd.specialists"):
        train_all_specialists(cfg, run_copy)
    assert first_run == ["specialist 0 hard", "specialist 0 soft"]
    lines = [m for m in caplog.messages if m.startswith("specialists:")]
    assert len(lines) == 1 and re.fullmatch(r"specialists: 1/2 done, about \d+ (s|min) left", lines[0])
    finished = specialist_dir(run_copy, 0) / "model.pt"
    saved = finished.read_bytes()
    assert not (specialist_dir(run_copy, 1) / "model.pt").exists()

    resumed = _stage_recorder(monkeypatch)
    threads_before = torch.get_num_threads()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ensemble_kd.specialists"):
        paths = train_all_specialists(cfg, run_copy)
    lines = [m for m in caplog.messages if m.startswith("specialists:")]
    assert len(lines) == 1 and re.fullmatch(r"specialists: 2/2 done \(\d+ (s|min) for this run's 1\)", lines[0])
    assert torch.get_num_threads() == threads_before  # a specialist trained in this process restores the count
    assert resumed == ["specialist 1 hard", "specialist 1 soft"]  # specialist 0 is not trained again
    assert finished.read_bytes() == saved
    assert all(p.is_file() for p in paths)


def test_failing_specialist_names_its_cluster_and_cause_and_keeps_the_others(run_copy: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _stage_recorder(monkeypatch, fail_on="specialist 1", error=ValueError("loss exploded on purpose"))
    with pytest.raises(SpecialistError, match=r"specialist 1 .*ValueError: loss exploded on purpose"):
        train_all_specialists(tiny_config(), run_copy)
    assert (specialist_dir(run_copy, 0) / "model.pt").is_file()
    assert not (specialist_dir(run_copy, 1) / "model.pt").exists()


@pytest.mark.parametrize("seconds, text", [(0.2, "1 s"), (40.4, "40 s"), (90, "2 min"), (3599, "1 h"),
                                           (7500, "2 h 5 min")])
def test_durations_in_the_progress_line_are_rounded_for_reading(seconds: float, text: str) -> None:
    assert specialists._about(seconds) == text


def test_the_time_left_is_this_runs_pace_per_unit_of_cost_times_the_cost_left(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    clock = iter([100.0, 160.0, 190.0])  # started at 100 s; the first finishes at 160, the second at 190
    monkeypatch.setattr(specialists.time, "perf_counter", lambda: next(clock))
    progress = specialists._Progress([30.0, 10.0, 20.0], finished_before=1, total=4)
    with caplog.at_level(logging.INFO, logger="ensemble_kd.specialists"):
        progress(0)  # 30 units in 60 s: the 30 left take about 60 s
        progress(2)  # 50 units in 90 s: the 10 left take about 18 s
    assert caplog.messages == ["specialists: 2/4 done, about 1 min left", "specialists: 3/4 done, about 18 s left"]


# ---------------------------------------------------------------- how a specialist starts

def test_scratch_specialists_have_fresh_weights_of_their_own_architecture(run_copy: Path) -> None:
    cfg = tiny_config("specialists.init=scratch", "specialists.model.arch=mlp", "specialists.model.hidden=[24]",
                      "specialists.soft_epochs=0")
    data = load_data(cfg.data, cfg.seed)
    generalist = load_generalist(cfg, data, run_copy)
    subset = read_clusters(run_copy)[0]
    first = specialists.build_specialist(cfg, data, generalist, subset, seed=5)
    again = specialists.build_specialist(cfg, data, generalist, subset, seed=5)
    other = specialists.build_specialist(cfg, data, generalist, subset, seed=6)
    assert first.head.out_features == len(subset) + 1
    assert first.features[1].out_features == 24  # specialists.model, not the generalist's [16]
    assert torch.equal(first.head.weight, again.head.weight)  # seeded by the specialist's own seed
    assert not torch.equal(first.head.weight, other.head.weight)
    copied = specialists.build_specialist(tiny_config(), data, generalist, subset, seed=5)
    assert torch.equal(copied.features[1].weight, generalist.features[1].weight)  # init = generalist copies
    paths = train_all_specialists(cfg, run_copy)
    trained = specialists.load_specialist(cfg, data, run_copy, 0)
    assert trained.features[1].out_features == 24 and paths[0].is_file()
    with pytest.raises(specialists.ArtifactError, match="another configuration"):
        specialists.load_specialist(tiny_config(), data, run_copy, 0)  # a copy-initialised run refuses it


def test_a_model_of_their_own_needs_scratch_initialisation() -> None:
    with pytest.raises(ConfigError, match="specialists.init = 'scratch'"):
        tiny_config("specialists.model.arch=cnn")
