"""Learning-rate schedules over a run's iterations, chosen by name (``optim.lr_schedule``).

Each is a pure function (base lr, iteration, iterations, final ratio) -> the lr of that iteration's update.
"""

from __future__ import annotations

import math
from collections.abc import Callable

Schedule = Callable[[float, int, int, float], float]


def constant(lr: float, iteration: int, iterations: int, final_ratio: float) -> float:
    """The same lr at every iteration."""
    return lr


def cosine(lr: float, iteration: int, iterations: int, final_ratio: float) -> float:
    """Half a cosine from ``lr`` at iteration 0 down to ``final_ratio * lr`` at the last iteration (iterations - 1).

    Past the last iteration (a resumed run given more iterations re-schedules the rest) it stays at the floor.
    """
    progress = min(iteration / max(iterations - 1, 1), 1.0)
    return lr * (final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


LR_SCHEDULES: dict[str, Schedule] = {"constant": constant, "cosine": cosine}
