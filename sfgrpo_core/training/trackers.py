"""Experiment trackers (``train.trackers``): TensorBoard and Weights & Biases receive what metrics.jsonl holds.

Each iteration's record goes out as scalars (nested fields flattened: ``reward_components/mini_geneval``,
``step_reward_mean/3``), the config as hyperparameters once, and at each evaluation its images (the held-out
samples, the x0 estimates along one trajectory). The libraries' own writers do the work: torch.utils.tensorboard's
SummaryWriter and wandb (offline unless it is logged in or ``WANDB_MODE`` is set). Only the main process tracks.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np


class TrackerError(RuntimeError):
    """A tracker that cannot start (its package missing): the message names the pip extra."""


class Tracker(Protocol):
    def log_config(self, config: Mapping[str, Any]) -> None: ...
    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None: ...
    def log_image(self, name: str, image: np.ndarray, step: int) -> None: ...
    def close(self) -> None: ...


def leaves(tree: Mapping[str, Any], separator: str, *, lists: bool, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(name, value) for every leaf of nested mappings, names joined by ``separator``; with ``lists`` a list's
    items are leaves too (``a/3``), otherwise a list is one leaf."""
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if lists and isinstance(value, list | tuple):
            value = {str(index): item for index, item in enumerate(value)}
        if isinstance(value, Mapping):
            yield from leaves(value, separator, lists=lists, prefix=f"{name}{separator}")
        else:
            yield name, value


def flatten(record: Mapping[str, Any]) -> dict[str, float]:
    """The numeric fields of a metrics record as name -> float: nested mappings and lists become ``a/b`` and
    ``a/3``; None, text and non-finite values are left out (a tracker's scalar must be a finite number)."""
    return {name: float(value) for name, value in leaves(record, "/", lists=True)
            if isinstance(value, bool) or (isinstance(value, int | float) and math.isfinite(value))}


def _require(module: str, tracker: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise TrackerError(f"train.trackers: {tracker!r} needs the Python package {module.split('.')[0]!r} "
                           f"({error}); install it with pip install 'stepwise-flow-grpo[{tracker}]', or set "
                           "train.trackers to none") from None


class TensorBoardTracker:
    """Event files in ``<run_dir>/tensorboard`` (``tensorboard --logdir <run_dir>/tensorboard``)."""

    def __init__(self, run_dir: Path, run_name: str) -> None:
        _require("tensorboard", "tensorboard")
        writer_class = _require("torch.utils.tensorboard", "tensorboard").SummaryWriter
        self.writer = writer_class(log_dir=str(run_dir / "tensorboard"))

    def log_config(self, config: Mapping[str, Any]) -> None:
        import yaml

        self.writer.add_text("config", "```\n" + yaml.safe_dump(dict(config), sort_keys=False) + "```", 0)
        from torch.utils.tensorboard.summary import hparams

        for event in hparams(flatten_text(config), {}):  # the HPARAMS tab
            self.writer.file_writer.add_summary(event)

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def log_image(self, name: str, image: np.ndarray, step: int) -> None:
        self.writer.add_image(name, image, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run under ``<run_dir>/wandb``: offline (``wandb sync`` uploads it later) unless W&B is logged in or
    ``WANDB_MODE`` chooses."""

    def __init__(self, run_dir: Path, run_name: str) -> None:
        self.wandb = _require("wandb", "wandb")
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = self.wandb.init(project=os.environ.get("WANDB_PROJECT", "sfgrpo"), name=run_name,
                                   dir=str(run_dir), mode=mode, reinit="create_new")

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.run.config.update(dict(config), allow_val_change=True)

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        self.run.log(dict(scalars), step=step)

    def log_image(self, name: str, image: np.ndarray, step: int) -> None:
        self.run.log({name: self.wandb.Image(image)}, step=step)

    def close(self) -> None:
        self.run.finish()


def flatten_text(config: Mapping[str, Any]) -> dict[str, Any]:
    """A nested config as ``section.field`` -> a number, bool or text (what a hyperparameter table holds)."""
    return {name: value if isinstance(value, bool | int | float | str) else str(value)
            for name, value in leaves(config, ".", lists=False)}


TRACKERS: dict[str, Callable[[Path, str], Tracker]] = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}


class Trackers:
    """The configured trackers as one (none at all is a valid, silent set)."""

    def __init__(self, names: str, run_dir: Path, run_name: str) -> None:
        chosen = [name for name in names.split(",") if name and name != "none"]
        self.trackers: list[Tracker] = []
        try:
            for name in chosen:
                self.trackers.append(TRACKERS[name](run_dir, run_name))
        except BaseException:
            self.close()
            raise

    def log_config(self, config: Mapping[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log_config(config)

    def log_record(self, record: Mapping[str, Any], step: int) -> None:
        scalars = flatten({key: value for key, value in record.items() if key != "iteration"})
        for tracker in self.trackers:
            tracker.log_scalars(scalars, step)

    def log_image(self, name: str, image: np.ndarray, step: int) -> None:
        for tracker in self.trackers:
            tracker.log_image(name, image, step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
