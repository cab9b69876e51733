"""Run folders for front ends that number their runs (the ComfyUI node), and what a finished run reports."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from .checkpoint import latest_checkpoint

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def run_folder(root: Path, run_name: str, resume: bool) -> Path:
    """``root/<run_name>_NNNNN``: the next free number for a new run, the newest one holding a checkpoint to resume.

    Raises:
        ValueError: naming run_name (not a plain folder name) or resume (nothing to resume).
    """
    if not RUN_NAME.match(run_name) or ".." in run_name:
        raise ValueError(f"run_name: {run_name!r} is not a plain folder name; use letters, digits, '_', '-' and '.'")
    candidates = root.glob(f"{run_name}_*") if root.is_dir() else []
    numbered = sorted((int(match.group(1)), path) for path in candidates
                      if (match := re.fullmatch(re.escape(run_name) + r"_(\d{5})", path.name)))
    if resume:
        resumable = [path for _, path in numbered if latest_checkpoint(path) is not None]
        if not resumable:
            raise ValueError(f"resume: there is no run named {run_name!r} with a checkpoint in {root}; turn resume "
                             "off to start a new run, or give the run_name of the run to continue")
        return resumable[-1]
    number = numbered[-1][0] + 1 if numbered else 1
    return root / f"{run_name}_{number:05d}"


def loss_map(records: list[dict[str, Any]]) -> dict[str, list[float]]:
    """LOSS_MAP for the stock loss graph ("loss") plus the other per-iteration series."""
    keys = ("loss", "reward_mean", "approx_kl", "clip_fraction", "zero_std_ratio")
    series = {key: [float(r[key]) for r in records if key in r and "loss" in r] for key in keys}
    series["eval_reward_mean"] = [float(r["eval_reward_mean"]) for r in records if "eval_reward_mean" in r]
    for name in _component_names(records):  # a weighted mix: each component's mean, "reward/<name>"
        series[f"reward/{name}"] = [_float(r["reward_components"].get(name)) for r in records
                                    if "loss" in r and "reward_components" in r]
    return series


def _component_names(records: list[dict[str, Any]]) -> list[str]:
    return sorted({name for r in records for name in r.get("reward_components", {})})


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


def summary(records: list[dict[str, Any]], run_dir: Path, lora_name: str) -> str:
    """A few lines for the user: where the run and its LoRA are, train and held-out reward first -> last."""
    rewards = [r["reward_mean"] for r in records if "reward_mean" in r]
    evals = [r["eval_reward_mean"] for r in records if "eval_reward_mean" in r]
    lines = [f"run folder: {run_dir}", f"LoRA: {lora_name} (Load LoRA lists it)"]
    if rewards:
        lines.append(f"train reward: {_fmt(rewards[0])} -> {_fmt(rewards[-1])} over {len(rewards)} iterations")
    if evals:
        lines.append(f"held-out reward: {_fmt(evals[0])} -> {_fmt(evals[-1])}")
    mixed = [r["reward_components"] for r in records if "reward_components" in r]
    for name in _component_names(records):
        lines.append(f"  {name}: {_fmt(mixed[0].get(name))} -> {_fmt(mixed[-1].get(name))}")
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return "missing" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"
