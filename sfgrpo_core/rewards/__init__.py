"""The reward registry: one place the trainer, the ComfyUI nodes and the benchmarks get rewards from.

A Reward is called as ``reward(images, prompts, metadata=None)`` with a list of PIL images or a uint8 tensor
[B, H, W, 3] (the toy world passes its 2-D points [B, 2] instead) and returns a float32 tensor [B]. NaN marks an
item it could not score: the trainer leaves such items out of every statistic and counts them, never treating
them as 0. A reward may also set ``last_components`` (name -> [B] tensor) for logging.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Reward(Protocol):
    def __call__(self, images: Any, prompts: Sequence[str], metadata: Sequence[dict] | None = None) -> torch.Tensor:
        """Scores [B] float32, NaN for an item that could not be scored."""


RewardFactory = Callable[..., Reward]
_REGISTRY: dict[str, RewardFactory] = {}


def register(name: str, factory: RewardFactory) -> None:
    """Register ``factory(**options) -> Reward`` under ``name`` (replacing an earlier one of that name)."""
    if not name or not isinstance(name, str):
        raise ValueError("a reward name must be a non-empty string")
    _REGISTRY[name] = factory


def available() -> list[str]:
    """Names of the registered rewards."""
    return sorted(_REGISTRY)


def load(name: str | Reward, **options: Any) -> Reward:
    """The reward called ``name`` built with ``options``; a callable is returned as it is.

    Raises:
        ValueError: for an unknown name (listing the known ones) or options the factory does not take.
    """
    if callable(name):
        return name
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; available: {', '.join(available())}")
    try:
        return _REGISTRY[name](**options)
    except TypeError as error:
        raise ValueError(f"reward {name!r}: bad options {sorted(options)}: {error}") from None


def batch_size_of(images: Any) -> int:
    return images.shape[0] if isinstance(images, torch.Tensor) else len(images)


def _subset(images: Any, index: int) -> Any:
    return images[index : index + 1] if isinstance(images, torch.Tensor) else [images[index]]


class RewardError(RuntimeError):
    """A reward failed on every image of a call: a configuration problem, not missing data."""


def score(reward: Reward, images: Any, prompts: Sequence[str], metadata: Sequence[dict] | None = None,
          ) -> torch.Tensor:
    """Call ``reward`` defensively: [B] float32 scores with NaN for every item that could not be scored.

    If the batch call raises, each item is scored on its own so one bad image cannot lose the others; an item that
    still raises, or any non-finite score, becomes NaN. If every item raises, the reward cannot work with these
    inputs at all (an unknown prompt, a wrong image format): that raises RewardError with the reward's message.
    """
    count = batch_size_of(images)
    if len(prompts) != count:
        raise ValueError(f"{len(prompts)} prompts for {count} images")
    try:
        scores = _as_scores(reward(images, prompts, metadata), count)
    except Exception as batch_error:
        scores = torch.full((count,), float("nan"))
        failures = 0
        for index in range(count):
            try:
                item_metadata = None if metadata is None else [metadata[index]]
                scores[index] = _as_scores(reward(_subset(images, index), [prompts[index]], item_metadata), 1)[0]
            except Exception:
                failures += 1
        if failures == count:
            raise RewardError(f"the reward failed on every image: {batch_error}") from batch_error
    return torch.where(torch.isfinite(scores), scores, torch.full_like(scores, float("nan")))


def _as_scores(result: Any, count: int) -> torch.Tensor:
    scores = torch.as_tensor(result, dtype=torch.float32).detach().cpu().reshape(-1)
    if scores.shape != (count,):
        raise ValueError(f"a reward returned {tuple(scores.shape)} scores for {count} images")
    return scores


from . import builtin  # noqa: E402,F401  (registers the built-in rewards)
