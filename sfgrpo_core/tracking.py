"""Metrics: a JSONL log (one object per iteration) and a reward-curve PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text

TRAINING_EVENT = "sfgrpo.training"
"""The websocket event the ComfyUI trainer node sends after each iteration: {"node", "prompt_id", "record"} with the
iteration's metrics record (json_safe); ``sfgrpo run`` prints it and the live training view plots it."""


class MetricsLog:
    """Append-only JSONL metrics of a run. Resuming at iteration i drops the records of iterations >= i, so a
    resumed run's log equals an uninterrupted one's."""

    def __init__(self, path: str | Path, resume_iteration: int = 0):
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []
        if resume_iteration > 0 and self.path.is_file():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    if record.get("iteration", -1) < resume_iteration:
                        self.records.append(record)
        atomic_write_text(self.path, "".join(json.dumps(record) + "\n" for record in self.records))

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
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


def plot_reward_curve(records: list[dict[str, Any]], path: str | Path, title: str = "reward") -> Path:
    """Training reward mean (+- std) and held-out eval reward per iteration, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.6), dpi=100)
    train = [r for r in records if r.get("reward_mean") is not None]
    if train:
        x = [r["iteration"] for r in train]
        mean = [r["reward_mean"] for r in train]
        std = [r.get("reward_std") or 0.0 for r in train]
        axis.plot(x, mean, label="train reward (final samples)", color="tab:blue")
        axis.fill_between(x, [m - s for m, s in zip(mean, std, strict=True)],
                          [m + s for m, s in zip(mean, std, strict=True)],
                          color="tab:blue", alpha=0.15)
    evaluations = [r for r in records if r.get("eval_reward_mean") is not None]
    if evaluations:
        axis.plot([r["iteration"] for r in evaluations], [r["eval_reward_mean"] for r in evaluations], "o-",
                  label="held-out reward (ODE)", color="tab:orange")
    axis.set_xlabel("iteration")
    axis.set_ylabel("reward")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(loc="best", fontsize=8)
    figure.tight_layout()
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary)
    plt.close(figure)
    temporary.replace(path)
    return path
