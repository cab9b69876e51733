"""FLUX through the nodes: a random-initialised FLUX at ComfyUI's own width (hidden 3072, 24 heads; one double and
one single block; small text and pooled inputs), written as a half-precision file at test time and loaded by the
stock UNETLoader. The sampler, the Tweedie preview and one training iteration of the node run on it, and the LoRA
the node writes loads in ComfyUI's stock LoRA loader with no key left unloaded.

ComfyUI 0.3.75 reads FLUX's hidden size, text width and pooled width from the weights' shapes; heads (24) and the
rotary axes (16, 56, 56) are fixed, which fixes the hidden size at 3072 (~530M parameters for 1+1 blocks)."""


import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from template_models import flux_state_dict

CONTEXT_DIM, POOLED_DIM, TOKENS = 64, 32, 6
FILE = "tiny_flux_test.safetensors"


@pytest.fixture(scope="module")
def flux(comfy_engine, tmp_path_factory):
    """The stock UNETLoader's MODEL of the random FLUX, the mini world's VAE (16 latent channels, like FLUX's) and a
    CONDITIONING of FLUX's form."""
    import folder_paths

    import nodes as comfy_nodes

    folder = tmp_path_factory.mktemp("flux_models")
    save_file(flux_state_dict(0, context_dim=CONTEXT_DIM, pooled_dim=POOLED_DIM), str(folder / FILE))
    folder_paths.add_model_folder_path("diffusion_models", str(folder))
    with torch.inference_mode():
        (patcher,) = comfy_nodes.UNETLoader().load_unet(FILE, "default")
        (vae,) = comfy_nodes.VAELoader().load_vae("mini_taesd.safetensors")
    generator = torch.Generator().manual_seed(1)
    conditioning = [[torch.randn(1, TOKENS, CONTEXT_DIM, generator=generator),
                     {"pooled_output": torch.randn(1, POOLED_DIM, generator=generator), "guidance": 3.5}]]
    yield {"model": patcher, "vae": vae, "conditioning": conditioning}
    # 1 GB (FLUX's hidden size is fixed at 3072): gone with the module, not at the end of the session.
    folder_paths.folder_names_and_paths["diffusion_models"][0].remove(str(folder))
    shutil.rmtree(folder)


def test_comfyui_detects_the_random_model_as_flux(flux):
    import comfy.model_sampling

    assert type(flux["model"].model.diffusion_model).__name__ == "Flux"
    assert isinstance(flux["model"].model.model_sampling, comfy.model_sampling.ModelSamplingFlux)


def test_the_sfgrpo_sampler_and_the_preview_run_on_flux(comfy_engine, flux):
    import comfy.sample

    latent = torch.zeros(1, 16, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    with torch.inference_mode():
        sample = comfy.sample.sample(flux["model"], noise, 4, 1.0, "sfgrpo_ddim_sde", "simple", flux["conditioning"],
                                     flux["conditioning"], latent, seed=0)
        assert sample.shape == latent.shape and torch.isfinite(sample).all()
        preview = comfy_engine.nodes.NODE_CLASS_MAPPINGS["SFGRPOTweediePreview"]
        output = preview.execute(model=flux["model"], positive=flux["conditioning"], negative=flux["conditioning"],
                                 latent_image={"samples": latent}, vae=flux["vae"], seed=0, steps=4, cfg=1.0,
                                 scheduler="simple", sde="ddim", strength=0.7, substeps=2)
    estimates, grid = output.args[0], output.args[1]
    assert estimates.shape == (5, 64, 64, 3) and grid.shape == (1, 64, 5 * 64, 3)
    assert torch.isfinite(estimates).all()


def test_one_training_iteration_on_flux_writes_a_lora_the_stock_loader_reads_whole(comfy_engine, flux):
    import comfy.sd

    types = comfy_engine.pack_module("types")
    prompts = types.PromptSet(("a sign", "a tree"), (flux["conditioning"], flux["conditioning"]))
    reward = comfy_engine.pack_module("rewards").load_reward("jpeg_compressibility", "{}")
    train_node = comfy_engine.nodes.NODE_CLASS_MAPPINGS["SFGRPOTrainLoRA"]
    settings = dict(method="stepwise", sde="ddim", eta=0.7, noise_level=0.7, steps=3, substeps=1,
                    min_train_std=0.0, group_size=2, groups_per_iteration=1, iterations=1, lr=1e-3, clip_range=0.05,
                    kl_beta=0.0, rank=2, alpha=2.0, seed=0, checkpoint_every=1, eval_every=0, eval_samples=1,
                    micro_batch_size=0)
    with torch.inference_mode():
        output = train_node.execute(model=flux["model"], vae=flux["vae"], prompts=prompts, reward=reward,
                                    run_name="flux_run", resume=False, width=64, height=64, **settings)
    lora_name = output.args[4]
    native = output.args[1]
    assert native and all(torch.isfinite(tensor).all() for tensor in native.values())
    assert any("single_blocks.0.linear1" in key for key in native) and any("double_blocks.0" in key for key in native)
    with comfy_engine.logged() as messages:
        lora_file = comfy_engine.root / "loras" / lora_name
        loaded, _ = comfy.sd.load_lora_for_models(flux["model"], None, load_file(str(lora_file)), 1.0, 0)
    assert not [message for message in messages if "lora key not loaded" in message], messages
    assert loaded is not flux["model"] and len(loaded.patches) > 0
