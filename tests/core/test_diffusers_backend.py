"""The diffusers backend on tiny random SD3 and FLUX pipelines: the pipelines' own conventions, training, and the
diffusers LoRA round trip (everything CPU, float32, built from configs: no downloads)."""

import pytest
import tiny_models as tiny
import torch
from safetensors.torch import load_file

from sfgrpo_core import models
from sfgrpo_core.algorithm.sde import sde_step
from sfgrpo_core.config import Config
from sfgrpo_core.lora.adapters import save_lora
from sfgrpo_core.lora.formats import export_lora
from sfgrpo_core.models.diffusers_backend import (
    DiffusersFlowModel,
    load_pipeline_model,
    model_from_pipeline,
    pack_latents,
    pipeline_prompt_encoder,
    unpack_latents,
)
from sfgrpo_core.training import trainer

PROMPTS = ["a red cube", "two blue spheres"]
TOKENS = 8  # T5 tokens per prompt
BUILDERS = {"sd3": tiny.tiny_sd3_pipeline, "flux": tiny.tiny_flux_pipeline}


def _model(pipeline, **options):
    return model_from_pipeline(pipeline, latent_size=8, max_sequence_length=TOKENS, **options)


def _pipeline_latents(pipeline, latents, condition, sigmas):
    """Final latents [B, C, H, W] of the diffusers pipeline itself: no CFG, our initial latents and sigma grid."""
    options = dict(prompt_embeds=condition["context"], pooled_prompt_embeds=condition["pooled"], sigmas=sigmas,
                   num_inference_steps=len(sigmas), height=16, width=16, output_type="latent")
    if "flux" in type(pipeline).__name__.lower():
        packed = pipeline(latents=pack_latents(latents), guidance_scale=3.5, **options).images
        return unpack_latents(packed, 8, 8)
    return pipeline(latents=latents, guidance_scale=1.0, **options).images


@pytest.mark.parametrize("architecture", ["sd3", "flux"])
def test_euler_steps_on_our_velocity_reproduce_the_diffusers_pipeline(architecture):
    pipeline = BUILDERS[architecture]()
    model = _model(pipeline)
    condition = model.encode_prompts(PROMPTS)
    assert condition["context"].shape[0] == 2 and condition["pooled"].shape == (2, 32)
    latents = torch.randn(2, *model.sample_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = _pipeline_latents(pipeline, latents, condition, [1.0, 0.7, 0.3])
    grid = pipeline.scheduler.sigmas  # the pipeline's shifted sigmas, ending at 0
    x = latents
    with torch.no_grad():
        for k in range(len(grid) - 1):
            velocity = model.velocity(x, grid[k].expand(2), condition)
            assert velocity.dtype == torch.float32 and velocity.shape == x.shape
            x = sde_step("ode", x, velocity, grid[k], grid[k + 1], strength=0.0).prev_sample
    torch.testing.assert_close(x, expected.float())
    images = model.decode(x)
    assert images.dtype == torch.uint8 and images.shape == (2, 16, 16, 3)


def test_flux_packing_matches_the_pipeline_and_round_trips():
    from diffusers import FluxPipeline

    latents = torch.randn(3, 16, 6, 8)
    packed = pack_latents(latents)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 3, 16, 6, 8), rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(packed, 6, 8), latents, rtol=0, atol=0)


def test_bad_guidance_and_latent_sizes_fail_fast():
    pipeline = tiny.tiny_flux_pipeline()
    encode = pipeline_prompt_encoder(pipeline, "cpu", TOKENS)
    arguments = dict(vae_scaling_factor=1.0, vae_shift_factor=0.0, latent_channels=16)
    with pytest.raises(ValueError, match="guidance"):
        DiffusersFlowModel(pipeline.transformer, pipeline.vae, encode, latent_size=(8, 8), **arguments)
    with pytest.raises(ValueError, match="even"):
        DiffusersFlowModel(pipeline.transformer, pipeline.vae, encode, latent_size=(7, 8), guidance=3.5, **arguments)
    with pytest.raises(ValueError, match="guidance"):
        DiffusersFlowModel(tiny.tiny_sd3_transformer(), pipeline.vae, encode, latent_size=(8, 8), guidance=3.5,
                           **arguments)


def _train_config(tmp_path):
    return Config().replace(**{
        "train.reward": "jpeg_compressibility", "train.prompts": PROMPTS, "train.eval_prompts": PROMPTS[:1],
        "train.group_size": 2, "train.groups_per_iteration": 1, "train.iterations": 1, "train.eval_every": 0,
        "train.reward_batch_size": 8, "train.output_dir": str(tmp_path / "run"), "sampler.steps": 3,
        "credit.substeps": 1, "lora.rank": 2, "lora.alpha": 4.0,
    })


@pytest.mark.parametrize("architecture", ["sd3", "flux"])
def test_a_trained_lora_exported_to_diffusers_reloads_with_diffusers_loader(architecture, tmp_path):
    model = _model(BUILDERS[architecture]())
    config = _train_config(tmp_path)
    result = trainer.train(config, model=model)
    assert len(result.records) == 1 and result.records[0]["active_transitions"] > 0
    # one exported file, for diffusers and ComfyUI's stock loaders alike (tests/comfy/test_train_node.py)
    assert not (result.run_dir / "lora_comfyui.safetensors").exists()
    assert all(key.startswith("transformer.") for key in load_file(str(result.run_dir / "lora_diffusers.safetensors")))
    adapted = {name for name, module in model.module.named_modules() if hasattr(module, "lora_A") and module.lora_A}
    expected = 15 if architecture == "sd3" else 11  # SD3's last block has no to_add_out; FLUX single blocks: q, k, v
    assert len(adapted) == expected and any(name.endswith("to_add_out") for name in adapted)
    with torch.no_grad():  # a one-step LoRA is still almost zero: make its effect large
        for name, parameter in model.module.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    trained = save_lora(tmp_path / "trained.safetensors", model.module, rank=2, alpha=4.0,
                        target_modules=model.default_lora_targets)
    exported = export_lora(trained, tmp_path / "diffusers.safetensors")
    assert all(key.startswith("transformer.") for key in load_file(str(exported)))

    fresh = BUILDERS[architecture]()
    fresh.load_lora_weights(str(exported))
    reloaded = _model(fresh)
    condition = model.encode_prompts(PROMPTS)
    x, sigma = torch.randn(2, *model.sample_shape), torch.tensor([0.9, 0.4])
    with torch.no_grad():
        ours, theirs = model.velocity(x, sigma, condition), reloaded.velocity(x, sigma, condition)
        base = _model(BUILDERS[architecture]()).velocity(x, sigma, condition)
    torch.testing.assert_close(theirs, ours)
    assert (ours - base).abs().max() > 1e-2  # the comparison is not vacuous


def test_the_diffusers_backend_loads_a_saved_pipeline_folder(tmp_path):
    pipeline = tiny.tiny_sd3_pipeline()
    pipeline.save_pretrained(tmp_path / "sd3")
    # float32 named: the default follows the CPU (bfloat16 where native and faster, tests/core/test_precision.py)
    loaded = models.build("diffusers", path=str(tmp_path / "sd3"), device="cpu", cache_dir=str(tmp_path),
                          max_sequence_length=TOKENS, dtype="float32")
    assert isinstance(loaded, DiffusersFlowModel) and loaded.sample_shape == (16, 8, 8)
    assert loaded.default_prompts and loaded.dtype == torch.float32
    reference = _model(pipeline)
    x, sigma = torch.randn(2, 16, 8, 8), torch.tensor([0.5, 0.8])
    with torch.no_grad():
        torch.testing.assert_close(loaded.velocity(x, sigma, loaded.encode_prompts(PROMPTS)),
                                   reference.velocity(x, sigma, reference.encode_prompts(PROMPTS)))
    torch.testing.assert_close(loaded.decode(x), reference.decode(x), rtol=0, atol=0)


def test_a_missing_or_foreign_model_path_names_model_path(tmp_path):
    for path in ("", str(tmp_path / "missing"), str(tmp_path)):
        with pytest.raises(ValueError, match="model.path"):
            load_pipeline_model(path=path, device="cpu", cache_dir=str(tmp_path))


def _lora_gradients_and_saved_tensors(model):
    """LoRA gradients of one velocity loss, and how many tensors autograd kept for the backward pass."""
    from sfgrpo_core.lora.adapters import attach_lora

    parameters = attach_lora(model.module, rank=4, alpha=8.0, target_modules=model.default_lora_targets, seed=0)
    for parameter in parameters:  # lora_B starts at 0; give it values so every adapter's gradient flows
        torch.nn.init.normal_(parameter, std=0.02, generator=torch.Generator().manual_seed(parameter.numel()))
    generator = torch.Generator().manual_seed(1)
    x, sigma = torch.randn(2, *model.sample_shape, generator=generator), torch.tensor([0.4, 0.9])
    condition = model.encode_prompts(PROMPTS)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = model.velocity(x, sigma, condition).square().mean()
    loss.backward()
    return [parameter.grad.clone() for parameter in parameters], sum(saved)


@pytest.mark.parametrize("architecture", ["sd3", "flux"])
def test_gradient_checkpointing_is_on_for_pipelines_and_keeps_the_gradients(architecture):
    """Real models recompute each block in the backward pass (model_from_pipeline's default, `model.options`
    gradient_checkpointing): the LoRA gradients equal those of the plain backward, and far less is kept."""
    checkpointed = _model(BUILDERS[architecture]())
    plain = _model(BUILDERS[architecture](), gradient_checkpointing=False)
    assert checkpointed.module.gradient_checkpointing and not plain.module.gradient_checkpointing
    gradients, kept = _lora_gradients_and_saved_tensors(checkpointed)
    expected, kept_plain = _lora_gradients_and_saved_tensors(plain)
    for gradient, reference in zip(gradients, expected, strict=True):
        torch.testing.assert_close(gradient, reference)
    assert any(gradient.abs().sum() > 0 for gradient in gradients)
    assert kept < kept_plain / 2, (kept, kept_plain)


def test_gradient_checkpointing_option_must_be_a_bool(tmp_path):
    tiny.tiny_sd3_pipeline().save_pretrained(tmp_path / "sd3")
    with pytest.raises(ValueError, match="gradient_checkpointing must be true or false"):
        load_pipeline_model(path=str(tmp_path / "sd3"), device="cpu", gradient_checkpointing="yes")


def test_images_per_decode_fits_the_free_memory():
    from sfgrpo_core.models.diffusers_backend import DECODE_BYTES_PER_PIXEL, images_per_decode

    one_megapixel = 1024 * 1024
    assert images_per_decode(8 * 2**30, one_megapixel) == 1  # 4 GiB each: one fits in 80% of 8 GiB, two do not
    assert images_per_decode(2**30, one_megapixel) == 1  # never fewer than one
    for free in (2**30, 24 * 2**30, 139 * 2**30):
        chunk = images_per_decode(free, 512 * 512)
        assert chunk == 1 or chunk * 512 * 512 * DECODE_BYTES_PER_PIXEL <= 0.8 * free
        assert (chunk + 1) * 512 * 512 * DECODE_BYTES_PER_PIXEL > 0.8 * free


def test_a_decode_split_by_free_memory_gives_the_same_images(monkeypatch):
    from sfgrpo_core.models import diffusers_backend

    model = _model(BUILDERS["sd3"]())
    latents = torch.randn(5, *model.sample_shape, generator=torch.Generator().manual_seed(3))
    whole = model.decode(latents)
    pixels = 16 * 16  # the tiny VAE's images
    monkeypatch.setattr(diffusers_backend, "free_memory_bytes",
                        lambda device: int(2.5 * pixels * diffusers_backend.DECODE_BYTES_PER_PIXEL / 0.8))
    calls = []
    decode = model.vae.decode
    monkeypatch.setattr(model.vae, "decode", lambda z, **kw: calls.append(len(z)) or decode(z, **kw))
    torch.testing.assert_close(model.decode(latents), whole, rtol=0, atol=0)
    assert calls == [2, 2, 1]
