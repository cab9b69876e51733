"""Rollouts: prompt groups with shared initial noise, sampled with a recorded SDE trajectory."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .. import seeding
from ..algorithm.sde import MIN_TRAINABLE_STD, StepFunction, trainable_mask
from ..algorithm.tweedie import x0_estimate
from ..models.base import VelocityModel
from ..models.condition import Condition, select

StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
"""fn(step k, total T, x_k [N, ...], x0 estimate at step k [N, ...]); for progress bars and previews."""


@dataclass(frozen=True)
class PromptBatch:
    """N = groups x group_size trajectories; members of a group share prompt and condition, and (for Stepwise-Flow-
    GRPO) the initial noise x_1."""

    prompts: list[str]
    group_ids: torch.Tensor
    condition: Condition
    initial_noise: torch.Tensor
    member_seeds: list[int]

    def rows(self, start: int, stop: int) -> PromptBatch:
        """Members start..stop-1 (a chunk of the batch; each keeps its prompt, condition, noise and seed)."""
        index = torch.arange(start, min(stop, len(self.prompts)))
        return PromptBatch(prompts=self.prompts[start:stop], group_ids=self.group_ids[index],
                           condition=select(self.condition, index), initial_noise=self.initial_noise[start:stop],
                           member_seeds=self.member_seeds[start:stop])


@dataclass(frozen=True)
class Rollout:
    """A recorded batch of trajectories.

    Attributes:
        states: [N, T + 1, ...] float32; states[:, k] is the state at sigmas[k]: states[:, 0] the initial noise
            x_1, states[:, T] the final sample.
        velocities: [N, T, ...] float32; the model's velocity at states[:, k] and sigmas[k] (the step rewards'
            completions start with it instead of a second model call).
        log_probs: [N, T] log-density of transition k (states[:, k] -> states[:, k + 1]) at rollout.
        stds: [N, T] noise std of each transition (0 for deterministic ones).
        active: [N, T] bool; transitions that train (stochastic enough, and not the skipped last step).
        sigmas: [T + 1] the grid; transition k goes sigmas[k] -> sigmas[k + 1].
    """

    states: torch.Tensor
    velocities: torch.Tensor
    log_probs: torch.Tensor
    stds: torch.Tensor
    active: torch.Tensor
    sigmas: torch.Tensor
    batch: PromptBatch

    @property
    def final(self) -> torch.Tensor:
        return self.states[:, -1]


def choose_prompts(prompts: Sequence[str], groups: int, seed: int, iteration: int) -> list[str]:
    """``groups`` prompts drawn without replacement while possible, from (seed, iteration) alone."""
    if not prompts:
        raise ValueError("train.prompts: the prompt list is empty; give at least one prompt")
    rng = random.Random(seeding.derive_seed(seed, iteration, "prompts"))
    chosen: list[str] = []
    while len(chosen) < groups:
        chosen += rng.sample(list(prompts), min(len(prompts), groups - len(chosen)))
    return chosen


def independent_noise(sample_shape: Sequence[int], groups: int, group_size: int, seed: int,
                      iteration: int) -> torch.Tensor:
    """[groups * group_size, *sample_shape] initial noise, one draw per member seeded by (seed, iteration, group,
    member): Flow-GRPO's rollouts, whose members do not share x_1."""
    return torch.stack([torch.randn(tuple(sample_shape),
                                    generator=seeding.generator(seed, iteration, group, member, "initial"))
                        for group in range(groups) for member in range(group_size)])


def make_prompt_batch(model: VelocityModel, group_prompts: Sequence[str], group_size: int, seed: int,
                      iteration: int, device: torch.device | str = "cpu",
                      initial_noise: torch.Tensor | None = None) -> PromptBatch:
    """Expand one prompt per group into members, with a per-member seed for the step noise (seeded by
    (seed, iteration, group, member)).

    Args:
        initial_noise: [N, *sample_shape] noise x_1 of every member. None: the group's shared noise, seeded by
            (seed, iteration, group), which Stepwise-Flow-GRPO needs (r_0 is then one reward per group).
    """
    condition = model.encode_prompts(list(group_prompts))
    group_ids = torch.arange(len(group_prompts)).repeat_interleave(group_size)
    if initial_noise is None:
        shared = [torch.randn(model.sample_shape, generator=seeding.generator(seed, iteration, group, "initial"))
                  for group in range(len(group_prompts))]
        initial_noise = torch.stack(shared)[group_ids]
    elif initial_noise.shape != (len(group_ids), *model.sample_shape):
        raise ValueError(f"initial_noise: shape {tuple(initial_noise.shape)}, expected "
                         f"{(len(group_ids), *model.sample_shape)}")
    return PromptBatch(
        prompts=[group_prompts[group] for group in group_ids.tolist()],
        group_ids=group_ids,
        condition=select(condition, group_ids),
        initial_noise=initial_noise.to(device),
        member_seeds=[seeding.derive_seed(seed, iteration, group, member, "steps")
                      for group in range(len(group_prompts)) for member in range(group_size)],
    )


@torch.no_grad()
def rollout(model: VelocityModel, batch: PromptBatch, sigmas: torch.Tensor, step_fn: StepFunction, *,
            train_last_step: bool = False, min_train_std: float = MIN_TRAINABLE_STD,
            callback: StepCallback | None = None, chunk_size: int = 0) -> Rollout:
    """Sample every member with ``step_fn`` and record the trajectory, log-probs and stds.

    Each member's step noise comes from its own generator, so a member's trajectory does not depend on which
    other members share the batch, nor on ``chunk_size``: the members run ``chunk_size`` at a time (0: all at once),
    so the model's activations never hold more than one chunk. ``callback`` follows the first chunk.
    """
    count = len(batch.prompts)
    if 0 < chunk_size < count:
        chunks = [_rollout(model, batch.rows(start, start + chunk_size), sigmas, step_fn,
                           callback=callback if start == 0 else None)
                  for start in range(0, count, chunk_size)]
        states, velocities, log_probs, stds = (torch.cat(parts) for parts in zip(*chunks, strict=True))
    else:
        states, velocities, log_probs, stds = _rollout(model, batch, sigmas, step_fn, callback=callback)
    active = trainable_mask(stds) & (stds >= min_train_std)
    if not train_last_step:
        active[:, -1] = False
    return Rollout(states=states, velocities=velocities, log_probs=log_probs, stds=stds, active=active,
                   sigmas=sigmas.float(), batch=batch)


def _rollout(model: VelocityModel, batch: PromptBatch, sigmas: torch.Tensor, step_fn: StepFunction, *,
             callback: StepCallback | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(states [N, T + 1, ...], velocities [N, T, ...], log_probs [N, T], stds [N, T]) of one batch of members."""
    x = batch.initial_noise.float()
    count, steps = x.shape[0], len(sigmas) - 1
    generators = seeding.member_generators(batch.member_seeds, x.device)
    states, velocities, log_probs, stds = [x], [], [], []
    for k in range(steps):
        sigma = sigmas[k].expand(count).to(x.device)
        velocity = model.velocity(x, sigma, batch.condition)
        noise = seeding.member_noise(generators, x)
        step = step_fn(x, velocity, sigma, sigmas[k + 1].expand(count).to(x.device), noise=noise)
        if callback is not None:
            callback(k, steps, x, x0_estimate(x, velocity, sigma))
        x = step.prev_sample
        states.append(x)
        velocities.append(velocity.float())
        log_probs.append(step.log_prob)
        stds.append(step.std)
    return (torch.stack(states, dim=1), torch.stack(velocities, dim=1), torch.stack(log_probs, dim=1),
            torch.stack(stds, dim=1))
