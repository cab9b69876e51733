"""Checkpoints: one complete record (LoRA, optimizer, iteration, config) per folder, written atomically: a crash
mid-save leaves the previous checkpoint intact and never a half-written one.

No RNG state is recorded: every random draw of a run comes from a generator seeded by (seed, iteration, ...) (see
``sfgrpo_core.seeding``), so a resumed run reproduces an uninterrupted one without touching the process's global RNG
(which, inside ComfyUI, belongs to everyone).

Layout: <run>/checkpoints/iter_000010/{lora.safetensors, optimizer.safetensors, state.json}; the folder is built
under a temporary name and renamed into place, then <run>/checkpoints/latest (a one-line file) is replaced.
Only safetensors and JSON are read back: no pickle.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..atomic import atomic_save_safetensors, atomic_write_text
from ..config import Config, config_from_dict

CHECKPOINTS = "checkpoints"


@dataclass(frozen=True)
class Checkpoint:
    iteration: int
    """Iterations completed; training resumes at this iteration index."""
    config: Config
    lora: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    path: Path


def optimizer_to_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a torch optimizer state_dict into safetensors-storable tensors and a JSON-able skeleton."""
    tensors: dict[str, torch.Tensor] = {}
    # str(parameter index) -> state key -> {"tensor": name in tensors} or {"value": JSON-able value}
    per_parameter: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        per_parameter[str(index)] = {}
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value
                per_parameter[str(index)][key] = {"tensor": f"state.{index}.{key}"}
            else:
                per_parameter[str(index)][key] = {"value": value}
    return tensors, {"state": per_parameter, "param_groups": state["param_groups"]}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], skeleton: dict[str, Any]) -> dict[str, Any]:
    """Inverse of ``optimizer_to_tensors``."""
    state: dict[int, dict[str, Any]] = {}
    for index, values in skeleton["state"].items():
        state[int(index)] = {key: tensors[entry["tensor"]] if "tensor" in entry else entry["value"]
                             for key, entry in values.items()}
    return {"state": state, "param_groups": skeleton["param_groups"]}


def save_checkpoint(run_dir: str | Path, iteration: int, config: Config, lora: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint ``iteration`` (iterations completed): the LoRA weights and the optimizer's state_dict()
    (whole tensors), and prune all but the ``keep`` newest."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"iter_{iteration:06d}"
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        atomic_save_safetensors(lora, staging / "lora.safetensors")
        optimizer_tensors, skeleton = optimizer_to_tensors(optimizer_state)
        atomic_save_safetensors(optimizer_tensors, staging / "optimizer.safetensors")
        state = {"iteration": iteration, "config": config.to_dict(), "optimizer": skeleton}
        atomic_write_text(staging / "state.json", json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    atomic_write_text(root / "latest", final.name + "\n")
    for old in sorted(path for path in root.glob("iter_*") if path.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "state.json").is_file():
            return candidate
    complete = sorted(path for path in root.glob("iter_*") if (path / "state.json").is_file())
    return complete[-1] if complete else None


def checkpoint_iteration(path: str | Path) -> int:
    """Iterations completed at a checkpoint folder (from its state.json; nothing else is read or restored)."""
    return int(json.loads((Path(path) / "state.json").read_text())["iteration"])


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint folder (safetensors + JSON only)."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    optimizer_state = optimizer_from_tensors(load_file(str(path / "optimizer.safetensors")), state["optimizer"])
    return Checkpoint(iteration=int(state["iteration"]), config=config_from_dict(state["config"]),
                      lora=load_file(str(path / "lora.safetensors")), optimizer_state=optimizer_state, path=path)
