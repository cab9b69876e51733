"""The policy update: recorded transitions rescored, micro-batch accumulation, which transitions train, the KL."""

import dataclasses

import pytest
import torch

from sfgrpo_core.algorithm import losses
from sfgrpo_core.algorithm.schedule import flow_sigmas
from sfgrpo_core.algorithm.sde import get_step_function
from sfgrpo_core.config import OptimConfig
from sfgrpo_core.lora.adapters import attach_lora
from sfgrpo_core.models.condition import select
from sfgrpo_core.models.toy import ToyVelocityNet, ToyWorld
from sfgrpo_core.training.rollout import make_prompt_batch, rollout
from sfgrpo_core.training.update import recompute_steps, update_policy

PROMPTS = ["mode 0", "mode 3"]
GROUP_SIZE, STEPS = 4, 5
STEP_FN = get_step_function("flow_grpo", 0.7)


def toy_world(seed: int = 0) -> ToyWorld:
    """A randomly initialised toy world (no pretraining): a real conditioned MLP VelocityModel, built at once."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ToyWorld(ToyVelocityNet(hidden=16).requires_grad_(False))


def lora_toy_world(perturb: bool = True) -> tuple[ToyWorld, list[torch.nn.Parameter]]:
    """The toy world with a LoRA on every Linear; ``perturb`` moves B away from 0 (seeded, so every call builds the
    same weights), which gives A and B gradients and makes the policy differ from the base."""
    model = toy_world()
    parameters = attach_lora(model.module, rank=4, alpha=4.0, target_modules=model.default_lora_targets, seed=1)
    if perturb:
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, parameter in model.module.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    return model, parameters


def _record(model):
    batch = make_prompt_batch(model, PROMPTS, GROUP_SIZE, seed=0, iteration=0)
    return rollout(model, batch, flow_sigmas(STEPS), STEP_FN)


def _advantages(recorded, seed=0):
    return torch.randn(recorded.log_probs.shape, generator=torch.Generator().manual_seed(seed))


class RecordingSGD(torch.optim.SGD):
    """Plain SGD (no momentum or decay) that keeps the gradient each optimizer step applies."""

    def __init__(self, parameters, lr):
        super().__init__(parameters, lr=lr)
        self.applied: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        self.applied.append([parameter.grad.detach().clone() for group in self.param_groups
                             for parameter in group["params"]])
        return super().step(closure)


def _update(recorded, advantages, *, perturb=True, **optim):
    """One update_policy call on a fresh copy of the LoRA model with one minibatch and no gradient clipping: the
    gradient its single optimizer step applied, and the stats."""
    model, parameters = lora_toy_world(perturb)
    config = OptimConfig(**{"lr": 1.0, "weight_decay": 0.0, "grad_clip": 0.0, "clip_range": 0.2, "minibatches": 1,
                            **optim})
    optimizer = RecordingSGD(parameters, lr=1.0)
    stats = update_policy(model, optimizer, recorded, advantages, config, STEP_FN, torch.Generator().manual_seed(0))
    assert len(optimizer.applied) == stats.optimizer_steps == 1
    return optimizer.applied[0], stats


def _hand_gradient(recorded, advantages, keep, clip_range=0.2):
    """Gradient of the clipped GRPO objective mean(max(-A r, -A clip(r, 1 - eps, 1 + eps))) over the transitions
    ``keep`` alone, written out with the SDE step, for the perturbed LoRA model."""
    model, parameters = lora_toy_world()
    members, steps = torch.nonzero(keep, as_tuple=True)
    x, sigmas = recorded.states[members, steps], recorded.sigmas
    velocity = model.velocity(x, sigmas[steps], select(recorded.batch.condition, members))
    step = STEP_FN(x, velocity, sigmas[steps], sigmas[steps + 1], prev_sample=recorded.states[members, steps + 1])
    ratio = torch.exp(step.log_prob - recorded.log_probs[members, steps])
    advantage = advantages[members, steps]
    loss = torch.maximum(-advantage * ratio, -advantage * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
    return torch.autograd.grad(loss, parameters)


def _assert_gradients_close(first, second, **tolerance):
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, **tolerance)


def test_recompute_steps_reproduces_the_recorded_transitions():
    """Transition k is rescored from states[:, k] at sigma_k to states[:, k + 1] at sigma_{k + 1}: same weights,
    same log-prob and std, so the first update is exactly on-policy."""
    model, _ = lora_toy_world()
    recorded = _record(model)
    members, steps = torch.nonzero(torch.ones_like(recorded.active), as_tuple=True)
    with torch.no_grad():
        step = recompute_steps(model, recorded, members, steps, STEP_FN)
    torch.testing.assert_close(step.prev_sample, recorded.states[members, steps + 1], rtol=0, atol=0)
    torch.testing.assert_close(step.std, recorded.stds[members, steps])
    torch.testing.assert_close(step.log_prob, recorded.log_probs[members, steps], rtol=0, atol=1e-4)


@pytest.mark.parametrize("on_policy,clip_range", [(True, 0.2), (False, 100.0), (False, 0.01)],
                         ids=["on-policy", "off-policy", "off-policy-clipped"])
def test_the_update_follows_the_gradient_of_the_grpo_objective(on_policy, clip_range):
    """On-policy (the rollout's own weights) and off-policy (rolled out by the base model, before the LoRA moved),
    with and without the clip binding: the importance ratio uses the recorded log-probs."""
    model, _ = lora_toy_world(perturb=on_policy)
    recorded = _record(model)
    advantages = _advantages(recorded)
    applied, stats = _update(recorded, advantages, clip_range=clip_range)
    expected = _hand_gradient(recorded, advantages, recorded.active, clip_range)
    _assert_gradients_close(applied, expected, rtol=1e-4, atol=1e-8)
    assert all(gradient.abs().max() > 1e-4 for gradient in expected)  # A and B of every layer move
    assert stats.transitions == int(recorded.active.sum())
    assert (stats.ratio_mean == pytest.approx(1.0, abs=1e-5)) == on_policy
    assert (0 < stats.clip_fraction < 1) if clip_range < 0.1 else stats.clip_fraction == 0


@pytest.mark.parametrize("kl_beta", [0.0, 0.3])
@pytest.mark.parametrize("micro_batch_size", [1, 4, 7])
def test_micro_batches_accumulate_the_full_batch_gradient(micro_batch_size, kl_beta):
    """32 active transitions in micro-batches of 1, 4 or 7 (a remainder of 4) step like one full batch."""
    model, _ = lora_toy_world()
    recorded = _record(model)
    advantages = _advantages(recorded)
    full, full_stats = _update(recorded, advantages, micro_batch_size=0, kl_beta=kl_beta)
    micro, micro_stats = _update(recorded, advantages, micro_batch_size=micro_batch_size, kl_beta=kl_beta)
    _assert_gradients_close(micro, full, rtol=1e-4, atol=1e-8)
    assert micro_stats.loss == pytest.approx(full_stats.loss, rel=1e-5, abs=1e-7)
    assert micro_stats.kl_penalty == pytest.approx(full_stats.kl_penalty, rel=1e-5)
    assert (micro_stats.kl_penalty > 0) == (kl_beta > 0)


def test_masked_and_missing_transitions_get_no_gradient():
    """Huge advantages on inactive transitions (the skipped last step, one more masked by hand) and NaN advantages
    change nothing: the update is the gradient of the other transitions alone, averaged over them alone."""
    model, _ = lora_toy_world()
    recorded = _record(model)
    active = recorded.active.clone()
    active[2, 1] = False
    recorded = dataclasses.replace(recorded, active=active)
    advantages = _advantages(recorded)
    advantages[3, 0] = advantages[6, 2] = float("nan")
    keep = active & torch.isfinite(advantages)
    huge = advantages.clone()
    huge[~active] = 1e6
    quiet = advantages.clone()
    quiet[~active] = 0.0

    applied, stats = _update(recorded, huge)
    assert stats.transitions == int(keep.sum()) == int(active.sum()) - 2
    assert all(torch.isfinite(gradient).all() for gradient in applied)
    _assert_gradients_close(applied, _hand_gradient(recorded, advantages, keep), rtol=1e-4, atol=1e-8)
    _assert_gradients_close(applied, _update(recorded, quiet)[0], rtol=0, atol=0)


@pytest.mark.parametrize("skip", [False, True])
def test_zero_advantages_count_in_the_mean_unless_skipped(skip):
    """A group whose gains are all equal has advantage 0 everywhere: no gradient of its own, but its transitions
    are in the mean's denominator unless optim.skip_zero_advantage drops them."""
    model, _ = lora_toy_world()
    recorded = _record(model)
    advantages = _advantages(recorded)
    advantages[:GROUP_SIZE] = 0.0
    applied, stats = _update(recorded, advantages, skip_zero_advantage=skip)
    keep = recorded.active & (advantages != 0) if skip else recorded.active
    assert stats.transitions == int(keep.sum())
    expected = _hand_gradient(recorded, advantages, keep)
    _assert_gradients_close(applied, expected, rtol=1e-4, atol=1e-8)


def test_kl_penalty_of_a_fresh_lora_is_exactly_zero():
    """B = 0: the adapter-on policy is the base model, so the KL term is 0 and changes nothing."""
    model, _ = lora_toy_world(perturb=False)
    recorded = _record(model)
    advantages = _advantages(recorded)
    with_kl, stats = _update(recorded, advantages, perturb=False, kl_beta=1.0)
    assert stats.kl_penalty == 0.0
    _assert_gradients_close(with_kl, _update(recorded, advantages, perturb=False)[0], rtol=0, atol=0)


@pytest.mark.parametrize("micro_batch_size", [0, 5])
@pytest.mark.parametrize("kl_scale", ["flow_grpo", "step_variance"])
def test_kl_reference_is_the_base_model(kl_scale, micro_batch_size):
    """After the LoRA moved, kl_penalty is the KL between the adapter-on step means and those of the base model
    (a separate copy without any LoRA), on the scale kl_scale names, and with zero advantages the update is
    exactly its gradient."""
    model, parameters = lora_toy_world()
    recorded = _record(model)
    beta = 0.5
    applied, stats = _update(recorded, torch.zeros_like(recorded.log_probs), kl_beta=beta, kl_scale=kl_scale,
                            micro_batch_size=micro_batch_size)

    base = toy_world()
    members, steps = torch.nonzero(recorded.active, as_tuple=True)
    x, sigmas = recorded.states[members, steps], recorded.sigmas
    sigma, sigma_next = sigmas[steps], sigmas[steps + 1]
    condition = select(recorded.batch.condition, members)
    policy = STEP_FN(x, model.velocity(x, sigma, condition), sigma, sigma_next)
    with torch.no_grad():
        reference = STEP_FN(x, base.velocity(x, sigma, condition), sigma, sigma_next)
    step_size = sigma - sigma_next if kl_scale == "flow_grpo" else None
    kl = losses.kl_penalty(policy.mean, reference.mean, policy.std, step_size=step_size).mean()
    assert kl.item() > 1e-5
    assert stats.kl_penalty == pytest.approx(kl.item(), rel=1e-4)
    gradients = torch.autograd.grad(beta * kl, parameters)
    _assert_gradients_close(applied, gradients, rtol=1e-4, atol=1e-8)
