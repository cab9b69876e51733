"""Faults a long run meets: the process killed mid-iteration (kill -9), a write that fails half-way."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from sfgrpo_core import atomic
from sfgrpo_core.training.checkpoint import checkpoint_iteration, latest_checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _train_command(toy_base_path, run: pathlib.Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sfgrpo_core.cli", "train", "configs/toy.yaml", "--model.path", str(toy_base_path),
            "--train.output_dir", str(run), "--train.iterations", "30", "--train.eval_every", "0",
            "--train.checkpoint_every", "1", *extra]


def _checkpointed(run: pathlib.Path) -> int:
    """Iterations of the run's newest complete checkpoint (0 when there is none yet)."""
    last = latest_checkpoint(run)
    return checkpoint_iteration(last) if last is not None else 0


def test_kill_9_mid_run_then_resume_gives_the_uninterrupted_runs_lora_bit_for_bit(toy_base_path, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = subprocess.run(_train_command(toy_base_path, tmp_path / "straight"), cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]

    run = tmp_path / "killed"
    process = subprocess.Popen(_train_command(toy_base_path, run), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while process.poll() is None and _checkpointed(run) < 3:  # older checkpoints are pruned: read the newest
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # in the middle of some iteration after the third: no cleanup runs
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (run / "lora.safetensors").exists()

    resumed = subprocess.run(_train_command(toy_base_path, run, "--resume"), cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, got = load_file(tmp_path / "straight" / "lora.safetensors"), load_file(run / "lora.safetensors")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[key], got[key]) for key in expected)


def test_a_lora_write_that_fails_half_way_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "lora.safetensors"
    atomic.atomic_save_safetensors({"w": torch.ones(4)}, path)
    before = path.read_bytes()

    def disk_full(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", disk_full)  # the new bytes are written, not yet made durable
    with pytest.raises(OSError, match="No space left"):
        atomic.atomic_save_safetensors({"w": torch.zeros(1000)}, path)
    assert path.read_bytes() == before
    assert [entry.name for entry in tmp_path.iterdir()] == ["lora.safetensors"]  # no temporary file is left
