"""`sfgrpo bench memory`: peak memory of one training iteration as the number of prompt groups grows, with the
model calls chunked (train.sample_batch_size, optim.micro_batch_size, train.reward_batch_size) and without.

Each point runs in a fresh process (peak RSS only grows within a process): it builds the session, runs one iteration
(rollout -> rewards -> update) and reports the process's peak resident set (CPU) or the peak allocated GPU memory.
With chunking the peak should stay flat as groups grow (the trajectories themselves are small next to the model's
activations); without it the activations grow with the batch.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text
from ..config import load_config
from .paper import STEPWISE_CONFIG

RECIPE = STEPWISE_CONFIG


def probe(config_path: str, groups: int, chunk: int, device: str) -> dict[str, Any]:
    """One iteration in this process; its peak memory in MiB."""
    import torch

    from ..training.trainer import assign_credit, build_session, collect, update

    with tempfile.TemporaryDirectory() as scratch:
        changes: dict[str, Any] = {"train.groups_per_iteration": groups, "model.device": device,
                                   "train.output_dir": str(Path(scratch) / "run")}
        if chunk:
            changes.update({"train.sample_batch_size": chunk, "train.reward_batch_size": chunk,
                            "optim.micro_batch_size": chunk})
        else:  # everything at once
            changes.update({"train.sample_batch_size": 100_000, "train.reward_batch_size": 100_000,
                            "optim.micro_batch_size": 0})
        session = build_session(load_config(config_path).replace(**changes))
        start = time.perf_counter()
        trajectories = collect(session, 0)
        update(session, trajectories, assign_credit(session, trajectories), 0)
        seconds = time.perf_counter() - start
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    result = {"groups": groups, "trajectories": len(trajectories.batch.prompts), "chunk": chunk,
              "peak_rss_mib": peak_rss, "seconds": seconds}
    if device.startswith("cuda"):
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--groups", default="1,2,4,8", help="groups_per_iteration values to measure")
    parser.add_argument("--chunk", type=int, default=16, help="sample, reward and micro batch size when chunked")
    parser.add_argument("--config", default=str(RECIPE))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="", help="write the points as JSON here")
    parser.add_argument("--probe", type=int, default=0, help=argparse.SUPPRESS)  # internal: one point, this process


def run_from_args(args: argparse.Namespace) -> int:
    if args.probe:
        print(json.dumps(probe(args.config, args.probe, args.chunk, args.device)))
        return 0
    points = []
    for chunk in (args.chunk, 0):
        for groups in (int(value) for value in args.groups.split(",")):
            command = [sys.executable, "-m", "sfgrpo_core.cli", "bench", "memory", "--probe", str(groups),
                       "--chunk", str(chunk), "--config", args.config, "--device", args.device]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode:
                print(done.stderr[-2000:], file=sys.stderr)
                return 1
            point = json.loads(done.stdout.strip().splitlines()[-1])
            points.append(point)
            memory = point.get("peak_cuda_mib", point["peak_rss_mib"])
            print(f"chunk {chunk or 'none':>4}  groups {groups:>3}  trajectories {point['trajectories']:>4}  "
                  f"peak {memory:8.0f} MiB  ({point['seconds']:.1f} s)", flush=True)
    summary = {"command": "sfgrpo bench memory " + " ".join(sys.argv[3:]), "config": args.config,
               "device": args.device, "points": points, "written": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(summary, indent=1) + "\n")
    return 0
