"""Gains and group-relative advantages (docs/algorithm.md section 5): the advantage math of both credit methods.

Index convention (see ``sfgrpo_core.algorithm``): rewards[:, k] is r_k, the reward of the clean completion of step
k's state (state 0 is the initial noise x_1, state T the final sample). Transition k goes from state k to state
k + 1, and its gain is g_k = r_{k+1} - r_k.
Missing values (a reward that failed on an image) are NaN and stay NaN: they are left out of every statistic, and
the trainer masks them out of the loss; they are never replaced by 0.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

StdScope = Literal["group", "global"]


def stepwise_gains(rewards: torch.Tensor) -> torch.Tensor:
    """Per-transition gains g_k = r_{k+1} - r_k.

    Args:
        rewards: [N, T + 1] rewards r_0 (initial noise) ... r_T (final sample).

    Returns:
        [N, T] float32; sum over k is r_T - r_0 (telescoping). NaN where either end is missing.
    """
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [N, T + 1] with T >= 1, got shape {tuple(rewards.shape)}")
    rewards = rewards.float()
    return rewards[:, 1:] - rewards[:, :-1]


def _check_groups(values: torch.Tensor, group_ids: torch.Tensor) -> None:
    if group_ids.shape != (values.shape[0],):
        raise ValueError(f"group_ids must be [N]={values.shape[0]}, got shape {tuple(group_ids.shape)}")


def joint_advantages(
    gains: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    std_scope: StdScope = "group",
    eps: float = 1e-4,
    clip: float = 5.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stepwise-Flow-GRPO advantages: A = (g - mean) / (std + eps), mean and std over ALL (member, step) pairs
    of a group jointly (not per step), clipped to +-clip.

    Args:
        gains: [N, T] gains (NaN = missing).
        group_ids: [N] integer group of each trajectory (members of a group share prompt and initial noise).
        std_scope: "group" divides by the group's std; "global" (ours, like flow_grpo's global_std) by the std of
            all included gains of the batch.
        eps: added to the std.
        clip: advantages are clamped to [-clip, clip].
        mask: optional [N, T] bool; False entries (deterministic steps) are left out of the statistics.

    Returns:
        [N, T] float32 advantages; NaN where the gain is missing or masked. A group whose included gains are all
        equal gets advantage exactly 0 (never NaN, never eps-amplified rounding noise).
    """
    _check_groups(gains, group_ids)
    if std_scope not in ("group", "global"):
        raise ValueError(f"std_scope must be 'group' or 'global', got {std_scope!r}")
    gains = gains.float()
    include = torch.isfinite(gains)
    if mask is not None:
        include &= mask.bool().to(include.device)
    advantages = torch.full_like(gains, float("nan"))
    included = gains[include]
    global_std = included.std(correction=0) if included.numel() else torch.tensor(0.0)
    for group in torch.unique(group_ids):
        rows = group_ids == group
        values = gains[rows][include[rows]]
        if values.numel() == 0:
            continue
        scale = values.std(correction=0) if std_scope == "group" else global_std
        normalized = ((gains[rows] - values.mean()) / (scale + eps)).clamp(-clip, clip)
        if values.max() == values.min():
            normalized = torch.zeros_like(normalized)
        advantages[rows] = torch.where(include[rows], normalized, torch.full_like(normalized, float("nan")))
    return advantages


def per_step_advantages(gains: torch.Tensor, group_ids: torch.Tensor, *, mask: torch.Tensor | None = None,
                        **normalization: Any) -> torch.Tensor:
    """Ablation: normalize each step's gains on their own within the group (the paper shows joint is better).

    Same arguments (``std_scope``, ``eps``, ``clip`` as keywords) and return as ``joint_advantages``.
    """
    columns = [
        joint_advantages(gains[:, k : k + 1], group_ids, mask=None if mask is None else mask[:, k : k + 1],
                         **normalization)
        for k in range(gains.shape[1])
    ]
    return torch.cat(columns, dim=1)


def flow_grpo_advantages(final_rewards: torch.Tensor, group_ids: torch.Tensor, **normalization: Any) -> torch.Tensor:
    """Flow-GRPO's advantage A^i = (R^i - group mean) / (std + eps) of the final reward.

    Args:
        final_rewards: [N] (NaN = missing).
        normalization: ``std_scope``, ``eps``, ``clip`` as in ``joint_advantages``.

    Returns:
        [N] float32 (NaN where the reward is missing); the caller broadcasts it over the steps.
    """
    if final_rewards.ndim != 1:
        raise ValueError(f"final_rewards must be [N], got shape {tuple(final_rewards.shape)}")
    return joint_advantages(final_rewards[:, None], group_ids, **normalization)[:, 0]


def zero_variance_fraction(values: torch.Tensor, group_ids: torch.Tensor) -> float:
    """Fraction of groups whose finite ``values`` ([N] or [N, K]) are all equal: they teach nothing."""
    _check_groups(values, group_ids)
    groups = torch.unique(group_ids)
    flat = values.float().reshape(values.shape[0], -1)
    constant = 0
    for group in groups:
        finite = flat[group_ids == group]
        finite = finite[torch.isfinite(finite)]
        constant += int(finite.numel() == 0 or bool(finite.max() == finite.min()))
    return constant / max(len(groups), 1)
