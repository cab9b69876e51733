"""The Credit Signal node (bench signal in the graph) inside a real ComfyUI engine, on the mini world: its numbers
are the core's measurement of the same rollouts (the headless mini world, same seeds), with its verdict and plot."""

import json
import sys

import pytest
import torch

CAPTURED: dict[str, dict] = {}
CAPTURE_INPUTS = {"plot": ("IMAGE",), "numbers": ("STRING", {"forceInput": True}),
                  "verdict": ("STRING", {"forceInput": True})}
PROMPTS = "a red circle\ntwo blue squares"
SETTINGS = {"sde": "ddim", "eta": 0.7, "noise_level": 0.7, "steps": 4, "substeps": 2, "group_size": 4, "groups": 2,
            "seed": 0, "batches": 1, "continuations": 2}


@pytest.fixture(scope="module")
def engine(comfy_engine):
    comfy_engine.add_capture_node("TestCaptureSignal", CAPTURED, CAPTURE_INPUTS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield comfy_engine
    torch.set_num_threads(threads)


def _graph(**settings) -> dict:
    return {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": "mini_sd3_transformer.safetensors",
                                                        "weight_dtype": "default"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "mini_taesd.safetensors"}},
        "clip": {"class_type": "SFGRPOMiniWorldTextEncoder", "inputs": {}},
        "prompts": {"class_type": "SFGRPOPrompts", "inputs": {"clip": ["clip", 0], "text": PROMPTS}},
        "reward": {"class_type": "SFGRPOLoadReward", "inputs": {"reward": "mini_pickscore", "options": "{}"}},
        "signal": {"class_type": "SFGRPOCreditSignal", "inputs": {
            "model": ["unet", 0], "vae": ["vae", 0], "prompts": ["prompts", 0], "reward": ["reward", 0],
            "width": 64, "height": 64, **{**SETTINGS, **settings}}},
        "capture": {"class_type": "TestCaptureSignal", "inputs": {
            "key": "signal", "plot": ["signal", 0], "numbers": ["signal", 1], "verdict": ["signal", 2]}},
    }


def test_the_node_measures_the_credit_signal_and_gives_a_verdict(engine):
    server = engine.run(_graph())
    errors = [data for event, data in server.messages if event == "execution_error"]
    assert not errors, errors[0]["exception_message"] + "".join(errors[0]["traceback"])
    result = json.loads(CAPTURED["signal"]["numbers"])
    assert result["trajectories"] == 8 and result["continuations"] == 2 and result["reward"] == "mini_pickscore"
    trained = [step for step in result["steps"] if step["trains"]]
    assert trained and all({"true_gain_share", "stepwise_alignment", "flow_grpo_alignment"} <= set(step)
                           for step in trained)
    verdict = CAPTURED["signal"]["verdict"]
    assert verdict.startswith(("per-step credit is", "no verdict")), verdict
    plot = CAPTURED["signal"]["plot"]
    assert plot.ndim == 4 and plot.shape[0] == 1 and plot.shape[-1] == 3 and float(plot.std()) > 0.01
    texts = [data["output"]["text"] for event, data in server.messages
             if event == "executed" and data["output"] and "text" in data["output"]]
    assert texts and texts[0][0].startswith(verdict)  # the verdict on the node, the table under it

    # The core's measurement of the same rollouts: the headless mini world with the same seeds and settings.
    from sfgrpo_core.bench.signal import measure_session
    from sfgrpo_core.config import load_config
    from sfgrpo_core.training.trainer import build_session

    config = load_config("configs/miniworld_pickscore.yaml").replace(**{
        "sampler.steps": 4, "credit.substeps": 2, "train.group_size": 4, "train.groups_per_iteration": 2,
        "train.prompts": PROMPTS.splitlines(), "train.eval_every": 0})
    core = measure_session(build_session(config), batches=1, continuations=2)
    assert result["final_reward_mean"] == pytest.approx(core["final_reward_mean"], abs=0.05)
    for node_step, core_step in zip(result["steps"], core["steps"], strict=True):
        for key in ("stepwise_alignment", "flow_grpo_alignment", "true_gain_share"):
            if core_step["trains"]:
                assert node_step[key] == pytest.approx(core_step[key], abs=0.05), (node_step["step"], key)


def test_the_node_refuses_a_size_that_is_not_a_multiple_of_16(engine):
    server = engine.run({**_graph(), "signal": {**_graph()["signal"], "inputs": {**_graph()["signal"]["inputs"],
                                                                                   "width": 60}}})
    errors = [data for event, data in server.messages if event == "execution_error"]
    assert errors and "width: 60 is not a multiple of 16" in errors[0]["exception_message"]


def test_cancel_stops_the_measurement_at_its_next_step_and_removes_the_adapters(engine, monkeypatch):
    """Cancel (ComfyUI's interrupt flag, as POST /interrupt sets it) raised during the first batch stops the node
    at its next progress tick; the MODEL it measured keeps no LoRA adapter."""
    import comfy.model_management
    import comfy.utils

    ticks = []
    original = comfy.utils.ProgressBar.update

    def update_then_cancel(self, value):
        ticks.append(value)
        original(self, value)
        comfy.model_management.interrupt_current_processing(True)

    monkeypatch.setattr(comfy.utils.ProgressBar, "update", update_then_cancel)
    models = []
    real_build = sys.modules[engine.nodes.NODE_CLASS_MAPPINGS["SFGRPOCreditSignal"].__module__].ComfyFlowModel

    def keep_model(*args, **kwargs):
        models.append(real_build(*args, **kwargs))
        return models[-1]

    monkeypatch.setattr(sys.modules[engine.nodes.NODE_CLASS_MAPPINGS["SFGRPOCreditSignal"].__module__],
                        "ComfyFlowModel", keep_model)
    try:
        server = engine.run(_graph(batches=3))
    finally:
        comfy.model_management.interrupt_current_processing(False)
    kinds = [event for event, _ in server.messages]
    assert "execution_interrupted" in kinds and "execution_success" not in kinds, kinds
    total = 3 * (1 + SETTINGS["steps"])  # progress_ticks(batches, steps, continuations)
    assert 1 <= len(ticks) < total
    assert models and not [name for name, _ in models[0].module.named_parameters() if "lora_" in name]
