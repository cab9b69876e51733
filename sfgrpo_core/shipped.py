"""Files the project ships beside the library: the example configs and workflows, and the ComfyUI node pack.

In a checkout (or a ComfyUI custom_nodes folder) they are the repository's top-level ``configs/``, ``workflows/``
and the pack itself (``__init__.py``, ``nodes/``, ``web/``). An installed wheel carries copies inside the package,
under ``sfgrpo_core/_shipped/`` (setup.py puts them there), so ``sfgrpo train miniworld`` and ``sfgrpo demo`` run
from any directory.
"""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
CHECKOUT = PACKAGE.parent
PACKAGED = PACKAGE / "_shipped"


def in_checkout() -> bool:
    """Whether this library runs from the repository (or a ComfyUI custom_nodes copy of it), not from a wheel."""
    return (CHECKOUT / "nodes").is_dir() and (CHECKOUT / "configs").is_dir()


def shipped_dir(name: str) -> Path:
    """The folder ``configs`` or ``workflows``: the checkout's, else the installed package's copy."""
    if name not in ("configs", "workflows"):
        raise ValueError(f"no shipped folder {name!r}: configs or workflows")
    return CHECKOUT / name if in_checkout() else PACKAGED / name


def shipped_configs() -> list[str]:
    """The names of the shipped configs (``miniworld``, ``toy``, ...)."""
    return sorted(path.stem for path in shipped_dir("configs").glob("*.yaml"))


def config_path(text: str) -> Path:
    """A config given as a path, or as a shipped config's name (``miniworld`` for configs/miniworld.yaml).

    A path that exists wins; a bare name that is neither is an error naming the shipped ones.
    """
    path = Path(text)
    if path.exists() or not re.fullmatch(r"[A-Za-z0-9_.-]+", text):
        return path
    shipped = shipped_dir("configs") / (text if text.endswith((".yaml", ".yml", ".json")) else f"{text}.yaml")
    if shipped.is_file():
        return shipped
    raise FileNotFoundError(f"config {text!r}: no such file, and no shipped config of that name (shipped: "
                            f"{', '.join(shipped_configs())})")


def pack_files() -> dict[str, Path]:
    """What ComfyUI loads of this pack from its custom_nodes folder: name -> the file or folder (the checkout's, or
    the installed wheel's copies beside the installed library); ``workflows`` is its template browser's."""
    names = ("__init__.py", "nodes", "web", "workflows", "sfgrpo_core")
    if in_checkout():
        return {name: CHECKOUT / name for name in names}
    return {"__init__.py": PACKAGED / "pack" / "__init__.py", "nodes": PACKAGED / "pack" / "nodes",
            "web": PACKAGED / "pack" / "web", "workflows": PACKAGED / "workflows", "sfgrpo_core": PACKAGE}
