"""What one transition of the update keeps for its backward pass on SD3.5-Medium at 1024 px, measured on a CPU.

    .venv/bin/python benchmarks/activation_memory.py [--latent 128] [--context 333] [--out FILE.json]

The update's memory grows with ``optim.micro_batch_size``: every transition of a micro-batch keeps its activations
until the backward pass. This builds SD3.5-Medium's transformer (diffusers' SD3Transformer2DModel with the published
config of stabilityai/stable-diffusion-3.5-medium, random weights, bfloat16) cut to three blocks (one with MMDiT-X's
second attention, one plain, the last, which updates no context), attaches the trainer's LoRA (attention
projections, rank 32, float32) and runs the trainer's forward on one and on two samples at 1024 px (a 128 x 128
latent: 4096 image tokens) with 333 text tokens (77 CLIP + 256 T5). Every tensor autograd saves for backward is
counted once (by storage; parameters excluded), attributed to the block that saved it, so the full model's bytes
per sample follow from the three: outside + 13 x dual + 10 x plain + last. The same ops save the same tensors on a
GPU (the attention saves its output and log-sum-exp there too, not the L x L matrix), so the figure carries over;
a GPU adds its allocator's slack and the backward pass's transient gradients on top.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

# stabilityai/stable-diffusion-3.5-medium, transformer/config.json
SD35_MEDIUM = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
               "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
               "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 384,
               "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm"}


def saved_bytes_by_block(transformer: torch.nn.Module, samples: int, latent: int, context: int,
                         checkpointed: bool) -> dict[str, int]:
    """Bytes autograd keeps for backward in one forward pass of ``samples`` transitions, per block ("outside" for the
    embeddings and the final layer), each storage counted once, parameters left out. ``checkpointed``: diffusers'
    gradient checkpointing (its default checkpoint function, labelled), under which a block keeps its inputs only."""
    parameters = {parameter.untyped_storage().data_ptr() for parameter in transformer.parameters()}
    seen: set[int] = set()
    current = ["outside"]
    totals: dict[str, int] = {}
    blocks = list(transformer.transformer_blocks)  # type: ignore[union-attr]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in parameters and pointer not in seen:
            seen.add(pointer)
            totals[current[0]] = totals.get(current[0], 0) + storage.nbytes()
        return tensor

    def labelled(label: str, run: Any, *args: Any) -> Any:
        current[0] = label
        try:
            return run(*args)
        finally:
            current[0] = "outside"

    def checkpoint(module: torch.nn.Module, *args: Any) -> Any:  # what the checkpoint saves is the block's
        return labelled(f"block{blocks.index(module)}", lambda *inputs: torch.utils.checkpoint.checkpoint(
            module.__call__, *inputs, use_reentrant=False), *args)

    originals = [block.forward for block in blocks]
    if checkpointed:
        transformer.enable_gradient_checkpointing(checkpoint)  # type: ignore[operator]
    else:
        transformer.disable_gradient_checkpointing()  # type: ignore[operator]
        for index, block in enumerate(blocks):
            block.forward = lambda *args, _index=index, _run=originals[index], **kwargs: labelled(  # type: ignore
                f"block{_index}", lambda *inputs: _run(*inputs, **kwargs), *args)
    config = transformer.config  # type: ignore[union-attr]
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(samples, config.in_channels, latent, latent, generator=generator).bfloat16()
    encoder = torch.randn(samples, context, config.joint_attention_dim, generator=generator).bfloat16()
    pooled = torch.randn(samples, config.pooled_projection_dim, generator=generator).bfloat16()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            output = transformer(hidden_states=hidden, timestep=torch.full((samples,), 500.0),
                                 encoder_hidden_states=encoder, pooled_projections=pooled, return_dict=False)[0]
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)
    assert output.requires_grad, "the LoRA must make the output depend on trainable parameters"
    return totals


# stabilityai/stable-diffusion-3.5-medium, vae/config.json
SD35_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": (128, 256, 512, 512),
            "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
            "layers_per_block": 2, "norm_num_groups": 32, "use_quant_conv": False, "use_post_quant_conv": False}


def resident_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def transient_peak_mib(kind: str, samples: int, latent: int, context: int) -> float:
    """How far resident memory rises above its level before one no-grad pass: the rollout's transformer forward
    (``inference``: the cut model in bfloat16; one block is alive at a time, so the cut's peak is the full model's)
    or the VAE decode in float32 (``decode``). Run in a fresh process per point."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if kind == "inference":
            model = SD3Transformer2DModel(**{**SD35_MEDIUM, "num_layers": 3, "dual_attention_layers": (0,)})
            model = model.to(torch.bfloat16)
            inputs = {"hidden_states": torch.randn(samples, 16, latent, latent, generator=generator).bfloat16(),
                      "encoder_hidden_states": torch.randn(samples, context, 4096, generator=generator).bfloat16(),
                      "pooled_projections": torch.randn(samples, 2048, generator=generator).bfloat16(),
                      "timestep": torch.full((samples,), 500.0), "return_dict": False}
            run = lambda: model(**inputs)  # noqa: E731
        else:
            vae = AutoencoderKL(**SD35_VAE)
            latents = torch.randn(samples, 16, latent, latent, generator=generator)
            run = lambda: vae.decode(latents, return_dict=False)  # noqa: E731
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = resident_mib("VmRSS")
        run()
        return resident_mib("VmHWM") - before


def peaks_in_fresh_processes(latent: int, context: int) -> dict[str, Any]:
    import subprocess
    import sys

    peaks: dict[str, Any] = {}
    for kind in ("inference", "decode"):
        measured = {}
        for samples in (1, 2):
            output = subprocess.run([sys.executable, __file__, "--peak", kind, "--samples", str(samples),
                                     "--latent", str(latent), "--context", str(context)],
                                    capture_output=True, text=True, check=True).stdout
            measured[samples] = float(output.strip().splitlines()[-1])
        peaks[kind] = {"first_sample_mib": round(measured[1]), "per_sample_mib": round(measured[2] - measured[1])}
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=128, help="latent side (128 = 1024 px)")
    parser.add_argument("--context", type=int, default=333, help="text tokens (77 CLIP + 256 T5)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--out", default="", help="also write the result here as JSON")
    parser.add_argument("--peak", choices=("inference", "decode"), help=argparse.SUPPRESS)  # one fresh-process point
    parser.add_argument("--samples", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak:
        print(transient_peak_mib(args.peak, args.samples, args.latent, args.context))
        return
    from diffusers import SD3Transformer2DModel

    from sfgrpo_core.lora.adapters import attach_lora
    from sfgrpo_core.models.diffusers_backend import ATTENTION_LORA_TARGETS

    with torch.device("meta"):
        full = SD3Transformer2DModel(**SD35_MEDIUM)
    parameters_full = sum(parameter.numel() for parameter in full.parameters())
    torch.manual_seed(0)
    cut = SD3Transformer2DModel(**{**SD35_MEDIUM, "num_layers": 3, "dual_attention_layers": (0,)})
    cut = cut.to(torch.bfloat16).requires_grad_(False)
    attach_lora(cut, rank=args.rank, alpha=2.0 * args.rank, target_modules=ATTENTION_LORA_TARGETS)
    gib, mib = 2.0**30, 2.0**20
    result: dict[str, Any] = {
        "model": "SD3.5-Medium transformer (published config), bfloat16, LoRA rank "
                 f"{args.rank} on {', '.join(ATTENTION_LORA_TARGETS)} (float32)",
        "parameters_full": parameters_full, "weights_gib_bf16": round(parameters_full * 2 / gib, 2),
        "tokens": {"image": (args.latent // 2) ** 2, "text": args.context},
    }
    for mode in ("plain", "checkpointed"):
        measured = {samples: saved_bytes_by_block(cut, samples, args.latent, args.context, mode == "checkpointed")
                    for samples in (1, 2)}
        one, two = measured[1], measured[2]
        per_sample = {part: two.get(part, 0) - one.get(part, 0) for part in two}  # what a second sample adds
        full_model = (per_sample.get("outside", 0) + 13 * per_sample["block0"] + 10 * per_sample["block1"]
                      + per_sample["block2"])
        result[mode] = {
            "kept_mib_per_sample_by_part": {part: round(value / mib, 1) for part, value in sorted(per_sample.items())},
            "kept_gib_per_sample_full_model": round(full_model / gib, 3),
            "linear_in_samples": all(abs(two[part] - 2 * one.get(part, 0)) <= 0.02 * two[part] for part in two),
        }
    # In the backward pass a checkpointed model recomputes one block at a time: on top of what it keeps, one
    # block's plain activations (the largest, a dual-attention block) are alive at once.
    plain_blocks = result["plain"]["kept_mib_per_sample_by_part"]
    result["checkpointed"]["peak_gib_per_sample_with_one_block_recomputed"] = round(
        result["checkpointed"]["kept_gib_per_sample_full_model"] + max(plain_blocks["block0"],
                                                                       plain_blocks["block1"]) / 1024, 3)
    # The no-grad passes: the rollout, evaluation and completions (train.sample_batch_size samples at once) and the
    # decode before each reward (train.reward_batch_size images at once).
    result["no_grad_transient_peaks"] = peaks_in_fresh_processes(args.latent, args.context)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
