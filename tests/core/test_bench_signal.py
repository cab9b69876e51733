"""sfgrpo bench signal's statistics: a perfect value estimate (martingale rewards) against noisy estimates."""

import math

import pytest
import torch

from sfgrpo_core.bench.signal import step_signal

GROUPS, GROUP_SIZE = 64, 32


def _groups() -> torch.Tensor:
    return torch.arange(GROUPS).repeat_interleave(GROUP_SIZE)


def test_martingale_rewards_give_shares_that_sum_to_one_and_uncorrelated_gains():
    """r_k the expected final reward given x_k: independent increments, each step's share its own variance's."""
    generator = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.0, 1.0, 2.0, 0.5, 0.0])  # the first step is shared within a group, the last is not random
    count = GROUPS * GROUP_SIZE
    start = torch.randn(GROUPS, generator=generator).repeat_interleave(GROUP_SIZE)[:, None]  # r_0: one per group
    increments = torch.randn(count, len(scales), generator=generator) * scales
    rewards = torch.cat([start, start + increments.cumsum(dim=1)], dim=1)
    result = step_signal(rewards, _groups(), torch.ones(count, len(scales), dtype=torch.bool))
    expected = scales**2 / (scales**2).sum()
    shares = torch.tensor([step["share"] for step in result["steps"]], dtype=torch.float64)
    torch.testing.assert_close(shares, expected.double(), atol=0.03, rtol=0)
    assert result["share_sum"] == pytest.approx(1.0, abs=0.05)
    assert abs(result["adjacent_gain_corr"]) < 0.05
    for step, share in zip(result["steps"], expected.tolist(), strict=True):
        if share > 0:  # Flow-GRPO's credit lines up with a step's gain as much as the step decides the outcome
            assert step["corr_with_final"] == pytest.approx(math.sqrt(share), abs=0.03)
        else:
            assert step["zero_gain_fraction"] == 1.0
    assert result["zero_variance_groups"] == 0 and result["trajectories"] == count
    # the rewards are the values themselves: Stepwise's gains are the true gains, Flow-GRPO's credit is not
    with_values = step_signal(rewards, _groups(), torch.ones(count, len(scales), dtype=torch.bool), values=rewards)
    for step, share in zip(with_values["steps"], expected.tolist(), strict=True):
        if share > 0:
            assert step["stepwise_alignment"] == pytest.approx(1.0)
            assert step["flow_grpo_alignment"] == pytest.approx(step["corr_with_final"])
            assert step["true_gain_share"] == pytest.approx(step["share"])


def test_noisy_estimates_inflate_the_shares_and_anticorrelate_consecutive_gains():
    """r_k = the final reward plus the estimate's own noise: gains go up and down, as they cannot for a value."""
    generator = torch.Generator().manual_seed(1)
    count, steps = GROUPS * GROUP_SIZE, 6
    final = torch.randn(count, generator=generator)
    rewards = final[:, None] + 0.5 * torch.randn(count, steps + 1, generator=generator)
    rewards[:, -1] = final
    result = step_signal(rewards, _groups(), torch.ones(count, steps, dtype=torch.bool))
    assert result["share_sum"] > 2.0
    # where the first step decides the outcome (the value is the final reward from x_1 on), Flow-GRPO's credit is the
    # true gain and Stepwise's is the estimates' noise
    values = final[:, None].expand(-1, steps + 1).clone()
    values[:, 0] = 0.0
    first = step_signal(rewards, _groups(), torch.ones(count, steps, dtype=torch.bool), values=values)["steps"][0]
    assert first["flow_grpo_alignment"] == pytest.approx(1.0) and abs(first["stepwise_alignment"]) < 0.1
    assert result["adjacent_gain_corr"] == pytest.approx(-0.5, abs=0.05)  # cov(e_{k+1} - e_k, e_{k+2} - e_{k+1})
    # the estimates predict the final reward (corr 1 / sqrt(1 + 0.25)), the same at every step
    for step in result["steps"][:-1]:
        assert step["predicts_final"] == pytest.approx(1 / math.sqrt(1.25), abs=0.03)


def test_missing_rewards_drop_their_trajectory_and_flat_groups_are_counted():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0],  # group 0: the same final reward
                            [0.0, 0.0, 0.0], [0.0, 0.5, 1.0],  # group 1
                            [0.0, float("nan"), 1.0], [0.0, 0.0, 0.0]])  # group 2: one member missing
    group_ids = torch.tensor([0, 0, 1, 1, 2, 2])
    result = step_signal(rewards, group_ids, torch.ones(6, 2, dtype=torch.bool))
    assert result["trajectories"] == 5 and result["groups"] == 3
    assert result["zero_variance_groups"] == pytest.approx(2 / 3)  # group 0, and group 2's one remaining member
    assert result["steps"][0]["zero_gain_fraction"] == pytest.approx(3 / 5)


@pytest.mark.parametrize(("flag", "value"), [("--values", "-1"), ("--batches", "0"), ("--steps", "-2")])
def test_the_cli_refuses_out_of_range_counts_naming_the_flag(flag, value, capsys):
    from sfgrpo_core.cli import main

    assert main(["bench", "signal", flag, value]) == 2
    assert f"{flag}: {value} is below" in capsys.readouterr().out


def _step(k, share, stepwise, flow, trains=True):
    return {"step": k, "trains": trains, "true_gain_share": share, "stepwise_alignment": stepwise,
            "flow_grpo_alignment": flow}


def test_the_verdict_weighs_the_steps_by_the_variance_they_carry():
    from sfgrpo_core.bench.signal import verdict

    # mini_pickscore, T' = 5 (docs/results.md): better at every material step
    pays = {"steps": [_step(0, 0.0, math.nan, math.nan, trains=False), _step(1, 0.33, 0.59, 0.33),
                      _step(2, 0.35, 0.54, 0.44), _step(3, 0.29, 0.63, 0.53), _step(4, 0.15, 0.80, 0.41),
                      _step(5, 0.10, 0.86, 0.35), _step(6, 0.0, 0.1, 0.05, trains=False)]}
    assert verdict(pays).startswith("per-step credit is informative at steps 1, 2, 3, 4, 5 (100% of")
    assert verdict(pays).endswith("Stepwise is likely to pay")
    # the pass/fail MiniGenEval (docs/results.md): no better where the variance is
    hard = {"steps": [_step(1, 0.10, -0.09, 0.11), _step(2, 0.19, 0.12, 0.04), _step(3, 0.18, 0.26, 0.22),
                      _step(4, 0.21, 0.27, 0.35), _step(5, 0.62, 0.51, 0.74)]}
    assert verdict(hard).endswith("Flow-GRPO is the better pick here") and "better at 2" in verdict(hard)
    # better where most variance is, worse elsewhere: a hint to raise T'
    mixed = {"steps": [_step(1, 0.2, 0.1, 0.3), _step(2, 0.8, 0.8, 0.4)]}
    assert "worse than the final reward at steps 1" in verdict(mixed) and "try more substeps" in verdict(mixed)
    assert verdict({"steps": [{"step": 1, "trains": True, "share": 0.5}]}).startswith("no verdict")


def test_the_figure_draws_the_measurement():
    from sfgrpo_core.bench.signal import signal_figure

    result = {"steps": [_step(1, 0.4, 0.6, 0.3), _step(2, 0.6, 0.7, 0.5)]}
    pixels = signal_figure(result, size=(500, 300))
    assert pixels.shape == (300, 500, 3) and pixels.dtype.name == "uint8" and pixels.std() > 10
