"""benchmarks/gpu_memory_24gb.py (the 24 GB check of SD3.5 Medium with PickScore, for a GPU machine): its code runs
here with --tiny on the CPU, and its real-size pipeline has SD3.5 Medium's published sizes (built on the meta
device, no memory)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_script_measures_one_iteration_of_each_method_per_size(tmp_path):
    out = tmp_path / "gpu_24gb.json"
    done = subprocess.run([sys.executable, "benchmarks/gpu_memory_24gb.py", "--device", "cpu", "--tiny", "--sizes",
                           "16", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    points = json.loads(out.read_text())["points"]
    assert set(points) == {"flow_grpo_16px", "stepwise_16px", "ratio_16px"}
    for method in ("flow_grpo", "stepwise"):
        assert {"seconds_rollout", "seconds_rewards", "seconds_update", "loss"} <= set(points[f"{method}_16px"])
    assert points["stepwise_16px"]["reward_calls"] > points["flow_grpo_16px"]["reward_calls"]


def test_the_real_pipeline_has_sd35_mediums_sizes():
    sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]
    from gpu_memory_24gb import real_sd35_medium_pipeline

    pipeline = real_sd35_medium_pipeline("meta")
    billions = {name: sum(p.numel() for p in getattr(pipeline, name).parameters()) / 1e9
                for name in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")}
    assert 2.2 < billions["transformer"] < 2.6  # MMDiT-X, 24 blocks of 1536
    assert 4.5 < billions["text_encoder_3"] < 4.8  # T5-XXL's encoder (a small vocabulary: its tokenizer is a stand-in)
    assert 0.6 < billions["text_encoder_2"] < 0.7 and billions["text_encoder"] < 0.13
