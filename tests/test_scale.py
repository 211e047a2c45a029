"""Scaling out: specialists on a Dask cluster, devices and mixed precision, many classes."""
from __future__ import annotations

import builtins
import math
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config, weights
from sklearn.metrics import adjusted_rand_score

from ensemble_kd import parallel, precision
from ensemble_kd.artifacts import load_torch, read_jsonl
from ensemble_kd.config import ConfigError, ModelConfig, TrainConfig, load_config
from ensemble_kd.confusion import ClassClusterer, build_matrices, confusability, hard_confusion, soft_confusion
from ensemble_kd.ensemble import combine
from ensemble_kd.inference import evaluate, predict_logits
from ensemble_kd.models import build_model
from ensemble_kd.parallel import SchedulerError, effective_jobs, run_jobs, specialist_device
from ensemble_kd.precision import (
    _bf16_autocast_works,
    forward_flops,
    native_bf16,
    resolve_precision,
    training_precision,
)
from ensemble_kd.specialists import train_all_specialists
from ensemble_kd.train import FitOptions, TrainSet, fit, set_seed

# ---------------------------------------------------------------- Dask

@pytest.fixture(scope="module")
def dask_cluster():
    """Two single-threaded worker processes on loopback, closed when the module is done."""
    distributed = pytest.importorskip("dask.distributed")
    cluster = distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1",
                                       dashboard_address=None)
    yield cluster
    cluster.close()



def test_dask_and_loky_backends_train_identical_specialists(dask_cluster, tiny_run: tuple[Path, dict],
                                                           clustered_run: Path, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    cfg = tiny_config("specialists.backend=dask", f"specialists.scheduler={dask_cluster.scheduler_address}")
    run_dir = shutil.copytree(clustered_run, tmp_path / "dask")  # the same generalist and clusters
    on_dask = [weights(path) for path in train_all_specialists(cfg, run_dir)]
    local = [weights(tiny_run[0] / "specialists" / f"specialist_{k:02d}" / "model.pt") for k in range(2)]
    assert len(on_dask) == 2 and "several threads" not in caplog.text
    for trained_here, remote in zip(local, on_dask):
        assert trained_here.keys() == remote.keys()
        assert all(torch.equal(trained_here[name], remote[name]) for name in trained_here)


def _pid(_: int) -> int:
    return os.getpid()


def test_dask_jobs_run_on_the_workers_in_order_and_the_client_is_closed_even_when_one_fails(
        dask_cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    clients, real_connect = [], parallel.connect
    monkeypatch.setattr(parallel, "connect", lambda *a, **k: clients.append(real_connect(*a, **k)) or clients[-1])
    cfg = tiny_config("specialists.backend=dask", f"specialists.scheduler={dask_cluster.scheduler_address}")
    assert run_jobs(cfg, 2, None, pow, [(i, 2) for i in range(4)]) == [0, 1, 4, 9]
    pids = run_jobs(cfg, 1, None, _pid, [(i,) for i in range(3)])  # n_jobs 1: still on the cluster
    assert os.getpid() not in pids  # joblib's Dask backend would run these here for a one-thread cluster
    with pytest.raises(ZeroDivisionError):
        run_jobs(cfg, 2, None, divmod, [(1, 0), (2, 0)])
    assert len(clients) == 3 and all(client.status == "closed" for client in clients)


def test_workers_that_cannot_see_the_run_directory_are_refused(dask_cluster, tmp_path: Path) -> None:
    client = parallel.connect(dask_cluster.scheduler_address)
    try:
        with pytest.raises(SchedulerError, match=r"2 of 2 Dask workers cannot see .*shared"):
            parallel.check_shared_run_dir(client, tmp_path / "not-a-run")
        with pytest.raises(SchedulerError, match="relative"):
            parallel.check_shared_run_dir(client, Path("artifacts/run"))
        (tmp_path / "clusters.json").write_text("{}")
        parallel.check_shared_run_dir(client, tmp_path)  # loopback workers share this file system
    finally:
        client.close()


def test_workers_with_several_threads_get_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    class Client:
        def nthreads(self) -> dict[str, int]:
            return {"tcp://10.0.0.1:4000": 1, "tcp://10.0.0.2:4000": 8}

    parallel._warn_about_threaded_workers(Client())
    assert "1 Dask workers run several threads (e.g. tcp://10.0.0.2:4000)" in caplog.text
    assert "--nthreads 1" in caplog.text


def test_an_unreachable_scheduler_fails_fast_with_what_to_do(tmp_path: Path) -> None:
    pytest.importorskip("dask.distributed")
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cfg = tiny_config("specialists.backend=dask", f"specialists.scheduler=tcp://127.0.0.1:{port}")
    started = time.perf_counter()
    with pytest.raises(SchedulerError, match=rf"cannot reach a Dask scheduler at .*127.0.0.1:{port}.* within 1 s"
                                             r".*`dask scheduler`"):
        run_jobs(cfg, 2, None, pow, [(2, 2)], connect_timeout=1.0)
    assert time.perf_counter() - started < 10


def test_without_dask_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_dask(name, *args, **kwargs):
        if name.startswith("dask"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dask)
    with pytest.raises(ImportError, match=r"pip install 'ensemble-kd\[dask\]'"):
        parallel.connect("tcp://127.0.0.1:8786")


# ---------------------------------------------------------------- devices

@pytest.fixture
def three_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend three CUDA GPUs are visible (only device placement is computed, nothing runs there)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)


def test_specialists_are_spread_round_robin_over_the_gpus(three_gpus) -> None:
    cfg = load_config(overrides=["device=cuda"])
    assert [str(specialist_device(cfg, k)) for k in range(5)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:0", "cuda:1"]
    assert specialist_device(load_config(overrides=["device=cpu"]), 4) == torch.device("cpu")


@pytest.mark.parametrize("overrides, n_tasks, expected", [
    (["device=cuda", "specialists.n_jobs=8"], 10, 3),  # loky on CUDA: one worker per GPU, n_jobs ignored
    (["device=auto", "specialists.n_jobs=1"], 10, 3),
    (["device=cuda"], 2, 2),  # never more workers than specialists left
    (["device=cpu", "specialists.n_jobs=5"], 10, 5),
    (["device=cpu", "specialists.n_jobs=5"], 4, 4),
])
def test_effective_jobs(three_gpus, overrides: list[str], n_tasks: int, expected: int) -> None:
    assert effective_jobs(load_config(overrides=overrides), n_tasks) == expected


def test_effective_jobs_minus_one_is_one_per_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel.os, "cpu_count", lambda: 6)
    assert effective_jobs(load_config(overrides=["specialists.n_jobs=-1"]), 100) == 6


# ---------------------------------------------------------------- mixed precision

def _blobs(n: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 3
    x = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 4.0]])[y] + 0.5 * torch.randn(n, 2, generator=generator)
    return x, y


@pytest.mark.skipif(not _bf16_autocast_works("cpu"), reason="this CPU build of torch has no bfloat16 autocast")
def test_bf16_training_on_cpu_learns_and_keeps_float32_weights(tmp_path: Path) -> None:
    x, y = _blobs()
    set_seed(0)
    model = build_model(ModelConfig(arch="mlp", hidden=[16], dropout=0.0), (2,), 3, [0.0], [1.0])
    cfg = TrainConfig(epochs=4, batch_size=32, lr=0.02)
    fit(model, TrainSet(x, y), cfg, tmp_path, FitOptions(stage="bf16", seed=0, progress=False, precision="bf16"))
    losses = [record["loss"] for record in read_jsonl(tmp_path / "metrics.jsonl")]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    assert evaluate(model, x, y).accuracy > 0.9  # chance is 1/3
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert load_torch(tmp_path / "model.pt")["precision"] == "bf16"


def test_fp16_on_cpu_is_refused_with_what_to_use_instead(tmp_path: Path) -> None:
    x, y = _blobs(30)
    model = build_model(ModelConfig(arch="mlp", hidden=[4]), (2,), 3, [0.0], [1.0])
    with pytest.raises(ConfigError, match=r"fp16' needs a CUDA device.*use precision = 'bf16'"):
        fit(model, TrainSet(x, y), TrainConfig(epochs=1), tmp_path, FitOptions(stage="fp16", seed=0, progress=False,
            precision="fp16"))
    assert not (tmp_path / "model.pt").exists()


@pytest.mark.parametrize("overrides, message", [
    (["precision=fp16"], "precision = 'fp16' needs a CUDA GPU"),  # the default device is cpu
    (["precision=fp64"], "precision = 'fp64' is not one of auto, fp32, bf16, fp16"),
])
def test_impossible_precisions_are_config_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_fp16_with_a_cuda_or_auto_device_is_a_valid_config() -> None:
    assert load_config(overrides=["precision=fp16", "device=auto"]).precision == "fp16"


def test_forward_flops_of_an_mlp_by_hand() -> None:
    model = build_model(ModelConfig(arch="mlp", hidden=[32, 16]), (8,), 3, [0.0], [1.0])
    assert forward_flops(model, torch.zeros(1, 8)) == 2 * (8 * 32 + 32 * 16 + 16 * 3)  # multiply-adds of the Linears


def test_auto_precision_is_bf16_only_where_bf16_is_native_and_the_model_large_enough(monkeypatch) -> None:
    large = build_model(ModelConfig(arch="mlp", hidden=[1024, 1024]), (784,), 10, [0.0], [1.0])
    tiny = build_model(ModelConfig(arch="mlp", hidden=[16]), (2,), 3, [0.0], [1.0])
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    # training: 3 x 128 x 2 x (784 x 1024 + 1024 x 1024 + 1024 x 10) = 1.4 GFLOP per step; tiny: 13 kFLOP
    assert training_precision("auto", "cpu", large, torch.zeros(1, 784), batch_size=128) == "bf16"
    assert training_precision("auto", "cpu", tiny, torch.zeros(1, 2), batch_size=128) == "fp32"
    assert training_precision("fp32", "cpu", large, torch.zeros(1, 784), batch_size=128) == "fp32"  # asked for
    assert training_precision("bf16", "cpu", tiny, torch.zeros(1, 2), batch_size=128) == "bf16"
    assert large.training and tiny.training  # counting ran in eval mode and gave the mode back
    assert resolve_precision("auto", "cpu", step_flops=2e8) == "bf16"
    assert resolve_precision("auto", "cpu", step_flops=2e7) == "fp32"
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    assert training_precision("auto", "cpu", large, torch.zeros(1, 784), batch_size=128) == "fp32"
    assert resolve_precision("auto", "cpu") == "fp32"


def test_predict_logits_under_auto_never_runs_the_model_more_than_once_per_chunk(monkeypatch) -> None:
    calls = []
    model = build_model(ModelConfig(arch="mlp", hidden=[1024]), (784,), 10, [0.0], [1.0])
    model.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    logits = predict_logits(model, torch.rand(300, 784), batch_size=128, precision="auto")
    assert calls == [128, 128, 44]  # bf16 chosen from the parameter count, not from a trial pass
    assert logits.dtype == torch.float32 and logits.shape == (300, 10)


@pytest.mark.skipif(not native_bf16(torch.device("cpu")), reason="this CPU has no native bfloat16 (AVX512-BF16 or AMX)")
@pytest.mark.parametrize("min_flops, recorded", [(0, "bf16"), (float("inf"), None)])
def test_fit_under_auto_records_the_precision_it_chose(tmp_path: Path, monkeypatch, min_flops: float,
                                                       recorded: str | None) -> None:
    monkeypatch.setattr(precision, "BF16_MIN_STEP_FLOPS", min_flops)
    x, y = _blobs(60)
    model = build_model(ModelConfig(arch="mlp", hidden=[8]), (2,), 3, [0.0], [1.0])
    fit(model, TrainSet(x, y), TrainConfig(epochs=1, batch_size=32), tmp_path,
        FitOptions(stage="auto", seed=0, progress=False, precision="auto"))
    assert load_torch(tmp_path / "model.pt").get("precision") == recorded  # absent for fp32


def test_compile_is_a_validated_switch() -> None:
    assert load_config().compile is False  # opt-in
    assert load_config(overrides=["compile=true"]).compile is True
    with pytest.raises(ConfigError, match="compile must be true or false"):
        load_config(overrides=["compile=1"])


@pytest.mark.skipif(not os.environ.get("ENSEMBLE_KD_COMPILE_TEST"), reason=(
    "torch.compile on CPU builds C++ kernels with gcc: about 40 s for this tiny model on 2 busy cores, too slow "
    "for the suite; set ENSEMBLE_KD_COMPILE_TEST=1 to run it"))
def test_a_compiled_fit_learns_and_saves_the_plain_models_weights(tmp_path: Path) -> None:
    x, y = _blobs()
    set_seed(0)
    model = build_model(ModelConfig(arch="mlp", hidden=[16], dropout=0.0), (2,), 3, [0.0], [1.0])
    fit(model, TrainSet(x, y), TrainConfig(epochs=4, batch_size=32, lr=0.02), tmp_path,
        FitOptions(stage="compiled", seed=0, progress=False, compile_model=True))
    assert evaluate(model, x, y).accuracy > 0.9  # chance is 1/3
    assert set(load_torch(tmp_path / "model.pt")["state_dict"]) == set(model.state_dict())  # no _orig_mod. prefix


def test_the_ensemble_combination_stays_float32_inside_a_bf16_autocast_region() -> None:
    # two overlapping specialists, so EM needs several steps; in bfloat16 its matrix products
    # would move q by about 2e-4 (checked against the undecorated function)
    generalist = torch.tensor([[0.37, 0.29, 0.21, 0.13]])
    specialists = [torch.tensor([[0.33, 0.41, 0.26]]), torch.tensor([[0.17, 0.52, 0.31]])]
    membership = torch.tensor([[True, True, False, False], [False, True, True, False]])
    active = torch.tensor([[True, True]])
    expected = combine(generalist, specialists, membership, active)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = combine(generalist, specialists, membership, active)
    assert q.dtype == torch.float32
    torch.testing.assert_close(q, expected, atol=1e-7, rtol=0)


# ---------------------------------------------------------------- many classes

def simulated_probs(num_classes: int, num_groups: int, per_class: int, seed: int = 0):
    """Held-out labels and generalist probabilities whose mass stays inside each class's planted group.

    Classes are dealt to groups at random (not in blocks); logits are N(0, 1) plus 3 for
    every class of the true class's group plus 4 more for the true class.
    """
    rng = np.random.default_rng(seed)
    group_of = rng.permutation(num_classes) % num_groups
    y = np.repeat(np.arange(num_classes), per_class)
    logits = rng.normal(size=(len(y), num_classes))
    logits += 3.0 * (group_of[None, :] == group_of[y][:, None])
    logits[np.arange(len(y)), y] += 4.0
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return y, probs / probs.sum(axis=1, keepdims=True), group_of


def test_clustering_recovers_200_classes_in_20_planted_groups_quickly() -> None:
    y, probs, group_of = simulated_probs(200, 20, per_class=20)
    started = time.perf_counter()
    matrices = build_matrices(y, probs, 200)
    clusterer = ClassClusterer(k=20, min_size=2).fit(confusability(matrices["soft"], "soft"))
    elapsed = time.perf_counter() - started
    planted = {tuple(np.flatnonzero(group_of == g).tolist()) for g in range(20)}
    assert {tuple(c) for c in clusterer.clusters_} == planted
    assert adjusted_rand_score(group_of, clusterer.labels_) == 1.0
    assert elapsed < 5.0, f"clustering 200 classes took {elapsed:.1f} s"


def test_vectorised_confusion_matrices_match_their_definitions() -> None:
    rng = np.random.default_rng(1)
    num_classes = 7
    y = rng.integers(0, num_classes - 1, 60)  # the last class has no example: its rows stay zero
    probs = rng.dirichlet(np.ones(num_classes), 60)
    y_pred = probs.argmax(axis=1)
    soft, hard = soft_confusion(y, probs), hard_confusion(y, y_pred, num_classes)
    for c in range(num_classes):
        rows = y == c
        expected_soft = probs[rows].mean(axis=0) if rows.any() else np.zeros(num_classes)
        expected_hard = np.bincount(y_pred[rows], minlength=num_classes) / max(rows.sum(), 1)
        np.testing.assert_allclose(soft[c], expected_soft, rtol=0, atol=1e-15)
        np.testing.assert_array_equal(hard[c], expected_hard)
