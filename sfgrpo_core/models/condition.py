"""Batched conditioning of any structure: a tensor, None, or tuples/lists/dicts of them (batch dimension first)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

Condition = Any
"""A tensor [B, ...], None, or a tuple / list / dict whose tensor leaves all have batch dimension B."""


def map_condition(condition: Condition, fn: Callable[[torch.Tensor], torch.Tensor]) -> Condition:
    """Apply ``fn`` to every tensor leaf."""
    if condition is None:
        return None
    if isinstance(condition, torch.Tensor):
        return fn(condition)
    if isinstance(condition, dict):
        return {key: map_condition(value, fn) for key, value in condition.items()}
    if isinstance(condition, (tuple, list)):
        return type(condition)(map_condition(value, fn) for value in condition)
    return condition


def select(condition: Condition, index: torch.Tensor | Sequence[int]) -> Condition:
    """Rows ``index`` of every leaf (repeats allowed, so this also expands a per-prompt condition to members)."""
    index = torch.as_tensor(index, dtype=torch.long)
    return map_condition(condition, lambda tensor: tensor[index.to(tensor.device)])
