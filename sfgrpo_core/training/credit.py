"""Credit methods, chosen by name: how a rollout becomes per-transition advantages (rewards -> gains -> advantages).

- ``stepwise`` (Stepwise-Flow-GRPO): reward the clean completion of every state, credit each transition with its
  gain r_{k+1} - r_k, normalize jointly over the group (docs/algorithm.md sections 4-5).
- ``flow_grpo``: reward the final sample only; every transition gets the trajectory's group-relative advantage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import torch

from .. import rewards
from ..algorithm import advantages
from ..config import CreditConfig
from ..models.base import VelocityModel
from .distributed import SINGLE, Team
from .rollout import Rollout
from .step_rewards import BatchSizes, score_in_batches, scored_states, step_rewards


@dataclass(frozen=True)
class Credit:
    """Rewards and advantages of a rollout.

    Attributes:
        rewards: [N, T + 1] intermediate rewards r_0..r_T (stepwise), or [N, 1] final rewards (flow_grpo); NaN =
            missing.
        advantages: [N, T] per transition; NaN where missing or masked.
        gains: [N, T] stepwise gains, or None for flow_grpo.
        reward_calls: number of images scored.
        components: for a reward made of several, each component's rewards, shaped like ``rewards``.
        group_ids: [N] the group of each trajectory.
        rows: this process's trajectories among the N (all of them for one process).
        scored: [N, T + 1] (or [N, 1]) bool, the rewards computed; NaN outside it means "not needed", inside it
            "missing" (``step_rewards.scored_states``).

    With several processes every tensor covers the whole batch (gathered from all of them) and ``reward_calls``
    counts every process's images: each process holds the same Credit.
    """

    rewards: torch.Tensor
    advantages: torch.Tensor
    gains: torch.Tensor | None
    reward_calls: int
    group_ids: torch.Tensor
    rows: slice
    scored: torch.Tensor
    components: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def missing(self) -> int:
        """Rewards that were computed and failed (NaN inside ``scored``)."""
        return int((torch.isnan(self.rewards) & self.scored).sum())

    @property
    def final_rewards(self) -> torch.Tensor:
        return self.rewards[:, -1]

    @property
    def final_components(self) -> dict[str, torch.Tensor]:
        return {name: values[:, -1] for name, values in self.components.items()}


def stepwise_credit(model: VelocityModel, rollout: Rollout, reward: rewards.Reward, config: CreditConfig,
                    batch_sizes: BatchSizes, team: Team = SINGLE) -> Credit:
    """Stepwise-Flow-GRPO: gains of T'-step completions, jointly (or per-step, for ablations) normalized."""
    scored = scored_states(rollout.active)  # only the ends of training transitions: the advantages are unchanged
    local = step_rewards(model, rollout, reward, substeps=config.substeps, batch_sizes=batch_sizes, scored=scored,
                         completion=config.completion)
    scores = gather_scores(team, local.scores)
    group_ids, active = team.gather_rows(rollout.batch.group_ids), team.gather_rows(rollout.active)
    normalize = advantages.joint_advantages if config.normalization == "joint" else advantages.per_step_advantages

    def advantages_of(rewards_per_step: torch.Tensor) -> torch.Tensor:
        return normalize(advantages.stepwise_gains(rewards_per_step), group_ids, std_scope=_std_scope(config),
                         eps=config.std_eps, clip=config.advantage_clip, mask=active)

    return Credit(rewards=scores.values, advantages=_mixed(advantages_of, scores, reward),
                  gains=advantages.stepwise_gains(scores.values),
                  reward_calls=_total(team, local.images), group_ids=group_ids,
                  rows=team.rows(len(group_ids)), scored=team.gather_rows(scored), components=scores.components)


@torch.no_grad()
def flow_grpo_credit(model: VelocityModel, rollout: Rollout, reward: rewards.Reward, config: CreditConfig,
                     batch_sizes: BatchSizes, team: Team = SINGLE) -> Credit:
    """Flow-GRPO: the final reward's group-relative advantage, the same for every step of a trajectory."""
    local = score_in_batches(model, reward, rollout.final, list(rollout.batch.prompts), batch_sizes.rewards)
    final = gather_scores(team, local)
    group_ids = team.gather_rows(rollout.batch.group_ids)
    steps = rollout.log_probs.shape[1]

    def advantages_of(final_rewards: torch.Tensor) -> torch.Tensor:
        per_trajectory = advantages.flow_grpo_advantages(final_rewards[:, 0], group_ids, std_scope=_std_scope(config),
                                                         eps=config.std_eps, clip=config.advantage_clip)
        return per_trajectory[:, None].expand(-1, steps).clone()

    as_columns = rewards.Scores(final.values[:, None], {name: v[:, None] for name, v in final.components.items()})
    return Credit(rewards=as_columns.values, advantages=_mixed(advantages_of, as_columns, reward), gains=None,
                  reward_calls=_total(team, len(local.values)), group_ids=group_ids, rows=team.rows(len(group_ids)),
                  scored=torch.ones_like(as_columns.values, dtype=torch.bool), components=as_columns.components)


def gather_scores(team: Team, scores: rewards.Scores) -> rewards.Scores:
    """Every process's rows of ``scores`` (and of each component), in rank order."""
    return rewards.Scores(team.gather_rows(scores.values),
                          {name: team.gather_rows(values) for name, values in sorted(scores.components.items())})


def _total(team: Team, count: int) -> int:
    return int(team.sum(torch.tensor([float(count)])).item())


def _mixed(advantages_of: Callable[[torch.Tensor], torch.Tensor], scores: rewards.Scores,
           reward: rewards.Reward) -> torch.Tensor:
    """The advantages of the reward; for a mix that normalizes each component first (weighted with
    aggregate='normalize_then_sum'), the weighted sum of each component's own advantages."""
    weights = getattr(reward, "advantage_weights", None)
    if not weights:
        return advantages_of(scores.values)
    return sum(weight * advantages_of(scores.components[name]) for name, weight in weights.items())


def _std_scope(config: CreditConfig) -> advantages.StdScope:
    # CreditConfig keeps std_scope a str checked against its choices ("group", "global"); advantages checks it again.
    return cast(advantages.StdScope, config.std_scope)


CreditMethod = Callable[[VelocityModel, Rollout, rewards.Reward, CreditConfig, BatchSizes, Team], Credit]
CREDIT_METHODS: dict[str, CreditMethod] = {"stepwise": stepwise_credit, "flow_grpo": flow_grpo_credit}
