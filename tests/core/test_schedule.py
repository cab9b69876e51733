"""The sigma grid is diffusers' own: FlowMatchEulerDiscreteScheduler with the same shift and step count."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from sfgrpo_core.algorithm.schedule import flow_sigmas


@pytest.mark.parametrize("steps, shift", [(1, 3.0), (4, 1.0), (8, 3.0), (10, 3.0), (28, 3.0), (40, 1.5)])
def test_flow_sigmas_equal_the_diffusers_scheduler(steps, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    torch.testing.assert_close(flow_sigmas(steps, shift), scheduler.sigmas.float(), rtol=0, atol=1e-6)


def test_a_bad_grid_is_refused_naming_the_value():
    with pytest.raises(ValueError, match="steps must be >= 1"):
        flow_sigmas(0)
    with pytest.raises(ValueError, match="shift must be > 0"):
        flow_sigmas(4, 0.0)
