"""Credit methods, chosen by name: how a rollout becomes per-transition advantages (rewards -> gains -> advantages).

- ``stepwise`` (Stepwise-Flow-GRPO): reward the clean completion of every state, credit each transition with its
  gain r_{k+1} - r_k, normalize jointly over the group (algorithm.md sections 4-5).
- ``flow_grpo``: reward the final sample only; every transition gets the trajectory's group-relative advantage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch

from .. import rewards
from ..algorithm import advantages
from ..config import CreditConfig
from ..models.base import VelocityModel
from .rollout import Rollout
from .step_rewards import BatchSizes, images_scored, score_in_batches, step_rewards


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


def stepwise_credit(model: VelocityModel, rollout: Rollout, reward: rewards.Reward, config: CreditConfig,
                    batch_sizes: BatchSizes) -> Credit:
    """Stepwise-Flow-GRPO: gains of T'-step completions, jointly (or per-step, for ablations) normalized."""
    rewards_per_step = step_rewards(model, rollout, reward, substeps=config.substeps, batch_sizes=batch_sizes)
    gains = advantages.stepwise_gains(rewards_per_step)
    normalize = advantages.joint_advantages if config.normalization == "joint" else advantages.per_step_advantages
    step_advantages = normalize(gains, rollout.batch.group_ids, std_scope=_std_scope(config), eps=config.std_eps,
                                clip=config.advantage_clip, mask=rollout.active)
    return Credit(rewards=rewards_per_step, advantages=step_advantages, gains=gains,
                  reward_calls=images_scored(rollout))


@torch.no_grad()
def flow_grpo_credit(model: VelocityModel, rollout: Rollout, reward: rewards.Reward, config: CreditConfig,
                     batch_sizes: BatchSizes) -> Credit:
    """Flow-GRPO: the final reward's group-relative advantage, the same for every step of a trajectory."""
    final = score_in_batches(model, reward, rollout.final, list(rollout.batch.prompts), batch_sizes.rewards)
    per_trajectory = advantages.flow_grpo_advantages(final, rollout.batch.group_ids, std_scope=_std_scope(config),
                                                 eps=config.std_eps, clip=config.advantage_clip)
    broadcast = per_trajectory[:, None].expand(-1, rollout.log_probs.shape[1]).clone()
    return Credit(rewards=final[:, None], advantages=broadcast, gains=None, reward_calls=len(final))


def _std_scope(config: CreditConfig) -> advantages.StdScope:
    # CreditConfig keeps std_scope a str checked against its choices ("group", "global"); advantages checks it again.
    return cast(advantages.StdScope, config.std_scope)


CreditMethod = Callable[[VelocityModel, Rollout, rewards.Reward, CreditConfig, BatchSizes], Credit]
CREDIT_METHODS: dict[str, CreditMethod] = {"stepwise": stepwise_credit, "flow_grpo": flow_grpo_credit}
