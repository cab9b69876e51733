"""Step rewards (algorithm.md section 4): every state of every trajectory completed to a clean estimate, decoded
exactly like a final image, and scored.

Index convention: state k of a trajectory is x at sigma_k; state 0 is the initial noise x_1 (t = 1), state T the final
sample (t = 0). r_k rewards state k's clean completion, r_T the final sample itself.
"""

from __future__ import annotations

import torch

from .. import rewards
from ..algorithm import tweedie
from ..models.base import VelocityModel
from ..models.condition import select
from .rollout import PromptBatch, Rollout


def score_in_batches(model: VelocityModel, reward: rewards.Reward, samples: torch.Tensor, prompts: list[str],
                      batch_size: int) -> torch.Tensor:
    """Decode clean samples exactly as final images are decoded, and score them, ``batch_size`` at a time."""
    scores = [rewards.score(reward, model.decode(samples[start : start + batch_size]),
                            prompts[start : start + batch_size])
              for start in range(0, len(prompts), batch_size)]
    return torch.cat(scores)


def scored_starts(batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(members whose initial noise gets scored, index of each member's scored start among them): the first member
    of each group when the group shares x_1, else every member."""
    group_ids = batch.group_ids
    if not batch.shares_initial_noise:
        everyone = torch.arange(len(group_ids))
        return everyone, everyone
    groups = torch.unique(group_ids)
    first_members = torch.stack([torch.nonzero(group_ids == group)[0, 0] for group in groups])
    return first_members, torch.searchsorted(groups, group_ids)


def images_scored(rollout: Rollout) -> int:
    """How many images ``step_rewards`` decodes and scores for ``rollout``: the scored starts, every member's
    states 1..T-1, and the final samples."""
    count, steps = rollout.states.shape[0], rollout.states.shape[1] - 1
    return len(scored_starts(rollout.batch)[0]) + count * (steps - 1) + count


@torch.no_grad()
def step_rewards(model: VelocityModel, rollout: Rollout, reward: rewards.Reward, *, substeps: int,
                 batch_size: int) -> torch.Tensor:
    """r_k for every state of every trajectory: [N, T + 1].

    r_0 rewards the completion of the initial noise x_1: once per group when the group shares it (Stepwise-Flow-
    GRPO's setting), else once per member; r_1..r_{T-1} reward the T'-substep ODE completion of x_k made with the
    rollout weights; r_T rewards the final sample itself. All completions are batched across trajectories and steps,
    ``batch_size`` at a time.
    """
    states, sigmas, batch = rollout.states, rollout.sigmas, rollout.batch
    count, steps = states.shape[0], states.shape[1] - 1
    first_members, start_of = scored_starts(batch)
    # Items to complete: (member, step) for the scored starts at k = 0, and every member at 1..T-1.
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
    result[:, 0] = first_scores[start_of]
    middle = scores[len(first_members) : len(first_members) + count * (steps - 1)]
    result[:, 1:steps] = middle.reshape(count, steps - 1)
    result[:, steps] = scores[-count:]
    return result
