"""Deterministic seeds derived from names, so every random draw of a run can be reproduced on its own."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from ``seed`` and any parts (iteration, group, member, a purpose string).

    Unlike ``seed + i`` schemes, nearby inputs give unrelated seeds and there are no collisions between purposes.
    """
    text = "/".join([str(seed), *map(str, parts)]).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def generator(seed: int, *parts: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator seeded with ``derive_seed(seed, *parts)``."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, *parts))


def member_generators(seeds: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One generator per batch member on ``device`` (the model's, so the noise is drawn where it is used), seeded
    with ``seeds[b]``: a member's noise then depends on its seed (and the device's generator) alone, not on which
    other members share the batch. CPU and CUDA generators give different streams from the same seed."""
    return [torch.Generator(device=device).manual_seed(seed) for seed in seeds]


def member_noise(generators: Sequence[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise shaped like ``like`` [B, ...], row b drawn from ``generators[b]`` on its device, on
    ``like``'s device."""
    rows = [torch.randn(like.shape[1:], generator=generator, device=generator.device) for generator in generators]
    return torch.stack(rows).to(like.device)
