"""Posterior-mean (Tweedie) estimates and their deterministic ODE completion (docs/algorithm.md section 4).

With x_t = (1 - t) x0 + t x1 and v = x1 - x0: x0_hat = x_t - t v and x1_hat = x_t + (1 - t) v.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .broadcast import expand_like, per_sample

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""fn(x [B, ...], sigma [B]) -> velocity [B, ...]."""


def x0_estimate(x: torch.Tensor, velocity: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """Clean-sample estimate x0_hat = x - t v, float32, shape of ``x``."""
    t = expand_like(per_sample(sigma, x.shape[0], x.device), x)
    return x.float() - t * velocity.float()


def x1_estimate(x: torch.Tensor, velocity: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """Noise estimate x1_hat = x + (1 - t) v, float32, shape of ``x``."""
    t = expand_like(per_sample(sigma, x.shape[0], x.device), x)
    return x.float() + (1 - t) * velocity.float()


def complete(velocity_fn: VelocityFn, x: torch.Tensor, sigma: float | torch.Tensor, substeps: int,
             first_velocity: torch.Tensor | None = None) -> torch.Tensor:
    """Complete ``x`` at ``sigma`` to a clean estimate by Euler ODE steps uniform in t from sigma down to 0.

    ``substeps`` = 1 is the one-step Tweedie estimate x0_hat. Samples may sit at different sigmas (a [B] tensor):
    each walks its own uniform grid, all batched in one call per substep. Runs under the caller's grad mode
    (the trainer calls it under ``torch.no_grad``).

    Args:
        velocity_fn: fn(x, sigma [B]) -> velocity.
        x: [B, ...] samples at ``sigma``.
        sigma: float / 0-d / [B] noise levels in [0, 1].
        substeps: T' >= 1.
        first_velocity: the velocity at (x, sigma) when the caller has it already (the rollout evaluated it there):
            the first substep then costs no model call, so T' = 1 costs none and T' = 2 one.

    Returns:
        [B, ...] float32 clean estimates.
    """
    if substeps < 1:
        raise ValueError(f"substeps must be >= 1, got {substeps}")
    start = per_sample(sigma, x.shape[0], x.device)
    x = x.float()
    for k in range(substeps):
        t = start * (1 - k / substeps)
        s = start * (1 - (k + 1) / substeps)
        velocity = first_velocity if k == 0 and first_velocity is not None else velocity_fn(x, t)
        x = x + expand_like(s - t, x) * velocity.float()
    return x


def complete_on_grid(velocity_fn: VelocityFn, x: torch.Tensor, sigmas: torch.Tensor,
                     first_velocity: torch.Tensor | None = None) -> torch.Tensor:
    """Complete ``x`` at ``sigmas[0]`` to a clean estimate by Euler ODE steps along the rest of the sampling grid
    ``sigmas[0] > sigmas[1] > ... > sigmas[-1] = 0`` (DenseGRPO's completion: the deterministic sampler over every
    remaining step, where ``complete`` takes T' steps uniform in t). A grid of two points [t, 0] is the one-step
    Tweedie estimate x0_hat.

    Args:
        velocity_fn: fn(x, sigma [B]) -> velocity.
        x: [B, ...] samples, all at ``sigmas[0]``.
        sigmas: [M + 1] the remaining grid, ending at 0.
        first_velocity: the velocity at (x, sigmas[0]) when the caller has it (the rollout's): saves one model call.

    Returns:
        [B, ...] float32 clean estimates.
    """
    if sigmas.ndim != 1 or len(sigmas) < 2 or float(sigmas[-1]) != 0.0:
        raise ValueError(f"sigmas must be a 1-D grid of at least two points ending at 0, got {sigmas.tolist()}")
    x = x.float()
    for k in range(len(sigmas) - 1):
        t = per_sample(sigmas[k], x.shape[0], x.device)
        velocity = first_velocity if k == 0 and first_velocity is not None else velocity_fn(x, t)
        x = x + float(sigmas[k + 1] - sigmas[k]) * velocity.float()
    return x
