"""The SFGRPO sampler inside a real ComfyUI engine (in-process), on the committed mini world.

The mini world's transformer loads through the stock UNETLoader and its TAESD through VAELoader; the conditioning
comes from the pack's Mini World Text Encoder through the stock CLIPTextEncode. The sampler must match the trainer's
own rollout.
"""

import pytest
import torch

from sfgrpo_core.algorithm.sde import get_step_function
from sfgrpo_core.models import build
from sfgrpo_core.seeding import derive_seed
from sfgrpo_core.training.rollout import PromptBatch, rollout

PROMPT = "a red circle"
SEED = 7
STEPS = 6
SD3_SCALE, SD3_SHIFT = 1.5305, 0.0609  # ComfyUI's SD3 latent format: model latent = (latent - shift) * scale
CAPTURED: dict[str, dict] = {}


@pytest.fixture(scope="module")
def world():
    """The committed mini world as the trainer sees it (sfgrpo_core.models.build("miniworld"))."""
    return build("miniworld")


@pytest.fixture(scope="module")
def engine(comfy_engine):
    """The session's ComfyUI engine with a test-only capture node, on one torch thread for this module: the mini
    world's tensors are tiny, and two threads on a busy 2-core machine made each step ~30x slower."""
    comfy_engine.add_capture_node("TestCapture", CAPTURED, {"latent": ("LATENT",), "image": ("IMAGE",),
                                                           "sigmas": ("SIGMAS",)})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield comfy_engine
    torch.set_num_threads(threads)


def _graph(sampler: dict, *, model_sampling: str | None = None, decode: bool = False) -> dict:
    """API prompt: mini world -> SamplerCustom (cfg 1) with ``sampler`` (a node) -> capture latent and sigmas."""
    model = ["unet", 0]
    prompt = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": "mini_sd3_transformer.safetensors",
                                                        "weight_dtype": "default"}},
        "clip": {"class_type": "SFGRPOMiniWorldTextEncoder", "inputs": {}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": PROMPT}},
        "neg": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["pos", 0]}},
        "empty": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sigmas": {"class_type": "BasicScheduler", "inputs": {"model": model, "scheduler": "simple",
                                                               "steps": STEPS, "denoise": 1.0}},
        "sampler": sampler,
        "sample": {"class_type": "SamplerCustom", "inputs": {
            "model": model, "add_noise": True, "noise_seed": SEED, "cfg": 1.0, "positive": ["pos", 0],
            "negative": ["neg", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["empty", 0]}},
        "capture": {"class_type": "TestCapture", "inputs": {"key": "custom", "latent": ["sample", 0],
                                                            "sigmas": ["sigmas", 0]}},
    }
    if model_sampling is not None:
        prompt["patched"] = {"class_type": "ModelSamplingDiscrete", "inputs": {
            "model": model, "sampling": model_sampling, "zsnr": False}}
        prompt["sample"]["inputs"]["model"] = ["patched", 0]
    if decode:
        prompt["vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": "mini_taesd.safetensors"}}
        prompt["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["vae", 0]}}
        prompt["capture"]["inputs"]["image"] = ["decode", 0]
    return prompt


def _sfgrpo(sde: str = "ddim", strength: float = 0.7) -> dict:
    return {"class_type": "SFGRPOSampler", "inputs": {"sde": sde, "strength": strength}}


def _select(name: str) -> dict:
    return {"class_type": "KSamplerSelect", "inputs": {"sampler_name": name}}


def _run(engine, prompt: dict, key: str = "custom") -> dict:
    """Execute ``prompt``; the values its capture node kept (fails with ComfyUI's error message)."""
    CAPTURED.clear()
    server = engine.run(prompt)
    errors = [data for event, data in server.messages if event == "execution_error"]
    assert not errors, errors[0]["exception_message"]
    return CAPTURED[key]


def _samples(engine, sampler: dict) -> torch.Tensor:
    return _run(engine, _graph(sampler))["latent"]["samples"]


def test_pack_registers_the_sampler_node_and_ksampler_names(engine):
    import comfy.k_diffusion.sampling
    import comfy.samplers

    assert "SFGRPOSampler" in engine.nodes.NODE_CLASS_MAPPINGS
    for name in ("sfgrpo_ddim_sde", "sfgrpo_flow_sde", "sfgrpo_cps_sde"):
        assert comfy.samplers.KSampler.SAMPLERS.count(name) == 1
        assert name in comfy.samplers.SAMPLER_NAMES
        assert callable(getattr(comfy.k_diffusion.sampling, f"sample_{name}"))
    inputs = engine.nodes.NODE_CLASS_MAPPINGS["SFGRPOSampler"].INPUT_TYPES()["required"]
    assert all(options.get("tooltip") for _, options in inputs.values())
    assert "under-dispersed" in inputs["strength"][1]["tooltip"]


def test_sampler_custom_runs_decodes_and_is_deterministic(engine):
    first = _run(engine, _graph(_sfgrpo(), decode=True))
    image = first["image"]
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()
    assert 0.0 <= image.min() and image.max() <= 1.0
    torch.testing.assert_close(_samples(engine, _sfgrpo()), first["latent"]["samples"], rtol=0, atol=0)


@pytest.mark.parametrize("sde", ["ddim", "flow_grpo", "cps"])
def test_strength_zero_is_euler_and_noise_changes_the_sample(engine, sde):
    euler = _samples(engine, _select("euler"))
    torch.testing.assert_close(_samples(engine, _sfgrpo(sde, 0.0)), euler, rtol=1e-4, atol=1e-4)
    assert (_samples(engine, _sfgrpo(sde, 0.7)) - euler).abs().max() > 1e-2


def test_stock_ksampler_runs_the_registered_name_deterministically(engine):
    prompt = _graph(_sfgrpo())
    prompt["sample"] = {"class_type": "KSampler", "inputs": {
        "model": ["unet", 0], "seed": SEED, "steps": STEPS, "cfg": 1.0, "sampler_name": "sfgrpo_ddim_sde",
        "scheduler": "simple", "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["empty", 0],
        "denoise": 1.0}}
    first = _run(engine, prompt)["latent"]["samples"]
    torch.testing.assert_close(_run(engine, prompt)["latent"]["samples"], first, rtol=0, atol=0)
    # the same seed, sigmas and SDE (eta 0.7) as the SFGRPOSampler node in SamplerCustom
    torch.testing.assert_close(first, _samples(engine, _sfgrpo("ddim", 0.7)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sde", ["ddim", "flow_grpo"])
def test_comfyui_sample_equals_the_trainer_rollout(engine, world, sde):
    captured = _run(engine, _graph(_sfgrpo(sde, 0.7)))
    comfy_final = (captured["latent"]["samples"].float() - SD3_SHIFT) * SD3_SCALE  # back to the model's latents
    sigmas = captured["sigmas"].float()
    initial = torch.randn(1, *world.sample_shape, generator=torch.Generator().manual_seed(SEED))  # prepare_noise
    batch = PromptBatch(prompts=[PROMPT], group_ids=torch.zeros(1, dtype=torch.long),
                        condition=world.encode_prompts([PROMPT]), initial_noise=initial,
                        member_seeds=[derive_seed(SEED, 0, "steps")])
    core = rollout(world, batch, sigmas, get_step_function(sde, 0.7))
    if sde == "flow_grpo":  # ComfyUI's last step (to sigma 0) is the Euler step onto the denoised estimate
        before_last = core.states[:, -2]
        velocity = world.velocity(before_last, sigmas[-2].expand(1), batch.condition)
        expected = before_last - sigmas[-2] * velocity
    else:
        expected = core.final
    assert (expected - initial).abs().max() > 0.1
    torch.testing.assert_close(comfy_final, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_strength_is_refused_naming_it(engine, value):
    """inf fails ComfyUI's own max/min check at validation; NaN passes it (every comparison is False), so the node
    refuses it when it runs. Either way the input is named and nothing is sampled."""
    import asyncio

    graph = _graph(_sfgrpo(strength=value))
    valid, _, _, node_errors = asyncio.run(engine.execution.validate_prompt("non-finite", graph, None))
    if not valid:
        assert node_errors["sampler"]["errors"][0]["details"] == "strength"
        return
    CAPTURED.clear()
    server = engine.run(graph)
    errors = [data for event, data in server.messages if event == "execution_error"]
    assert errors and errors[0]["exception_message"].strip() == f"strength: must be a finite number, got {value!r}"
    assert "custom" not in CAPTURED


def test_refuses_a_model_that_is_not_flow_matching(engine):
    CAPTURED.clear()
    server = engine.run(_graph(_sfgrpo(), model_sampling="eps"))
    errors = [data for event, data in server.messages if event == "execution_error"]
    assert errors and errors[0]["exception_type"].endswith("ValueError")
    assert "needs a flow-matching model" in errors[0]["exception_message"]
    assert "custom" not in CAPTURED
