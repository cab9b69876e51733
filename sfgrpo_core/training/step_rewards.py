"""Step rewards (docs/algorithm.md section 4): every state of every trajectory completed to a clean estimate, decoded
exactly like a final image, and scored.

Index convention: state k of a trajectory is x at sigma_k; state 0 is the initial noise x_1 (t = 1), state T the final
sample (t = 0). r_k rewards state k's clean completion, r_T the final sample itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from .. import rewards
from ..algorithm import tweedie
from ..models.base import VelocityModel
from ..models.condition import select
from .rollout import Rollout


@dataclass(frozen=True)
class BatchSizes:
    """How much goes through at once: ``samples`` trajectories per model call (completions), ``rewards`` images per
    decode and reward call (train.sample_batch_size and train.reward_batch_size)."""

    samples: int
    rewards: int


def score_in_batches(model: VelocityModel, reward: rewards.Reward, samples: torch.Tensor, prompts: list[str],
                     batch_size: int) -> rewards.Scores:
    """Decode clean samples exactly as final images are decoded, and score them, ``batch_size`` at a time: [n]
    scores (and each component's [n] scores for a reward made of several)."""
    return score_decoded(reward, decode_in_batches(model, samples, batch_size), prompts, batch_size)


def decode_in_batches(model: VelocityModel, samples: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The images of clean ``samples``, decoded ``batch_size`` at a time (once, for every reward that scores them)."""
    return torch.cat([model.decode(samples[start : start + batch_size])
                      for start in range(0, samples.shape[0], batch_size)])


def score_decoded(reward: rewards.Reward, images: torch.Tensor, prompts: list[str], batch_size: int) -> rewards.Scores:
    """Scores of decoded ``images``, ``batch_size`` at a time: [n] values, and each component's [n] for a mix."""
    parts = [rewards.score(reward, images[start : start + batch_size], prompts[start : start + batch_size])
             for start in range(0, len(prompts), batch_size)]
    names = sorted({name for part in parts for name in part.components})
    def component(name: str) -> torch.Tensor:  # NaN in a batch whose items all failed that component
        return torch.cat([part.components.get(name, torch.full_like(part.values, float("nan"))) for part in parts])

    return rewards.Scores(torch.cat([part.values for part in parts]), {name: component(name) for name in names})


def scored_states(active: torch.Tensor) -> torch.Tensor:
    """The states whose reward the loss uses: [N, T + 1] bool from the [N, T] ``active`` transitions.

    A gain g_k = r_{k+1} - r_k enters the advantages only where transition k trains (docs/algorithm.md section 5:
    masked gains are left out of the statistics and the loss), so only the two ends of active transitions need a
    reward; the final samples are always scored (the logged reward, zero-variance groups). On the mini world's 8-step
    DDIM grid this leaves out r_0 (the deterministic step from t = 1) and r_7 (the steps into sigma ~0.009 and 0 do not
    train): 52 of 344 images an iteration, with the advantages unchanged.
    """
    if active.ndim != 2:
        raise ValueError(f"active must be [N, T], got shape {tuple(active.shape)}")
    active = active.bool().cpu()
    scored = torch.zeros(active.shape[0], active.shape[1] + 1, dtype=torch.bool)
    scored[:, :-1] |= active
    scored[:, 1:] |= active
    scored[:, -1] = True
    return scored


def distinct_states(rollout: Rollout, scored: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The states 0..T-1 that need a completion of their own, and which one each (member, step) uses.

    Members of a group share prompt and condition, so members whose state k is bitwise equal share its completion
    and reward: x_1 when the group shares its initial noise (r_0 once per group), and every state a deterministic
    step leads to from equal states (the DDIM step from t = 1). Nothing else is merged, so every reward equals the
    one a completion of its own would get.

    Args:
        scored: optional [N, T + 1] bool (``scored_states``); states where it is False get no completion.

    Returns:
        (member [M], step [M]) of each distinct state, in order of step, then member; and [N, T] the index into
        them of each (member, step), -1 where the state is not scored.
    """
    states, group_ids = rollout.states, rollout.batch.group_ids
    count, steps = states.shape[0], states.shape[1] - 1
    wanted = torch.ones(count, steps, dtype=torch.bool) if scored is None else scored[:, :steps].bool().cpu()
    members: list[int] = []
    step_of: list[int] = []
    index = torch.full((count, steps), -1, dtype=torch.long)
    for k in range(steps):
        for group in torch.unique(group_ids):
            rows = torch.nonzero((group_ids == group) & wanted[:, k])[:, 0]
            if not len(rows):
                continue
            _, inverse = torch.unique(states[rows.to(states.device), k].flatten(1), dim=0, return_inverse=True)
            inverse = inverse.cpu()
            firsts = sorted(int(torch.nonzero(inverse == value)[0, 0]) for value in torch.unique(inverse))
            for item, first in enumerate(firsts):  # numbered by first occurrence: the order does not depend on sort
                index[rows[inverse == inverse[first]], k] = len(members) + item
            members += [int(rows[first]) for first in firsts]
            step_of += [k] * len(firsts)
    return torch.tensor(members, dtype=torch.long), torch.tensor(step_of, dtype=torch.long), index


@dataclass(frozen=True)
class StepRewards:
    """What ``step_rewards`` returns: ``scores`` (r_0..r_T, [N, T + 1], and each component's) and ``images``, how many
    images it decoded and scored (one per distinct scored state 0..T-1, and the final samples)."""

    scores: rewards.Scores
    images: int


RowsVelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
"""fn(x [B, ...], sigma [B], rows) -> velocity, for the chunk's states ``rows`` (None: all of them)."""


def uniform_completion(velocity_fn: RowsVelocityFn, states: torch.Tensor, sigmas: torch.Tensor,
                       steps: torch.Tensor, first_velocities: torch.Tensor, substeps: int) -> torch.Tensor:
    """The paper's completion: T' Euler substeps uniform in t from each state's sigma to 0, all states batched.

    Args:
        velocity_fn: fn(x, sigma [B], rows) -> velocity.
        states: [B, ...] states, state i at ``sigmas[steps[i]]``.
        sigmas: [T + 1] the sampling grid.
        steps: [B] each state's index k on the grid.
        first_velocities: [B, ...] the rollout's velocity at each state.
        substeps: T'.
    """
    return tweedie.complete(lambda x, sigma: velocity_fn(x, sigma, None), states, sigmas[steps].to(states.device),
                            substeps, first_velocity=first_velocities)


def grid_completion(velocity_fn: RowsVelocityFn, states: torch.Tensor, sigmas: torch.Tensor,
                    steps: torch.Tensor, first_velocities: torch.Tensor, substeps: int) -> torch.Tensor:
    """DenseGRPO's completion: the Euler ODE over every remaining grid step sigma_k > ... > 0 (``substeps`` is not
    used; state k costs T - k - 1 model calls). States at the same k are batched."""
    result = torch.empty(states.shape, dtype=torch.float32, device=states.device)
    for k in steps.unique().tolist():
        rows = torch.nonzero(steps == k)[:, 0].to(states.device)
        result[rows] = tweedie.complete_on_grid(partial(_velocity_of_rows, velocity_fn, rows), states[rows],
                                                sigmas[k:].to(states.device), first_velocity=first_velocities[rows])
    return result


def _velocity_of_rows(velocity_fn: RowsVelocityFn, rows: torch.Tensor, x: torch.Tensor,
                      sigma: torch.Tensor) -> torch.Tensor:
    return velocity_fn(x, sigma, rows)


COMPLETIONS = {"uniform": uniform_completion, "grid": grid_completion}


@torch.no_grad()
def step_rewards(model: VelocityModel, rollout: Rollout, reward: rewards.Reward, *, substeps: int,
                 batch_sizes: BatchSizes, scored: torch.Tensor | None = None,
                 completion: str = "uniform") -> StepRewards:
    """r_k for every state of every trajectory: [N, T + 1] (and each component's [N, T + 1] for a mix), with the
    number of images scored.

    r_0..r_{T-1} reward the ODE completion of x_k made with the rollout weights (``completion``: "uniform", T'
    substeps uniform in t, the paper's; "grid", the remaining sampling grid, DenseGRPO's), r_T the final sample
    itself. A state shared by several members of a group is completed and scored once (``distinct_states``: r_0 once
    per group when the group shares x_1, Stepwise-Flow-GRPO's setting). Each completion's first substep uses the
    velocity the rollout computed at that state (no model call), the others are batched across trajectories and
    steps, ``batch_sizes.samples`` at a time; decodes and rewards go ``batch_sizes.rewards`` at a time. With
    ``scored`` ([N, T + 1] bool, ``scored_states``) only those states are completed and scored; the others are NaN
    (not computed, unlike a missing reward, which is NaN inside ``scored``).
    """
    if completion not in COMPLETIONS:
        raise ValueError(f"completion: {completion!r} is not one of {', '.join(COMPLETIONS)}")
    states, sigmas, batch = rollout.states, rollout.sigmas, rollout.batch
    count, steps = states.shape[0], states.shape[1] - 1
    members, step_index, index = distinct_states(rollout, scored)
    completions = []
    for start in range(0, len(members), batch_sizes.samples):
        member, k = members[start : start + batch_sizes.samples], step_index[start : start + batch_sizes.samples]
        condition = select(batch.condition, member)

        def velocity_fn(x, sigma, rows, condition=condition):
            return model.velocity(x, sigma, condition if rows is None else select(condition, rows))

        completions.append(COMPLETIONS[completion](velocity_fn, states[member, k], sigmas, k,
                                                   rollout.velocities[member, k], substeps))
    clean = torch.cat([*completions, rollout.final])
    prompts = [batch.prompts[i] for i in members.tolist()] + list(batch.prompts)
    scores = score_in_batches(model, reward, clean, prompts, batch_sizes.rewards)

    def per_step(flat: torch.Tensor) -> torch.Tensor:  # distinct completions then finals -> [N, T + 1]
        result = torch.full((count, steps + 1), float("nan"))
        distinct = torch.cat([flat[: len(members)], torch.tensor([float("nan")])])  # index -1: not scored
        result[:, :steps] = distinct[index]
        result[:, steps] = flat[len(members) :]
        return result

    return StepRewards(rewards.Scores(per_step(scores.values),
                                      {name: per_step(values) for name, values in scores.components.items()}),
                       images=len(clean))
