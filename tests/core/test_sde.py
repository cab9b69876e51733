"""Defining properties of the sampler steps (docs/algorithm.md sections 1-3)."""

import math

import pytest
import torch

from sfgrpo_core.algorithm import sde
from sfgrpo_core.algorithm.schedule import flow_sigmas


def _state(batch=4, shape=(3, 5, 5), seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=generator)
    velocity = torch.randn(batch, *shape, generator=generator)
    noise = torch.randn(batch, *shape, generator=generator)
    return x, velocity, noise


def test_sd3_grid_matches_the_notes():
    expected = [1.0000, 0.9601, 0.9133, 0.8577, 0.7904, 0.7073, 0.6022, 0.4649, 0.2780, 0.0089, 0.0]
    torch.testing.assert_close(flow_sigmas(10, 3.0), torch.tensor(expected), atol=6e-5, rtol=0)


@pytest.mark.parametrize("t,s", [(0.9133, 0.8577), (0.2780, 0.0089), (1.0, 0.9601), (0.0089, 0.0)])
def test_zero_noise_is_the_euler_step(t, s):
    x, velocity, noise = _state()
    euler = x + (s - t) * velocity
    for step in (
        sde.sde_step("flow_grpo", x, velocity, t, s, strength=0.0, noise=noise),
        sde.sde_step("ddim", x, velocity, t, s, strength=0.0, noise=noise),
        sde.sde_step("cps", x, velocity, t, s, strength=0.0, noise=noise),
        sde.sde_step("ode", x, velocity, t, s, strength=0.7, noise=noise),
    ):
        torch.testing.assert_close(step.prev_sample, euler, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(step.mean, euler, atol=1e-6, rtol=1e-6)
        assert not step.trainable.any()


def test_flow_grpo_mean_and_std_follow_the_equations():
    x, velocity, noise = _state()
    t, s, a = 0.7073, 0.6022, 0.7
    step = sde.sde_step("flow_grpo", x, velocity, t, s, strength=a, noise=noise)
    std_t = a * math.sqrt(t / (1 - t))
    mean = x + (s - t) * (velocity + std_t**2 / (2 * t) * (x + (1 - t) * velocity))
    torch.testing.assert_close(step.mean, mean)
    torch.testing.assert_close(step.std, torch.full((4,), std_t * math.sqrt(t - s)))
    torch.testing.assert_close(step.prev_sample, mean + std_t * math.sqrt(t - s) * noise)


def test_flow_grpo_at_t_one_uses_the_next_grid_value():
    x, velocity, noise = _state()
    step = sde.sde_step("flow_grpo", x, velocity, 1.0, 0.9601, strength=0.7, noise=noise)
    assert torch.isfinite(step.prev_sample).all() and torch.isfinite(step.log_prob).all()
    expected_std = 0.7 * math.sqrt(1.0 / (1 - 0.9601)) * math.sqrt(1 - 0.9601)
    torch.testing.assert_close(step.std, torch.full((4,), expected_std))


def test_ddim_mean_and_std_follow_the_equations():
    x, velocity, noise = _state()
    t, s, eta = 0.7904, 0.7073, 0.7
    step = sde.sde_step("ddim", x, velocity, t, s, strength=eta, noise=noise)
    sigma_t = eta * s * math.sqrt(1 - t)
    x0_hat, x1_hat = x - t * velocity, x + (1 - t) * velocity
    mean = (1 - s) * x0_hat + math.sqrt(s**2 - sigma_t**2) * x1_hat
    torch.testing.assert_close(step.mean, mean)
    torch.testing.assert_close(step.prev_sample, mean + sigma_t * noise)
    assert sigma_t <= s


def test_cps_std():
    x, velocity, noise = _state()
    step = sde.sde_step("cps", x, velocity, 0.6022, 0.4649, strength=0.5, noise=noise)
    torch.testing.assert_close(step.std, torch.full((4,), 0.4649 * math.sin(0.25 * math.pi)))


@pytest.mark.parametrize("name,strength", [("ddim", 0.7), ("flow_grpo", 0.7), ("cps", 0.5)])
def test_log_prob_is_normal_log_density_averaged(name, strength):
    x, velocity, noise = _state()
    step_fn = sde.get_step_function(name, strength)
    step = step_fn(x, velocity, 0.6022, 0.4649, noise=noise)
    normal = torch.distributions.Normal(step.mean, step.std.reshape(-1, 1, 1, 1))
    expected = normal.log_prob(step.prev_sample).flatten(1).mean(1)
    torch.testing.assert_close(step.log_prob, expected)


def test_ddim_deterministic_steps_are_masked_never_nan():
    x, velocity, noise = _state()
    for t, s in ((1.0, 0.9601), (0.0089, 0.0)):
        step = sde.sde_step("ddim", x, velocity, t, s, strength=0.7, noise=noise)
        assert (step.std == 0).all()
        assert not step.trainable.any()
        assert torch.isfinite(step.log_prob).all() and (step.log_prob == 0).all()
        assert torch.isfinite(step.prev_sample).all()


def test_per_sample_sigmas_match_scalar_calls():
    x, velocity, noise = _state()
    sigmas = torch.tensor([0.9601, 0.7073, 0.4649, 0.2780])
    nexts = torch.tensor([0.9133, 0.6022, 0.2780, 0.0089])
    batched = sde.sde_step("ddim", x, velocity, sigmas, nexts, strength=0.7, noise=noise)
    for i in range(4):
        single = sde.sde_step("ddim", x[i : i + 1], velocity[i : i + 1], float(sigmas[i]), float(nexts[i]),
                              strength=0.7, noise=noise[i : i + 1])
        torch.testing.assert_close(batched.prev_sample[i : i + 1], single.prev_sample)
        torch.testing.assert_close(batched.log_prob[i : i + 1], single.log_prob)


def test_log_prob_gradient_flows_to_velocity_only_through_mean():
    x, velocity, noise = _state()
    velocity.requires_grad_(True)
    recorded = sde.sde_step("ddim", x, velocity.detach(), 0.6022, 0.4649, strength=0.7, noise=noise).prev_sample
    step = sde.sde_step("ddim", x, velocity, 0.6022, 0.4649, strength=0.7, prev_sample=recorded)
    step.log_prob.sum().backward()
    assert torch.isfinite(velocity.grad).all() and velocity.grad.abs().sum() > 0


def test_float32_inside_for_half_inputs():
    x, velocity, noise = _state()
    step = sde.sde_step("flow_grpo", x.half(), velocity.bfloat16(), 0.5, 0.4, strength=0.7, noise=noise)
    assert step.prev_sample.dtype == torch.float32 and step.log_prob.dtype == torch.float32


def test_bad_names_and_shapes_are_reported():
    x, velocity, _ = _state()
    with pytest.raises(ValueError, match="unknown sde 'ddpm'"):
        sde.get_step_function("ddpm", 0.5)
    with pytest.raises(ValueError, match="unknown sde 'ddpm'"):
        sde.sde_step("ddpm", x, velocity, 0.5, 0.4, strength=0.5)
    with pytest.raises(ValueError, match="prev_sample has shape"):
        sde.sde_step("ddim", x, velocity, 0.5, 0.4, strength=0.5, prev_sample=x[:1])
    with pytest.raises(ValueError, match="sigma must be"):
        sde.sde_step("ddim", x, velocity, torch.ones(3), 0.5, strength=0.5)
