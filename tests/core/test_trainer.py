"""The trainer end to end on the toy world: it learns, it is on-policy, and it resumes exactly."""

import json
import pathlib

import pytest
import torch

from sfgrpo_core.config import ConfigError
from sfgrpo_core.training import trainer
from sfgrpo_core.training.diagnose import diagnose


def _eval_curve(records):
    return [r["eval_reward_mean"] for r in records if r.get("eval_reward_mean") is not None]


@pytest.mark.parametrize("method", ["stepwise", "flow_grpo"])
def test_both_methods_raise_the_held_out_reward(toy_config, method):
    config = toy_config.replace(**{"credit.method": method})
    result = trainer.train(config)
    curve = _eval_curve(result.records)
    print(method, [round(value, 3) for value in curve])
    assert len(curve) == 5  # iterations 0, 10, 20, 30 and after the last
    assert curve[-1] > curve[0] + 0.1, curve
    assert result.lora_path.is_file() and (result.run_dir / "reward_curve.png").stat().st_size > 1000
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 41
    record = json.loads(lines[5])
    for key in ("reward_mean", "reward_std", "zero_std_ratio", "approx_kl", "clip_fraction", "ratio_mean",
                "seconds_rollout", "seconds_rewards", "seconds_update", "samples_seen", "reward_missing",
                "reward_calls"):
        assert key in record, key
    if method == "stepwise":
        assert len(record["gain_abs_mean"]) == 10 and len(record["step_reward_mean"]) == 11


def test_stepwise_learns_faster_than_flow_grpo_per_iteration(toy_config):
    """The paper's claim, on the toy world: after the same iterations, stepwise credit is ahead."""
    short = toy_config.replace(**{"train.iterations": 20})
    stepwise = _eval_curve(trainer.train(short).records)[-1]
    flow_config = short.replace(**{"credit.method": "flow_grpo", "train.output_dir": short.train.output_dir + "_flow"})
    flow = _eval_curve(trainer.train(flow_config).records)[-1]
    print("stepwise", stepwise, "flow_grpo", flow)
    assert stepwise > flow


def test_the_first_minibatch_is_exactly_on_policy(toy_config):
    results = diagnose(toy_config)
    assert all(result.passed for result in results), [result.line() for result in results]
    for sde in ("ddim", "cps"):
        results = diagnose(toy_config.replace(**{"sampler.sde": sde}))
        assert all(result.passed for result in results), [result.line() for result in results]


def test_resume_matches_an_uninterrupted_run(toy_config, tmp_path):
    settings = {"train.iterations": 6, "train.checkpoint_every": 2, "train.eval_every": 2}
    straight = trainer.train(toy_config.replace(**settings, **{"train.output_dir": str(tmp_path / "a")}))
    split = toy_config.replace(**settings, **{"train.output_dir": str(tmp_path / "b")})

    class Crash(Exception):
        pass

    def crash_at_three(record):
        if record["iteration"] == 3:
            raise Crash()

    with pytest.raises(Crash):
        trainer.train(split, hooks=trainer.TrainHooks(on_iteration=crash_at_three))
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text().strip() == "iter_000002"
    resumed = trainer.train(split, resume=True)

    def comparable(records):
        return [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in records]

    assert comparable(resumed.records) == comparable(straight.records)
    from sfgrpo_core.lora.adapters import read_lora

    weights_a, _ = read_lora(straight.lora_path)
    weights_b, _ = read_lora(resumed.lora_path)
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key


def test_extending_a_finished_run_and_refusing_incompatible_resumes(toy_config):
    config = toy_config.replace(**{"train.iterations": 2, "train.eval_every": 0})
    trainer.train(config)
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        trainer.train(config)
    with pytest.raises(ConfigError, match="cannot resume with changed optim.lr"):
        trainer.train(config.replace(**{"optim.lr": 0.1, "train.iterations": 3}), resume=True)
    extended = trainer.train(config.replace(**{"train.iterations": 3}), resume=True)
    assert [r["iteration"] for r in extended.records] == [0, 1, 2]


def test_resume_without_a_checkpoint_is_refused(toy_config):
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        trainer.train(toy_config, resume=True)


def test_bad_prompts_fail_before_training(toy_config):
    with pytest.raises(ValueError, match="toy world prompt 'a cat'"):
        trainer.train(toy_config.replace(**{"train.prompts": ["a cat"]}))


def test_kl_penalty_and_per_step_normalization_run(toy_config):
    config = toy_config.replace(**{"optim.kl_beta": 0.04, "credit.normalization": "per_step",
                                   "train.iterations": 2, "train.eval_every": 0, "optim.micro_batch_size": 16})
    records = trainer.train(config).records
    assert records[-1]["kl_penalty"] > 0
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)


def test_the_cosine_schedule_sets_each_iterations_lr(toy_config):
    from sfgrpo_core.training.lr_schedule import constant, cosine

    lrs = [cosine(1e-3, k, 5, 0.1) for k in range(5)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4) and lrs[2] == pytest.approx(5.5e-4)
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False)) and cosine(1e-3, 9, 5, 0.1) == pytest.approx(1e-4)
    assert constant(1e-3, 3, 5, 0.1) == 1e-3
    config = toy_config.replace(**{"optim.lr_schedule": "cosine", "optim.lr_final_ratio": 0.1, "optim.lr": 1e-3,
                                   "train.iterations": 3, "train.eval_every": 0})
    records = trainer.train(config).records
    assert [r["lr"] for r in records] == pytest.approx([1e-3, 5.5e-4, 1e-4])
    # A decay spanning 5 iterations stays put when a run trains (or is extended) to fewer or more of them.
    spanned = config.replace(**{"optim.lr_decay_iterations": 5, "train.output_dir": config.train.output_dir + "2"})
    assert [r["lr"] for r in trainer.train(spanned).records] == pytest.approx(lrs[:3])


def test_missing_rewards_are_counted_and_left_out(toy_config):
    from sfgrpo_core import rewards
    from sfgrpo_core.rewards.builtin import ToyModeCloseness

    toy_reward = ToyModeCloseness()

    def flaky(points, prompts, metadata=None):
        scores = toy_reward(points, prompts)
        scores[::7] = float("nan")
        return scores

    rewards.register("test_flaky_toy", lambda: flaky)
    records = trainer.train(toy_config.replace(**{"train.reward": "test_flaky_toy", "train.iterations": 2,
                                                  "train.eval_every": 0})).records
    assert records[0]["reward_missing"] > 0
    assert all(torch.isfinite(torch.tensor([r["loss"], r["reward_mean"]])).all() for r in records)


def test_a_diverging_run_stops_with_an_error_and_saves_nothing_non_finite(toy_config, tmp_path):
    config = toy_config.replace(**{"optim.lr": 1e30, "optim.grad_clip": 0.0, "train.iterations": 6,
                                   "train.eval_every": 0, "train.checkpoint_every": 1})
    with pytest.raises(trainer.NonFiniteError, match=r"iteration \d+: .*non-finite|the loss is nan"):
        trainer.train(config)
    run_dir = pathlib.Path(config.train.output_dir)
    assert not (run_dir / "lora.safetensors").exists()  # no "success": the final LoRA is never written
    from safetensors.torch import load_file

    for checkpoint in (run_dir / "checkpoints").glob("iter_*"):
        assert all(torch.isfinite(tensor).all() for tensor in load_file(checkpoint / "lora.safetensors").values())


class _NaNGradient(torch.autograd.Function):
    """The identity forward, a NaN gradient backward: a fault in a module's backward pass."""

    @staticmethod
    def forward(ctx, tensor):
        return tensor.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.mark.parametrize("fault", ["forward", "backward"])
def test_diagnose_names_the_module_that_makes_a_nan(toy_config, fault):
    """A NaN injected into one layer of the real toy model, in its forward output or in its backward pass: the
    finite_update check fails and names that layer, and the other checks run on."""
    from sfgrpo_core import models

    model = models.build("toy", path=toy_config.model.path)
    layer = model.module.hidden2
    if fault == "forward":
        layer.register_forward_hook(lambda module, inputs, output: output * float("nan") if torch.is_grad_enabled()
                                    else output)
    else:
        layer.register_forward_hook(lambda module, inputs, output: _NaNGradient.apply(output))
    results = {result.name: result for result in diagnose(toy_config, model=model)}
    check = results["finite_update"]
    assert not check.passed and check.value > 0, check.line()
    expected = ("forward output of hidden2.base_layer (its inputs finite)" if fault == "forward" else
                "backward of hidden2.base_layer (the gradient at its output finite, at its input not)")
    assert f"first non-finite value: {expected}" in check.detail, check.line()
    assert results["on_policy_ratio"].passed and results["zero_noise_is_ode"].passed  # the rollout ran no-grad
