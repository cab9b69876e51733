"""`sfgrpo bench speed --quick`: the side-by-side cost measurement end to end (no timing is asserted: the counts of
work are, and that every ratio was measured)."""

import json
import math
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_quick_speed_benchmark_counts_the_work_of_each_method(tmp_path):
    out = tmp_path / "speed.json"
    result = subprocess.run([sys.executable, "-m", "sfgrpo_core.cli", "bench", "speed", "--quick", "--out", str(out)],
                            capture_output=True, text=True, cwd=ROOT, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Stepwise / Flow-GRPO per iteration" in result.stdout
    summary = json.loads(out.read_text())
    # the machine and the dtypes chosen for it, so that figures from different CPUs can be compared
    from sfgrpo_core.models.precision import cpu_capability, fast_dtype

    assert summary["hardware"]["cpu_capability"] == cpu_capability() and cpu_capability() in result.stdout
    chosen = str(fast_dtype("cpu")).removeprefix("torch.")
    assert summary["hardware"]["fast_dtype"] == chosen
    assert summary["methods"]["stepwise"]["dtypes"] == {"compute": "float32", "decode": chosen}
    stepwise, flow = summary["methods"]["stepwise"], summary["methods"]["flow_grpo"]
    # --quick: groups of 4, 2 groups, 4 steps, of which only transition 1 trains (step 0 from t = 1 is deterministic,
    # step 2's std is under min_train_std, the last step does not train). Flow-GRPO scores the 8 final samples;
    # Stepwise also the two ends of transition 1: state 1 once per group (the deterministic DDIM step from the
    # group's shared x_1), every member's state 2; nothing else enters its advantages (scored_states).
    assert flow["decoded_images"] == flow["reward_calls"] == 8
    assert stepwise["decoded_images"] == stepwise["reward_calls"] == 2 + 8 + 8
    # T' = 2: one model call per completion on top of the rollout's 8 x 4 (its first substep reuses the rollout's)
    assert stepwise["model_calls"] - stepwise["update_samples"] == 8 * 4 + (2 + 8)
    for data in (stepwise, flow):
        assert set(data["seconds_by_phase"]) == {"rollout", "rewards", "update"}
        assert all(value > 0 for value in data["seconds_per_unit_alone"].values())
        assert math.isfinite(data["overhead"]) and data["overhead"] > 0
    assert math.isclose(summary["stepwise_over_flow_grpo"],
                        stepwise["seconds_per_iteration"] / flow["seconds_per_iteration"])


def test_memory_benchmark_measures_each_point_in_a_fresh_process(tmp_path):
    out = tmp_path / "memory.json"
    command = [sys.executable, "-m", "sfgrpo_core.cli", "bench", "memory", "--groups", "1", "--chunk", "6",
               "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    points = json.loads(out.read_text())["points"]
    # one group size, chunked and whole: a fresh process each (two more points cost a minute and test nothing new)
    assert [(p["chunk"], p["groups"], p["trajectories"]) for p in points] == [(6, 1, 12), (0, 1, 12)]
    assert all(p["peak_rss_mib"] > 100 and p["seconds"] > 0 for p in points)


def test_bench_rewards_times_each_reward_and_reports_what_it_cannot(tmp_path):
    out = tmp_path / "rewards.json"
    result = subprocess.run([sys.executable, "benchmarks/reward_speed.py", "--rewards",
                             "jpeg_compressibility,mini_geneval,ocr,imagereward", "--size", "64", "--batch", "2",
                             "--repeats", "1", "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                            timeout=600)
    assert result.returncode == 1, result.stderr[-2000:]  # imagereward cannot run here (its own environment): said so
    records = {record["reward"]: record for record in json.loads(out.read_text())["results"]}
    assert all(records[name]["ms_per_image"] > 0 for name in ("jpeg_compressibility", "mini_geneval", "ocr"))
    assert "ms_per_image" not in records["imagereward"] and "ImageReward" in records["imagereward"]["error"]


def test_bench_signal_scores_every_state_of_a_configs_rollouts(tmp_path):
    out = tmp_path / "signal.jsonl"
    command = [sys.executable, "-m", "sfgrpo_core.cli", "bench", "signal", "--config", "configs/toy.yaml",
               "--batches", "1", "--steps", "6", "--substeps", "2", "--values", "2", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shares sum to" in result.stdout
    record = json.loads(out.read_text())
    assert record["reward"] == "toy_mode" and record["reward_options"] == {}
    # the toy config: 4 groups of 8, the Flow-GRPO SDE (every step but the last to sigma 0 is random)
    assert (record["sampling_steps"], record["substeps"], record["trajectories"]) == (6, 2, 32)
    assert [step["step"] for step in record["steps"]] == list(range(6))
    assert [step["trains"] for step in record["steps"]] == [True] * 5 + [False]
    assert math.isfinite(record["share_sum"]) and record["share_sum"] > 0
    for step in record["steps"][:-1]:  # 2 continuations of each state: both credits compared with the true gains
        assert -1 <= step["stepwise_alignment"] <= 1 and -1 <= step["flow_grpo_alignment"] <= 1
