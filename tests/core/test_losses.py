"""Defining properties of the clipped GRPO loss and the KL penalty (docs/algorithm.md section 6)."""

import torch

from sfgrpo_core.algorithm import losses


def test_on_policy_loss_is_minus_mean_advantage_and_gradient_is_advantage():
    log_prob = torch.randn(3, 4, requires_grad=True)
    advantages = torch.randn(3, 4)
    result = losses.grpo_loss(log_prob, log_prob.detach(), advantages, clip_range=1e-4)
    torch.testing.assert_close(result.loss, -advantages.mean())
    result.loss.backward()
    torch.testing.assert_close(log_prob.grad, -advantages / 12)
    assert result.ratio_mean == 1.0 and result.clip_fraction == 0.0 and result.approx_kl == 0.0


def test_zero_gradient_outside_the_clip_region():
    old = torch.zeros(4)
    # ratio 1.5 with A > 0 and ratio 0.5 with A < 0: clipped branch is the max, gradient is 0.
    log_prob = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5])).requires_grad_(True)
    advantages = torch.tensor([1.0, -1.0, -1.0, 1.0])
    result = losses.grpo_loss(log_prob, old, advantages, clip_range=0.2)
    result.loss.backward()
    assert log_prob.grad[0] == 0 and log_prob.grad[1] == 0
    # The pessimistic side keeps its gradient (ratio 1.5 with A < 0, ratio 0.5 with A > 0).
    assert log_prob.grad[2] != 0 and log_prob.grad[3] != 0
    assert result.clip_fraction == 1.0


def test_masked_and_missing_entries_contribute_nothing():
    log_prob = torch.randn(2, 3, requires_grad=True)
    advantages = torch.randn(2, 3)
    advantages[0, 1] = float("nan")
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False
    result = losses.grpo_loss(log_prob, log_prob.detach() + 0.01, advantages, clip_range=1.0, mask=mask)
    result.loss.backward()
    assert log_prob.grad[0, 1] == 0 and log_prob.grad[1, 2] == 0
    assert result.active == 4 and torch.isfinite(result.loss)
    keep = torch.isfinite(advantages) & mask
    expected = (-advantages[keep] * torch.exp(torch.tensor(-0.01))).mean()
    torch.testing.assert_close(result.loss, expected)


def test_no_active_entries_gives_zero_loss_with_graph():
    log_prob = torch.randn(3, requires_grad=True)
    result = losses.grpo_loss(log_prob, log_prob.detach(), torch.ones(3), clip_range=0.1,
                              mask=torch.zeros(3, dtype=torch.bool))
    assert result.loss.item() == 0.0 and result.active == 0
    result.loss.backward()
    assert (log_prob.grad == 0).all()


def test_kl_penalty_matches_closed_form_and_masks_deterministic_steps():
    mean = torch.randn(3, 2, 2, requires_grad=True)
    ref = torch.randn(3, 2, 2)
    std = torch.tensor([0.5, 0.1, 0.0])
    kl = losses.kl_penalty(mean, ref, std)
    expected = ((mean - ref) ** 2).flatten(1).mean(1) / (2 * std**2)
    torch.testing.assert_close(kl[:2], expected[:2])
    assert kl[2] == 0
    # Equals KL(N(mean, std) || N(ref, std)) per element.
    p = torch.distributions.Normal(mean[0].detach(), 0.5)
    q = torch.distributions.Normal(ref[0], 0.5)
    torch.testing.assert_close(kl[0].detach(), torch.distributions.kl_divergence(p, q).mean())
