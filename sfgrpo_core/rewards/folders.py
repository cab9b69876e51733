"""Reward weights in a models folder (ComfyUI's ``models/rewards``, or any folder): the model-backed rewards'
options filled from files and folders named as their hub repositories name them.

Put, for example, the folder of ``yuvalkirstain/PickScore_v1`` as ``PickScore_v1/`` and that of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` as ``CLIP-ViT-H-14-laion2B-s32B-b79K/`` in the folder, and ``pickscore``
loads from there without a hub. What each reward looks for is ``WEIGHTS``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .vision import AESTHETIC_HEAD_FILE, HPS_V21_FILE

CLIP_L14_FOLDER = "clip-vit-large-patch14"
# reward -> option -> the names that option's weights go by in a rewards folder (the first found is used). A file
# name for hps: its checkpoint lying in the folder itself (the option is then that folder, which holds the file).
WEIGHTS: dict[str, dict[str, tuple[str, ...]]] = {
    "pickscore": {"model": ("PickScore_v1",), "processor": ("CLIP-ViT-H-14-laion2B-s32B-b79K",)},
    "clip": {"model": (CLIP_L14_FOLDER,)},
    "aesthetic": {"head": (Path(AESTHETIC_HEAD_FILE).with_suffix(".safetensors").name, AESTHETIC_HEAD_FILE),
                  "model": (CLIP_L14_FOLDER,)},
    "hps": {"model": ("HPSv2", HPS_V21_FILE)},
    "imagereward": {"model": ("ImageReward",)},
}
# Registered mixes whose components read weights (their options nest under the component's name).
MIX_COMPONENTS: dict[str, tuple[str, ...]] = {"ocr_pickscore": ("pickscore",)}
WHAT = {
    "PickScore_v1": "a folder: the hub repo yuvalkirstain/PickScore_v1",
    "CLIP-ViT-H-14-laion2B-s32B-b79K": "a folder: the hub repo laion/CLIP-ViT-H-14-laion2B-s32B-b79K (its processor)",
    CLIP_L14_FOLDER: "a folder: the hub repo openai/clip-vit-large-patch14",
    "HPSv2": f"a folder holding {HPS_V21_FILE} (from the hub repo xswu/HPSv2), or that file itself",
    "ImageReward": "a folder: the hub repo THUDM/ImageReward (ImageReward.pt, med_config.json)",
}


def listed(folders: Sequence[Path]) -> list[str]:
    """The names of the files and folders in ``folders`` (each name once, sorted): what a weights list offers."""
    names = {entry.name for folder in folders if folder.is_dir() for entry in folder.iterdir()
             if not entry.name.startswith(".")}
    return sorted(names, key=str.lower)


def locate(name: str, folders: Sequence[Path]) -> Path | None:
    """The first ``folder/name`` that exists."""
    return next((folder / name for folder in folders if (folder / name).exists()), None)


def _option_value(option_names: tuple[str, ...], folders: Sequence[Path]) -> str | None:
    for name in option_names:
        found = locate(name, folders)
        if found is not None:
            # hps: its checkpoint file itself stands for the folder that holds it
            return str(found.parent if found.is_file() and name == HPS_V21_FILE else found)
    return None


def weights_options(reward: str, folders: Sequence[Path], *, chosen: str | None = None) -> dict[str, str]:
    """The options of ``reward`` its weights in ``folders`` supply: option -> path. ``chosen`` (a name in the
    folders) is taken for the reward's main option (its first in ``WEIGHTS``), whatever its name."""
    options: dict[str, str] = {}
    for index, (option, names) in enumerate(WEIGHTS.get(reward, {}).items()):
        if index == 0 and chosen:
            found = locate(chosen, folders)
            if found is None:
                raise ValueError(f"weights: {chosen!r} is not in {_folders_text(folders)}")
            options[option] = str(found.parent if found.is_file() and reward == "hps" else found)
            continue
        value = _option_value(names, folders)
        if value is not None:
            options[option] = value
    return options


def mix_components(reward: str, options: Mapping[str, Any]) -> tuple[list[str], str | None]:
    """The components of a mix that may read weights, and the option their own options nest under (None: at the
    top level, as ocr_pickscore's ``pickscore``; "options" for ``weighted``)."""
    if reward == "weighted":
        components = options.get("components")
        return (list(components) if isinstance(components, Mapping) else []), "options"
    return list(MIX_COMPONENTS.get(reward, ())), None


def mix_weights_options(reward: str, options: Mapping[str, Any], folders: Sequence[Path]) -> dict[str, Any]:
    """``options`` of a mix of rewards (``weighted``, ``ocr_pickscore``) with each component's weights from
    ``folders`` filled in where ``options`` does not name them: ocr_pickscore's PickScore reads the folders as
    pickscore alone does. Another reward's options come back unchanged (a malformed mix too: the reward says
    what is wrong with it)."""
    names, nested_key = mix_components(reward, options)
    filled = dict(options)
    raw = filled.get(nested_key) if nested_key else filled
    if raw is not None and not isinstance(raw, Mapping):
        return filled
    nested = dict(raw or {})
    for name in names:
        given = nested.get(name) or {}
        found = weights_options(name, folders) if name in WEIGHTS else {}
        if found and isinstance(given, Mapping):
            nested[name] = {**found, **given}
    if nested_key is None:
        return nested
    if nested:
        filled[nested_key] = nested
    return filled


def weights_help(reward: str, folders: Sequence[Path]) -> str:
    """What ``reward`` looks for in a rewards folder, and which folders those are."""
    wanted = WEIGHTS.get(reward)
    if not wanted:
        return " ".join(filter(None, (weights_help(name, folders) for name in MIX_COMPONENTS.get(reward, ()))))
    parts = [" or ".join(repr(name) for name in names) + (f" ({WHAT[names[0]]})" if names[0] in WHAT else "")
             for names in wanted.values()]
    return f"Put {' and '.join(parts)} in {_folders_text(folders)}."


def _folders_text(folders: Sequence[Path]) -> str:
    if not folders:
        return "a rewards folder (none is registered)"
    return "the rewards folder " + " or ".join(str(folder) for folder in folders)
