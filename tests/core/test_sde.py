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


def test_flow_grpo_at_t_one_uses_the_next_grid_value():
    x, velocity, noise = _state()
    step = sde.sde_step("flow_grpo", x, velocity, 1.0, 0.9601, strength=0.7, noise=noise)
    assert torch.isfinite(step.prev_sample).all() and torch.isfinite(step.log_prob).all()
    expected_std = 0.7 * math.sqrt(1.0 / (1 - 0.9601)) * math.sqrt(1 - 0.9601)
    torch.testing.assert_close(step.std, torch.full((4,), expected_std))


DATA_MEAN, DATA_STD = 1.5, 0.5  # a Gaussian data distribution x0 ~ N(1.5, 0.5^2), one dimension


def exact_velocity(x: torch.Tensor, t: float, data_std: float = DATA_STD) -> torch.Tensor:
    """E[x1 - x0 | x_t] for x0 ~ N(DATA_MEAN, data_std^2), x1 ~ N(0, 1), x_t = (1 - t) x0 + t x1 (closed form:
    x_t is Gaussian with mean (1 - t) mu and variance (1 - t)^2 std^2 + t^2); data_std 0 is one data point."""
    mean, variance = (1 - t) * DATA_MEAN, (1 - t) ** 2 * data_std**2 + t**2
    x0 = DATA_MEAN + (1 - t) * data_std**2 / variance * (x - mean)
    x1 = t / variance * (x - mean)
    return x1 - x0


def sample_through(name: str, strength: float, steps: int, data_std: float = DATA_STD, count: int = 100_000,
                   start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples from the exact marginal at grid point ``start``, walked to 0 by ``name`` with the exact velocity:
    (the grid, the samples at every grid point from ``start`` on, [steps + 1 - start, count])."""
    generator = torch.Generator().manual_seed(0)
    sigmas = flow_sigmas(steps, 3.0)
    t = float(sigmas[start])
    x = (1 - t) * (DATA_MEAN + data_std * torch.randn(count, 1, generator=generator)) + t * torch.randn(
        count, 1, generator=generator)
    trajectory = [x]
    for k in range(start, steps):
        noise = torch.randn(count, 1, generator=generator)
        x = sde.sde_step(name, x, exact_velocity(x, float(sigmas[k]), data_std), float(sigmas[k]),
                         float(sigmas[k + 1]), strength=strength, noise=noise).prev_sample
        trajectory.append(x)
    return sigmas[start:], torch.stack(trajectory)[..., 0]


@pytest.mark.parametrize(("name", "strength"), [("ddim", 0.7), ("ddim", 1.0), ("cps", 0.5)])
def test_ddim_and_cps_keep_the_marginal_exactly_where_the_tweedie_estimates_are_exact(name, strength):
    """With one data point the Tweedie estimates x0_hat and x1_hat are exact, and then a DDIM-type step, whatever
    its size, lands on the marginal x_s ~ N((1 - s) x0, s^2): its mean mixes the two estimates with weights
    (1 - s, sqrt(s^2 - sigma^2)) and the fresh noise supplies the missing sigma^2 of variance."""
    sigmas, trajectory = sample_through(name, strength, steps=6, data_std=0.0)
    for sigma, samples in zip(sigmas.tolist(), trajectory, strict=True):
        standard_error = sigma / len(samples) ** 0.5  # of the mean; the std's is 1/sqrt(2) of it
        assert abs(float(samples.mean()) - (1 - sigma) * DATA_MEAN) <= 5 * standard_error + 1e-6
        assert abs(float(samples.std()) - sigma) <= 5 * standard_error + 1e-6


def test_the_flow_grpo_sde_keeps_the_marginal_up_to_discretisation():
    """Flow-GRPO's SDE is the reverse-time SDE with the flow's marginals: on Gaussian data with the exact velocity
    its samples end at N(1.5, 0.5^2) up to the Euler-Maruyama error, which shrinks as the grid is refined (as the
    plain ODE's does)."""
    errors = {}
    for steps in (10, 40, 160):
        for name, strength in (("flow_grpo", 0.7), ("ode", 0.0)):
            final = sample_through(name, strength, steps)[1][-1]
            assert abs(float(final.mean()) - DATA_MEAN) < 5e-3
            errors[name, steps] = abs(float(final.std()) - DATA_STD)
    assert errors["flow_grpo", 10] > errors["flow_grpo", 40] > errors["flow_grpo", 160]
    assert errors["flow_grpo", 160] < 0.01 and errors["ode", 160] < 0.015


def test_ddim_and_cps_are_few_step_samplers_under_dispersed_on_many_steps():
    """Measured, not a flaw to fix: where x0 is uncertain (Gaussian data), a DDIM-type step that uses the posterior
    mean x0_hat drops x0's posterior variance at each step, so on a fine grid the samples end too narrow (data std
    0.5; measured: ddim eta 0.7 0.35 / 0.44 / 0.46 after 10 / 40 / 160 steps, eta 1.0 0.34 / 0.40 / 0.41, cps eta
    0.5 0.34 / 0.43 / 0.45), while Flow-GRPO's SDE converges to 0.5. Hence 'a few-step sampler' (docs/algorithm.md
    section 2)."""
    flow = float(sample_through("flow_grpo", 0.7, 160)[1][-1].std())
    for name, strength in (("ddim", 0.7), ("ddim", 1.0), ("cps", 0.5)):
        final = sample_through(name, strength, 160)[1][-1]
        assert abs(float(final.mean()) - DATA_MEAN) < 5e-3
        assert float(final.std()) < DATA_STD - 0.03 < flow


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
