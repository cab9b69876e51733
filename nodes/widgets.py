"""Node widgets built from sfgrpo_core's config fields, so a widget's default, bounds, choices and tooltip are the
ones the CLI and config files use (config.py is the one place they are written)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from comfy_api.latest import io

from ..sfgrpo_core.config import SECTIONS, field_type

INT_MAX = 2**31 - 1


def config_field(section: str, name: str) -> dataclasses.Field:
    for spec in dataclasses.fields(SECTIONS[section]):
        if spec.name == name:
            return spec
    raise KeyError(f"{section}.{name} is not a config field")


def config_input(section: str, name: str, *, default: Any = None, widget_id: str | None = None,
                 step: float | None = None, note: str = "", optional: bool = False) -> io.Input:
    """A V3 widget for config field ``section.name``; ``default`` overrides the config default for this node (the
    tooltip then says so), ``note`` is appended to the help text. ``optional``: a workflow saved before the widget
    existed stays valid (the config default applies)."""
    spec = config_field(section, name)
    meta = spec.metadata
    value: Any = spec.default if default is None else default
    tooltip = meta["help"] + (f" Default here {value!r} (config default {spec.default!r})." if default is not None
                              and default != spec.default else "") + (f" {note}" if note else "")
    annotation = field_type(SECTIONS[section], name)
    widget_id = widget_id or name
    if meta.get("choices"):
        return io.Combo.Input(widget_id, options=list(meta["choices"]), default=value, tooltip=tooltip,
                              optional=optional)
    if annotation is bool:
        return io.Boolean.Input(widget_id, default=value, tooltip=tooltip, optional=optional)
    if annotation is int:
        # A seed widget would get the frontend's "randomize after queueing" control: a training seed stays fixed.
        return io.Int.Input(widget_id, default=value, min=int(meta["minimum"] if meta["minimum"] is not None else 0),
                            max=int(meta["maximum"]) if meta["maximum"] is not None else INT_MAX, tooltip=tooltip,
                            control_after_generate=False if name == "seed" else None, optional=optional)
    if annotation is float:
        maximum = meta["maximum"] if meta["maximum"] is not None else 1e6
        return io.Float.Input(widget_id, default=value, min=meta["minimum"] if meta["minimum"] is not None else -1e6,
                              max=maximum, step=step or _step(value), round=False, tooltip=tooltip,
                              optional=optional)
    if annotation is str:
        return io.String.Input(widget_id, default=value, tooltip=tooltip, optional=optional)
    raise TypeError(f"{section}.{name}: no widget for {annotation!r}")


def _step(value: float) -> float:
    """A widget step fine enough for the default (1e-4 for a 3e-4 learning rate, 0.01 for 0.7 or 64)."""
    if value == 0:
        return 0.01
    return min(0.01, 10.0 ** math.floor(math.log10(abs(value))))
