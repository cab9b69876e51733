"""The pack's own ComfyUI socket types, shared by every node module.

PROMPTS carries prompt texts with their encoded conditioning (``PromptSet``); REWARD carries a loaded reward
(``LoadedReward``). Both are plain Python objects: no ComfyUI import is needed to build or read them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from comfy_api.latest import io

CATEGORY = "Stepwise-Flow-GRPO"

Prompts = io.Custom("SFGRPO_PROMPTS")
Reward = io.Custom("SFGRPO_REWARD")


@dataclass(frozen=True)
class PromptSet:
    """Training or evaluation prompts: ``texts[i]`` encoded as ``conditionings[i]`` (texts may repeat: a repeated
    prompt is drawn, and evaluated, that many times as often).

    Each conditioning is ComfyUI's CONDITIONING of one prompt: ``[[context [1, L, D], {"pooled_output": [1, P],
    ...}]]`` (the first entry is used; area / timestep-range entries are not supported for training).
    """

    texts: tuple[str, ...]
    conditionings: tuple[Any, ...]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.conditionings):
            raise ValueError(f"{len(self.texts)} prompts but {len(self.conditionings)} conditionings")


@dataclass(frozen=True)
class LoadedReward:
    """A reward from the core registry with the name and options it was built from (for the run's config)."""

    name: str
    options_json: str
    reward: Any


def require_finite(**inputs: float) -> None:
    """Raise ValueError "<input>: ..." for a NaN or infinite float input (ComfyUI's min/max checks compare with < and
    >, which NaN passes, so a NaN widget value would otherwise run and return black images)."""
    for name, value in inputs.items():
        if not math.isfinite(value):
            raise ValueError(f"{name}: must be a finite number, got {value!r}")


def image_tensor(rgb: Any) -> torch.Tensor:
    """uint8 [H, W, 3] array (a figure) -> ComfyUI IMAGE [1, H, W, 3] float32 in 0..1."""
    return torch.from_numpy(rgb).float().div(255).unsqueeze(0)
