"""`sfgrpo bench speed`: what a Stepwise-Flow-GRPO iteration costs next to a Flow-GRPO one, measured side by side.

Both recipes (configs/miniworld.yaml and configs/miniworld_flow_grpo.yaml, or the files given) train in one process,
iterations interleaved (Stepwise, Flow-GRPO, Flow-GRPO, Stepwise, ...) so that the machine's drift hits both alike.
Per method: seconds per iteration and per phase (rollout, rewards, update), model evaluations (samples), decoded
images and reward calls per iteration; then the same work measured alone (the model's forward pass per sample,
forward + backward per sample, decode per image, reward per image, each timed on its own at the reward batch size),
so that ``overhead`` = an iteration's seconds / the sum of its work measured alone says what the loop adds.
Prints the ratios; writes them as JSON (``--out``). No timing is asserted anywhere: these machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_write_text
from ..config import Config, load_config
from ..models.condition import select
from ..models.precision import describe
from ..training.metrics import CallCounter, json_safe
from .paper import FLOW_GRPO_CONFIG, STEPWISE_CONFIG

RECIPES = {"stepwise": STEPWISE_CONFIG, "flow_grpo": FLOW_GRPO_CONFIG}
PHASES = ("rollout", "rewards", "update")


def timed_iteration(session: Any, counter: CallCounter, iteration: int) -> dict[str, float]:
    """One training iteration (rollout -> rewards -> update) with its seconds per phase and its counted work."""
    from ..training.trainer import PhaseTimer, assign_credit, collect, update

    counter.take()
    timer = PhaseTimer()
    with timer("rollout"):
        trajectories = collect(session, iteration)
    with timer("rewards"):
        credit = assign_credit(session, trajectories)
    sampling = counter.take()  # the rollout's and the completions' forward passes, and the decodes
    with timer("update"):
        update(session, trajectories, credit, iteration)
    seconds = timer.seconds
    updating = counter.take()  # forward + backward passes (and the KL reference's forward passes, if any)
    return {**seconds, "total": sum(seconds.values()),
            "model_calls": sampling["model_calls"] + updating["model_calls"],
            "update_samples": updating["model_calls"], "decoded_images": sampling["decoded_images"],
            "reward_calls": credit.reward_calls}


def best_of(repeats: int, fn: Callable[[], Any]) -> float:
    """The fastest of ``repeats`` timed calls (the least disturbed by the rest of the machine)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def unit_costs(session: Any, batch_size: int, repeats: int = 3) -> dict[str, float]:
    """Seconds per sample of the model's forward pass (no grad), of forward + backward through the LoRA, of a decode
    and of a reward call, each measured alone on ``batch_size`` samples."""
    from .. import rewards
    from ..training.trainer import collect

    trajectories = collect(session, 0)
    rows = torch.arange(batch_size) % trajectories.states.shape[0]
    x, sigma = trajectories.states[rows, 1], trajectories.sigmas[1].expand(batch_size)
    condition = select(trajectories.batch.condition, rows)
    prompts = [trajectories.batch.prompts[i] for i in rows.tolist()]
    model = session.model

    def forward() -> None:
        with torch.no_grad():
            model.velocity(x, sigma, condition)

    def forward_backward() -> None:
        model.velocity(x, sigma, condition).float().square().mean().backward()
        session.optimizer.zero_grad(set_to_none=True)

    images = model.decode(trajectories.final[rows])
    return {
        "forward": best_of(repeats, forward) / batch_size,
        "forward_backward": best_of(repeats, forward_backward) / batch_size,
        "decode": best_of(repeats, lambda: model.decode(trajectories.final[rows])) / batch_size,
        "reward": best_of(repeats, lambda: rewards.score(session.reward, images, prompts)) / batch_size,
    }


def work_alone(record: dict[str, float], costs: dict[str, float]) -> float:
    """Seconds the iteration's counted work takes measured alone: its forward passes (all model calls but the
    update's), the update's forward + backward passes, decodes and reward calls."""
    forward_only = record["model_calls"] - record["update_samples"]
    return (forward_only * costs["forward"] + record["update_samples"] * costs["forward_backward"]
            + record["decoded_images"] * costs["decode"] + record["reward_calls"] * costs["reward"])


def model_dtypes(model: Any) -> dict[str, str]:
    """The dtypes a backend chose: its compute dtype and its decoder's autocast dtype (float32 when none)."""
    def name(dtype: Any) -> str:
        return str(dtype or torch.float32).removeprefix("torch.")

    return {"compute": name(getattr(model, "dtype", None)), "decode": name(getattr(model, "decode_dtype", None))}


def measure(configs: dict[str, Config], iterations: int) -> dict[str, Any]:
    """Interleaved iterations of every method (after one warm-up each), the unit costs, and the summary."""
    from ..training.trainer import build_session

    sessions, counters, dtypes = {}, {}, {}
    for method, config in configs.items():
        session = build_session(config)
        dtypes[method] = model_dtypes(session.model)
        counters[method] = CallCounter(session.model)
        session.model = counters[method]
        sessions[method] = session
        timed_iteration(session, counters[method], 0)  # warm-up: first-call allocations and caches
    records: dict[str, list[dict[str, float]]] = {method: [] for method in configs}
    order = list(configs)
    for iteration in range(1, iterations + 1):
        for method in order if iteration % 2 else order[::-1]:
            records[method].append(timed_iteration(sessions[method], counters[method], iteration))
    result: dict[str, Any] = {"iterations": iterations, "methods": {}}
    for method, session in sessions.items():
        costs = unit_costs(session, session.config.train.reward_batch_size)
        mean = {key: float(np.mean([r[key] for r in records[method]])) for key in records[method][0]}
        alone = float(np.mean([work_alone(r, costs) for r in records[method]]))
        result["methods"][method] = {
            "seconds_per_iteration": mean["total"], "seconds_by_phase": {phase: mean[phase] for phase in PHASES},
            "model_calls": mean["model_calls"], "update_samples": mean["update_samples"],
            "decoded_images": mean["decoded_images"], "reward_calls": mean["reward_calls"],
            "seconds_per_unit_alone": costs, "work_alone_seconds": alone, "overhead": mean["total"] / alone,
            "dtypes": dtypes[method], "records": records[method],
        }
    methods = result["methods"]
    if {"stepwise", "flow_grpo"} <= set(methods):
        result["stepwise_over_flow_grpo"] = (methods["stepwise"]["seconds_per_iteration"]
                                             / methods["flow_grpo"]["seconds_per_iteration"])
    return result


def report(result: dict[str, Any]) -> str:
    hardware = result.get("hardware", {})
    lines = [f"CPU capability {hardware.get('cpu_capability')}, native bfloat16 "
             f"{hardware.get('cpu_native_bfloat16')}, fast dtype on {hardware.get('device')}: "
             f"{hardware.get('fast_dtype')}; dtypes (compute / decode): "
             + ", ".join(f"{method} {data['dtypes']['compute']} / {data['dtypes']['decode']}"
                         for method, data in result["methods"].items()),
             f"{'method':>10} {'s/it':>7} {'rollout':>8} {'rewards':>8} {'update':>8} {'calls':>7} {'decodes':>8} "
             f"{'rewards':>8} {'alone s':>8} {'overhead':>9}"]
    for method, data in result["methods"].items():
        phases = data["seconds_by_phase"]
        lines.append(f"{method:>10} {data['seconds_per_iteration']:7.2f} {phases['rollout']:8.2f} "
                     f"{phases['rewards']:8.2f} {phases['update']:8.2f} {data['model_calls']:7.0f} "
                     f"{data['decoded_images']:8.0f} {data['reward_calls']:8.0f} {data['work_alone_seconds']:8.2f} "
                     f"{data['overhead']:8.2f}x")
    if "stepwise_over_flow_grpo" in result:
        lines.append(f"Stepwise / Flow-GRPO per iteration: {result['stepwise_over_flow_grpo']:.2f}x")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--iterations", type=int, default=4, help="timed iterations per method (after a warm-up)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("--quick", action="store_true", help="a smoke test: small groups, 4 steps, 1 iteration")
    parser.add_argument("--stepwise-config", default=str(RECIPES["stepwise"]))
    parser.add_argument("--flow-grpo-config", default=str(RECIPES["flow_grpo"]))
    parser.add_argument("--out", default="", help="write the result as JSON here")


def run_from_args(args: argparse.Namespace) -> int:
    quick = {"train.group_size": 4, "train.groups_per_iteration": 2, "sampler.steps": 4} if args.quick else {}
    with tempfile.TemporaryDirectory() as scratch:
        configs = {method: load_config(path).replace(**{
            **quick, "model.device": args.device, "train.output_dir": str(Path(scratch) / method)})
            for method, path in (("stepwise", args.stepwise_config), ("flow_grpo", args.flow_grpo_config))}
        result = measure(configs, 1 if args.quick else args.iterations)
    result.update(hardware=describe(args.device))
    result.update(device=args.device, command="sfgrpo bench speed" + (" --quick" if args.quick else "") +
                  (f" --device {args.device}" if args.device != "cpu" else ""),
                  configs={method: str(path) for method, path in (("stepwise", args.stepwise_config),
                                                                  ("flow_grpo", args.flow_grpo_config))},
                  threads=torch.get_num_threads(), written=time.strftime("%Y-%m-%d %H:%M:%S"))
    print(report(result))
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(json_safe(result), indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0
