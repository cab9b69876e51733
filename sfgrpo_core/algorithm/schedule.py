"""Sigma grids for flow-matching samplers."""

from __future__ import annotations

import torch


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's resolution-dependent time shift: shift * t / (1 + (shift - 1) * t)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def flow_sigmas(steps: int, shift: float = 3.0) -> torch.Tensor:
    """The SD3 sampling grid of ``steps`` steps: [steps + 1] float32 from 1 down to 0.

    Matches diffusers' FlowMatchEulerDiscreteScheduler (1000 training steps): the grid runs linearly from 1 to the
    shifted smallest training sigma, is shifted again, and ends with an appended 0. For 10 steps and shift 3:
    1.0000 0.9601 0.9133 0.8577 0.7904 0.7073 0.6022 0.4649 0.2780 0.0089 0.0.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    smallest = float(shift_sigma(torch.tensor(1.0 / 1000, dtype=torch.float64), shift))
    base = torch.linspace(1.0, smallest, steps, dtype=torch.float64)
    return torch.cat([shift_sigma(base, shift), torch.zeros(1, dtype=torch.float64)]).float()
