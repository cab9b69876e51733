"""JSON text whose numbers must be finite: options users type (model.options, train.reward_options, Load Reward's
options, ``sfgrpo reward-server --options``). Python's json reads NaN, Infinity and 1e999 as floats that are not
finite; here they are refused, naming the value, before they reach a model or a reward."""

from __future__ import annotations

import json
import math
from typing import Any


class NonFiniteJSONError(ValueError):
    """A number in the JSON text is NaN or infinite."""


def _refuse(text: str) -> float:
    raise NonFiniteJSONError(f"{text} is not a finite number; write a finite value")


def _finite_float(text: str) -> float:
    value = float(text)
    return value if math.isfinite(value) else _refuse(text)


def loads_finite(text: str) -> Any:
    """``json.loads`` that raises NonFiniteJSONError for NaN, Infinity, -Infinity and overflowing numbers, and
    json.JSONDecodeError for text that is not JSON."""
    return json.loads(text, parse_constant=_refuse, parse_float=_finite_float)
