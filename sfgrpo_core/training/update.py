"""The policy update: recompute log-probs of recorded transitions and step the optimizer on the clipped loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..algorithm import losses
from ..algorithm.sde import SDEStep, StepFunction
from ..config import OptimConfig
from ..lora.adapters import adapter_disabled
from ..models.base import VelocityModel
from ..models.condition import select
from .distributed import SINGLE, Team
from .rollout import Rollout


@dataclass(frozen=True)
class UpdateStats:
    """Averages over the iteration's optimizer steps (weighted by transitions)."""

    loss: float
    ratio_mean: float
    clip_fraction: float
    approx_kl: float
    kl_penalty: float
    grad_norm: float
    transitions: int
    optimizer_steps: int


def recompute_steps(model: VelocityModel, rollout: Rollout, members: torch.Tensor, steps: torch.Tensor,
                    step_fn: StepFunction) -> SDEStep:
    """Score the recorded transitions (members[i], steps[i]) under the model's current weights.

    This is the one code path for log-probs during the update and in the diagnostics; gradients flow into the
    model through the step's mean.
    """
    states, sigmas = rollout.states, rollout.sigmas.to(rollout.states.device)
    x, x_next = states[members, steps], states[members, steps + 1]
    sigma, sigma_next = sigmas[steps], sigmas[steps + 1]
    velocity = model.velocity(x, sigma, select(rollout.batch.condition, members))
    return step_fn(x, velocity, sigma, sigma_next, prev_sample=x_next)


def trainable_transitions(active: torch.Tensor, advantages: torch.Tensor, *,
                          skip_zero_advantage: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(members, steps) of the transitions that train: ``active`` [N, T], with a finite advantage (and a nonzero one
    when ``skip_zero_advantage``, as flow_grpo drops the samples of zero-variance groups)."""
    keep = active & torch.isfinite(advantages)
    if skip_zero_advantage:
        keep &= advantages != 0
    members, steps = torch.nonzero(keep, as_tuple=True)
    return members, steps


def _idle_pass(model: VelocityModel, rollout: Rollout, step: int, step_fn: StepFunction,
               config: OptimConfig) -> None:
    """A forward and backward pass that adds nothing to any gradient. Each pass through a sharded model (train.sharding
    fsdp) gathers and reduces its shards with the other processes, so all of them must make as many passes; this
    process has fewer transitions in the minibatch than another."""
    members, steps = torch.zeros(1, dtype=torch.long), torch.full((1,), step, dtype=torch.long)
    if config.kl_beta > 0:
        with torch.no_grad(), adapter_disabled(model.module):
            recompute_steps(model, rollout, members, steps, step_fn)
    (recompute_steps(model, rollout, members, steps, step_fn).mean.sum() * 0.0).backward()


def update_policy(model: VelocityModel, optimizer: torch.optim.Optimizer, rollout: Rollout,
                  advantages: torch.Tensor, config: OptimConfig, step_fn: StepFunction,
                  generator: torch.Generator, team: Team = SINGLE) -> UpdateStats:
    """One pass over the iteration's transitions in ``config.minibatches`` shuffled minibatches, one optimizer step
    each, gradients accumulated over micro-batches of ``config.micro_batch_size``.

    With several processes (``team``) the minibatches are those of the whole batch, shuffled alike on every
    process; each process back-propagates the transitions of its own rows and the gradients are summed across
    processes before clipping, so the step equals one process's on the whole batch.

    Args:
        rollout: this process's trajectories (rows ``team.rows(N)`` of the batch).
        advantages: [N, T] constants of the whole batch (NaN = missing/masked).
        generator: seeds the shuffle (derived from (seed, iteration), so resumed runs shuffle identically).
    """
    active = team.gather_rows(rollout.active)
    members, steps = trainable_transitions(active, advantages, skip_zero_advantage=config.skip_zero_advantage)
    total, rows = len(members), team.rows(len(active))
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    if total == 0:
        return UpdateStats(loss=0.0, ratio_mean=1.0, clip_fraction=0.0, approx_kl=0.0, kl_penalty=0.0, grad_norm=0.0,
                           transitions=0, optimizer_steps=0)
    order = torch.randperm(total, generator=generator)
    names = ("loss", "ratio_mean", "clip_fraction", "approx_kl", "kl_penalty")
    sums = dict.fromkeys(names, 0.0)
    grad_norms = []
    for minibatch in torch.tensor_split(order, min(config.minibatches, total)):
        optimizer.zero_grad(set_to_none=True)
        mine = minibatch[(members[minibatch] >= rows.start) & (members[minibatch] < rows.stop)]
        micro_size = config.micro_batch_size or max(len(mine), 1)
        micros = [micro for micro in torch.split(mine, micro_size) if len(micro)]  # split(empty) gives one empty
        for _ in range(team.largest(len(micros)) - len(micros) if team.sharded else 0):
            _idle_pass(model, rollout, int(steps[0]), step_fn, config)
        for micro in micros:
            m, k = members[micro] - rows.start, steps[micro]  # rows of this process's rollout
            step = recompute_steps(model, rollout, m, k, step_fn)
            result = losses.grpo_loss(step.log_prob, rollout.log_probs[m, k].to(step.log_prob.device),
                                      advantages[members[micro], k].to(step.log_prob.device),
                                      clip_range=config.clip_range)
            loss = result.loss
            kl_value = 0.0
            if config.kl_beta > 0:
                with torch.no_grad(), adapter_disabled(model.module):
                    reference = recompute_steps(model, rollout, m, k, step_fn)
                sigmas = rollout.sigmas.to(step.mean.device)
                step_size = sigmas[k] - sigmas[k + 1] if config.kl_scale == "flow_grpo" else None
                kl = losses.kl_penalty(step.mean, reference.mean, step.std, step_size=step_size).mean()
                loss = loss + config.kl_beta * kl
                kl_value = float(kl.detach())
            (loss * len(micro) / len(minibatch)).backward()  # the whole minibatch's mean, over every process
            weight = len(micro)
            sums["loss"] += float(loss.detach()) * weight
            sums["ratio_mean"] += result.ratio_mean * weight
            sums["clip_fraction"] += result.clip_fraction * weight
            sums["approx_kl"] += result.approx_kl * weight
            sums["kl_penalty"] += kl_value * weight
        team.sum_gradients(parameters)
        max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(parameters, max_norm)))
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    totals = team.sum(torch.tensor([sums[name] for name in names], dtype=torch.float64)).tolist()
    means = {name: value / total for name, value in zip(names, totals, strict=True)}
    return UpdateStats(**means, grad_norm=sum(grad_norms) / len(grad_norms), transitions=total,
                       optimizer_steps=len(grad_norms))
