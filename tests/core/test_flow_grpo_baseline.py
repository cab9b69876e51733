"""The settings that make the `flow_grpo` method Flow-GRPO as published (independent initial noise, flow_grpo's KL
scale, zero-advantage samples dropped), and the config's refusal of non-finite numbers."""

import math

import pytest
import torch

from sfgrpo_core.algorithm import losses
from sfgrpo_core.config import Config, ConfigError
from sfgrpo_core.rewards import load as load_reward
from sfgrpo_core.training import trainer
from sfgrpo_core.training.rollout import Rollout
from sfgrpo_core.training.step_rewards import BatchSizes, step_rewards
from sfgrpo_core.training.update import trainable_transitions


def _rollout(toy_config, **changes) -> tuple[trainer.Session, Rollout]:
    session = trainer.build_session(toy_config.replace(**changes))
    return session, trainer.collect(session, 0)


def _group_rows(trajectories: Rollout, group: int) -> torch.Tensor:
    return trajectories.states[trajectories.batch.group_ids == group, 0]


def test_initial_noise_defaults_by_method():
    assert Config().replace(**{"credit.method": "stepwise"}).initial_noise == "shared"
    assert Config().replace(**{"credit.method": "flow_grpo"}).initial_noise == "independent"
    pinned = Config().replace(**{"credit.method": "flow_grpo", "train.initial_noise": "shared"})
    assert pinned.initial_noise == "shared"


def test_flow_grpo_members_get_their_own_initial_noise_reproducibly(toy_config):
    _, shared = _rollout(toy_config, **{"credit.method": "stepwise"})
    assert (_group_rows(shared, 0) == _group_rows(shared, 0)[:1]).all()
    _, independent = _rollout(toy_config, **{"credit.method": "flow_grpo"})
    rows = _group_rows(independent, 0)
    assert all(not torch.equal(rows[i], rows[j]) for i in range(len(rows)) for j in range(i))
    _, again = _rollout(toy_config, **{"credit.method": "flow_grpo"})
    assert torch.equal(again.states, independent.states)  # seeded by (seed, iteration, group, member)


def test_step_rewards_score_each_members_own_noise_when_it_is_not_shared(toy_config):
    session, trajectories = _rollout(toy_config, **{"train.initial_noise": "independent"})
    calls = []

    def reward(images, prompts, metadata=None):
        calls.append(len(prompts))
        return load_reward("toy_mode")(images, prompts)

    result = step_rewards(session.model, trajectories, reward, substeps=2, batch_sizes=BatchSizes(7, 7))
    rewards = result.scores.values
    count, steps = trajectories.log_probs.shape
    assert sum(calls) == result.images == count * (steps + 1)
    # r_0 of two members of one group differ (each completes its own x_1), and none is missing.
    first_group = trajectories.batch.group_ids == 0
    assert torch.isfinite(rewards).all() and rewards[first_group, 0].unique().numel() > 1


def test_flow_grpo_kl_scale_is_the_step_variance_kl_times_h():
    generator = torch.Generator().manual_seed(0)
    mean, ref_mean = torch.randn(3, 4, 5, generator=generator), torch.randn(3, 4, 5, generator=generator)
    std, h = torch.tensor([0.1, 0.2, 0.05]), torch.tensor([0.04, 0.05, 0.18])
    step_variance = losses.kl_penalty(mean, ref_mean, std)
    torch.testing.assert_close(losses.kl_penalty(mean, ref_mean, std, step_size=h), step_variance * h)
    by_hand = ((mean - ref_mean) ** 2).flatten(1).mean(1) / (2 * (std**2 / h))
    torch.testing.assert_close(losses.kl_penalty(mean, ref_mean, std, step_size=h), by_hand)


def test_zero_advantage_transitions_can_be_left_out_of_the_loss(toy_config):
    _, trajectories = _rollout(toy_config)
    advantages = torch.randn(trajectories.log_probs.shape, generator=torch.Generator().manual_seed(1))
    advantages[trajectories.batch.group_ids == 1] = 0.0  # a zero-variance group
    kept = trainable_transitions(trajectories.active, advantages)
    dropped = trainable_transitions(trajectories.active, advantages, skip_zero_advantage=True)
    zero_rows = int((trajectories.active & (advantages == 0)).sum())
    assert zero_rows > 0 and len(dropped[0]) == len(kept[0]) - zero_rows
    assert (advantages[dropped] != 0).all()


@pytest.mark.parametrize("field", ["optim.lr", "sampler.eta", "sampler.noise_level", "optim.kl_beta",
                                   "credit.advantage_clip", "lora.alpha"])
@pytest.mark.parametrize("value", [math.nan, math.inf, "nan"])
def test_non_finite_numbers_are_refused_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"^{field}: must be a finite number"):
        Config().replace(**{field: value})


def test_the_shipped_flow_grpo_recipe_is_flow_grpo_as_published():
    from sfgrpo_core.config import load_config

    config = load_config("configs/miniworld_flow_grpo.yaml")
    stepwise = load_config("configs/miniworld.yaml")
    assert (config.sampler.sde, config.sampler.noise_level, config.initial_noise) == ("flow_grpo", 0.7, "independent")
    assert (config.optim.clip_range, config.optim.kl_scale, config.optim.skip_zero_advantage) == (1e-4, "flow_grpo",
                                                                                                  True)
    assert config.credit.std_scope == "global" and not config.sampler.train_last_step
    # The same budget as the Stepwise recipe, so the two runs compare methods only.
    for section, name in (("train", "group_size"), ("train", "groups_per_iteration"), ("train", "iterations"),
                          ("optim", "lr"), ("lora", "rank"), ("sampler", "steps"), ("train", "eval_samples")):
        assert getattr(getattr(config, section), name) == getattr(getattr(stepwise, section), name), name
