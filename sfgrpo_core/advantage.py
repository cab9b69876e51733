"""Credit methods, chosen by name: how a rollout's rewards become per-transition advantages.

- ``stepwise`` (Stepwise-Flow-GRPO): reward the clean completion of every state, credit each transition with its
  gain r_{k+1} - r_k, normalize jointly over the group (algorithm.md sections 4-5).
- ``flow_grpo``: reward the final sample only; every transition gets the trajectory's group-relative advantage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch

from . import credit, rewards, tweedie
from .config import CreditConfig
from .models.base import VelocityModel
from .models.condition import select
from .rollout import Rollout


@dataclass(frozen=True)
class Credit:
    """Rewards and advantages of a rollout.

    Attributes:
        rewards: [N, T + 1] intermediate rewards r_0..r_T (stepwise), or [N, 1] final rewards (flow_grpo); NaN =
            missing.
        advantages: [N, T] per transition; NaN where missing or masked.
        gains: [N, T] stepwise gains, or None for flow_grpo.
        reward_calls: number of images scored.
    """

    rewards: torch.Tensor
    advantages: torch.Tensor
    gains: torch.Tensor | None
    reward_calls: int

    @property
    def final_rewards(self) -> torch.Tensor:
        return self.rewards[:, -1]


def score_in_batches(model: VelocityModel, reward: rewards.Reward, samples: torch.Tensor, prompts: list[str],
                      batch_size: int) -> torch.Tensor:
    """Decode clean samples exactly as final images are decoded, and score them, ``batch_size`` at a time."""
    scores = [rewards.score(reward, model.decode(samples[start : start + batch_size]),
                            prompts[start : start + batch_size])
              for start in range(0, len(prompts), batch_size)]
    return torch.cat(scores)


@torch.no_grad()
def intermediate_rewards(model: VelocityModel, rollout: Rollout, reward: rewards.Reward, *, substeps: int,
                         batch_size: int) -> torch.Tensor:
    """r_k for every state of every trajectory: [N, T + 1].

    r_0 (the initial noise, shared by a group) is computed once per group; r_1..r_{T-1} reward the T'-substep ODE
    completion of x_k made with the rollout weights; r_T rewards the final sample itself. All completions are
    batched across trajectories and steps, ``batch_size`` at a time.
    """
    states, sigmas, batch = rollout.states, rollout.sigmas, rollout.batch
    count, steps = states.shape[0], states.shape[1] - 1
    group_ids = batch.group_ids
    first_members = torch.stack([torch.nonzero(group_ids == group)[0, 0] for group in torch.unique(group_ids)])
    # Items to complete: (member, step) for the first member of each group at k = 0, and every member at 1..T-1.
    members = torch.cat([first_members, torch.arange(count).repeat_interleave(steps - 1)])
    step_index = torch.cat([torch.zeros(len(first_members), dtype=torch.long),
                            torch.arange(1, steps).repeat(count)])
    completions = []
    for start in range(0, len(members), batch_size):
        member, k = members[start : start + batch_size], step_index[start : start + batch_size]
        condition = select(batch.condition, member)
        def velocity_fn(x, sigma, condition=condition):
            return model.velocity(x, sigma, condition)

        completions.append(tweedie.complete(velocity_fn, states[member, k], sigmas[k].to(states.device), substeps))
    clean = torch.cat([torch.cat(completions), rollout.final])
    prompts = [batch.prompts[i] for i in members.tolist()] + list(batch.prompts)
    scores = score_in_batches(model, reward, clean, prompts, batch_size)
    result = torch.full((count, steps + 1), float("nan"))
    first_scores = scores[: len(first_members)]
    result[:, 0] = first_scores[torch.searchsorted(torch.unique(group_ids), group_ids)]
    middle = scores[len(first_members) : len(first_members) + count * (steps - 1)]
    result[:, 1:steps] = middle.reshape(count, steps - 1)
    result[:, steps] = scores[-count:]
    return result


def stepwise_credit(model: VelocityModel, rollout: Rollout, reward: rewards.Reward, config: CreditConfig,
                    batch_size: int) -> Credit:
    """Stepwise-Flow-GRPO: gains of T'-step completions, jointly (or per-step, for ablations) normalized."""
    step_rewards = intermediate_rewards(model, rollout, reward, substeps=config.substeps, batch_size=batch_size)
    gains = credit.stepwise_gains(step_rewards)
    normalize = credit.joint_advantages if config.normalization == "joint" else credit.per_step_advantages
    advantages = normalize(gains, rollout.batch.group_ids, std_scope=_std_scope(config), eps=config.std_eps,
                           clip=config.advantage_clip, mask=rollout.active)
    calls = len(torch.unique(rollout.batch.group_ids)) + rollout.states.shape[0] * (rollout.states.shape[1] - 1)
    return Credit(rewards=step_rewards, advantages=advantages, gains=gains, reward_calls=calls)


@torch.no_grad()
def flow_grpo_credit(model: VelocityModel, rollout: Rollout, reward: rewards.Reward, config: CreditConfig,
                     batch_size: int) -> Credit:
    """Flow-GRPO: the final reward's group-relative advantage, the same for every step of a trajectory."""
    final = score_in_batches(model, reward, rollout.final, list(rollout.batch.prompts), batch_size)
    per_trajectory = credit.flow_grpo_advantages(final, rollout.batch.group_ids, std_scope=_std_scope(config),
                                                 eps=config.std_eps, clip=config.advantage_clip)
    advantages = per_trajectory[:, None].expand(-1, rollout.log_probs.shape[1]).clone()
    return Credit(rewards=final[:, None], advantages=advantages, gains=None, reward_calls=len(final))


def _std_scope(config: CreditConfig) -> credit.StdScope:
    # CreditConfig keeps std_scope a str checked against its choices ("group", "global"); credit checks it again.
    return cast(credit.StdScope, config.std_scope)


CreditMethod = Callable[[VelocityModel, Rollout, rewards.Reward, CreditConfig, int], Credit]
CREDIT_METHODS: dict[str, CreditMethod] = {"stepwise": stepwise_credit, "flow_grpo": flow_grpo_credit}
