"""Figures as RGB arrays, for ComfyUI IMAGE outputs, PNG files and reports: matplotlib (Agg) and PIL, no ComfyUI.

Figures are drawn on a ``matplotlib.figure.Figure`` with its own Agg canvas rather than through pyplot: pyplot keeps
global state (the current figure, the backend) that a ComfyUI process shares with every other node pack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

STEP_FIGURE_SIZE = (640, 400)  # (width, height) in pixels of ``step_reward_figure``
REWARD_CURVE_SIZE = (600, 360)  # (width, height) in pixels of ``reward_curve_figure``
MESSAGE_SIZE = (320, 64)  # (width, height) in pixels of ``message_image``
_DPI = 100
_GAIN_UP, _GAIN_DOWN, _GAIN_FLAT = "tab:green", "tab:red", "tab:gray"
_MAX_LEGEND_ENTRIES = 8


def step_reward_figure(step_rewards: Any, sigmas: Any, title: str = "reward of each step's clean estimate",
                       ) -> np.ndarray:
    """The paper's Figure 1 view of trajectories: reward r_k of step k's clean estimate against t = sigma_k.

    Top panel: one line per trajectory, t running from 1 (noise) on the left to 0 (clean) on the right, i.e. in
    denoising order; each step's gain r_{k+1} - r_k is marked at the point it leads to (green up triangle for a
    gain, red down triangle for a loss, grey dot for none). Bottom panel: the mean gain of each step over the
    trajectories, as bars. Missing rewards (NaN) are left out: a missing point breaks no line (the finite points are
    joined), but a gain needs both of its ends, so the gains next to a missing point are not drawn.

    Args:
        step_rewards: [N, K] rewards of N trajectories at K steps (or [K] for one trajectory); NaN = missing.
        sigmas: [K] noise level t of each step in [0, 1] (the final sample, if included, has t = 0).
        title: the figure's title.

    Returns:
        uint8 [H, W, 3] RGB image, (W, H) = ``STEP_FIGURE_SIZE``.

    Raises:
        ValueError: when the shapes of ``step_rewards`` and ``sigmas`` disagree.
    """
    rewards = np.asarray(step_rewards, dtype=np.float64)
    t = np.asarray(sigmas, dtype=np.float64).reshape(-1)
    if rewards.ndim == 1:
        rewards = rewards[None]
    if rewards.ndim != 2 or rewards.shape[1] != t.shape[0]:
        raise ValueError(f"sigmas: {t.shape[0]} noise levels for step rewards of shape {rewards.shape}; give one "
                         f"sigma per step (step_rewards [N, K], sigmas [K])")
    rewards = np.where(np.isfinite(rewards), rewards, np.nan)
    gains = rewards[:, 1:] - rewards[:, :-1]  # NaN where either end is missing

    figure, canvas = new_figure(STEP_FIGURE_SIZE)
    curves, bars = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    colors = [f"C{i % 10}" for i in range(rewards.shape[0])]
    for index, (row, color) in enumerate(zip(rewards, colors, strict=True)):
        finite = np.isfinite(row)
        label = f"sample {index}" if index < _MAX_LEGEND_ENTRIES else None
        curves.plot(t[finite], row[finite], "-", marker=".", markersize=4, color=color, alpha=0.6, linewidth=1.2,
                    label=label)
        for gain_sign, marker, marker_color in ((1, "^", _GAIN_UP), (-1, "v", _GAIN_DOWN), (0, "o", _GAIN_FLAT)):
            ends = np.flatnonzero(np.sign(gains[index]) == gain_sign) + 1  # the step each gain leads to
            curves.scatter(t[ends], row[ends], marker=marker, color=marker_color, s=30, zorder=3)
        if finite.any():  # the first point has no gain: an open circle in the trajectory's colour
            first = np.flatnonzero(finite)[0]
            curves.scatter(t[first], row[first], marker="o", facecolors="none", edgecolors=color, s=30, zorder=3)
    curves.set_ylabel("reward r_k")
    curves.set_title(title, fontsize=10)
    curves.grid(alpha=0.3)
    if rewards.shape[0] > 0 and np.isfinite(rewards).any():
        curves.legend(loc="best", fontsize=7)
    else:
        curves.text(0.5, 0.5, "no reward could be computed", transform=curves.transAxes, ha="center", va="center")

    counted = np.isfinite(gains).sum(0)
    mean_gain = np.where(counted > 0, np.nansum(gains, 0) / np.maximum(counted, 1), np.nan)
    if t.shape[0] > 1:
        width = 0.8 * np.abs(np.diff(t))
        centres = (t[:-1] + t[1:]) / 2
        shown = np.isfinite(mean_gain)
        bars.bar(centres[shown], mean_gain[shown], width=width[shown],
                 color=[_GAIN_UP if gain >= 0 else _GAIN_DOWN for gain in mean_gain[shown]])
    bars.axhline(0.0, color="black", linewidth=0.6)
    bars.set_ylabel("mean gain", fontsize=8)
    bars.set_xlabel("t = sigma (1 = noise, 0 = clean)")
    bars.grid(alpha=0.3)
    bars.set_xlim(1.02, -0.02)  # shared: denoising runs left to right
    figure.tight_layout()
    return figure_pixels(canvas)


def reward_curve_figure(records: list[dict[str, Any]], title: str = "reward") -> np.ndarray:
    """Training reward mean (+- std, shaded) and held-out reward per iteration, from metrics records.

    Args:
        records: metrics records (``metrics.jsonl`` lines); those with "reward_mean" draw the training curve, those
            with "eval_reward_mean" the held-out one. Missing values (None / NaN) are left out.
        title: the figure's title.

    Returns:
        uint8 [H, W, 3] RGB image, (W, H) = ``REWARD_CURVE_SIZE``.
    """
    figure, canvas = new_figure(REWARD_CURVE_SIZE)
    axis = figure.subplots()
    train = [r for r in records if _finite(r.get("reward_mean"))]
    if train:
        x = np.array([r["iteration"] for r in train])
        mean = np.array([r["reward_mean"] for r in train], dtype=np.float64)
        std = np.array([r.get("reward_std") if _finite(r.get("reward_std")) else 0.0 for r in train])
        axis.plot(x, mean, label="train reward (final samples)", color="tab:blue")
        axis.fill_between(x, mean - std, mean + std, color="tab:blue", alpha=0.15)
    evaluations = [r for r in records if _finite(r.get("eval_reward_mean"))]
    if evaluations:
        axis.plot([r["iteration"] for r in evaluations], [r["eval_reward_mean"] for r in evaluations], "o-",
                  label="held-out reward (ODE)", color="tab:orange")
    axis.set_xlabel("iteration")
    axis.set_ylabel("reward")
    axis.set_title(title, fontsize=10)
    axis.grid(alpha=0.3)
    if train or evaluations:
        axis.legend(loc="best", fontsize=8)
    figure.tight_layout()
    return figure_pixels(canvas)


def save_png(rgb: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 [H, W, 3] image as a PNG, atomically."""
    import io

    from PIL import Image

    from ..atomic import atomic_write_bytes

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and bool(np.isfinite(value))


def message_image(text: str, size: tuple[int, int] = MESSAGE_SIZE) -> np.ndarray:
    """A plain image saying ``text`` (e.g. why a figure is missing): uint8 [H, W, 3], (W, H) = ``size``."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, (245, 245, 245))
    draw = ImageDraw.Draw(image)
    draw.multiline_text((8, 8), text, fill=(40, 40, 40))
    return np.asarray(image, dtype=np.uint8).copy()


def new_figure(size: tuple[int, int]):
    """A matplotlib Figure of ``size`` (width, height) pixels on an Agg canvas (no display); draw, then
    ``figure_pixels(canvas)``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(size[0] / _DPI, size[1] / _DPI), dpi=_DPI)
    return figure, FigureCanvasAgg(figure)


def figure_pixels(canvas) -> np.ndarray:
    """The canvas drawn as uint8 RGB [H, W, 3]."""
    canvas.draw()
    return np.asarray(canvas.buffer_rgba(), dtype=np.uint8)[..., :3].copy()
