"""Training on the mini world with a weighted mix logs every component, for both aggregations; a reward that fails
on every image stops the run with a clear error and keeps the last good checkpoint."""

import json
import pathlib
import subprocess
import sys

import pytest

from sfgrpo_core import rewards
from sfgrpo_core.config import load_config
from sfgrpo_core.training import trainer
from sfgrpo_core.training.runs import loss_map, summary

ROOT = pathlib.Path(__file__).resolve().parents[2]
MIX = {"components": {"mini_geneval": 1.0, "jpeg_compressibility": 0.01}}
SHORT = {"train.iterations": 2, "train.group_size": 4, "train.groups_per_iteration": 2, "train.eval_every": 1,
         "train.eval_samples": 1, "train.eval_steps": 4, "sampler.steps": 4, "train.checkpoint_every": 1}


def _config(tmp_path, **changes):
    return load_config(ROOT / "configs" / "miniworld.yaml").replace(
        **{**SHORT, "train.output_dir": str(tmp_path / "run"), **changes})


@pytest.mark.parametrize("aggregate", ["sum", "normalize_then_sum"])
def test_a_weighted_run_logs_every_component(tmp_path, aggregate):
    options = json.dumps({**MIX, "aggregate": aggregate})
    result = subprocess.run([sys.executable, "-m", "sfgrpo_core.cli", "train", "configs/miniworld.yaml",
                             *[f"--{key}={value}" for key, value in SHORT.items()],
                             "--train.reward", "weighted", "--train.reward_options", options,
                             "--train.output_dir", str(tmp_path / "run")],
                            capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [record for record in records if "loss" in record]
    assert len(trained) == 2
    for record in trained:
        components = record["reward_components"]
        assert set(components) == {"mini_geneval", "jpeg_compressibility"}
        assert 0.0 <= components["mini_geneval"] <= 1.0 and components["jpeg_compressibility"] < 0  # -kB
        # The logged mix is the weighted sum of the logged component means (no image missing here).
        assert record["reward_mean"] == pytest.approx(components["mini_geneval"]
                                                      + 0.01 * components["jpeg_compressibility"], abs=1e-5)
        assert record["reward_components_missing"] == {"mini_geneval": 0, "jpeg_compressibility": 0}
    # The Train LoRA node's LOSS_MAP and summary show them too.
    series = loss_map(records)
    assert series["reward/mini_geneval"] == [record["reward_components"]["mini_geneval"] for record in trained]
    assert "  jpeg_compressibility: " in summary(records, tmp_path / "run", "lora.safetensors")
    evaluated = [record for record in records if "eval_reward_components" in record]
    assert evaluated and set(evaluated[0]["eval_reward_components"]) == {"mini_geneval", "jpeg_compressibility"}


def test_a_reward_that_fails_on_every_image_stops_the_run_and_keeps_the_checkpoint(tmp_path):
    geneval = rewards.load("mini_geneval")
    first_checkpoint = tmp_path / "run" / "checkpoints" / "iter_000001"

    def breaks_after_the_first_checkpoint(images, prompts, metadata=None):
        if first_checkpoint.exists():
            raise RuntimeError("CUDA error: device lost")
        return geneval(images, prompts, metadata)

    with pytest.raises(rewards.RewardError, match="failed on every image: CUDA error: device lost"):
        trainer.train(_config(tmp_path, **{"train.iterations": 3}), reward=breaks_after_the_first_checkpoint)
    assert sorted(path.name for path in first_checkpoint.parent.glob("iter_*")) == ["iter_000001"]
    state = json.loads((first_checkpoint / "state.json").read_text())
    assert state["iteration"] == 1
