"""`sfgrpo bench signal`: is there per-step signal for Stepwise credit to use, and where in the trajectory is the final
reward decided?

Stepwise-Flow-GRPO pays T'-step completions of every state so that transition k is credited with its own gain
g_k = r_{k+1} - r_k instead of the trajectory's final reward r_T. That can only help where r_k is informative (the
completion's reward says something about where the trajectory ends) and where a group's spread of r_T is made by
some steps more than others. This samples a config's training rollouts (no training), scores every state (not only
the ones the loss uses) and reports, within groups (advantages are group-relative; each group's mean is removed and
variances pooled over groups), per transition k:

- share_k = Var(g_k) / Var(r_T): the fraction of the final reward's spread that step k's gain carries;
- corr(g_k, r_T): how well Flow-GRPO's credit (r_T for every step) lines up with step k's own gain;
- the fraction of gains that are exactly 0 (a reward of discrete partial credit moves in jumps);
- corr(r_k, r_T): how well the completion of x_k predicts the final reward;

and over the trajectory the sum of the shares and the mean correlation of consecutive gains. If r_k were the
expected final reward given x_k (a perfect value estimate), the gains would be martingale differences: uncorrelated,
shares summing to 1 (r_T - r_0 is their sum, and r_0 is shared within a group). A sum far above 1 with negatively
correlated consecutive gains means the estimates' rewards go up and down along a trajectory: much of a step's gain is
the estimate's own noise, which step-wise credit hands to that step.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from ..config import load_config
from ..training.metrics import json_safe
from .paper import STEPWISE_CONFIG


def group_centered(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """values [N, ...] (float64) minus the mean of their group."""
    values = values.double()
    result = torch.empty_like(values)
    for group in group_ids.unique():
        rows = group_ids == group
        result[rows] = values[rows] - values[rows].mean(dim=0, keepdim=True)
    return result


def pooled_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Correlation of two group-centred vectors; NaN when either has no spread."""
    denominator = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) / denominator if denominator > 0 else math.nan


def step_signal(rewards: torch.Tensor, group_ids: torch.Tensor, active: torch.Tensor) -> dict[str, Any]:
    """The statistics above from r_0..r_T ([N, T + 1]); trajectories with a missing reward are left out.

    Args:
        rewards: [N, T + 1] the step rewards (``step_rewards`` with every state scored).
        group_ids: [N] each trajectory's group.
        active: [N, T] bool, the transitions that train (reported next to each step).
    """
    complete = torch.isfinite(rewards).all(dim=1)
    rewards, group_ids, active = rewards[complete], group_ids[complete], active[complete]
    gains = rewards[:, 1:] - rewards[:, :-1]
    centered_gains = group_centered(gains, group_ids)
    centered_states = group_centered(rewards, group_ids)
    final = centered_states[:, -1]
    final_variance = float((final * final).sum())
    steps = []
    for k in range(gains.shape[1]):
        steps.append({
            "step": k,
            "trains": bool(active[:, k].any()),
            "share": float((centered_gains[:, k] ** 2).sum()) / final_variance if final_variance > 0 else math.nan,
            "corr_with_final": pooled_correlation(centered_gains[:, k], final),
            "zero_gain_fraction": float((gains[:, k].abs() < 1e-9).double().mean()),
            "predicts_final": pooled_correlation(centered_states[:, k], final),
        })
    adjacent = [pooled_correlation(centered_gains[:, k], centered_gains[:, k + 1]) for k in range(gains.shape[1] - 1)]
    adjacent = [value for value in adjacent if math.isfinite(value)]
    finals = [rewards[group_ids == group, -1] for group in group_ids.unique()]
    spreads = [float(values.max() - values.min()) for values in finals]
    return {
        "trajectories": int(complete.sum()),
        "groups": len(spreads),
        "zero_variance_groups": sum(spread == 0 for spread in spreads) / len(spreads) if spreads else math.nan,
        "final_reward_mean": float(rewards[:, -1].mean()) if len(rewards) else math.nan,
        "share_sum": sum(step["share"] for step in steps if math.isfinite(step["share"])),
        "adjacent_gain_corr": sum(adjacent) / len(adjacent) if adjacent else math.nan,
        "steps": steps,
    }


def measure(config_path: Path, changes: dict[str, Any], batches: int, checkpoint: Path | None) -> dict[str, Any]:
    """Rollouts of ``batches`` iterations (their prompts and noise) with every state scored; their step_signal."""
    from ..lora.adapters import load_lora_state_dict
    from ..training.checkpoint import load_checkpoint
    from ..training.step_rewards import BatchSizes, step_rewards
    from ..training.trainer import build_session, collect

    config = load_config(config_path).replace(**changes)
    session = build_session(config)
    if checkpoint is not None:
        load_lora_state_dict(session.model.module, load_checkpoint(checkpoint).lora)
    sizes = BatchSizes(samples=config.train.sample_batch_size, rewards=config.train.reward_batch_size)
    all_rewards, all_groups, all_active = [], [], []
    for iteration in range(batches):
        recorded = collect(session, iteration)
        scored = step_rewards(session.model, recorded, session.reward, substeps=config.credit.substeps,
                              batch_sizes=sizes)
        all_rewards.append(scored.scores.values)
        all_groups.append(recorded.batch.group_ids.cpu() + iteration * config.train.groups_per_iteration)
        all_active.append(recorded.active.cpu())
    return {"config": str(config_path), "sampling_steps": config.sampler.steps, "substeps": config.credit.substeps,
            "sde": config.sampler.sde, "eta": config.sampler.eta, "reward": config.train.reward,
            "checkpoint": str(checkpoint) if checkpoint else None, "seed": config.train.seed,
            **step_signal(torch.cat(all_rewards), torch.cat(all_groups), torch.cat(all_active))}


def table(result: dict[str, Any]) -> str:
    checkpoint = result["checkpoint"] or "none (base model)"
    lines = [f"T = {result['sampling_steps']}, T' = {result['substeps']}, checkpoint {checkpoint}: "
             f"{result['trajectories']} trajectories, final reward {result['final_reward_mean']:.3f}, "
             f"zero-variance groups {result['zero_variance_groups']:.2f}",
             f"shares sum to {result['share_sum']:.2f} (1 for a perfect value estimate), consecutive gains "
             f"correlate {result['adjacent_gain_corr']:.2f} (0 for one)",
             "step  trains  share  corr(g_k, r_T)  zero gains  corr(r_k, r_T)"]
    for step in result["steps"]:
        trains = "yes" if step["trains"] else "no"
        lines.append(f"{step['step']:>4}  {trains:>6}  {step['share']:5.2f}  {step['corr_with_final']:14.2f}  "
                     f"{step['zero_gain_fraction']:10.2f}  {step['predicts_final']:14.2f}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(STEPWISE_CONFIG), help="the training config whose rollouts to measure")
    parser.add_argument("--steps", type=int, default=0, help="sampling steps T (default: the config's)")
    parser.add_argument("--substeps", type=int, default=0, help="T', ODE substeps of each completion (default: the "
                                                                "config's)")
    parser.add_argument("--batches", type=int, default=8, help="iterations' worth of rollouts to pool")
    parser.add_argument("--checkpoint", default="", help="a run's checkpoint folder: measure with its LoRA")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("--out", default="", help="append the result as one JSON line to this file")


def run_from_args(args: argparse.Namespace) -> int:
    changes: dict[str, Any] = {"model.device": args.device}
    if args.steps:
        changes["sampler.steps"] = args.steps
    if args.substeps:
        changes["credit.substeps"] = args.substeps
    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    result = measure(Path(args.config), changes, args.batches, checkpoint)
    print(table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with Path(args.out).open("a") as handle:
            handle.write(json.dumps(json_safe(result)) + "\n")
    return 0
