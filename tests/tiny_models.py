"""Tiny random-initialised diffusers models and offline tokenizers: fixtures for tests and demos.

Nothing here downloads anything or reads weights: every model is built from a small config with a fixed seed (the
global RNG is left untouched), in well under a second on a CPU. The models compute real SD3 / FLUX forward passes
but know nothing about images; they exist to exercise shapes, conventions, LoRA and file formats.

Sizes: latents have 16 channels and the VAE upsamples 2x (two blocks), so an 8 x 8 latent decodes to 16 x 16 RGB.
Text: character-level CLIP (byte-level BPE without merges, 32 tokens) and T5 (unigram over lowercase letters and
digits) tokenizers; pass ``max_sequence_length`` <= 32 to the pipelines' ``encode_prompt``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

LATENT_CHANNELS = 16
CLIP_MAX_LENGTH = 32
T5_MAX_LENGTH = 32
JOINT_ATTENTION_DIM = 32
POOLED_PROJECTION_DIM = 32
VAE_SCALING_FACTOR = 1.5305  # SD3's values; any pair works for a random VAE
VAE_SHIFT_FACTOR = 0.0609


def seeded(seed: int, build: Callable[[], Any]) -> Any:
    """``build()`` with the torch RNG seeded by ``seed``, restoring the global RNG afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_sd3_transformer(seed: int = 0, **config: Any):
    """An SD3Transformer2DModel: 2 layers, 2 heads of dim 8 (inner 16), 16 latent channels, float32, eval mode.

    ``config`` overrides any constructor argument (e.g. ``attention_head_dim=64`` for ComfyUI-loadable sizes).
    """
    from diffusers import SD3Transformer2DModel

    settings = dict(sample_size=8, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                    num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=JOINT_ATTENTION_DIM,
                    caption_projection_dim=16, pooled_projection_dim=POOLED_PROJECTION_DIM, pos_embed_max_size=16)
    settings.update(config)
    if "caption_projection_dim" not in config:
        settings["caption_projection_dim"] = settings["num_attention_heads"] * settings["attention_head_dim"]
    return seeded(seed, lambda: SD3Transformer2DModel(**settings)).train(False)


def tiny_flux_transformer(seed: int = 0, **config: Any):
    """A FluxTransformer2DModel: 1 double and 1 single block, 2 heads of dim 16, guidance-distilled (like
    FLUX.1-dev), 16 latent channels packed 2x2 into 64; float32, eval mode. ``config`` overrides the constructor."""
    from diffusers import FluxTransformer2DModel

    settings = dict(patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=1,
                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=JOINT_ATTENTION_DIM,
                    pooled_projection_dim=POOLED_PROJECTION_DIM, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    settings.update(config)
    return seeded(seed, lambda: FluxTransformer2DModel(**settings)).train(False)


def tiny_vae(seed: int = 0):
    """An AutoencoderKL with 16 latent channels and a 2x spatial factor; float32, eval mode."""
    from diffusers import AutoencoderKL

    return seeded(seed, lambda: AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=LATENT_CHANNELS, norm_num_groups=8,
        sample_size=16, scaling_factor=VAE_SCALING_FACTOR, shift_factor=VAE_SHIFT_FACTOR, use_quant_conv=False,
        use_post_quant_conv=False)).train(False)


def tiny_clip_tokenizer():
    """A CLIPTokenizer over the 256 byte-level characters (each also with CLIP's '</w>' end-of-word suffix) and no
    merges: every character is one token. 32 tokens per prompt."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    characters = sorted(ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>", *characters, *(f"{character}</w>" for character in characters)]
    return CLIPTokenizer(vocab={token: index for index, token in enumerate(tokens)}, merges=[],
                         model_max_length=CLIP_MAX_LENGTH)


def tiny_t5_tokenizer():
    """A T5Tokenizer (unigram) over lowercase letters, digits and a little punctuation, with word-start pieces."""
    from transformers import T5Tokenizer

    characters = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(character, -3.0) for character in characters]
    pieces += [(f"\u2581{character}", -2.5) for character in characters]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def tiny_clip_text_encoder(seed: int, *, hidden_size: int, projection_dim: int | None = None):
    """A 2-layer CLIP text encoder for ``tiny_clip_tokenizer``: with a text projection of ``projection_dim``
    (CLIPTextModelWithProjection, SD3) or without one (CLIPTextModel, FLUX: its pooler output is the pooled vector)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tiny_clip_tokenizer()), hidden_size=hidden_size,
                            intermediate_size=2 * hidden_size, num_hidden_layers=2, num_attention_heads=2,
                            max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=projection_dim or hidden_size,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model_class = CLIPTextModel if projection_dim is None else CLIPTextModelWithProjection
    return seeded(seed, lambda: model_class(config)).train(False)


def tiny_t5_encoder(seed: int, *, d_model: int = JOINT_ATTENTION_DIM):
    """A 1-layer T5EncoderModel for ``tiny_t5_tokenizer`` with hidden size ``d_model``."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(tiny_t5_tokenizer()), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1,
                      num_heads=2, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)
    return seeded(seed, lambda: T5EncoderModel(config)).train(False)


def tiny_sd3_pipeline(seed: int = 0):
    """A complete StableDiffusion3Pipeline of tiny parts: two CLIP encoders (hidden 16, projections 16 + 16 = the
    transformer's pooled 32), a T5 encoder (hidden 32 = joint_attention_dim), the tiny VAE and SD3 transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(seed), vae=tiny_vae(seed + 1),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=tiny_clip_text_encoder(seed + 2, hidden_size=16, projection_dim=16),
        text_encoder_2=tiny_clip_text_encoder(seed + 3, hidden_size=16, projection_dim=16),
        text_encoder_3=tiny_t5_encoder(seed + 4), tokenizer=tiny_clip_tokenizer(), tokenizer_2=tiny_clip_tokenizer(),
        tokenizer_3=tiny_t5_tokenizer())


def tiny_flux_pipeline(seed: int = 0):
    """A complete FluxPipeline of tiny parts: CLIP (hidden 32 = pooled 32), T5 (hidden 32), VAE and FLUX."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    return FluxPipeline(
        transformer=tiny_flux_transformer(seed), vae=tiny_vae(seed + 1),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=tiny_clip_text_encoder(seed + 2, hidden_size=POOLED_PROJECTION_DIM),
        text_encoder_2=tiny_t5_encoder(seed + 3), tokenizer=tiny_clip_tokenizer(), tokenizer_2=tiny_t5_tokenizer())
