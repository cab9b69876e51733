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

With ``--values M`` it also estimates what each step really contributes: v_k, the mean final reward of M SDE
continuations from x_k (the value of the state; v_T = r_T), and the true gain dv_k = v_{k+1} - v_k. Per step it
reports how well each credit lines up with dv_k (group-centred correlations): Stepwise's g_k and Flow-GRPO's r_T.
The paper's premise is that the first is the better aligned. Both correlations share the same target, so the noise
of v's M-sample means lowers both by the same factor and their comparison stays fair.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import rewards
from ..algorithm import advantages
from ..algorithm.sde import StepFunction
from ..config import load_config
from ..models.base import VelocityModel
from ..models.condition import select
from ..seeding import derive_seed
from ..shipped import config_path
from ..training.metrics import json_safe
from ..training.rollout import PromptBatch, Rollout, rollout
from ..training.step_rewards import BatchSizes, distinct_states, score_in_batches, step_rewards
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


def step_signal(rewards: torch.Tensor, group_ids: torch.Tensor, active: torch.Tensor,
                values: torch.Tensor | None = None) -> dict[str, Any]:
    """The statistics above from r_0..r_T ([N, T + 1]); trajectories with a missing reward are left out.

    Args:
        rewards: [N, T + 1] the step rewards (``step_rewards`` with every state scored).
        group_ids: [N] each trajectory's group.
        active: [N, T] bool, the transitions that train (reported next to each step).
        values: optional [N, T + 1] estimates of each state's value v_k (``continuation_values``); adds each
            credit's correlation with the true gains v_{k+1} - v_k.
    """
    complete = torch.isfinite(rewards).all(dim=1)
    if values is not None:
        complete &= torch.isfinite(values).all(dim=1)
        values = values[complete]
    rewards, group_ids, active = rewards[complete], group_ids[complete], active[complete]
    gains = advantages.stepwise_gains(rewards)
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
    if values is not None:
        true_gains = group_centered(advantages.stepwise_gains(values), group_ids)
        for k, step in enumerate(steps):
            step["true_gain_share"] = (float((true_gains[:, k] ** 2).sum()) / final_variance if final_variance > 0
                                       else math.nan)
            step["stepwise_alignment"] = pooled_correlation(centered_gains[:, k], true_gains[:, k])
            step["flow_grpo_alignment"] = pooled_correlation(final, true_gains[:, k])
    adjacent = [pooled_correlation(centered_gains[:, k], centered_gains[:, k + 1]) for k in range(gains.shape[1] - 1)]
    adjacent = [value for value in adjacent if math.isfinite(value)]
    return {
        "trajectories": int(complete.sum()),
        "groups": len(group_ids.unique()),
        "zero_variance_groups": (advantages.zero_variance_fraction(rewards[:, -1], group_ids) if len(rewards)
                                 else math.nan),
        "final_reward_mean": float(rewards[:, -1].mean()) if len(rewards) else math.nan,
        "share_sum": sum(step["share"] for step in steps if math.isfinite(step["share"])),
        "adjacent_gain_corr": sum(adjacent) / len(adjacent) if adjacent else math.nan,
        "steps": steps,
    }


@torch.no_grad()
def continuation_values(model: VelocityModel, trajectories: Rollout, reward: rewards.Reward, step_fn: StepFunction,
                        continuations: int, batch_sizes: BatchSizes, seed: int,
                        final_rewards: torch.Tensor, on_step: Callable[[], None] | None = None) -> torch.Tensor:
    """[N, T + 1] v_k: the mean final reward of ``continuations`` SDE continuations from each state x_k (k < T; each
    distinct state once, as ``step_rewards`` completes them), and the final sample's reward at k = T."""
    members, step_index, index = distinct_states(trajectories)
    count, steps = trajectories.states.shape[0], trajectories.states.shape[1] - 1
    distinct_values = torch.full((len(members),), float("nan"))
    for k in range(steps):
        chosen = torch.nonzero(step_index == k)[:, 0]
        rows = members[chosen].repeat_interleave(continuations)
        batch = PromptBatch(prompts=[trajectories.batch.prompts[i] for i in rows.tolist()], group_ids=rows,
                            condition=select(trajectories.batch.condition, rows),
                            initial_noise=trajectories.states[rows.to(trajectories.states.device), k],
                            member_seeds=[derive_seed(seed, "value", int(chosen[i // continuations]), i)
                                          for i in range(len(rows))])
        ends = rollout(model, batch, trajectories.sigmas[k:], step_fn, chunk_size=batch_sizes.samples).final
        scores = score_in_batches(model, reward, ends, batch.prompts, batch_sizes.rewards).values
        distinct_values[chosen] = scores.view(-1, continuations).nanmean(dim=1)
        if on_step is not None:
            on_step()
    values = torch.full((count, steps + 1), float("nan"))
    values[:, :steps] = distinct_values[index]
    values[:, steps] = final_rewards
    return values


def measure(config_path: Path, changes: dict[str, Any], batches: int, checkpoint: Path | None,
            continuations: int = 0) -> dict[str, Any]:
    """Rollouts of ``batches`` iterations (their prompts and noise) with every state scored; their step_signal
    (with ``continuations`` > 0, also against each state's value from that many continuations)."""
    from ..lora.adapters import load_lora_state_dict
    from ..training.checkpoint import load_checkpoint
    from ..training.trainer import build_session

    config = load_config(config_path).replace(**changes)
    session = build_session(config)
    if checkpoint is not None:
        load_lora_state_dict(session.model.module, load_checkpoint(checkpoint).lora)
    return {"config": str(config_path), "checkpoint": str(checkpoint) if checkpoint else None,
            **measure_session(session, batches, continuations)}


def measure_session(session: Any, batches: int, continuations: int = 0,
                    on_progress: Callable[[], None] | None = None) -> dict[str, Any]:
    """``measure`` on a built training session (``trainer.build_session``: its model, reward and config), e.g. a
    ComfyUI MODEL's. ``on_progress`` is called after each batch's step rewards and after each step's continuations
    (``progress_ticks`` calls in all): a place to report progress and to stop."""
    from ..training.trainer import collect, step_function_for

    config = session.config
    tick = on_progress or (lambda: None)
    sizes = BatchSizes(samples=config.train.sample_batch_size, rewards=config.train.reward_batch_size)
    all_rewards, all_groups, all_active, all_values = [], [], [], []
    for iteration in range(batches):
        trajectories = collect(session, iteration)
        scored = step_rewards(session.model, trajectories, session.reward, substeps=config.credit.substeps,
                              batch_sizes=sizes, completion=config.credit.completion)
        tick()
        all_rewards.append(scored.scores.values)
        all_groups.append(trajectories.batch.group_ids.cpu() + iteration * config.train.groups_per_iteration)
        all_active.append(trajectories.active.cpu())
        if continuations:
            all_values.append(continuation_values(session.model, trajectories, session.reward,
                                                  step_function_for(config), continuations, sizes,
                                                  seed=config.train.seed,
                                                  final_rewards=scored.scores.values[:, -1], on_step=tick))
    values = torch.cat(all_values) if continuations else None
    return {"sampling_steps": config.sampler.steps, "substeps": config.credit.substeps,
            "completion": config.credit.completion,
            "sde": config.sampler.sde, "eta": config.sampler.eta, "reward": config.train.reward,
            "reward_options": config.reward_kwargs, "seed": config.train.seed, "continuations": continuations,
            **step_signal(torch.cat(all_rewards), torch.cat(all_groups), torch.cat(all_active), values)}


def progress_ticks(batches: int, steps: int, continuations: int) -> int:
    """How many times ``measure_session`` calls ``on_progress``."""
    return batches * (1 + (steps if continuations else 0))


# A step counts when its true gains carry at least this share of the final reward's variance, and one credit is
# better aligned than the other when its correlation is higher by more than the margin (ours: with 100-200
# trajectories a correlation's standard error is ~0.07-0.1; the margin asks for a difference a user can act on).
MATERIAL_SHARE, ALIGNMENT_MARGIN = 0.10, 0.05


def verdict(result: dict[str, Any]) -> str:
    """One line: at which trained steps (carrying a material share of the outcome's variance) Stepwise's gains are
    the better aligned with the true per-step gains, and whether Stepwise is likely to pay. Needs continuations."""
    steps = [step for step in result["steps"] if step["trains"] and "stepwise_alignment" in step
             and math.isfinite(step.get("true_gain_share", math.nan))
             and step["true_gain_share"] >= MATERIAL_SHARE]
    if not steps:
        return ("no verdict: measure with continuations (values) > 0 on rollouts whose rewards vary within groups; "
                "no trained step carries a measurable share of the outcome's variance")
    better = [s for s in steps if s["stepwise_alignment"] > s["flow_grpo_alignment"] + ALIGNMENT_MARGIN]
    worse = [s for s in steps if s["stepwise_alignment"] < s["flow_grpo_alignment"] - ALIGNMENT_MARGIN]
    share = sum(s["true_gain_share"] for s in steps)
    better_share = sum(s["true_gain_share"] for s in better) / share

    def names(chosen: list[dict[str, Any]]) -> str:
        return ", ".join(str(s["step"]) for s in chosen)

    if better and better_share >= 0.5 and not worse:
        return (f"per-step credit is informative at steps {names(better)} ({better_share:.0%} of the variance the "
                "trained steps carry): Stepwise is likely to pay")
    if better and better_share >= 0.5:
        return (f"per-step credit is informative at steps {names(better)} ({better_share:.0%} of the variance) but "
                f"worse than the final reward at steps {names(worse)}: Stepwise may pay; try more substeps (T')")
    return (f"per-step credit is no better than the final reward at the steps that carry the variance "
            f"({names(steps)}; better at {names(better) or 'none'}): Flow-GRPO is the better pick here")


def signal_figure(result: dict[str, Any], size: tuple[int, int] = (760, 420)) -> Any:
    """The measurement as a picture (RGB uint8 [H, W, 3]): per step, the share of the outcome's variance its true
    gain carries (bars) and each credit's alignment with the true gains (lines), the verdict as the title."""
    import numpy as np

    from ..training.figures import figure_pixels, new_figure

    figure, canvas = new_figure(size)
    axis = figure.subplots(1, 1)
    steps = [step for step in result["steps"] if step["trains"]]
    x = np.array([step["step"] for step in steps])
    if steps and "stepwise_alignment" in steps[0]:
        axis.bar(x, [step["true_gain_share"] for step in steps], color="0.8",
                 label="share of the variance (true gain)")
        axis.plot(x, [step["stepwise_alignment"] for step in steps], "o-", color="C0", label="Stepwise's gain g_k")
        axis.plot(x, [step["flow_grpo_alignment"] for step in steps], "s--", color="C1",
                  label="Flow-GRPO's credit r_T")
        axis.set_ylabel("correlation with the true per-step gain")
    else:
        axis.bar(x, [step["share"] for step in steps], color="0.8", label="share of the variance (estimate's gain)")
    axis.axhline(0, color="0.5", linewidth=0.8)
    axis.set_xlabel("trained step k")
    axis.set_xticks(x)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="best")
    title = verdict(result)
    axis.set_title(title if len(title) < 95 else title[:title.rfind(" ", 0, 95)] + " ...", fontsize=8)
    figure.tight_layout()
    return figure_pixels(canvas)


def table(result: dict[str, Any]) -> str:
    checkpoint = result.get("checkpoint") or "none (base model)"
    completion = "the remaining grid" if result.get("completion") == "grid" else f"T' = {result['substeps']}"
    lines = [f"T = {result['sampling_steps']}, {completion}, checkpoint {checkpoint}: "
             f"{result['trajectories']} trajectories, final reward {result['final_reward_mean']:.3f}, "
             f"zero-variance groups {result['zero_variance_groups']:.2f}",
             f"shares sum to {result['share_sum']:.2f} (1 for a perfect value estimate), consecutive gains "
             f"correlate {result['adjacent_gain_corr']:.2f} (0 for one)",
             "step  trains  share  corr(g_k, r_T)  zero gains  corr(r_k, r_T)" +
             ("  true share  corr(g_k, dv_k)  corr(r_T, dv_k)" if result.get("continuations") else "")]
    for step in result["steps"]:
        trains = "yes" if step["trains"] else "no"
        line = (f"{step['step']:>4}  {trains:>6}  {step['share']:5.2f}  {step['corr_with_final']:14.2f}  "
                f"{step['zero_gain_fraction']:10.2f}  {step['predicts_final']:14.2f}")
        if "stepwise_alignment" in step:
            line += (f"  {step['true_gain_share']:10.2f}  {step['stepwise_alignment']:15.2f}  "
                     f"{step['flow_grpo_alignment']:15.2f}")
        lines.append(line)
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(STEPWISE_CONFIG),
                        help="the training config whose rollouts to measure (a path or a shipped config's name)")
    parser.add_argument("--steps", type=int, default=0, help="sampling steps T (default: the config's)")
    parser.add_argument("--substeps", type=int, default=0, help="T', ODE substeps of each completion (default: the "
                                                                "config's)")
    parser.add_argument("--completion", default="", choices=("", "uniform", "grid"),
                        help="how states are completed: 'uniform' (T' substeps, the paper's) or 'grid' (the remaining "
                             "sampling grid, DenseGRPO's); default: the config's")
    parser.add_argument("--batches", type=int, default=8, help="iterations' worth of rollouts to pool")
    parser.add_argument("--values", type=int, default=0, metavar="M",
                        help="also estimate each state's value from M SDE continuations and compare each credit with "
                             "the true gains (costs ~M x T / 2 rollouts per batch)")
    parser.add_argument("--checkpoint", default="", help="a run's checkpoint folder: measure with its LoRA")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("--out", default="", help="append the result as one JSON line to this file")


def run_from_args(args: argparse.Namespace) -> int:
    for name, value, smallest in (("--batches", args.batches, 1), ("--values", args.values, 0),
                                  ("--steps", args.steps, 0), ("--substeps", args.substeps, 0)):
        if value < smallest:
            print(f"sfgrpo bench signal: {name}: {value} is below {smallest}")
            return 2
    changes: dict[str, Any] = {"model.device": args.device}
    if args.steps:
        changes["sampler.steps"] = args.steps
    if args.substeps:
        changes["credit.substeps"] = args.substeps
    if args.completion:
        changes["credit.completion"] = args.completion
    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    result = measure(config_path(args.config), changes, args.batches, checkpoint, args.values)
    print(table(result))
    if args.values:
        print(f"verdict: {verdict(result)}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with Path(args.out).open("a") as handle:
            handle.write(json.dumps(json_safe(result)) + "\n")
    return 0
