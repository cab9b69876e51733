"""Several processes (gloo on CPU) train the LoRA of one process with the same total batch and seed; a process that
dies makes the others stop with a clear error instead of hanging."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from sfgrpo_core.training.checkpoint import checkpoint_iteration, latest_checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _train_args(toy_base_path, run: pathlib.Path, *extra: str) -> list[str]:
    return ["train", "configs/toy.yaml", "--model.path", str(toy_base_path), "--train.output_dir", str(run),
            "--train.groups_per_iteration", "4", "--train.eval_every", "2", "--train.checkpoint_every", "1", *extra]


def _records(run: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_the_lora_of_one_with_the_same_total_batch(toy_base_path, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run([sys.executable, "-m", "sfgrpo_core.cli", *_train_args(toy_base_path, one,
                                                                                   "--train.iterations", "3")],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    double = subprocess.run([sys.executable, "-m", "sfgrpo_core.cli", *_train_args(toy_base_path, two,
                                                                                   "--train.iterations", "3"),
                             "--processes", "2"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert double.returncode == 0, double.stderr[-3000:]
    assert "4 prompt groups x 8 members = 32 trajectories per iteration, over 2 processes (2 groups" in double.stderr
    assert double.stdout.count("LoRA:") == 1  # the main process reports, the other stays quiet

    expected, got = load_file(one / "lora.safetensors"), load_file(two / "lora.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        relative = float((expected[key] - got[key]).norm() / expected[key].norm().clamp_min(1e-12))
        assert relative <= 1e-4, (key, relative)
    single_records, double_records = _records(one), _records(two)
    assert all(record["world_size"] == 1 for record in single_records)
    assert all(record["world_size"] == 2 for record in double_records)
    for a, b in zip(single_records, double_records, strict=True):  # same batch: same rewards and evaluations
        for key in ("reward_mean", "eval_reward_mean", "samples_seen", "active_transitions", "reward_calls"):
            assert (a.get(key) is None) == (b.get(key) is None), key
            if a.get(key) is not None:
                assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])


def test_two_sharded_processes_train_the_same_lora_and_resume_from_whole_checkpoints(toy_base_path, tmp_path):
    """train.sharding fsdp (FSDP2 over gloo): the LoRA of one process; checkpoints hold whole tensors, so a sharded
    run resumes from them (and a one-process run could)."""
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run([sys.executable, "-m", "sfgrpo_core.cli", *_train_args(toy_base_path, one,
                                                                                   "--train.iterations", "3")],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    sharded = [sys.executable, "-m", "sfgrpo_core.cli", *_train_args(toy_base_path, two, "--train.sharding", "fsdp"),
               "--processes", "2"]
    first = subprocess.run([*sharded, "--train.iterations", "2"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    whole = load_file(latest_checkpoint(two) / "lora.safetensors")
    assert whole.keys() == load_file(one / "lora.safetensors").keys()  # every key, at its whole shape
    resumed = subprocess.run([*sharded, "--train.iterations", "3", "--resume"], cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = load_file(one / "lora.safetensors"), load_file(two / "lora.safetensors")
    for key in expected:
        assert got[key].shape == expected[key].shape, key
        relative = float((expected[key] - got[key]).norm() / expected[key].norm().clamp_min(1e-12))
        assert relative <= 1e-4, (key, relative)
    assert [record["world_size"] for record in _records(two) if "reward_mean" in record] == [2, 2, 2]


def test_fsdp_shards_the_mini_worlds_transformer_block_by_block_and_trains_the_same_lora(tmp_path):
    """The SD3 transformer of the mini world, each block sharded on its own, two processes over gloo: the gradients
    of one process (their norms to 1e-4 at the first iteration, 1e-2 at the second) and its LoRA.

    One optimizer step per iteration (`optim.minibatches 1`): AdamW divides by the gradients' own size, so its first
    step is lr x sign(g), and an element whose gradient is rounding noise takes a whole +-lr step either way as the
    summation order falls; a second step inside the first iteration would compare gradients of two different LoRAs
    (a CI run saw the first iteration's mean grad norm differ by 2.3e-3 that way). The LoRA's difference is ~4e-4 of
    its norm in the typical matrix (at most 1e-2 here); a sharding error moves every matrix and every gradient norm.
    The reward is the smooth mini_pickscore, so that small difference does not flip a pass/fail check in the second
    iteration's rollouts.

    A known defect, not the sharding of the gradients: on CPU over gloo, a sharded run sometimes samples a first
    rollout that differs from the one-process run's (its mean reward by ~1e-3). On an AVX2 EPYC: 2 of 8 runs with
    another process busy on the machine, 0 of 12 on the idle machine, never with DDP (6 runs, busy): a race in the
    sharded forward pass whose cause is not found (docs/training.md). The sharded run is repeated, at most three times,
    until its first rollout is the one-process run's batch, and the gradients are compared on that."""
    args = ["train", "configs/miniworld.yaml", "--train.groups_per_iteration", "2", "--train.group_size", "4",
            "--train.eval_every", "0", "--train.iterations", "2", "--train.checkpoint_every", "1",
            "--train.reward", "mini_pickscore", "--optim.minibatches", "1"]
    one = tmp_path / "one"
    single = subprocess.run([sys.executable, "-m", "sfgrpo_core.cli", *args, "--train.output_dir", str(one)],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    first = _records(one)
    rewards_of_sharded_runs = []
    for attempt in range(3):
        two = tmp_path / f"two_{attempt}"
        sharded = subprocess.run([sys.executable, "-m", "sfgrpo_core.cli", *args, "--train.output_dir", str(two),
                                  "--train.sharding", "fsdp", "--processes", "2"],
                                 cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
        assert sharded.returncode == 0, sharded.stderr[-3000:]
        assert "FSDP shards the model over the 2 processes: 4 transformer blocks one by one" in sharded.stderr
        second = _records(two)
        rewards_of_sharded_runs.append(second[0]["reward_mean"])
        if second[0]["reward_mean"] == pytest.approx(first[0]["reward_mean"], rel=1e-6):  # the same batch
            break
    else:
        raise AssertionError(f"no sharded run sampled the one-process run's first batch: mean reward "
                             f"{first[0]['reward_mean']} against {rewards_of_sharded_runs}")
    expected, got = load_file(one / "lora.safetensors"), load_file(two / "lora.safetensors")
    assert expected.keys() == got.keys() and sum(float(t.norm()) for k, t in expected.items() if "lora_B" in k) > 0
    assert first[0]["grad_norm"] == pytest.approx(second[0]["grad_norm"], rel=1e-4)  # one gradient, the same batch
    assert first[1]["reward_mean"] == pytest.approx(second[1]["reward_mean"], rel=5e-3)  # nearly the same LoRA
    assert first[1]["grad_norm"] == pytest.approx(second[1]["grad_norm"], rel=1e-2)
    differences = {key: float((expected[key] - got[key]).norm() / expected[key].norm().clamp_min(1e-12))
                   for key in expected}
    assert max(differences.values()) <= 5e-2, max(differences.items(), key=lambda item: item[1])
    assert sorted(differences.values())[len(differences) // 2] <= 3e-3, differences  # the typical matrix


def test_accelerate_launch_with_the_shipped_fsdp_config_shards(toy_base_path, tmp_path):
    """configs/accelerate/fsdp.yaml as a user runs it: accelerate's FSDP environment turns train.sharding auto on."""
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                             "configs/accelerate/fsdp.yaml", "--num_processes", "2", "-m", "sfgrpo_core.cli",
                             *_train_args(toy_base_path, tmp_path / "run", "--train.iterations", "1")],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FSDP shards the model over the 2 processes" in result.stderr
    assert [record["world_size"] for record in _records(tmp_path / "run") if "reward_mean" in record] == [2]


def test_an_uneven_split_is_refused_naming_the_field(toy_base_path, tmp_path):
    result = subprocess.run([sys.executable, "-m", "sfgrpo_core.cli",
                             *_train_args(toy_base_path, tmp_path / "run", "--train.groups_per_iteration", "3"),
                             "--processes", "2"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "train.groups_per_iteration: 3 groups cannot be split evenly over 2 processes" in result.stderr


def test_a_killed_process_makes_the_other_stop_with_a_clear_error(toy_base_path, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run = tmp_path / "run"
    args = [sys.executable, "-m", "sfgrpo_core.cli",
            *_train_args(toy_base_path, run, "--train.iterations", "100000", "--train.distributed_timeout", "60")]
    processes = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  env={**ENV, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
                                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
                 for rank in range(2)]
    try:
        deadline = time.monotonic() + 300
        while (latest_checkpoint(run) is None or checkpoint_iteration(latest_checkpoint(run)) < 2):  # pruned
            assert time.monotonic() < deadline and all(p.poll() is None for p in processes), "training did not start"
            time.sleep(0.05)
        processes[1].send_signal(signal.SIGKILL)
        start = time.monotonic()
        _, stderr = processes[0].communicate(timeout=120)  # well within the 60 s collective timeout, not a hang
        assert processes[0].returncode == 1, stderr[-2000:]
        assert time.monotonic() - start < 90
        assert "process 0 of 2:" in stderr and "another process stopped" in stderr, stderr[-2000:]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    last = latest_checkpoint(run)  # the last good checkpoint stays, complete
    assert last is not None and checkpoint_iteration(last) >= 2
    assert torch.isfinite(torch.cat([t.flatten() for t in load_file(last / "lora.safetensors").values()])).all()
