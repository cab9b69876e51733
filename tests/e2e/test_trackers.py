"""train.trackers: TensorBoard and W&B (offline) receive every metrics.jsonl field each iteration, the evaluation
images and the config; read back with TensorBoard's own EventAccumulator and from W&B's offline run file."""

import json
import math
import struct

import pytest

from sfgrpo_core.config import load_config
from sfgrpo_core.training.trackers import TrackerError, Trackers, flatten
from sfgrpo_core.training.trainer import train

ITERATIONS = 2


def test_flatten_names_nested_fields_and_drops_what_is_not_a_finite_number():
    record = {"loss": 0.5, "reward_components": {"ocr": 0.25, "pickscore": None}, "step_reward_mean": [None, 1.0, 2],
              "kl": math.nan, "ok": True, "note": "text"}
    assert flatten(record) == {"loss": 0.5, "reward_components/ocr": 0.25, "step_reward_mean/1": 1.0,
                               "step_reward_mean/2": 2.0, "ok": 1.0}


def test_a_missing_tracker_package_names_its_extra(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError, as when not installed
    with pytest.raises(TrackerError, match=r"stepwise-flow-grpo\[wandb\]"):
        Trackers("wandb", tmp_path, "run")


def _wandb_records(path):
    """The records of a W&B run file (LevelDB log format: 32 KiB blocks of [crc, length, type] chunks)."""
    from wandb.proto import wandb_internal_pb2

    data, position, pending = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0 and length == 0:
            break
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_tensorboard_and_wandb_receive_every_metric_the_images_and_the_config(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    config = load_config("configs/miniworld.yaml").replace(**{
        "train.output_dir": str(tmp_path / "run"), "train.iterations": ITERATIONS, "train.eval_every": 1,
        "train.eval_samples": 1, "train.group_size": 4, "train.groups_per_iteration": 2, "sampler.steps": 4,
        "train.checkpoint_every": ITERATIONS, "train.trackers": "tensorboard,wandb"})
    result = train(config)
    records = [r for r in result.records if "loss" in r]
    assert len(records) == ITERATIONS

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for record in records:
        for name, value in flatten({k: v for k, v in record.items() if k != "iteration"}).items():
            logged = {event.step: event.value for event in events.Scalars(name)}
            assert logged[record["iteration"]] == pytest.approx(value, rel=1e-6, abs=1e-9), name
    assert "reward_mean" in tags["scalars"] and "step_reward_mean/4" in tags["scalars"]
    assert {"eval/samples", "rollout/x0_estimates"} <= set(tags["images"])
    strip = events.Images("rollout/x0_estimates")[0]
    assert strip.width > 4 * strip.height  # the 4 estimates and the final sample side by side
    assert [image.step for image in events.Images("eval/samples")] == [0, 1, ITERATIONS]
    assert "config/text_summary" in tags["tensors"]

    run_files = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, "W&B ran offline (no login) and wrote its run under the run folder"
    history, config_items = {}, {}
    for record in _wandb_records(run_files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            history.setdefault(int(items["_step"]), {}).update(items)
        elif kind == "config":
            config_items.update({item.key: json.loads(item.value_json) for item in record.config.update})
    for record in records:
        logged = history[record["iteration"]]
        for name, value in flatten({k: v for k, v in record.items() if k != "iteration"}).items():
            assert float(logged[name]) == pytest.approx(value, rel=1e-6, abs=1e-9), name
        assert '"image-file"' in logged["eval/samples/_type"]
    assert config_items["train"]["trackers"] == "tensorboard,wandb" and config_items["credit"]["method"] == "stepwise"
