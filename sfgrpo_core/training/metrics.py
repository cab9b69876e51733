"""Metrics: a JSONL log, one object per iteration (the reward curve is drawn by ``figures.reward_curve_figure``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text

TRAINING_EVENT = "sfgrpo.training"
"""The websocket event the ComfyUI trainer node sends after each iteration: {"node", "prompt_id", "record"} with the
iteration's metrics record (json_safe); ``sfgrpo run`` prints it and the live training view plots it."""


class MetricsLog:
    """Append-only JSONL metrics of a run. Resuming at iteration i drops the records of iterations >= i, so a
    resumed run's log equals an uninterrupted one's."""

    def __init__(self, path: str | Path, resume_iteration: int = 0, write: bool = True):
        self.path, self.write = Path(path), write
        self.records: list[dict[str, Any]] = []
        if resume_iteration > 0 and self.path.is_file():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    if record.get("iteration", -1) < resume_iteration:
                        self.records.append(record)
        if write:  # several processes: only the main one writes
            atomic_write_text(self.path, "".join(json.dumps(record) + "\n" for record in self.records))

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if not self.write:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(json_safe(record)) + "\n")


def json_safe(value: Any) -> Any:
    """JSON has no NaN: write missing numbers as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    return value


class CallCounter:
    """A VelocityModel that forwards everything to ``model`` and counts the work: samples through ``velocity``
    (one model evaluation each, forward or forward + backward) and images through ``decode``. The trainer reads and
    resets the counts once per iteration."""

    def __init__(self, model: Any):
        self.model = model
        self.velocity_samples = 0
        self.decoded_images = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def velocity(self, x: Any, sigma: Any, condition: Any) -> Any:
        self.velocity_samples += int(x.shape[0])
        return self.model.velocity(x, sigma, condition)

    def decode(self, x: Any) -> Any:
        self.decoded_images += int(x.shape[0])
        return self.model.decode(x)

    def take(self) -> dict[str, int]:
        """{"model_calls", "decoded_images"} since the last take."""
        counts = {"model_calls": self.velocity_samples, "decoded_images": self.decoded_images}
        self.velocity_samples = self.decoded_images = 0
        return counts
