"""Weighted mixes of registered rewards, as Flow-GRPO's multi_score and the paper's OCR recipe use them.

Two ways to aggregate, chosen by name (``aggregate``):
- ``sum`` (weighted sum, then normalization): the mix scores sum_i w_i r_i, and the trainer normalizes that one
  reward into advantages like any other (Flow-GRPO's multi_score);
- ``normalize_then_sum`` (per-reward normalization, then weighted sum): the trainer turns each component into
  advantages on its own (group-relative, like the combined reward would be) and sums them with the weights, so a
  component with a large scale (JPEG kB) cannot drown one with a small scale (a 0..1 accuracy).
Either way the mix's score is sum_i w_i r_i (held-out evaluation and logs), and every component's own scores are
kept in ``last_components`` for the metrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from . import Reward, load, register, score

AGGREGATIONS = ("sum", "normalize_then_sum")


class Weighted:
    """A weighted mix of registered rewards: sum_i w_i r_i, or the weighted sum of per-reward normalized advantages.

    Args:
        components: reward name -> weight (a finite float; negative weights penalize, e.g. {"nsfw": 1.0} is already
            a penalty). Each name must be registered.
        aggregate: "sum" (weighted sum, then normalization) or "normalize_then_sum" (per-reward normalization,
            then weighted sum).
        options: reward name -> that reward's keyword options, e.g. {"jpeg_compressibility": {"quality": 90}}.

    An image one component cannot score gets NaN for that component and for the mix (missing, never 0).
    """

    def __init__(self, components: Mapping[str, float] | None = None, aggregate: str = "sum",
                 options: Mapping[str, Mapping[str, Any]] | None = None):
        if not components or not isinstance(components, Mapping):
            raise ValueError('components: give reward name -> weight, e.g. {"mini_geneval": 1.0, '
                             '"jpeg_compressibility": 0.01}')
        if aggregate not in AGGREGATIONS:
            raise ValueError(f"aggregate: {aggregate!r} is not one of {', '.join(AGGREGATIONS)}")
        options = dict(options or {})
        unused = sorted(set(options) - set(components))
        if unused:
            raise ValueError(f"options: {unused} are not among the components {sorted(components)}")
        self.weights: dict[str, float] = {}
        for name, weight in components.items():
            if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
                raise ValueError(f"components.{name}: the weight must be a finite number, got {weight!r}")
            self.weights[name] = float(weight)
        self.aggregate = aggregate
        self.rewards: dict[str, Reward] = {}
        for name in self.weights:
            try:
                self.rewards[name] = load(name, **dict(options.get(name, {})))
            except ValueError as error:
                raise ValueError(f"components.{name}: {error}") from None
        self.last_components: dict[str, torch.Tensor] = {}

    @property
    def advantage_weights(self) -> dict[str, float] | None:
        """Weights the credit step applies to each component's own advantages; None: normalize the mix itself."""
        return dict(self.weights) if self.aggregate == "normalize_then_sum" else None

    def torch_modules(self) -> list[torch.nn.Module]:
        """The torch modules of every component that has some (for a host that moves them to its device)."""
        return [module for reward in self.rewards.values()
                for module in (reward.torch_modules() if hasattr(reward, "torch_modules") else [])]

    def to(self, device: str | torch.device) -> Weighted:
        for reward in self.rewards.values():
            if hasattr(reward, "to") and hasattr(reward, "torch_modules"):
                reward.to(device)
        return self

    def __call__(self, images: Any, prompts: Sequence[str], metadata: Sequence[dict] | None = None) -> torch.Tensor:
        """sum_i w_i r_i [B] float32; NaN where any component is missing. Sets ``last_components``."""
        components = {name: score(reward, images, prompts, metadata).values for name, reward in self.rewards.items()}
        self.last_components = components
        return torch.stack([self.weights[name] * values for name, values in components.items()]).sum(0)


def ocr_pickscore(aggregate: str = "sum", ocr: Mapping[str, Any] | None = None,
                  pickscore: Mapping[str, Any] | None = None) -> Weighted:
    """The paper's OCR recipe: 0.8 ocr + 0.2 pickscore (ocr/pickscore: each reward's own options)."""
    options = {name: dict(value) for name, value in (("ocr", ocr), ("pickscore", pickscore)) if value}
    return Weighted({"ocr": 0.8, "pickscore": 0.2}, aggregate=aggregate, options=options)


register("weighted", Weighted, replace=False)
register("ocr_pickscore", ocr_pickscore, replace=False)
