"""Rollouts: the recorded trajectory, which transitions train (the active mask), and member independence."""

from collections.abc import Mapping
from types import MappingProxyType

import pytest
import torch
from torch import nn

from sfgrpo_core.algorithm.schedule import flow_sigmas
from sfgrpo_core.algorithm.sde import get_step_function
from sfgrpo_core.config import Config
from sfgrpo_core.models.condition import select
from sfgrpo_core.models.toy import ToyVelocityNet, ToyWorld
from sfgrpo_core.training import trainer
from sfgrpo_core.training.rollout import PromptBatch, make_prompt_batch, rollout

PROMPTS = ["mode 0", "mode 3", "mode 5"]
GROUP_SIZE, STEPS = 4, 6


def toy_world(seed: int = 0) -> ToyWorld:
    """A randomly initialised toy world (no pretraining): a real conditioned MLP VelocityModel, built at once."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ToyWorld(ToyVelocityNet(hidden=16).requires_grad_(False))


class ElementwiseModel:
    """v = w x + sigma x^2 / 4 + c(prompt): every output row depends on its own row alone, through elementwise
    products and sums only, so it is bit-identical whatever else shares the batch (a matmul is not)."""

    default_lora_targets: tuple[str, ...] = ()
    fused_lora_parts: Mapping[str, tuple[int, ...]] = MappingProxyType({})
    sample_shape: tuple[int, ...] = (2,)
    default_prompts: tuple[str, ...] = tuple(PROMPTS)
    default_eval_prompts: tuple[str, ...] = tuple(PROMPTS)

    def __init__(self):
        self.module = nn.Module()
        self.weight = torch.tensor([0.5, -0.8])

    def velocity(self, x, sigma, condition):
        return self.weight * x + 0.25 * sigma[:, None] * x * x + condition

    def encode_prompts(self, prompts):
        return torch.tensor([[0.1 * int(prompt.split()[-1]), -0.2] for prompt in prompts])

    def decode(self, x):
        return x


def _batch(model, initial_noise=None):
    return make_prompt_batch(model, PROMPTS, GROUP_SIZE, seed=0, iteration=0, initial_noise=initial_noise)


def _rollout(model, sde="flow_grpo", batch=None, **options):
    batch = batch if batch is not None else _batch(model)
    return rollout(model, batch, flow_sigmas(STEPS), get_step_function(sde, 0.7), **options)


def _sub_batch(batch: PromptBatch, rows: list[int]) -> PromptBatch:
    index = torch.tensor(rows)
    return PromptBatch(prompts=[batch.prompts[i] for i in rows], group_ids=batch.group_ids[index],
                       condition=select(batch.condition, index), initial_noise=batch.initial_noise[index],
                       member_seeds=[batch.member_seeds[i] for i in rows])


def test_ode_rollout_records_euler_steps_from_sigma_k_to_sigma_k_plus_one():
    model = toy_world()
    trajectories = _rollout(model, sde="ode")
    sigmas, states, condition = flow_sigmas(STEPS), trajectories.states, trajectories.batch.condition
    assert states.shape == (len(PROMPTS) * GROUP_SIZE, STEPS + 1, 2)
    assert torch.equal(states[:, 0], trajectories.batch.initial_noise)
    assert torch.equal(trajectories.final, states[:, STEPS])
    x = trajectories.batch.initial_noise
    for k in range(STEPS):
        x = x + (sigmas[k + 1] - sigmas[k]) * model.velocity(x, sigmas[k].expand(len(x)), condition)
        torch.testing.assert_close(states[:, k + 1], x)
    assert (trajectories.stds == 0).all() and not trajectories.active.any()


def test_last_step_trains_only_with_train_last_step():
    model = toy_world()
    trajectories = _rollout(model)
    assert (trajectories.stds[:, -1] > 1e-3).all()  # Flow-GRPO's last step is stochastic, just small
    assert trajectories.active[:, :-1].all() and not trajectories.active[:, -1].any()
    assert _rollout(model, train_last_step=True).active.all()


def test_min_train_std_drops_the_steps_below_it():
    model = toy_world()
    stds = _rollout(model).stds
    threshold = float(stds[0, 1:-1].median())
    trajectories = _rollout(model, min_train_std=threshold, train_last_step=True)
    assert torch.equal(trajectories.active, stds >= threshold)
    assert trajectories.active.any() and not trajectories.active.all()


@pytest.mark.parametrize("min_train_std,train_last_step", [(1e-4, False), (1e-4, True), (0.5, True)])
def test_the_trainer_rolls_out_with_the_configured_mask(min_train_std, train_last_step):
    """sampler.train_last_step and sampler.min_train_std reach the training rollout (trainer.collect)."""
    config = Config().replace(**{"sampler.sde": "flow_grpo", "sampler.steps": STEPS,
                                 "sampler.min_train_std": min_train_std, "sampler.train_last_step": train_last_step,
                                 "train.prompts": PROMPTS[:2], "train.group_size": 2, "train.groups_per_iteration": 2,
                                 "lora.rank": 2})
    trajectories = trainer.collect(trainer.build_session(config, model=toy_world()), 0)
    expected = trajectories.stds >= min_train_std
    expected[:, -1] &= train_last_step
    assert torch.equal(trajectories.active, expected)
    # The settings matter on this grid: the last step's std (~0.006) passes 1e-4, and 0.5 splits the other steps.
    assert bool(expected[:, -1].all()) == (train_last_step and min_train_std < 0.1)
    assert bool(expected[:, :-1].all()) == (min_train_std < 0.1) and expected.any()


@pytest.mark.parametrize("min_train_std", [1e-4, 0.0])
def test_ddim_deterministic_steps_are_masked_even_with_train_last_step(min_train_std):
    """The DDIM SDE's std is 0 at t = 1 (step 0) and at s = 0 (the last step): neither trains, whatever
    min_train_std (std 0 >= 0 must not make a step trainable)."""
    model = toy_world()
    trajectories = _rollout(model, sde="ddim", train_last_step=True, min_train_std=min_train_std)
    assert (trajectories.stds[:, 0] == 0).all() and (trajectories.stds[:, -1] == 0).all()
    assert not trajectories.active[:, 0].any() and not trajectories.active[:, -1].any()
    assert trajectories.active[:, 1:-1].all()


@pytest.mark.parametrize("sde", ["flow_grpo", "ddim"])
def test_group_members_share_the_initial_noise_not_the_step_noise(sde):
    model = toy_world()
    trajectories = _rollout(model, sde=sde)
    states = trajectories.states.reshape(len(PROMPTS), GROUP_SIZE, STEPS + 1, 2)
    stds = trajectories.stds.reshape(len(PROMPTS), GROUP_SIZE, STEPS)
    assert (states[:, :, 0] == states[:, :1, 0]).all()
    assert len(torch.unique(states[:, 0, 0], dim=0)) == len(PROMPTS)  # the groups' noises differ
    for k in range(STEPS):
        after = states[:, :, k + 1]
        if (stds[:, :, k] > 0).all():  # independent step noise: every pair of members differs from here on
            distances = torch.cdist(after, after)
            off_diagonal = ~torch.eye(GROUP_SIZE, dtype=torch.bool)
            assert (distances[:, off_diagonal] > 1e-4).all(), k
        elif k == 0:  # a deterministic first step from a shared state and condition leaves the members together
            assert (after == after[:, :1]).all()


@pytest.mark.parametrize("model_factory,exact", [(ElementwiseModel, True), (toy_world, False)],
                         ids=["elementwise-exact", "toy-mlp"])
@pytest.mark.parametrize("sde", ["flow_grpo", "ddim"])
def test_a_trajectory_does_not_depend_on_the_other_members(model_factory, exact, sde):
    """A sub-batch holding some members (their seeds, noise and condition rows, in another order and without
    their group mates) reproduces their trajectories."""
    model = model_factory()
    batch = _batch(model, initial_noise=torch.randn(len(PROMPTS) * GROUP_SIZE, 2,
                                                    generator=torch.Generator().manual_seed(2)))
    full = _rollout(model, sde=sde, batch=batch)
    rows = [9, 1, 6, 2]
    part = _rollout(model, sde=sde, batch=_sub_batch(batch, rows))
    if exact:
        assert torch.equal(part.states, full.states[rows])
    else:  # a matmul's rounding depends on the batch; a shared-noise bug would move states by ~0.1
        torch.testing.assert_close(part.states, full.states[rows], rtol=0, atol=1e-5)
    torch.testing.assert_close(part.log_probs, full.log_probs[rows], rtol=0, atol=1e-4)
    assert torch.equal(part.active, full.active[rows])


@pytest.mark.parametrize("chunk_size", [1, 5, 12, 100])
@pytest.mark.parametrize("sde", ["ddim", "flow_grpo"])
def test_a_chunked_rollout_is_the_whole_batchs_rollout(chunk_size, sde):
    """Members run chunk_size at a time, with their own noise: every recorded tensor is the one-batch rollout's
    (bit for bit with a row-independent model), and the progress callback follows the first chunk."""
    model = ElementwiseModel()
    whole = _rollout(model, sde=sde)
    seen = []
    chunked = _rollout(model, sde=sde, chunk_size=chunk_size, callback=lambda k, steps, x, x0: seen.append(len(x)))
    for name in ("states", "velocities", "log_probs", "stds", "active"):
        assert torch.equal(getattr(chunked, name), getattr(whole, name)), name
    assert seen == [min(chunk_size, len(PROMPTS) * GROUP_SIZE)] * STEPS
