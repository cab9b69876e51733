"""Random-initialised model files under the names the real-model templates use, at the widths ComfyUI reads them
with (tests/comfy/test_templates_real_models.py, tests/gpu/test_templates_gpu.py).

ComfyUI fixes most widths by architecture: CLIP-L (12 layers of 768) and CLIP-G (32 of 1280) come from its config
files, the VAE's channels are fixed, FLUX's hidden size is 3072 (24 heads, rotary axes 16/56/56), and an MMDiT's
hidden size is 64 x its depth. What it reads from the weights (depths, text widths) is kept small. T5-XXL (24
layers of 4096, 4.7B parameters, 9.5 GB in float16) is written only where a GPU runs it.

Weights: N(0, 0.02), norm scales 1, biases 0, built on the meta device so only the saved tensors take memory.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

# ComfyUI's SD3/FLUX VAE: the SD VAE's channels with 16 latent channels and no quant convs.
VAE_CONFIG = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
              "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
T5_XXL = {"d_model": 4096, "d_ff": 10240, "num_layers": 24, "num_heads": 64, "d_kv": 64, "vocab_size": 32128}


def random_state_dict(module: torch.nn.Module, seed: int, dtype: torch.dtype = torch.float16,
                      prefix: str = "") -> dict[str, torch.Tensor]:
    """``module``'s state dict (it may live on the meta device) with random weights of ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    norms = {name for name, child in module.named_modules() if "Norm" in type(child).__name__}
    state = {}
    for name, tensor in module.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if leaf == "bias":
            value = torch.zeros(tensor.shape)
        elif leaf == "scale" or (owner in norms and leaf == "weight"):
            value = torch.ones(tensor.shape)
        elif tensor.is_floating_point():
            value = torch.randn(tensor.shape, generator=generator) * 0.02
        else:
            continue  # integer buffers (position ids) are rebuilt by the loaders
        state[prefix + name] = value.to(dtype)
    return state


def vae_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """ComfyUI's 16-channel KL autoencoder (SD3's and FLUX's), encoder and decoder."""
    from comfy.ldm.modules.diffusionmodules.model import Decoder, Encoder

    with torch.device("meta"):
        encoder, decoder = Encoder(**VAE_CONFIG), Decoder(**VAE_CONFIG)
    return {**random_state_dict(encoder, seed, prefix="encoder."),
            **random_state_dict(decoder, seed + 1, prefix="decoder.")}


def mmdit_state_dict(seed: int, depth: int = 2) -> dict[str, torch.Tensor]:
    """An MMDiT shaped like SD3.5 Medium (RMS q/k norms, a second self-attention in block 0, 2048-wide pooled text,
    4096-wide context, pos_embed_max_size 384) with ``depth`` blocks: hidden size 64 x depth."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    hidden = 64 * depth
    with torch.device("meta"):
        model = MMDiT(input_size=None, patch_size=2, in_channels=16, out_channels=16, depth=depth,
                      adm_in_channels=2048, pos_embed_max_size=384, num_patches=384 * 384, qk_norm="rms",
                      x_block_self_attn_layers=[0], pos_embed_scaling_factor=None,
                      context_embedder_config={"target": "torch.nn.Linear",
                                               "params": {"in_features": 4096, "out_features": hidden}},
                      operations=comfy.ops.disable_weight_init)
    return random_state_dict(model, seed)


def flux_state_dict(seed: int, context_dim: int = 4096, pooled_dim: int = 768) -> dict[str, torch.Tensor]:
    """FLUX.1-dev's architecture (guidance-distilled) at its hidden size 3072, one double and one single block,
    text widths ``context_dim`` (T5-XXL: 4096) and ``pooled_dim`` (CLIP-L: 768)."""
    import comfy.ldm.flux.model
    import comfy.ops

    with torch.device("meta"):
        model = comfy.ldm.flux.model.Flux(
            image_model="flux", in_channels=16, out_channels=16, vec_in_dim=pooled_dim, context_in_dim=context_dim,
            hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56],
            theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True, operations=comfy.ops.disable_weight_init)
    return random_state_dict(model, seed)


def clip_text_state_dict(seed: int, which: str) -> dict[str, torch.Tensor]:
    """CLIP-L ("l": 12 layers of 768) or CLIP-G ("g": 32 layers of 1280, OpenCLIP bigG's text tower) in the
    Hugging Face layout ComfyUI's text-encoder loaders read, with the text projection."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    sizes = {"l": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       projection_dim=768, hidden_act="quick_gelu"),
             "g": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                       projection_dim=1280, hidden_act="gelu")}[which]
    config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **sizes)
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(config)
    return random_state_dict(model, seed)


def t5_xxl_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """T5-XXL's encoder (t5xxl_fp16.safetensors): 4.7B parameters, 9.5 GB in float16."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(**T5_XXL, feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    with torch.device("meta"):
        model = T5EncoderModel(config)
    return random_state_dict(model, seed)


def write(path: Path, state: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


def write_sd35_files(models: Path, *, t5: bool) -> None:
    """checkpoints/sd3.5_medium.safetensors (MMDiT + VAE, no text encoders: as Stability ships it) and
    text_encoders/clip_l, clip_g (and t5xxl_fp16 with ``t5``)."""
    checkpoint = {**{f"model.diffusion_model.{key}": value for key, value in mmdit_state_dict(0).items()},
                  **{f"first_stage_model.{key}": value for key, value in vae_state_dict(1).items()}}
    write(models / "checkpoints" / "sd3.5_medium.safetensors", checkpoint)
    write_text_encoders(models, t5=t5)


def write_text_encoders(models: Path, *, t5: bool) -> None:
    for name, which, seed in (("clip_l.safetensors", "l", 3), ("clip_g.safetensors", "g", 4)):
        if not (models / "text_encoders" / name).exists():
            write(models / "text_encoders" / name, clip_text_state_dict(seed, which))
    if t5 and not (models / "text_encoders" / "t5xxl_fp16.safetensors").exists():
        write(models / "text_encoders" / "t5xxl_fp16.safetensors", t5_xxl_state_dict(5))


def write_flux_files(models: Path, *, t5: bool) -> None:
    """diffusion_models/flux1-dev.safetensors, vae/ae.safetensors and the text encoders. Without ``t5`` FLUX's
    text input is CLIP-L's width (768), for a graph whose text encoder is CLIP-L alone."""
    write(models / "diffusion_models" / "flux1-dev.safetensors",
          flux_state_dict(6, context_dim=4096 if t5 else 768))
    write(models / "vae" / "ae.safetensors", vae_state_dict(7))
    write_text_encoders(models, t5=t5)
