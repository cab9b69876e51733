"""Does a Stepwise / Flow-GRPO iteration of SD3.5 Medium with PickScore fit a 24 GB card? Peak memory and seconds per
phase of one iteration of each method at 512 and 1024 px, on a GPU capped at 24 GiB.

    python benchmarks/gpu_memory_24gb.py --device cuda --out benchmarks/results/gpu_24gb.json   # a GPU machine
    python benchmarks/gpu_memory_24gb.py --device cpu --tiny --out /tmp/check.json             # the same code, tiny

Everything is random-initialised at its published size (no weights can be downloaded): SD3.5 Medium's transformer
(stabilityai/stable-diffusion-3.5-medium's config, 2.5B parameters), its VAE, CLIP-L, OpenCLIP-bigG and T5-XXL text
encoders (bfloat16), and PickScore's CLIP-H (tests/reward_stand_ins.py, real size). The compute and memory of a
forward and backward pass do not depend on the weights' values. The tokenizers are character-level stand-ins
(tests/tiny_models.py) padded to the real lengths (77 CLIP tokens, 256 T5 tokens).

``--memory-gib 24`` caps this process at 24 GiB of the card with torch.cuda.set_per_process_memory_fraction, so a
larger card (an H100 or H200) behaves like a 24 GB one: a setting that does not fit fails with an out-of-memory error,
recorded as such. The text encoders leave the GPU once the prompts are encoded (the trainer encodes every prompt
once at the start), which is what makes the iteration fit. ``--tiny`` swaps in the tiny pipeline of
tests/tiny_models.py and a tiny PickScore, to check the script on a CPU. Writes one JSON (rewritten after every
point, so a run cut short keeps what finished).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for entry in (ROOT, ROOT / "tests", ROOT / "benchmarks"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

import torch  # noqa: E402

from sfgrpo_core.config import load_config  # noqa: E402

GIB = 1024**3
PROMPTS = ["a photo of a red fox in the snow", "a watercolor of a lighthouse at dusk",
           "two cups of coffee on a wooden table", "a neon sign that says open late"]
# SD3's VAE (stabilityai/stable-diffusion-3.5-medium, vae/config.json) and text encoders (their config.json files).
SD3_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": (128, 256, 512, 512),
           "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
           "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 1.5305,
           "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "projection_dim": 768, "hidden_act": "quick_gelu"}
CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
          "projection_dim": 1280, "hidden_act": "gelu"}
T5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24,
          "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32}


def real_sd35_medium_pipeline(device: str) -> Any:
    """A StableDiffusion3Pipeline of random-initialised parts at SD3.5 Medium's published sizes, bfloat16 on
    ``device`` (built there directly: no float32 copy on the host)."""
    from activation_memory import SD35_MEDIUM
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from tiny_models import tiny_clip_tokenizer, tiny_t5_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip_tokenizer, t5_tokenizer = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    clip_tokenizer.model_max_length, t5_tokenizer.model_max_length = 77, 256

    def clip(sizes: dict[str, Any]) -> Any:
        return CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=len(clip_tokenizer), max_position_embeddings=77,
                                                          bos_token_id=0, eos_token_id=1, pad_token_id=1, **sizes))

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            parts = {"transformer": SD3Transformer2DModel(**SD35_MEDIUM), "vae": AutoencoderKL(**SD3_VAE),
                     "text_encoder": clip(CLIP_L), "text_encoder_2": clip(CLIP_G),
                     "text_encoder_3": T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), pad_token_id=0,
                                                               eos_token_id=1, **T5_XXL))}
    finally:
        torch.set_default_dtype(default)
    parts["vae"] = parts["vae"].float()  # the backend decodes in float32
    return StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), tokenizer=clip_tokenizer,
                                    tokenizer_2=clip_tokenizer, tokenizer_3=t5_tokenizer,
                                    **{name: module.eval() for name, module in parts.items()})


def build_model(pipeline: Any, device: str, latent: int, tiny: bool) -> Any:
    """The trainer's model over ``pipeline`` at ``latent`` (latent side; px = 8x), prompts encoded, then the text
    encoders moved off the GPU (they are not needed again)."""
    from sfgrpo_core.models.diffusers_backend import model_from_pipeline

    model = model_from_pipeline(pipeline, device=device, dtype=torch.float32 if tiny else torch.bfloat16,
                                latent_size=latent, max_sequence_length=32 if tiny else 256,
                                default_prompts=PROMPTS, default_eval_prompts=PROMPTS[:1])
    model.encode_prompts(PROMPTS)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        getattr(pipeline, name).to("cpu")
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return model


def one_iteration(model: Any, reward: Any, method: str, device: str, out: Path) -> dict[str, Any]:
    """One training iteration of ``method`` (the 24 GB recipe below): peak memory and seconds per phase."""
    from sfgrpo_core.training.trainer import train

    config = load_config(str(ROOT / "configs" / "miniworld.yaml")).replace(**{
        "model.name": "diffusers", "model.device": device, "credit.method": method, "credit.substeps": 2,
        "sampler.sde": "ddim" if method == "stepwise" else "flow_grpo", "sampler.steps": 10,
        "train.initial_noise": "auto", "train.group_size": 8, "train.groups_per_iteration": 1,
        "train.sample_batch_size": 4, "train.reward_batch_size": 4, "optim.micro_batch_size": 1,
        "train.iterations": 1, "train.eval_every": 0, "train.reward": "pickscore",
        "train.output_dir": str(out / method), "lora.rank": 32, "lora.alpha": 64.0, "train.prompts": PROMPTS,
        "train.eval_prompts": PROMPTS[:1]})
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    record = next(r for r in train(config, model=model, reward=reward).records if "loss" in r)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / GIB if device.startswith("cuda") else None
    from sfgrpo_core.lora.adapters import detach_lora

    detach_lora(model.module)  # the next method starts from the base model again
    return {"peak_memory_gib": peak, "wall_seconds": seconds, "loss": record["loss"],
            "reward_mean": record["reward_mean"], "reward_calls": record["reward_calls"],
            **{f"seconds_{phase}": record[f"seconds_{phase}"] for phase in ("rollout", "rewards", "update")}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--memory-gib", type=float, default=24.0, help="cap the process at this much GPU memory")
    parser.add_argument("--sizes", default="512,1024", help="image sizes in px (multiples of 16)")
    parser.add_argument("--tiny", action="store_true", help="tiny models (a check of the script on a CPU)")
    parser.add_argument("--out", required=True, help="the JSON file to write")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"device": args.device, "tiny": args.tiny, "memory_gib_cap": args.memory_gib,
                              "torch": torch.__version__, "points": {}}
    if args.device.startswith("cuda"):
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_gib * GIB / total))
        result["gpu"], result["gpu_memory_gib"] = torch.cuda.get_device_name(0), total / GIB
    from reward_stand_ins import build_stand_in

    from sfgrpo_core import rewards

    out = Path(args.out)
    with tempfile.TemporaryDirectory() as folder:
        if args.tiny:
            from tiny_models import tiny_sd3_pipeline

            pipeline = tiny_sd3_pipeline()
        else:
            pipeline = real_sd35_medium_pipeline(args.device)
        reward = rewards.load("pickscore", device=args.device, dtype="float32" if args.tiny else "bfloat16",
                              **build_stand_in("pickscore", Path(folder) / "pickscore",
                                               size="tiny" if args.tiny else "real"))
        for px in [int(size) for size in args.sizes.split(",")]:
            latent = px // 2 if args.tiny else px // 8  # the tiny VAE upsamples 2x, SD3's 8x
            for method in ("flow_grpo", "stepwise"):
                key = f"{method}_{px}px"
                try:
                    model = build_model(pipeline, args.device, latent, args.tiny)
                    result["points"][key] = one_iteration(model, reward, method, args.device,
                                                          Path(folder) / key)
                except torch.cuda.OutOfMemoryError as error:
                    result["points"][key] = {"fits": False, "error": str(error).splitlines()[0]}
                except Exception as error:  # noqa: BLE001 - record, then go on to the other points
                    result["points"][key] = {"error": f"{type(error).__name__}: {error}",
                                             "traceback": traceback.format_exc()[-2000:]}
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                print(key, json.dumps(result["points"][key]), flush=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(result, indent=1) + "\n")
            for pair in (("stepwise", "flow_grpo"),):
                first, second = (result["points"].get(f"{name}_{px}px", {}) for name in pair)
                if first.get("wall_seconds") and second.get("wall_seconds"):
                    result["points"][f"ratio_{px}px"] = {"seconds": first["wall_seconds"] / second["wall_seconds"]}
    out.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if all("error" not in point for point in result["points"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
