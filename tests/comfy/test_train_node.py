"""SFGRPOTrainLoRA inside a real ComfyUI engine (in-process) on the committed mini world: it trains, writes its run
folder and LoRA, hands back a model that KSampler uses, and its LoRA loads in the stock loaders with every key. Also:
the core backends' one LoRA file (diffusers' format) loads in ComfyUI's stock loader as it is, SD3 and FLUX."""

import asyncio
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

CAPTURED: dict[str, dict] = {}
TRAIN_PROMPTS = "a red circle\na blue square\ntwo green triangles"
SETTINGS = dict(method="stepwise", sde="ddim", eta=0.7, noise_level=0.7, steps=4, substeps=1, min_train_std=0.02,
                group_size=3, groups_per_iteration=2, iterations=2, lr=3e-3, clip_range=0.05, kl_beta=0.0, rank=4,
                alpha=8.0, seed=0, checkpoint_every=1, eval_every=1, eval_samples=2, micro_batch_size=0)


CAPTURE_INPUTS = {"model": ("MODEL",), "base_model": ("MODEL",), "lora": ("LORA_MODEL",), "metrics": ("LOSS_MAP",),
                  "image": ("IMAGE",), "base_image": ("IMAGE",), "curve": ("IMAGE",),
                  "text": ("STRING", {"forceInput": True})}

@pytest.fixture(scope="module")
def engine(comfy_engine):
    comfy_engine.add_capture_node("TestCaptureAll", CAPTURED, CAPTURE_INPUTS)
    import folder_paths

    # SaveLoRA writes under output/; list output/loras among the LoRA folders so the stock loader can read it back.
    saved = comfy_engine.root / "output" / "loras"
    saved.mkdir(parents=True, exist_ok=True)
    folder_paths.add_model_folder_path("loras", str(saved))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield comfy_engine
    torch.set_num_threads(threads)


def _sample(model: list, image_key: str, prompt: dict, seed: int = 3) -> None:
    """Add KSampler (sfgrpo_ddim_sde, 6 steps) + VAEDecode nodes for ``model`` to ``prompt`` as ``image_key``."""
    prompt[f"{image_key}_sample"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": seed, "steps": 6, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
        "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["empty", 0], "denoise": 1.0}}
    prompt[f"{image_key}_decode"] = {"class_type": "VAEDecode", "inputs": {
        "samples": [f"{image_key}_sample", 0], "vae": ["vae", 0]}}


def _base_graph() -> dict:
    return {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": "mini_sd3_transformer.safetensors",
                                                        "weight_dtype": "default"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "mini_taesd.safetensors"}},
        "clip": {"class_type": "SFGRPOMiniWorldTextEncoder", "inputs": {}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": "a red circle"}},
        "neg": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["pos", 0]}},
        "empty": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
    }


def train_graph(run_name: str = "test_run", resume: bool = False, **settings) -> dict:
    """Mini world -> Prompts + LoadReward -> TrainLoRA -> (SaveLoRA, KSampler with the trained and the base model)."""
    prompt = _base_graph()
    prompt.update({
        "prompts": {"class_type": "SFGRPOPrompts", "inputs": {"clip": ["clip", 0], "text": TRAIN_PROMPTS}},
        "reward": {"class_type": "SFGRPOLoadReward", "inputs": {"reward": "mini_geneval", "options": "{}"}},
        "train": {"class_type": "SFGRPOTrainLoRA", "inputs": {
            "model": ["unet", 0], "vae": ["vae", 0], "prompts": ["prompts", 0], "reward": ["reward", 0],
            "eval_prompts": ["prompts", 0], "run_name": run_name, "resume": resume, "width": 64, "height": 64,
            **{**SETTINGS, **settings}}},
        "save": {"class_type": "SaveLoRA", "inputs": {"lora": ["train", 1], "prefix": "loras/saved"}},
        "capture": {"class_type": "TestCaptureAll", "inputs": {
            "key": "train", "model": ["train", 0], "base_model": ["unet", 0], "lora": ["train", 1],
            "metrics": ["train", 2], "curve": ["train", 3], "text": ["train", 4], "image": ["trained_decode", 0],
            "base_image": ["base_decode", 0]}},
    })
    _sample(["train", 0], "trained", prompt)
    _sample(["unet", 0], "base", prompt)
    return prompt


def run(engine, prompt: dict) -> list[dict]:
    """Execute; the execution_error messages (empty when it ran)."""
    CAPTURED.clear()
    server = engine.run(prompt)
    return [data for event, data in server.messages if event == "execution_error"]


@pytest.fixture(scope="module")
def trained(engine) -> dict:
    errors = run(engine, train_graph())
    assert not errors, errors[0]["exception_message"] + "".join(errors[0]["traceback"])
    run_dir = engine.root / "output" / "sfgrpo" / "test_run_00001"
    # kept now: the resume test below trains this run further
    return {**CAPTURED["train"], "diffusers_lora": load_file(str(run_dir / "lora_diffusers.safetensors"))}


def test_training_writes_its_run_folder_and_lora_file(engine, trained):
    run_dir = engine.root / "output" / "sfgrpo" / "test_run_00001"
    assert trained["text"] == "sfgrpo/test_run_00001.safetensors"
    assert json.loads((run_dir / "comfyui.json").read_text())["reward_decode"] == "auto"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["train"]["group_size"] == 3 and config["credit"]["method"] == "stepwise"
    assert config["sampler"]["shift"] == pytest.approx(3.0)  # taken from the model's own sampling
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "loss" in r] == [0, 1]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("iter_*")) == ["iter_000001", "iter_000002"]
    lora_file = engine.root / "loras" / "sfgrpo" / "test_run_00001.safetensors"
    # one conversion: the loras/ file is the run folder's lora_comfyui.safetensors, config in its metadata
    assert lora_file.read_bytes() == (run_dir / "lora_comfyui.safetensors").read_bytes()
    with safe_open(str(lora_file), framework="pt") as handle:
        assert json.loads(handle.metadata()["sfgrpo_config"]) == config
    on_disk = load_file(str(lora_file))
    assert set(on_disk) == set(trained["lora"])
    assert all(key.startswith("diffusion_model.joint_blocks.") for key in on_disk)
    assert any(on_disk[key].abs().max() > 0 for key in on_disk if key.endswith("lora_up.weight"))
    assert trained["metrics"]["loss"] and len(trained["metrics"]["reward_mean"]) == 2
    assert trained["curve"].shape[0] == 1 and trained["curve"].shape[-1] == 3


def test_trained_model_changes_the_image_and_the_input_model_is_left_as_it_was(trained):
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert (trained["image"] - trained["base_image"]).abs().max() > 1 / 255
    base = trained["base_model"].model.diffusion_model
    assert not any(isinstance(module, BaseTunerLayer) for module in base.modules())
    assert not any(parameter.requires_grad for parameter in base.parameters())
    assert trained["model"] is not trained["base_model"]


def test_the_input_model_is_bitwise_unchanged_after_a_run_and_samples_as_before(engine):
    """The node trains adapters on the MODEL ComfyUI passes in (and cached); after the run that model must be what
    it was: the same weights bit for bit, no adapter modules, no gradients, the same velocity. So a node that uses
    the cached MODEL later (a KSampler of the base model) sees no change."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    world = _comfy_world(engine)
    patcher, module = world.patcher, world.module
    before = {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}
    module_types = [type(child) for child in module.modules()]
    texts, x, sigma = _inputs(world.sample_shape)
    with torch.no_grad():
        velocity_before = world.velocity(x, sigma, world.encode_prompts(texts))
    train_node = engine.nodes.NODE_CLASS_MAPPINGS["SFGRPOTrainLoRA"]
    reward = engine.pack_module("rewards").load_reward("mini_geneval", "{}")
    with torch.inference_mode():  # as ComfyUI runs every node
        train_node.execute(model=patcher, vae=world.vae, prompts=world.prompts, reward=reward,
                           run_name="unchanged_input", resume=False, width=64, height=64,
                           **{**SETTINGS, "iterations": 1, "eval_every": 0})
    after = module.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert [type(child) for child in module.modules()] == module_types
    assert not any(isinstance(child, BaseTunerLayer) for child in module.modules())
    assert not any(parameter.requires_grad for parameter in module.parameters())
    with torch.no_grad():
        torch.testing.assert_close(world.velocity(x, sigma, world.encode_prompts(texts)), velocity_before,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("source", ["node", "SaveLoRA"])
def test_lora_file_loads_in_the_stock_loader_with_every_key(engine, trained, source):
    import folder_paths

    if source == "node":
        name = trained["text"]
    else:
        name = next(n for n in folder_paths.get_filename_list("loras") if Path(n).name.startswith("saved"))
    prompt = _base_graph()
    prompt["lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["unet", 0], "lora_name": name,
                                                                       "strength_model": 1.0}}
    _sample(["lora", 0], "loaded", prompt)
    prompt["capture"] = {"class_type": "TestCaptureAll", "inputs": {"key": "loaded", "image": ["loaded_decode", 0]}}
    with engine.logged() as messages:
        errors = run(engine, prompt)
    assert not errors, errors[0]["exception_message"]
    assert not [m for m in messages if "lora key not loaded" in m]
    image = CAPTURED["loaded"]["image"]
    torch.testing.assert_close(image, trained["image"], rtol=0, atol=2 / 255)
    assert (image - trained["base_image"]).abs().max() > 1 / 255


def test_resume_continues_the_newest_run_and_a_new_run_gets_the_next_number(engine, trained):
    record = engine.root / "output" / "sfgrpo" / "test_run_00001" / "comfyui.json"
    before = record.read_bytes()
    smaller = train_graph(resume=True, iterations=3)
    smaller["train"]["inputs"]["width"] = 32
    assert _execution_error(engine, smaller).startswith("width: the run test_run_00001 was trained with width 64, "
                                                        "not 32; resume with 64")
    assert record.read_bytes() == before  # the run's record of its own settings is kept
    errors = run(engine, train_graph(resume=True, iterations=3))
    assert not errors, errors[0]["exception_message"]
    run_dir = engine.root / "output" / "sfgrpo" / "test_run_00001"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "loss" in r] == [0, 1, 2]
    assert CAPTURED["train"]["text"] == "sfgrpo/test_run_00001.safetensors"
    assert record.read_bytes() == before
    errors = run(engine, train_graph(iterations=1))
    assert not errors, errors[0]["exception_message"]
    assert CAPTURED["train"]["text"] == "sfgrpo/test_run_00002.safetensors"


def test_the_lr_schedule_widgets_reach_the_run_and_workflows_without_them_keep_the_constant_lr(engine, trained):
    """lr_schedule / lr_final_ratio / lr_decay_iterations are optional inputs (added after workflows were saved):
    the graphs above leave them out and train at a constant lr; set, they schedule the run's lr."""
    run_dir = engine.root / "output" / "sfgrpo"
    constant = json.loads((run_dir / "test_run_00001" / "config.json").read_text())["optim"]
    assert constant["lr_schedule"] == "constant"
    errors = run(engine, train_graph(run_name="cosine_run", iterations=3, eval_every=0, lr_schedule="cosine",
                                     lr_final_ratio=0.1, lr_decay_iterations=3))
    assert not errors, errors[0]["exception_message"]
    config = json.loads((run_dir / "cosine_run_00001" / "config.json").read_text())["optim"]
    assert (config["lr_schedule"], config["lr_final_ratio"], config["lr_decay_iterations"]) == ("cosine", 0.1, 3)
    records = [json.loads(line) for line in (run_dir / "cosine_run_00001" / "metrics.jsonl").read_text().splitlines()]
    lrs = [record["lr"] for record in records if "lr" in record]
    assert lrs == pytest.approx([3e-3, 3e-3 * 0.55, 3e-4])  # half a cosine from lr to 0.1 lr over 3 iterations


def _execution_error(engine, prompt: dict) -> str:
    errors = run(engine, prompt)
    assert errors, "the prompt ran without error"
    return errors[0]["exception_message"]


def test_bad_inputs_give_errors_that_say_what_to_change(engine):
    non_flow = train_graph()
    non_flow["eps"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["unet", 0], "sampling": "eps",
                                                                         "zsnr": False}}
    non_flow["train"]["inputs"]["model"] = ["eps", 0]
    assert _execution_error(engine, non_flow).startswith("model: Stepwise-Flow-GRPO needs a flow-matching model")

    empty = train_graph()
    empty["prompts"]["inputs"]["text"] = "\n# only a comment\n"
    assert "text: no prompts given" in _execution_error(engine, empty)

    assert "resume: there is no run named 'never_ran'" in _execution_error(engine, train_graph("never_ran", True))
    assert "run_name: '../escape'" in _execution_error(engine, train_graph("../escape"))
    odd_width = train_graph()
    odd_width["train"]["inputs"]["width"] = 72
    assert "width: 72 is not a multiple of 16; use 64" in _execution_error(engine, odd_width)


@pytest.mark.parametrize("widget, field", [("lr", "optim.lr"), ("eta", "sampler.eta"),
                                           ("noise_level", "sampler.noise_level"), ("clip_range", "optim.clip_range"),
                                           ("lr_final_ratio", "optim.lr_final_ratio")])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_and_inf_widgets_are_refused_naming_the_field_and_leave_no_run_folder(engine, widget, field, value):
    """inf fails ComfyUI's own bounds check at validation; NaN passes it (every comparison is False) and the config
    refuses it before the run folder is made. Either way the input is named."""
    runs_before = sorted(path.name for path in (engine.root / "output" / "sfgrpo").glob("*"))
    graph = train_graph(f"non_finite_{widget}")
    graph["train"]["inputs"][widget] = value
    valid, _, _, node_errors = asyncio.run(engine.execution.validate_prompt("non-finite", graph, None))
    if valid:
        message = _execution_error(engine, graph)
        assert message.startswith(f"{field}: must be a finite number, got {value!r}"), message
    else:
        assert node_errors["train"]["errors"][0]["details"] == widget
    assert sorted(path.name for path in (engine.root / "output" / "sfgrpo").glob("*")) == runs_before


def test_group_size_one_is_refused_at_validation(engine):


    prompt = train_graph(group_size=1)
    valid, _, _, node_errors = asyncio.run(engine.execution.validate_prompt("group", prompt, None))
    assert not valid
    details = json.dumps(node_errors["train"])
    assert "group_size" in details and "smaller than min of 2" in details


def _comfy_world(engine, patcher=None, texts=("a red circle", "two blue squares")):
    """ComfyFlowModel of the mini world loaded by the stock loaders (or of ``patcher``), with ``texts`` encoded."""
    import nodes as comfy_nodes

    prompts_module = engine.pack_module("prompts")
    with torch.inference_mode():
        if patcher is None:
            (patcher,) = comfy_nodes.UNETLoader().load_unet("mini_sd3_transformer.safetensors", "default")
        (vae,) = comfy_nodes.VAELoader().load_vae("mini_taesd.safetensors")
        clip = prompts_module.MiniWorldCLIP(prompts_module.mini_world_text_encoder())
        prompt_set = prompts_module.encode_prompt_set(clip, list(texts))
    return engine.pack_module("comfy_model").ComfyFlowModel(patcher, vae, prompt_set, width=64, height=64)


def _inputs(shape):
    texts = ["a red circle", "two blue squares", "a red circle"]
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0))
    return texts, x, torch.tensor([0.9, 0.5, 0.1])


def test_model_wrappers_and_transformer_options_other_nodes_set_apply_to_training(engine):
    """What another node sets on the MODEL (a model_function_wrapper, transformer_options that APPLY_MODEL wrappers
    and attention patches read) reaches the trainer's velocity, as it reaches ComfyUI's samplers."""
    import comfy.model_management
    import comfy.patcher_extension

    import nodes as comfy_nodes

    with torch.inference_mode():
        (base,) = comfy_nodes.UNETLoader().load_unet("mini_sd3_transformer.safetensors", "default")
    seen = []

    def halve(apply_model, args):  # as a "model function wrapper" node does
        seen.append(args["c"]["transformer_options"].get("test_marker"))
        return apply_model(args["input"], args["timestep"], **args["c"]) * 0.5

    patched = base.clone()
    patched.set_model_unet_function_wrapper(halve)
    patched.model_options.setdefault("transformer_options", {})["test_marker"] = "set by another node"
    wrapped = []

    def apply_model_wrapper(executor, *args, **kwargs):  # an APPLY_MODEL wrapper, read from transformer_options
        wrapped.append(True)
        return executor(*args, **kwargs)

    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test", apply_model_wrapper)
    texts, x, sigma = _inputs((16, 8, 8))
    plain_world, patched_world = _comfy_world(engine, base), _comfy_world(engine, patched)
    with torch.no_grad():
        plain = plain_world.velocity(x, sigma, plain_world.encode_prompts(texts))
        comfy.model_management.load_models_gpu([patched], force_full_load=True)
        through_wrapper = patched_world.velocity(x, sigma, patched_world.encode_prompts(texts))
    assert seen and set(seen) == {"set by another node"} and wrapped
    denoised_plain = x - sigma.view(-1, 1, 1, 1) * plain
    denoised_wrapped = x - sigma.view(-1, 1, 1, 1) * through_wrapper
    torch.testing.assert_close(denoised_wrapped, 0.5 * denoised_plain, rtol=1e-4, atol=1e-4)


def test_comfyui_backend_matches_the_core_mini_world_backend(engine):
    """The trainer's view of a ComfyUI MODEL (ComfyFlowModel) gives the velocities and images of the core's own
    mini world backend for the same weights, prompt, x and sigma."""
    from sfgrpo_core.models import build

    comfy_world, core_world = _comfy_world(engine), build("miniworld")
    assert comfy_world.sample_shape == core_world.sample_shape
    assert comfy_world.fused_lora_parts == {  # ComfyUI's fused q/k/v: one adapter per projection when training
        f"joint_blocks.{block}.{stream}.attn.qkv": (256, 256, 256) for block in range(4)
        for stream in ("x_block", "context_block")}
    texts, x, sigma = _inputs(core_world.sample_shape)
    with torch.no_grad():
        comfy_velocity = comfy_world.velocity(x, sigma, comfy_world.encode_prompts(texts))
        core_velocity = core_world.velocity(x, sigma, core_world.encode_prompts(texts))
        torch.testing.assert_close(comfy_velocity, core_velocity, rtol=1e-4, atol=1e-4)
        clean = x - sigma.view(-1, 1, 1, 1) * core_velocity
        comfy_images, core_images = comfy_world.decode(clean), core_world.decode(clean)
    assert comfy_images.dtype == torch.uint8 and comfy_images.shape == core_images.shape == (3, 64, 64, 3)
    # ComfyUI decodes in float32, the core's mini world in bfloat16 autocast where the CPU runs it natively
    assert (comfy_images.int() - core_images.int()).abs().float().mean() < 2.0
    with pytest.raises(ValueError, match="was not encoded"):
        comfy_world.encode_prompts(["a green triangle"])


def test_the_runs_diffusers_lora_gives_the_comfyui_lora_model_in_diffusers(engine, trained):
    """lora_diffusers.safetensors in diffusers' own loader reproduces the node's MODEL output (ComfyUI's LoRA), and
    the node trained one rank-r adapter per projection on ComfyUI's fused q/k/v (as the core's backends do)."""
    from sfgrpo_core.models import build

    ranks = {tuple(tensor.shape) for key, tensor in trained["diffusers_lora"].items() if key.endswith("lora_A.weight")}
    assert {rows for rows, _ in ranks} == {SETTINGS["rank"]}
    assert any(key.endswith("attn.to_k.lora_A.weight") for key in trained["diffusers_lora"])

    core_world = build("miniworld")
    core_world.module.load_lora_adapter(trained["diffusers_lora"], prefix="transformer")
    comfy_world = _comfy_world(engine, trained["model"])
    base_world = _comfy_world(engine)
    texts, x, sigma = _inputs(core_world.sample_shape)
    with torch.no_grad():
        with_lora = comfy_world.velocity(x, sigma, comfy_world.encode_prompts(texts))
        base = base_world.velocity(x, sigma, base_world.encode_prompts(texts))
        in_diffusers = core_world.velocity(x, sigma, core_world.encode_prompts(texts))
    assert (with_lora - base).abs().max() > 1e-3  # the LoRA does something
    torch.testing.assert_close(in_diffusers, with_lora, rtol=1e-4, atol=1e-4)


def _unloaded_keys(engine, load) -> tuple[object, list[str]]:
    """``load()``'s result and ComfyUI's "lora key not loaded" / "NOT LOADED" warnings while it ran."""
    with engine.logged() as messages:
        result = load()
    return result, [message for message in messages if "not loaded" in message.lower()]


def _random_lora_b(module: torch.nn.Module, std: float) -> None:
    """Give the fresh adapters (B = 0) a visible effect."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, std, generator=torch.Generator().manual_seed(len(name)))


def test_the_core_backends_diffusers_lora_loads_in_the_stock_loader_as_it_is(engine, tmp_path):
    """The one file the core's diffusers / mini-world backend exports (lora_diffusers.safetensors, q/k/v as separate
    diffusers modules) loads through the stock LoraLoaderModelOnly with every key (ComfyUI puts q/k/v on its fused
    qkv Linear itself) and gives the velocities of the same adapters in the core backend."""
    import shutil

    from sfgrpo_core.lora.adapters import adapter_disabled, attach_lora, save_lora
    from sfgrpo_core.models import build

    core = build("miniworld")
    attach_lora(core.module, rank=4, alpha=8.0, target_modules=core.default_lora_targets)
    _random_lora_b(core.module, 0.05)
    trained = save_lora(tmp_path / "lora.safetensors", core.module, rank=4, alpha=8.0,
                        target_modules=core.default_lora_targets)
    exported = core.export_lora(trained)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["lora.safetensors", "lora_diffusers.safetensors"]
    assert any(key.endswith("attn.to_k.lora_A.weight") for key in load_file(str(exported)))
    shutil.copy(exported, engine.root / "loras" / "core_run_diffusers.safetensors")

    prompt = _base_graph()
    prompt["lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["unet", 0], "lora_name": "core_run_diffusers.safetensors", "strength_model": 1.0}}
    prompt["capture"] = {"class_type": "TestCaptureAll", "inputs": {"key": "loaded", "model": ["lora", 0]}}
    errors, unloaded = _unloaded_keys(engine, lambda: run(engine, prompt))
    assert not errors, errors[0]["exception_message"]
    assert unloaded == []
    comfy_world, base_world = _comfy_world(engine, CAPTURED["loaded"]["model"]), _comfy_world(engine)
    texts, x, sigma = _inputs(core.sample_shape)
    with torch.no_grad():
        in_comfyui = comfy_world.velocity(x, sigma, comfy_world.encode_prompts(texts))
        base = base_world.velocity(x, sigma, base_world.encode_prompts(texts))
        in_core = core.velocity(x, sigma, core.encode_prompts(texts))
        with adapter_disabled(core.module):
            core_base = core.velocity(x, sigma, core.encode_prompts(texts))
    assert (in_core - core_base).abs().max() > 0.1  # the LoRA does something
    torch.testing.assert_close(base, core_base, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(in_comfyui, in_core, rtol=1e-4, atol=1e-4)


def test_a_flux_diffusers_lora_gives_comfyuis_weights_of_the_merged_model(engine, tmp_path):
    """FLUX (no tiny FLUX loads through ComfyUI's checkpoint detection, so ComfyUI's Flux model is built at tiny size
    here): the stock loader's path (comfy.sd.load_lora_for_models) reads every key of the diffusers file, q/k/v and
    proj_mlp included, and the patched weights are ComfyUI's own conversion of the diffusers weights with the LoRA
    merged."""
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import tiny_models as tiny

    from sfgrpo_core.lora.adapters import attach_lora, lora_state_dict, save_lora
    from sfgrpo_core.lora.formats import export_lora, lora_modules
    from sfgrpo_core.models.diffusers_backend import ATTENTION_LORA_TARGETS

    transformer = tiny.tiny_flux_transformer()
    base = {key: value.clone() for key, value in transformer.state_dict().items()}
    targets = (*ATTENTION_LORA_TARGETS, "proj_mlp", "proj_out")
    attach_lora(transformer, rank=2, alpha=4.0, target_modules=targets)
    _random_lora_b(transformer, 0.3)
    merged = dict(base)
    for module, (down, up) in lora_modules(lora_state_dict(transformer)).items():
        merged[f"{module}.weight"] = base[f"{module}.weight"] + up @ down * 4.0 / 2
    trained = save_lora(tmp_path / "lora.safetensors", transformer, rank=2, alpha=4.0, target_modules=targets)
    lora = load_file(str(export_lora(trained, tmp_path / "lora_diffusers.safetensors")))
    assert any(key.endswith("single_transformer_blocks.0.proj_mlp.lora_A.weight") for key in lora)

    def comfyui_weights(state):  # ComfyUI's diffusers -> ComfyUI conversion (it writes into its input: copies)
        return comfy.model_detection.convert_diffusers_mmdit({k: v.clone() for k, v in state.items()}, "")

    config = transformer.config
    model = comfy.supported_models.Flux({
        "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": config.pooled_projection_dim,
        "context_in_dim": config.joint_attention_dim, "hidden_size": 32, "mlp_ratio": 4.0, "num_heads": 2,
        "depth": 1, "depth_single_blocks": 1, "axes_dim": list(config.axes_dims_rope), "theta": 10000,
        "patch_size": 2, "qkv_bias": True, "guidance_embed": True}).get_model({})
    model.diffusion_model.load_state_dict(comfyui_weights(base), strict=True)
    fused_linears = engine.pack_module("comfy_model").fused_linears
    assert fused_linears(model.diffusion_model) == {  # the node gives each of these projections its own adapter
        "double_blocks.0.img_attn.qkv": (32, 32, 32), "double_blocks.0.txt_attn.qkv": (32, 32, 32),
        "single_blocks.0.linear1": (32, 32, 32, 128)}
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    (patched, _), unloaded = _unloaded_keys(engine, lambda: comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0))
    assert unloaded == []
    _, unloaded = _unloaded_keys(engine, lambda: comfy.sd.load_lora_for_models(
        patcher, None, {**lora, "transformer.not_a_module.lora_A.weight": torch.zeros(2, 32)}, 1.0, 0))
    assert unloaded and all("not_a_module" in message for message in unloaded)  # the check above can fail
    patched.patch_model()
    expected, unchanged = comfyui_weights(merged), comfyui_weights(base)
    weights = model.diffusion_model.state_dict()
    changed = [key for key in expected if not torch.equal(expected[key], unchanged[key])]
    assert sorted(changed) == ["double_blocks.0.img_attn.proj.weight", "double_blocks.0.img_attn.qkv.weight",
                               "double_blocks.0.txt_attn.proj.weight", "double_blocks.0.txt_attn.qkv.weight",
                               "final_layer.linear.weight", "single_blocks.0.linear1.weight",
                               "single_blocks.0.linear2.weight"]
    for key in expected:
        torch.testing.assert_close(weights[key], expected[key], rtol=1e-6, atol=1e-6)
