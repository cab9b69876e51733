"""The clipped GRPO policy loss and the KL penalty to the reference policy (docs/algorithm.md section 6)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .broadcast import expand_like
from .sde import trainable_mask


@dataclass(frozen=True)
class GRPOLoss:
    """The loss to minimize and detached diagnostics over the active (member, step) entries.

    Attributes:
        loss: scalar; mean of max(-A r, -A clip(r)) over active entries (0, with a graph, when none is active).
        ratio_mean: mean importance ratio r = exp(logp - logp_old); 1 on-policy.
        clip_fraction: fraction of active entries whose ratio lies outside [1 - clip, 1 + clip].
        approx_kl: mean of (logp_old - logp)^2 / 2, the usual low-variance estimate of KL(old || new).
        active: number of entries that contributed.
    """

    loss: torch.Tensor
    ratio_mean: float
    clip_fraction: float
    approx_kl: float
    active: int


def grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: float,
    mask: torch.Tensor | None = None,
) -> GRPOLoss:
    """PPO-style clipped surrogate, averaged over active entries.

    Args:
        log_prob: [...] log-probabilities under the current policy (carries gradient).
        old_log_prob: same shape, recorded at rollout (constant).
        advantages: same shape (constant). Entries that are not finite are treated as masked.
        clip_range: eps; ratios are clipped to [1 - eps, 1 + eps] (1e-4 with per-element-mean log-probs).
        mask: optional bool, same shape; False entries contribute nothing, not even to the mean's denominator.
    """
    if not (log_prob.shape == old_log_prob.shape == advantages.shape):
        raise ValueError(
            f"log_prob {tuple(log_prob.shape)}, old_log_prob {tuple(old_log_prob.shape)} and advantages "
            f"{tuple(advantages.shape)} must have the same shape"
        )
    active = torch.isfinite(advantages.detach())
    if mask is not None:
        active &= mask.bool()
    advantages = torch.where(active, advantages.detach().float(), torch.zeros_like(advantages, dtype=torch.float32))
    log_ratio = torch.where(active, log_prob.float() - old_log_prob.detach().float(), torch.zeros_like(advantages))
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    count = int(active.sum())
    loss = (torch.maximum(unclipped, clipped) * active).sum() / max(count, 1)
    with torch.no_grad():
        ratio_active = ratio[active]
        outside = ((ratio_active - 1.0).abs() > clip_range).float()
        return GRPOLoss(
            loss=loss,
            ratio_mean=float(ratio_active.mean()) if count else 1.0,
            clip_fraction=float(outside.mean()) if count else 0.0,
            approx_kl=float((0.5 * log_ratio[active] ** 2).mean()) if count else 0.0,
            active=count,
        )


def kl_penalty(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor,
               step_size: torch.Tensor | None = None) -> torch.Tensor:
    """KL between the policy's Gaussian step and the reference policy's with the same std:
    |mean - ref_mean|^2 / (2 std^2), averaged over the non-batch elements.

    Args:
        mean: [B, ...] policy mean (carries gradient).
        ref_mean: [B, ...] mean under the reference policy (the adapter switched off; constant).
        std: [B] step std; entries below ``sde.MIN_TRAINABLE_STD`` give 0.
        step_size: optional [B] h = t - s: flow_grpo's scale, |mean - ref_mean|^2 / (2 std^2 / h) (its train_sd3.py
            divides by std_dev_t^2, the step variance without h), i.e. the KL times h.

    Returns:
        [B] float32.
    """
    trainable = trainable_mask(std)
    safe_std = expand_like(torch.where(trainable, std.float(), torch.ones_like(std, dtype=torch.float32)), mean)
    kl = ((mean.float() - ref_mean.detach().float()) ** 2 / (2 * safe_std**2)).flatten(1).mean(dim=1)
    if step_size is not None:
        kl = kl * step_size.float()
    return torch.where(trainable, kl, torch.zeros_like(kl))
