import pytest
import torch

from sfgrpo_core.algorithm import tweedie


def test_estimates_recover_endpoints_of_a_straight_path():
    generator = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(3, 4, generator=generator), torch.randn(3, 4, generator=generator)
    t = torch.tensor([0.2, 0.5, 0.9])
    xt = (1 - t[:, None]) * x0 + t[:, None] * x1
    velocity = x1 - x0
    torch.testing.assert_close(tweedie.x0_estimate(xt, velocity, t), x0)
    torch.testing.assert_close(tweedie.x1_estimate(xt, velocity, t), x1)


def test_one_substep_is_the_tweedie_estimate_and_more_substeps_walk_euler():
    calls = []

    def velocity_fn(x, sigma):
        calls.append(sigma.clone())
        return torch.sin(x) + sigma[:, None]

    x = torch.randn(2, 5)
    sigma = torch.tensor([0.8, 0.3])
    one = tweedie.complete(velocity_fn, x, sigma, 1)
    torch.testing.assert_close(one, tweedie.x0_estimate(x, velocity_fn(x, sigma), sigma))

    calls.clear()
    five = tweedie.complete(velocity_fn, x, sigma, 5)
    expected = x.clone()
    for k in range(5):
        t, s = sigma * (1 - k / 5), sigma * (1 - (k + 1) / 5)
        expected = expected + (s - t)[:, None] * (torch.sin(expected) + t[:, None])
    torch.testing.assert_close(five, expected)
    assert len(calls) == 5
    torch.testing.assert_close(calls[0], sigma)


def test_substeps_must_be_positive():
    with pytest.raises(ValueError, match="substeps"):
        tweedie.complete(lambda x, s: x, torch.zeros(1, 2), 0.5, 0)


def test_a_grid_completion_is_the_deterministic_sampler_over_the_remaining_grid():
    """complete_on_grid walks the ODE over the rest of the sampling grid: the rollout's own ODE steps from there,
    the Tweedie estimate when one step is left, and the rollout's velocity reused for its first step."""
    from sfgrpo_core.algorithm.schedule import flow_sigmas
    from sfgrpo_core.algorithm.sde import get_step_function
    from sfgrpo_core.models.toy import ToyVelocityNet, ToyWorld
    from sfgrpo_core.training.rollout import make_prompt_batch, rollout

    torch.manual_seed(0)
    model = ToyWorld(ToyVelocityNet(hidden=16).requires_grad_(False))
    batch = make_prompt_batch(model, ["mode 1", "mode 4"], 2, seed=0, iteration=0)
    sigmas = flow_sigmas(6)
    ode = rollout(model, batch, sigmas, get_step_function("ode", 0.0))
    condition = batch.condition
    for k in range(len(sigmas) - 1):
        completed = tweedie.complete_on_grid(lambda x, sigma: model.velocity(x, sigma, condition), ode.states[:, k],
                                             sigmas[k:], first_velocity=ode.velocities[:, k])
        torch.testing.assert_close(completed, ode.final.float(), rtol=1e-5, atol=1e-6)
    last = len(sigmas) - 2
    torch.testing.assert_close(
        tweedie.complete_on_grid(lambda x, s: model.velocity(x, s, condition), ode.states[:, last], sigmas[last:]),
        tweedie.x0_estimate(ode.states[:, last], ode.velocities[:, last], sigmas[last]))
    with pytest.raises(ValueError, match="ending at 0"):
        tweedie.complete_on_grid(lambda x, s: x, torch.zeros(1, 2), torch.tensor([0.5, 0.1]))
