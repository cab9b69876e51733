"""What the trainer needs from a model: the VelocityModel protocol and its backend registry."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from .condition import Condition


@runtime_checkable
class VelocityModel(Protocol):
    """A flow-matching model the trainer can roll out, reward and fine-tune.

    Attributes:
        module: the network LoRA adapters attach to (its base weights stay frozen).
        default_lora_targets: module names that get adapters when the config names none.
        fused_lora_parts: {module name: row sizes of the projections it stacks} for fused Linears (ComfyUI's q/k/v);
            each projection gets its own adapter (sfgrpo_core.lora.attach_lora). Empty for unfused models.
        sample_shape: shape of one sample without the batch dimension (a latent, or a 2-D point).
        default_prompts, default_eval_prompts: prompts used when the config gives none.
    """

    module: nn.Module
    default_lora_targets: tuple[str, ...]
    fused_lora_parts: Mapping[str, tuple[int, ...]]
    sample_shape: tuple[int, ...]
    default_prompts: tuple[str, ...]
    default_eval_prompts: tuple[str, ...]

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, condition: Condition) -> torch.Tensor:
        """v = x1 - x0 predicted at x [B, *sample_shape], sigma [B] float32; returns [B, *sample_shape]."""

    def encode_prompts(self, prompts: Sequence[str]) -> Condition:
        """Condition for each prompt (batch dimension = len(prompts)). Raises ValueError for bad prompts."""

    def decode(self, x: torch.Tensor) -> Any:
        """What a reward reads from clean samples x [B, ...]: uint8 images [B, H, W, 3] for image models,
        quantized exactly as the final images are (so intermediate rewards carry no systematic offset)."""


BackendFactory = Callable[..., VelocityModel]
_BACKENDS: dict[str, BackendFactory] = {}


def register_backend(name: str, factory: BackendFactory) -> None:
    """Register ``factory(path=..., device=..., seed=..., cache_dir=...) -> VelocityModel`` under ``name``."""
    _BACKENDS[name] = factory


def available() -> list[str]:
    return sorted(_BACKENDS)


NEEDS_DIFFUSERS = frozenset({"diffusers", "miniworld"})


def build(name: str, **options: Any) -> VelocityModel:
    if name not in _BACKENDS:
        raise ValueError(f"model.name: unknown backend {name!r}; available: {', '.join(available())}")
    if name in NEEDS_DIFFUSERS:
        import importlib.util

        if importlib.util.find_spec("diffusers") is None:
            raise ValueError(f"model.name: the {name!r} backend needs diffusers, an optional extra: pip install "
                             "'stepwise-flow-grpo[diffusers]'")
    return _BACKENDS[name](**options)
