"""`sfgrpo bench paper --quick`: the benchmark's plumbing end to end in about a minute (the real run takes hours and
its results are committed under benchmarks/results/paper; nothing here asserts a timing or a learning result)."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from sfgrpo_core.bench.paper import catch_up

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _bench(out, *options):
    return subprocess.run([sys.executable, "-m", "sfgrpo_core.cli", "bench", "paper", "--quick", "--out", str(out),
                           *options], capture_output=True, text=True, cwd=ROOT, timeout=1200)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_quick_benchmark_writes_resumable_raw_records_and_a_summary(tmp_path):
    """The paper's PickScore protocol: both arms train on mini_pickscore, and every evaluation scores the same
    samples with MiniGenEval too (the gold judge: partial credit, strict accuracy, categories)."""
    out = tmp_path / "paper"
    first = _bench(out, "--reward", "mini_pickscore")
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((out / "paper.json").read_text())
    assert summary["reward"] == "mini_pickscore" and summary["gold_reward"] == "mini_geneval"
    assert set(summary["arms"]) == {"flow_grpo", "stepwise"}
    assert {"iterations_ratio", "seconds_ratio", "flow_grpo_final"} <= set(summary)
    for arm, data in summary["arms"].items():
        assert data["seeds"] == [0] and len(data["final_heldout"]) == 1 and len(data["final_strict"]) == 1
        assert set(data["curve"]) == {"0", "1", "2"} and data["seconds_per_iteration"] > 0
        assert set(data["seconds_per_iteration_by_phase"]) == {"rollout", "rewards", "update"}
        evals = _lines(out / "runs" / arm / "seed0" / "evals.jsonl")
        assert [r["iteration"] for r in evals] == [0, 1, 2]
        for record in evals:
            assert {"heldout", "heldout_se", "strict", "per_category", "samples_seen", "model_calls",
                    "reward_calls", "seconds"} <= set(record)
            assert {"gold_heldout", "gold_heldout_se"} <= set(record) and record["gold_reward"] == "mini_geneval"
            assert 0 <= record["strict"] <= record["gold_heldout"] <= 1  # MiniGenEval: mean >= share of 1s
            assert record["heldout"] > 1  # mini_pickscore is logit_scale x cosine, not a [0, 1] judgement
        assert len(data["final_gold_heldout"]) == 1 and "gold_heldout" in data["curve"]["2"]
        assert evals[0]["model_calls"] == 0 and evals[2]["model_calls"] > evals[1]["model_calls"] > 0
    # Stepwise costs more model calls and reward calls per iteration than Flow-GRPO (its completions).
    arms = summary["arms"]
    assert arms["stepwise"]["reward_calls_per_iteration"] > arms["flow_grpo"]["reward_calls_per_iteration"]
    # The evaluation reads each checkpoint: the quick Flow-GRPO run moves its LoRA, and its scores move with it.
    flow = _lines(out / "runs" / "flow_grpo" / "seed0" / "evals.jsonl")
    assert flow[2]["heldout"] != flow[0]["heldout"]
    assert (out / "paper.png").stat().st_size > 5000 and (out / "proxy_vs_gold.png").stat().st_size > 5000
    # A folder holds one reward's runs: MiniGenEval runs into it are refused, naming the reward it holds.
    mixed = _bench(out)
    assert mixed.returncode == 2 and "mini_pickscore" in mixed.stdout and "--out" in mixed.stdout

    metrics = out / "runs" / "stepwise" / "seed0" / "train" / "metrics.jsonl"
    before = (metrics.read_text(), (out / "runs" / "stepwise" / "seed0" / "evals.jsonl").read_text())
    import shutil

    # Only the records are committed, not the checkpoints: a finished run must not be trained again without them.
    shutil.rmtree(out / "runs" / "stepwise" / "seed0" / "train" / "checkpoints")
    again = _bench(out, "--reward", "mini_pickscore")  # resumable: nothing finished is trained or evaluated again
    assert again.returncode == 0, again.stderr[-3000:]
    assert (metrics.read_text(), (out / "runs" / "stepwise" / "seed0" / "evals.jsonl").read_text()) == before


def test_catch_up_finds_where_stepwise_reaches_flow_grpos_final_score():
    def arm(curve):
        return {"seeds": [0, 1], "final_heldout": curve[-1][1],
                "curve": {str(i): {"heldout": h, "seconds": [10.0 * i, 12.0 * i]} for i, h in curve}}

    flow = arm([(0, [0.3, 0.3]), (100, [0.40, 0.44])])  # final 0.42 at 100 iterations, 1100 s
    stepwise = arm([(0, [0.3, 0.3]), (25, [0.41, 0.42]), (50, [0.43, 0.42]), (100, [0.5, 0.5])])
    result = catch_up(stepwise, flow, 100)
    assert result["stepwise_reaches_at_iteration"] == 50 and result["iterations_ratio"] == 0.5
    assert abs(result["seconds_ratio"] - 550 / 1100) < 1e-12
    assert "seconds_ratio_median" not in result  # no per-iteration costs given
    # From the median seconds per iteration: 50 iterations at 30 s against 100 at 10 s.
    with_medians = catch_up({**stepwise, "seconds_per_iteration_median": 30.0},
                            {**flow, "seconds_per_iteration_median": 10.0}, 100)
    assert abs(with_medians["seconds_ratio_median"] - 1.5) < 1e-12
    never = arm([(0, [0.3, 0.3]), (100, [0.35, 0.36])])
    assert catch_up(never, flow, 100)["iterations_ratio"] is None
    # Only the seeds both arms finished count: against seed 1 alone (final 0.44) Stepwise needs 100 iterations.
    one_seed = {"seeds": [1], "final_heldout": [0.5],
                "curve": {str(i): {"seeds": [1], "heldout": [h[1]], "seconds": [12.0 * i]} for i, h in
                          [(0, [0.3, 0.3]), (25, [0.41, 0.42]), (50, [0.43, 0.42]), (100, [0.5, 0.5])]}}
    result = catch_up(one_seed, flow, 100)
    assert result["seeds"] == [1] and result["flow_grpo_final"] == 0.44 and result["iterations_ratio"] == 1.0


def test_paired_differences_compare_each_seed_with_its_own_flow_grpo_run():
    from sfgrpo_core.bench.paper import paired_differences

    flow = {"curve": {"0": {"seeds": [0, 1, 2], "heldout": [0.3, 0.3, 0.3]},
                      "50": {"seeds": [0, 1, 2], "heldout": [0.40, 0.50, 0.45]}}}
    arm = {"curve": {"0": {"seeds": [0, 1], "heldout": [0.3, 0.3]},
                     "50": {"seeds": [2, 0, 1], "heldout": [0.47, 0.44, 0.52]}}}
    result = paired_differences(arm, flow, "heldout")
    assert result["0"]["seeds"] == [0, 1] and result["0"]["mean"] == 0.0
    assert result["50"]["seeds"] == [0, 1, 2]
    assert result["50"]["differences"] == pytest.approx([0.04, 0.02, 0.02])
    assert result["50"]["mean"] == pytest.approx(0.08 / 3)
    assert result["50"]["se"] == pytest.approx(float(np.std([0.04, 0.02, 0.02], ddof=1)) / 3 ** 0.5)
    assert paired_differences(arm, flow, "gold_heldout") == {}


def test_combine_puts_the_main_run_on_top_and_keeps_every_run(tmp_path):
    from sfgrpo_core.bench.paper import combine

    for name, final in (("h200", 0.48), ("cpu", 0.47)):
        (tmp_path / name).mkdir()
        summary = {"device": name, "arms": {"flow_grpo": {"final_heldout": [final]}}, "iterations_ratio": None}
        (tmp_path / name / "paper.json").write_text(json.dumps(summary))
    combined = combine([tmp_path / "h200", tmp_path / "cpu"], tmp_path / "paper.json")
    assert json.loads((tmp_path / "paper.json").read_text()) == combined
    assert combined["device"] == "h200" and combined["arms"]["flow_grpo"]["final_heldout"] == [0.48]
    assert set(combined["runs"]) == {"h200", "cpu"} and combined["runs"]["cpu"]["device"] == "cpu"
    assert "iterations_ratio" in combined and combined["main_run"].endswith("h200")


def test_every_arm_is_a_valid_training_config_and_dense_is_densegrpos_credit(tmp_path):
    """Each arm's recipe plus its changes passes the config's own checks; dense changes exactly the completion
    (the rest of the grid) and the normalization (per timestep) of the Stepwise arm."""
    from sfgrpo_core.bench.paper import ARMS, arm_config, full_plan

    plan = full_plan(reward="mini_pickscore")
    configs = {arm: arm_config(arm, 0, plan, tmp_path / arm) for arm in ARMS}
    assert all(config.train.reward == "mini_pickscore" for config in configs.values())
    dense, stepwise = configs["dense"], configs["stepwise"]
    assert (dense.credit.completion, dense.credit.normalization) == ("grid", "per_step")
    assert (stepwise.credit.completion, stepwise.credit.normalization) == ("uniform", "joint")
    assert dense.replace(**{"credit.completion": "uniform", "credit.normalization": "joint",
                            "train.output_dir": stepwise.train.output_dir}) == stepwise


def test_equal_tuning_pairs_each_stepwise_arm_with_its_flow_grpo_counterpart(tmp_path):
    """stepwise_cosine is compared with flow_grpo_cosine (both given the lr decay) as well as with flow_grpo. Here
    the two arms' records are copies of one quick run each, so Stepwise's paired differences are its own."""
    import shutil

    out = tmp_path / "paper"
    assert _bench(out, "--reward", "mini_pickscore").returncode == 0
    for arm, copy in (("flow_grpo", "flow_grpo_cosine"), ("stepwise", "stepwise_cosine")):
        shutil.copytree(out / "runs" / arm, out / "runs" / copy)
    summarized = _bench(out, "--reward", "mini_pickscore", "--summary-only")
    assert summarized.returncode == 0, summarized.stderr[-3000:]
    summary = json.loads((out / "paper.json").read_text())
    equal = summary["equal_tuning"]["stepwise_cosine"]
    assert equal["flow_grpo_arm"] == "flow_grpo_cosine"
    assert equal["paired"]["heldout"] == summary["paired_with_flow_grpo"]["stepwise"]["heldout"]
    assert set(equal["paired"]) == {"heldout", "strict", "gold_heldout"}
    assert {"iterations_ratio", "seconds_ratio"} <= set(equal)
