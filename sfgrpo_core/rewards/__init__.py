"""The reward registry: one place the trainer, the CLI, the benchmarks and the ComfyUI nodes get rewards from.

A Reward is called as ``reward(images, prompts, metadata=None)`` with a list of PIL images or a uint8 tensor
[B, H, W, 3] (the toy world passes its 2-D points [B, 2] instead) and returns a float32 tensor [B]. NaN marks an
item it could not score: the trainer leaves such items out of every statistic and counts them, never treating
them as 0. A reward made of several (``weighted``) also sets ``last_components`` (name -> [B] scores of its last
call), which the trainer logs.

Rewards come from three places, all in one table per process: the ones shipped here (registered on import), a
user's ``register(name, factory)`` call, and other installed packages through the ``sfgrpo.rewards`` entry-point
group (``name = "package.module:factory"``, loaded on first use). A factory takes the reward's options as keyword
arguments and returns the reward; its docstring's first line and its signature are what ``describe`` shows.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast, runtime_checkable

import torch

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "sfgrpo.rewards"


@runtime_checkable
class Reward(Protocol):
    def __call__(self, images: Any, prompts: Sequence[str], metadata: Sequence[dict] | None = None) -> torch.Tensor:
        """Scores [B] float32, NaN for an item that could not be scored."""


RewardFactory = Callable[..., Reward]


class RewardError(RuntimeError):
    """A reward failed on every image of a call: a configuration problem, not missing data."""


class RewardInputError(ValueError):
    """An input the reward can never score, such as an OCR prompt with no quoted text: an error that names the
    input and stops the run, never an item marked missing."""


class TorchReward:
    """Base of rewards backed by torch modules. ``torch_modules`` lists them so that a host (ComfyUI's model
    management) can keep them off the GPU except while scoring; ``to`` moves them all."""

    device: torch.device = torch.device("cpu")

    def torch_modules(self) -> list[torch.nn.Module]:
        raise NotImplementedError

    def to(self, device: str | torch.device) -> TorchReward:
        self.device = torch.device(device)
        for module in self.torch_modules():
            module.to(self.device)
        return self


class MissingExtraError(ValueError):
    """A reward needs a package this environment lacks; the message names the pip extra that installs it."""


def require(module: str, extra: str, reward: str) -> types.ModuleType:
    """Import ``module`` for ``reward``, or raise MissingExtraError naming the pip extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtraError(
            f"reward {reward!r} needs the Python package {module!r} ({error}); install it with "
            f"pip install 'stepwise-flow-grpo[{extra}]', or run the reward in its own environment behind "
            f"'sfgrpo reward-server --reward {reward}' and train with reward 'remote'") from None


class _SharedTable(types.ModuleType):
    """The process's one registry (see ``_shared_table``)."""

    factories: dict[str, RewardFactory]
    plugin_errors: dict[str, str]  # reward name -> why its entry point failed to load
    entry_points_loaded: bool


def _shared_table() -> _SharedTable:
    """The process's one registry. ComfyUI imports this pack under its folder's name, so this file can be loaded
    twice (``sfgrpo_core.rewards`` by user code, ``<pack>.sfgrpo_core.rewards`` by the nodes): both copies keep
    their rewards in the first copy's table, found under one key in sys.modules."""
    key = "sfgrpo_core.rewards/shared-registry"
    if key not in sys.modules:
        table = _SharedTable(key, "The reward registry shared by every copy of sfgrpo_core.rewards.")
        table.factories, table.plugin_errors, table.entry_points_loaded = {}, {}, False
        sys.modules[key] = table
    return cast(_SharedTable, sys.modules[key])


_TABLE = _shared_table()
_REGISTRY: dict[str, RewardFactory] = _TABLE.factories


def register(name: str, factory: RewardFactory, *, replace: bool = True) -> None:
    """Register ``factory(**options) -> Reward`` under ``name``. ``replace=False`` keeps an earlier registration of
    that name (the built-ins use it, so a user's own reward of the same name wins whatever loads first)."""
    if not name or not isinstance(name, str):
        raise ValueError("a reward name must be a non-empty string")
    if not callable(factory):
        raise ValueError(f"reward {name!r}: the factory must be callable, got {type(factory).__name__}")
    if replace or name not in _REGISTRY:
        _REGISTRY[name] = factory


def _load_entry_points() -> None:
    """Register every ``sfgrpo.rewards`` entry point once per process; a plugin that fails to import is logged and
    remembered (``load`` of its name then says why) instead of taking the registry down."""
    if _TABLE.entry_points_loaded:
        return
    _TABLE.entry_points_loaded = True
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            register(entry.name, entry.load())
        except Exception as error:  # a broken plugin must not break the other rewards
            source = entry.dist.name if entry.dist is not None else entry.value
            message = f"entry point {entry.value!r} of {source} failed to load: {type(error).__name__}: {error}"
            _TABLE.plugin_errors[entry.name] = message
            log.warning("sfgrpo reward %r: %s", entry.name, message)


def factory(name: str) -> RewardFactory | None:
    """The factory registered under ``name`` now, or None."""
    return _REGISTRY.get(name)


def available() -> list[str]:
    """Names of the registered rewards (built-in, registered in this process, and installed plug-ins)."""
    _load_entry_points()
    return sorted(_REGISTRY)


def describe(name: str) -> str:
    """One line for people choosing a reward: ``name(option=default, ...): what it scores``."""
    _load_entry_points()
    factory = _REGISTRY[name]
    try:
        options = ", ".join(parameter.name if parameter.default is parameter.empty
                            else f"{parameter.name}={parameter.default!r}"
                            for parameter in inspect.signature(factory).parameters.values()
                            if parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL))
    except (TypeError, ValueError):  # a builtin or C callable without a signature
        options = "..."
    summary = (inspect.getdoc(factory) or "").strip().splitlines()
    return f"{name}({options})" + (f": {summary[0]}" if summary else "")


def load(name: str | Reward, **options: Any) -> Reward:
    """The reward called ``name`` built with ``options``; a callable is returned as it is.

    Raises:
        ValueError: for an unknown name (listing the known ones), a plug-in that failed to load (saying why), or
            options the factory does not take.
    """
    if callable(name):
        return name
    _load_entry_points()
    if name not in _REGISTRY:
        if name in _TABLE.plugin_errors:
            raise ValueError(f"reward {name!r}: {_TABLE.plugin_errors[name]}")
        raise ValueError(f"unknown reward {name!r}; available: {', '.join(available())}")
    try:
        return _REGISTRY[name](**options)
    except TypeError as error:
        raise ValueError(f"reward {name!r}: bad options {sorted(options)}: {error}; its options: "
                         f"{describe(name)}") from None


def batch_size_of(images: Any) -> int:
    return images.shape[0] if isinstance(images, torch.Tensor) else len(images)


def _subset(images: Any, index: int) -> Any:
    return images[index : index + 1] if isinstance(images, torch.Tensor) else [images[index]]


@dataclass(frozen=True)
class Scores:
    """What ``score`` returns: ``values`` [B] float32 (NaN = missing) and, for a reward made of several, each
    component's own [B] scores (NaN where that component could not score the image)."""

    values: torch.Tensor
    components: dict[str, torch.Tensor] = field(default_factory=dict)


def score(reward: Reward, images: Any, prompts: Sequence[str], metadata: Sequence[dict] | None = None) -> Scores:
    """Call ``reward`` defensively: [B] float32 scores with NaN for every item that could not be scored.

    If the batch call raises, each item is scored on its own so one bad image cannot lose the others; an item that
    still raises, or any non-finite score, becomes NaN. Two failures stop instead: RewardInputError (an input the
    reward can never score, e.g. an OCR prompt without quoted text) propagates as it is, and a reward that raises
    on every item raises RewardError with its message (it cannot work with these inputs at all).
    """
    count = batch_size_of(images)
    if len(prompts) != count:
        raise ValueError(f"{len(prompts)} prompts for {count} images")
    try:
        values = _as_scores(reward(images, prompts, metadata), count)
        components = _components(reward, count)
    except RewardInputError:
        raise
    except Exception as batch_error:
        values, per_item, failures = torch.full((count,), float("nan")), [], 0
        for index in range(count):
            try:
                item_metadata = None if metadata is None else [metadata[index]]
                values[index] = _as_scores(reward(_subset(images, index), [prompts[index]], item_metadata), 1)[0]
                per_item.append(_components(reward, 1))
            except RewardInputError:
                raise
            except Exception:
                per_item.append({})
                failures += 1
        if failures == count:
            raise RewardError(f"the reward failed on every image: {batch_error}") from batch_error
        names = sorted({name for item in per_item for name in item})
        components = {name: torch.cat([item.get(name, torch.tensor([float("nan")])) for item in per_item])
                      for name in names}
    return Scores(_finite_or_nan(values), {name: _finite_or_nan(value) for name, value in components.items()})


def _finite_or_nan(values: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(values), values, torch.full_like(values, float("nan")))


def _components(reward: Reward, count: int) -> dict[str, torch.Tensor]:
    components = getattr(reward, "last_components", None) or {}
    return {str(name): _as_scores(value, count) for name, value in components.items()}


def _as_scores(result: Any, count: int) -> torch.Tensor:
    scores = torch.as_tensor(result, dtype=torch.float32).detach().cpu().reshape(-1)
    if scores.shape != (count,):
        raise ValueError(f"a reward returned {tuple(scores.shape)} scores for {count} images")
    return scores


# Importing these registers the shipped rewards; none imports a heavy package until its reward is loaded.
from . import builtin, ocr, remote, safety, vision, weighted  # noqa: E402,F401
