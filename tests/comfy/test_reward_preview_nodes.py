"""The reward nodes (Load Reward, Score) and the Tweedie Preview inside a real ComfyUI engine, on the mini world.

The mini world loads through stock nodes (UNETLoader, VAELoader, CLIPTextEncode on the pack's text encoder); a
test-only node keeps the outputs. The preview runs are done once, in one prompt, and shared by the preview tests.
"""

import asyncio
import math
import sys
import uuid

import pytest
import torch

PROMPT = "a red circle"
SEED = 3
STEPS = 4
BATCH = 2
ODE_STEPS = 8
CAPTURED: dict[str, dict] = {}


_IMAGE = ("IMAGE",)
CAPTURE_INPUTS = {"estimates": _IMAGE, "grid": _IMAGE, "curve": _IMAGE, "final": _IMAGE, "latent": ("LATENT",),
                  "scores": ("FLOAT", {"forceInput": True}), "mean": ("FLOAT", {"forceInput": True})}

@pytest.fixture(scope="module")
def engine(comfy_engine):
    """The session's engine with the capture node, on one torch thread (tiny tensors; a busy 2-core machine)."""
    comfy_engine.add_capture_node("TestCaptureLists", CAPTURED, CAPTURE_INPUTS, input_is_list=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield comfy_engine
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pack_rewards(engine):
    """The reward registry the pack's nodes use: ComfyUI imports the pack under its own module name, so this is not
    the ``sfgrpo_core.rewards`` this test process imports."""
    return sys.modules[engine.nodes.NODE_CLASS_MAPPINGS["SFGRPOLoadReward"].__module__].rewards


def _world() -> dict:
    """Loaders and conditioning of the committed mini world."""
    return {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": "mini_sd3_transformer.safetensors",
                                                        "weight_dtype": "default"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "mini_taesd.safetensors"}},
        "clip": {"class_type": "SFGRPOMiniWorldTextEncoder", "inputs": {}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["clip", 0]}},
        "neg": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["pos", 0]}},
        "empty": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": BATCH}},
    }


def _load_reward(name: str, options: str = "{}") -> dict:
    return {"class_type": "SFGRPOLoadReward", "inputs": {"reward": name, "options": options}}


def _score_graph(image_nodes: dict, reward: dict, prompts: str) -> dict:
    """API prompt: ``image_nodes`` (ending in node "images") scored with ``reward`` (a node), captured as "score"."""
    return {
        **image_nodes, "reward": reward,
        "score": {"class_type": "SFGRPOScore", "inputs": {"images": ["images", 0], "reward": ["reward", 0],
                                                          "prompts": prompts}},
        "capture": {"class_type": "TestCaptureLists", "inputs": {"key": "score", "scores": ["score", 0],
                                                                 "mean": ["score", 1]}},
    }


def _two_flat_images(first_color: int, second_color: int) -> dict:
    """Nodes "a", "b" and "images": two flat 64x64 images of 0xRRGGBB colours, batched by stock nodes."""
    return {"a": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                         "color": first_color}},
            "b": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                         "color": second_color}},
            "images": {"class_type": "ImageBatch", "inputs": {"image1": ["a", 0], "image2": ["b", 0]}}}


def _run(engine, prompt: dict) -> tuple[list, list]:
    """Execute ``prompt``: (execution_error messages, executed messages)."""
    CAPTURED.clear()
    server = engine.run(prompt)
    errors = [data for event, data in server.messages if event == "execution_error"]
    executed = [data for event, data in server.messages if event == "executed"]
    return errors, executed


def _run_ok(engine, prompt: dict) -> list:
    errors, executed = _run(engine, prompt)
    assert not errors, errors[0]["exception_message"]
    return executed


def _error_message(engine, prompt: dict) -> str:
    errors, _ = _run(engine, prompt)
    assert errors, "the prompt ran without an error"
    assert errors[0]["exception_type"].endswith("ValueError"), errors[0]
    return errors[0]["exception_message"]


def _score_text(executed: list) -> str:
    texts = [data["output"]["text"] for data in executed if data["output"] and "text" in data["output"]]
    assert len(texts) == 1, executed
    return "\n".join(texts[0])


# ---------------------------------------------------------------------------------------------------------- rewards


def test_load_reward_and_score_decoded_images(engine):
    prompt = _world()
    prompt.update({
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["unet", 0], "seed": SEED, "steps": STEPS, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["empty", 0],
            "denoise": 1.0}},
    })
    graph = _score_graph({"images": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0],
                                                                            "vae": ["vae", 0]}}},
                         _load_reward("mini_geneval"), PROMPT)
    executed = _run_ok(engine, {**prompt, **graph})
    scores, mean = CAPTURED["score"]["scores"], CAPTURED["score"]["mean"]
    assert len(scores) == BATCH and all(0.0 <= value <= 1.0 for value in scores)
    assert mean == [pytest.approx(sum(scores) / BATCH)]
    text = _score_text(executed)
    assert text.splitlines()[0] == f"image 0: {scores[0]:.4f}" and f"mean: {mean[0]:.4f}" in text


def test_score_marks_an_image_the_reward_fails_on_as_missing(engine, pack_rewards, monkeypatch):
    def brightness_unless_black(images, prompts, metadata=None):
        if (images.flatten(1).amax(1) == 0).any():
            raise ValueError("a black image")
        return images.float().mean((1, 2, 3)) / 255

    monkeypatch.setitem(pack_rewards._REGISTRY, "test_fails_on_black", lambda: brightness_unless_black)
    graph = _score_graph(_two_flat_images(0x000000, 0x808080), _load_reward("test_fails_on_black"), "")
    executed = _run_ok(engine, graph)
    scores, mean = CAPTURED["score"]["scores"], CAPTURED["score"]["mean"]
    assert math.isnan(scores[0]) and scores[1] == pytest.approx(128 / 255)  # 0x80 -> 128/255 -> round(x*255) = 128
    assert mean == [pytest.approx(128 / 255)]  # the mean of the scored images only, never counting NaN as 0
    text = _score_text(executed)
    assert "image 0: missing" in text and "(1 of 2 scored)" in text

    graph = _score_graph(_two_flat_images(0, 0), _load_reward("test_fails_on_black"), "")
    assert _error_message(engine, graph).startswith("reward: 'test_fails_on_black' could not score any")


def test_a_reward_registered_through_import_sfgrpo_core_reaches_the_nodes(engine, pack_rewards):
    """ComfyUI imports the pack under its own module name: the nodes' registry is a second module object, but the
    table is one, so a reward a user (or another node pack) registers via ``import sfgrpo_core`` can be loaded."""
    from sfgrpo_core import rewards

    assert pack_rewards is not rewards
    rewards.register("test_from_user_code", lambda scale=1.0: (
        lambda images, prompts, metadata=None: scale * images.float().mean((1, 2, 3)) / 255))
    schema = engine.nodes.NODE_CLASS_MAPPINGS["SFGRPOLoadReward"].define_schema()
    assert "test_from_user_code" in schema.inputs[0].options
    assert "test_from_user_code(scale=1.0)" in schema.inputs[1].tooltip  # every reward's options are shown
    _run_ok(engine, _score_graph(_two_flat_images(0x808080, 0x808080),
                                 _load_reward("test_from_user_code", '{"scale": 2.0}'), ""))
    assert CAPTURED["score"]["scores"] == [pytest.approx(2 * 128 / 255)] * 2


class _TinyTorchReward:
    """A reward backed by a torch module, as the model-backed rewards are (``torch_modules`` + ``to``)."""

    built = 0
    devices_while_scoring: list = []

    def __init__(self):
        type(self).built += 1
        self.head = torch.nn.Linear(3, 1)

    def torch_modules(self):
        return [self.head]

    def to(self, device):
        self.head.to(device)
        return self

    def __call__(self, images, prompts, metadata=None):
        type(self).devices_while_scoring.append(self.head.weight.device)
        pixels = images.float().mean((1, 2)).to(self.head.weight.device) / 255
        return self.head(pixels)[:, 0].cpu()


def test_a_model_backed_reward_is_loaded_once_and_on_the_compute_device_only_while_scoring(engine, pack_rewards,
                                                                                             monkeypatch):
    import comfy.model_management

    monkeypatch.setitem(pack_rewards._REGISTRY, "test_tiny_torch", _TinyTorchReward)
    graph = _score_graph(_two_flat_images(0x102030, 0x405060), _load_reward("test_tiny_torch"), "")
    _run_ok(engine, graph)
    first = list(CAPTURED["score"]["scores"])
    _run_ok(engine, graph)  # a fresh executor: no ComfyUI cache, yet the reward is not built again
    assert CAPTURED["score"]["scores"] == first and _TinyTorchReward.built == 1
    compute, offload = comfy.model_management.get_torch_device(), comfy.model_management.unet_offload_device()
    assert all(device.type == compute.type for device in _TinyTorchReward.devices_while_scoring)
    loaded = sys.modules[engine.nodes.NODE_CLASS_MAPPINGS["SFGRPOLoadReward"].__module__]._LOADED
    reward = next(item.reward for key, item in loaded.items() if key[0] == "test_tiny_torch")
    assert reward.head.weight.device.type == offload.type  # back on the offload device after scoring

    class _RegisteredAgain(_TinyTorchReward):
        pass

    monkeypatch.setitem(pack_rewards._REGISTRY, "test_tiny_torch", _RegisteredAgain)  # a plug-in reloaded
    _run_ok(engine, graph)
    assert _RegisteredAgain.built == 2 and _TinyTorchReward.built == 1  # the new factory built once more


def test_score_refuses_a_prompt_count_that_fits_neither_rule(engine):
    graph = _score_graph(_two_flat_images(0xFF0000, 0x00FF00), _load_reward("jpeg_compressibility"),
                         "a red circle\na blue square\na green circle")
    message = _error_message(engine, graph)
    assert message.startswith("prompts: 3 prompt lines for 2 images"), message
    graph["score"]["inputs"]["prompts"] = "a red circle\na blue square"  # one per image is fine
    _run_ok(engine, graph)
    assert len(CAPTURED["score"]["scores"]) == 2 and all(value < 0 for value in CAPTURED["score"]["scores"])


@pytest.mark.parametrize(("options", "expected"), [
    ("{quality: 90}", "options: not valid JSON"),
    ("[90]", "options: expected a JSON object"),
    ('{"quality": 500}', "options: reward 'jpeg_compressibility' rejected"),
    ('{"qualty": 90}', "options: reward 'jpeg_compressibility' rejected"),
    ('{"quality": NaN}', "options: NaN is not a finite number"),
    ('{"quality": Infinity}', "options: Infinity is not a finite number"),
])
def test_load_reward_refuses_bad_options(engine, options, expected):
    graph = _score_graph(_two_flat_images(0, 0), _load_reward("jpeg_compressibility", options), "")
    assert _error_message(engine, graph).startswith(expected)


def test_reward_weights_come_from_the_rewards_models_folder(engine, tmp_path, monkeypatch):
    """PickScore's two hub repos as folders under their hub names in a registered rewards folder (here one that
    extra_model_paths.yaml would add): Load Reward lists them, 'auto' loads them, and the score equals the core's
    own load of the same folders; a reward whose weights are missing says which files go in which folder."""
    import shutil

    import folder_paths
    from reward_stand_ins import build_stand_in

    from sfgrpo_core import rewards

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub: weights come from the folder or not at all
    stand_in = build_stand_in("pickscore", tmp_path / "stand_in")
    folder = tmp_path / "rewards"
    shutil.copytree(stand_in["model"], folder / "PickScore_v1")
    shutil.copytree(stand_in["processor"], folder / "CLIP-ViT-H-14-laion2B-s32B-b79K")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "rewards",
                        (list(folder_paths.get_folder_paths("rewards")) + [str(folder)], set()))
    schema = engine.nodes.NODE_CLASS_MAPPINGS["SFGRPOLoadReward"].INPUT_TYPES()
    listed = set(schema["optional"]["weights"][1]["options"])  # a V3 combo: ("COMBO", {"options": [...]})
    assert {"auto", "PickScore_v1", "CLIP-ViT-H-14-laion2B-s32B-b79K"} <= listed

    images = _two_flat_images(0x2040C0, 0xE0E0E0)
    reward = {"class_type": "SFGRPOLoadReward", "inputs": {"reward": "pickscore", "options": "{}", "weights": "auto"}}
    _run_ok(engine, _score_graph(images, reward, "a blue square"))
    scores = CAPTURED["score"]["scores"]
    core = rewards.load("pickscore", model=str(folder / "PickScore_v1"),
                        processor=str(folder / "CLIP-ViT-H-14-laion2B-s32B-b79K"))
    pixels = torch.tensor([[[[0x20, 0x40, 0xC0]]], [[[0xE0, 0xE0, 0xE0]]]], dtype=torch.uint8).expand(2, 64, 64, 3)
    expected = core(pixels, ["a blue square"] * 2)
    assert scores == pytest.approx(expected.tolist(), abs=1e-4)

    missing = {"class_type": "SFGRPOLoadReward", "inputs": {"reward": "clip", "options": "{}", "weights": "auto"}}
    message = _error_message(engine, _score_graph(images, missing, "a blue square"))
    assert "clip-vit-large-patch14" in message and str(folder) in message, message


def test_an_unknown_reward_name_is_refused_naming_the_input(engine):
    """ComfyUI 0.3.75's validate_prompt checks only V1 list combos, not V3 ("COMBO", {"options"}) ones, so there
    the node itself must refuse the name; a ComfyUI that validates V3 combos refuses it before running."""
    graph = _score_graph(_two_flat_images(0, 0), _load_reward("no_such_reward"), "")
    valid, _, _, node_errors = asyncio.run(engine.execution.validate_prompt(str(uuid.uuid4()), graph, None))
    if not valid:
        error = node_errors["reward"]["errors"][0]
        assert error["extra_info"]["input_name"] == "reward" and "no_such_reward" in error["details"]
        return
    message = _error_message(engine, graph)
    assert message.startswith("reward: unknown reward 'no_such_reward'; choose one of:"), message
    assert "mini_geneval" in message and "jpeg_compressibility" in message


# ---------------------------------------------------------------------------------------------------------- preview


def _preview(key: str, *, steps: int = STEPS, sde: str = "ddim", strength: float = 0.7, substeps: int = 1,
             cfg: float = 1.0, reward: str | None = None) -> dict:
    """Nodes "<key>" (the preview), "<key>_decode" (stock VAEDecode of its samples) and their capture."""
    inputs = {"model": ["unet", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["empty", 0],
              "vae": ["vae", 0], "seed": SEED, "steps": steps, "cfg": cfg, "scheduler": "simple", "sde": sde,
              "strength": strength, "substeps": substeps}
    nodes = {}
    if reward is not None:
        nodes[f"{key}_reward"] = _load_reward(reward)
        inputs.update(reward=[f"{key}_reward", 0], prompt=PROMPT)
    nodes[key] = {"class_type": "SFGRPOTweediePreview", "inputs": inputs}
    nodes[f"{key}_decode"] = {"class_type": "VAEDecode", "inputs": {"samples": [key, 2], "vae": ["vae", 0]}}
    nodes[f"{key}_capture"] = {"class_type": "TestCaptureLists", "inputs": {
        "key": key, "estimates": [key, 0], "grid": [key, 1], "latent": [key, 2], "curve": [key, 3],
        "final": [f"{key}_decode", 0]}}
    return nodes


@pytest.fixture(scope="module")
def previews(engine) -> dict[str, dict]:
    """All preview runs in one prompt (the loaders run once): key -> its outputs and the decoded final samples, plus
    under "live" what ComfyUI's progress bar ("progress": node -> [(value, total)]) and live-preview callback
    ("x0": node -> [x0 given at each step]) were sent."""
    import comfy.utils
    import latent_preview
    from comfy_execution.utils import get_executing_context

    prompt = _world()
    prompt.update(_preview("geneval", reward="mini_geneval"))
    prompt.update(_preview("substeps", substeps=3, reward="mini_geneval"))
    prompt.update(_preview("jpeg", reward="jpeg_compressibility"))
    prompt.update(_preview("ode_weak", steps=ODE_STEPS, sde="ode", strength=0.1))
    prompt.update(_preview("ode_strong", steps=ODE_STEPS, sde="ode", strength=0.9))
    prompt.update(_preview("cfg", cfg=3.0, substeps=2, sde="flow_grpo"))
    progress, previewed = {}, {}
    original_prepare = latent_preview.prepare_callback

    def recording_prepare_callback(model, steps, x0_output_dict=None):
        callback = original_prepare(model, steps, x0_output_dict)

        def record(step, x0, x, total_steps):
            previewed.setdefault(get_executing_context().node_id, []).append(x0.clone())
            callback(step, x0, x, total_steps)

        return record

    def hook(value, total, preview_image, prompt_id=None, node_id=None):
        progress.setdefault(get_executing_context().node_id, []).append((value, total))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(latent_preview, "prepare_callback", recording_prepare_callback)
        patch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
        _run_ok(engine, prompt)
    runs = {key: {name: value[0] for name, value in values.items() if name != "key"}
            for key, values in CAPTURED.items()}
    return {**runs, "live": {"progress": progress, "x0": previewed}}


def test_preview_outputs_every_step_then_the_final_image(previews):
    run = previews["geneval"]
    estimates, final = run["estimates"], run["final"]
    assert estimates.shape == (BATCH * (STEPS + 1), 64, 64, 3) and torch.isfinite(estimates).all()
    assert final.shape == (BATCH, 64, 64, 3)
    per_sample = estimates.reshape(BATCH, STEPS + 1, 64, 64, 3)
    torch.testing.assert_close(per_sample[:, -1], final, rtol=0, atol=0)  # the decoded "samples" output
    # the last step lands on its own Tweedie estimate (an Euler step to t = 0), so with T' = 1 they agree
    torch.testing.assert_close(per_sample[:, -2], final, rtol=0, atol=2e-3)
    assert (per_sample[:, 0] - final).abs().mean() > 0.01  # the first step's estimate is not the final image yet
    assert run["latent"]["samples"].shape == (BATCH, 16, 8, 8)


def test_preview_grid_has_a_row_per_sample_and_a_column_per_step(previews):
    run = previews["geneval"]
    grid = run["grid"]
    assert grid.shape == (1, BATCH * 64, (STEPS + 1) * 64, 3)
    per_sample = run["estimates"].reshape(BATCH, STEPS + 1, 64, 64, 3)
    torch.testing.assert_close(grid[0, 64:128, 128:192], per_sample[1, 2], rtol=0, atol=0)


def test_preview_runs_with_guidance_substeps_and_another_sde(previews):
    """cfg > 1: the extra substep calls go through the CFG guider (positive and negative) like the sampler's own."""
    run = previews["cfg"]
    per_sample = run["estimates"].reshape(BATCH, STEPS + 1, 64, 64, 3)
    assert torch.isfinite(per_sample).all()
    torch.testing.assert_close(per_sample[:, -1], run["final"], rtol=0, atol=0)
    assert (run["final"] - previews["geneval"]["final"]).abs().mean() > 1e-3  # guidance changed the samples


def test_substeps_refine_early_estimates_only(previews):
    one, three = (previews[key]["estimates"].reshape(BATCH, STEPS + 1, 64, 64, 3) for key in ("geneval", "substeps"))
    assert torch.isfinite(three).all()
    assert (one[:, 0] - three[:, 0]).abs().mean() > 1e-3  # T' ODE substeps from t = 1 are not the one-step estimate
    torch.testing.assert_close(three[:, -1], one[:, -1], rtol=0, atol=0)  # the trajectory itself is the same


def test_reward_curve_has_its_size_and_depends_on_the_reward(previews):
    from sfgrpo_core.training.figures import MESSAGE_SIZE, STEP_FIGURE_SIZE

    geneval, jpeg = previews["geneval"]["curve"], previews["jpeg"]["curve"]
    for curve in (geneval, jpeg):
        assert curve.shape == (1, STEP_FIGURE_SIZE[1], STEP_FIGURE_SIZE[0], 3) and curve.std() > 0.02
    assert (geneval - jpeg).abs().max() > 0.1
    assert previews["ode_weak"]["curve"].shape == (1, MESSAGE_SIZE[1], MESSAGE_SIZE[0], 3)  # no reward connected


def test_progress_bar_and_live_preview_follow_the_refined_estimates(previews):
    live = previews["live"]
    for key, steps in (("geneval", STEPS), ("substeps", STEPS), ("ode_weak", ODE_STEPS)):
        assert live["progress"][key] == [(value, steps) for value in range(1, steps + 1)]
        assert len(live["x0"][key]) == steps
    one, three = live["x0"]["geneval"], live["x0"]["substeps"]
    # the same trajectory (the stock "denoised" would be identical), but the preview shows the T' = 3 estimate
    assert (one[0] - three[0]).abs().max() > 1e-3


def test_ode_estimates_ignore_strength_and_converge_to_the_final_image(previews):
    weak, strong = previews["ode_weak"]["estimates"], previews["ode_strong"]["estimates"]
    torch.testing.assert_close(strong, weak, rtol=0, atol=0)
    per_sample = weak.reshape(BATCH, ODE_STEPS + 1, 64, 64, 3)
    distance = (per_sample[:, :-1] - per_sample[:, -1:]).abs().mean(dim=(0, 2, 3, 4))  # [T] per step
    assert distance[-1] < distance[ODE_STEPS // 2] < distance[0], distance
    assert distance[-1] < 0.5 * distance[0], distance


def test_preview_refuses_a_model_that_is_not_flow_matching(engine):
    prompt = {**_world(), **_preview("eps")}
    prompt["patched"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["unet", 0], "sampling": "eps",
                                                                           "zsnr": False}}
    prompt["eps"]["inputs"]["model"] = ["patched", 0]
    assert "needs a flow-matching model" in _error_message(engine, prompt)
    assert "eps" not in CAPTURED


def test_preview_asks_for_the_prompt_a_prompt_aware_reward_needs(engine):
    prompt = {**_world(), **_preview("no_prompt", reward="mini_geneval")}
    prompt["no_prompt"]["inputs"]["prompt"] = ""
    message = _error_message(engine, prompt)
    assert message.startswith("prompt: empty, and reward: 'mini_geneval' could not score any"), message


def test_clean_estimate_is_euler_on_the_denoiser_velocity(engine):
    """Against a naive reference: T' Euler steps of v = (x - D(x, t)) / t from sigma to 0, D a toy denoiser."""
    clean_estimate = sys.modules[engine.nodes.NODE_CLASS_MAPPINGS["SFGRPOTweediePreview"].__module__].clean_estimate
    target = torch.linspace(-1, 1, 2 * 3 * 4).reshape(2, 3, 4)

    def denoiser(x, sigma, scale=1.0):  # pulls x towards ``target``, more at high noise
        return x + scale * sigma[:, None, None] * (target - x)

    x, sigma = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0)), torch.tensor(0.8)
    denoised = denoiser(x, sigma.expand(2), scale=0.5)
    for substeps in (1, 2, 5):
        expected, t_now = x.clone(), 0.8
        for k in range(substeps):
            t_next = 0.8 * (1 - (k + 1) / substeps)
            velocity = (expected - denoiser(expected, torch.full((2,), t_now), scale=0.5)) / t_now
            expected, t_now = expected + (t_next - t_now) * velocity, t_next
        actual = clean_estimate(denoiser, x, sigma, denoised, {"scale": 0.5}, substeps)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(clean_estimate(denoiser, x, sigma, denoised, {"scale": 0.5}, 1), denoised)
    torch.testing.assert_close(clean_estimate(denoiser, x, torch.tensor(0.0), x, {}, 3), x)  # already clean
