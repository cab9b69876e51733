"""Defining properties of gains and advantages (docs/algorithm.md section 5)."""

import pytest
import torch

from sfgrpo_core.algorithm import advantages as credit


def _rewards(n=6, steps=5, seed=0):
    return torch.rand(n, steps + 1, generator=torch.Generator().manual_seed(seed))


def test_gains_align_with_transitions_and_telescope():
    rewards = _rewards()
    gains = credit.stepwise_gains(rewards)
    assert gains.shape == (6, 5)
    torch.testing.assert_close(gains[:, 2], rewards[:, 3] - rewards[:, 2])
    torch.testing.assert_close(gains.sum(1), rewards[:, -1] - rewards[:, 0])


def test_joint_normalization_has_zero_mean_unit_std_per_group():
    gains = credit.stepwise_gains(_rewards(n=8))
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    advantages = credit.joint_advantages(gains, groups, eps=0.0, clip=100.0)
    for group in (0, 1):
        values = advantages[groups == group]
        torch.testing.assert_close(values.mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
        torch.testing.assert_close(values.std(correction=0), torch.tensor(1.0))
    # Joint, not per step: a single step's column need not be centred.
    assert advantages[groups == 0][:, 0].mean().abs() > 1e-3


def test_per_step_normalization_centres_every_column():
    gains = credit.stepwise_gains(_rewards(n=8))
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    advantages = credit.per_step_advantages(gains, groups, eps=0.0, clip=100.0)
    torch.testing.assert_close(advantages[:4].mean(0), torch.zeros(5), atol=1e-6, rtol=0)


def test_zero_variance_group_gives_zero_never_nan():
    gains = torch.cat([torch.full((3, 4), 0.1), torch.rand(3, 4)])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    for scope in ("group", "global"):
        advantages = credit.joint_advantages(gains, groups, std_scope=scope)
        assert (advantages[:3] == 0).all()
        assert torch.isfinite(advantages).all()
    assert credit.zero_variance_fraction(gains, groups) == 0.5
    final = torch.tensor([0.3, 0.3, 0.3, 0.1, 0.5, 0.9])
    flow = credit.flow_grpo_advantages(final, groups)
    assert (flow[:3] == 0).all() and torch.isfinite(flow).all()


def test_missing_rewards_stay_missing_and_are_left_out_of_statistics():
    rewards = _rewards(n=4, steps=3)
    rewards[1, 2] = float("nan")
    gains = credit.stepwise_gains(rewards)
    assert torch.isnan(gains[1, 1]) and torch.isnan(gains[1, 2]) and torch.isfinite(gains[1, 0])
    groups = torch.zeros(4, dtype=torch.long)
    advantages = credit.joint_advantages(gains, groups, eps=0.0, clip=100.0)
    assert torch.isnan(advantages[1, 1:]).all()
    finite = advantages[torch.isfinite(advantages)]
    assert finite.numel() == 10
    torch.testing.assert_close(finite.mean(), torch.tensor(0.0), atol=1e-6, rtol=0)


def test_masked_steps_are_left_out():
    gains = torch.rand(4, 3, generator=torch.Generator().manual_seed(3))
    gains[:, 0] = 100.0  # a deterministic step shared by the whole group
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[:, 0] = False
    groups = torch.zeros(4, dtype=torch.long)
    advantages = credit.joint_advantages(gains, groups, mask=mask, eps=0.0)
    assert torch.isnan(advantages[:, 0]).all()
    torch.testing.assert_close(advantages[:, 1:].mean(), torch.tensor(0.0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("std_scope", ["group", "global"])
@pytest.mark.parametrize("normalize", [credit.joint_advantages, credit.per_step_advantages])
def test_changing_a_masked_gain_changes_no_advantage(normalize, std_scope):
    """Masked gains stay out of every statistic (mean, group std, batch std): any value there gives the same
    advantages, and they stay NaN."""
    generator = torch.Generator().manual_seed(4)
    gains = torch.rand(6, 4, generator=generator)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    mask = torch.rand(6, 4, generator=generator) > 0.3
    mask[:, 0] = False  # a deterministic first step (the DDIM SDE at t = 1)
    before = normalize(gains, groups, std_scope=std_scope, mask=mask, eps=0.0, clip=100.0)
    changed = gains.clone()
    changed[~mask] = 1000.0 * torch.randn(int((~mask).sum()), generator=generator)
    after = normalize(changed, groups, std_scope=std_scope, mask=mask, eps=0.0, clip=100.0)
    torch.testing.assert_close(after, before, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(before[~mask]).all() and torch.isfinite(before[mask]).all()


def test_global_scope_divides_by_batch_std_and_clip_applies():
    gains = torch.tensor([[0.0], [1.0], [10.0], [30.0]])
    groups = torch.tensor([0, 0, 1, 1])
    advantages = credit.joint_advantages(gains, groups, std_scope="global", eps=0.0)
    batch_std = gains.std(correction=0)
    torch.testing.assert_close(advantages[:, 0], torch.tensor([-0.5, 0.5, -10.0, 10.0]) / batch_std)
    clipped = credit.flow_grpo_advantages(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]),
                                          torch.zeros(8, dtype=torch.long), clip=2.0)
    assert clipped.max() == 2.0


def test_flow_grpo_advantage_is_group_relative_final_reward():
    final = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    advantages = credit.flow_grpo_advantages(final, groups, eps=0.0)
    torch.testing.assert_close(advantages[:3], advantages[3:])
    torch.testing.assert_close(advantages[:3], (final[:3] - 2.0) / final[:3].std(correction=0))
