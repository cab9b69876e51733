"""``sfgrpo miniworld build``: build the whole mini world reproducibly and write its manifest.

Stages (each seeded, so the same settings give the same files on the same machine and thread count):
autoencoder -> encode a scene dataset -> pretrain transformer + text encoder -> evaluate -> export.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_save_safetensors, atomic_write_text
from . import autoencoder, denoiser
from .geneval import MiniGenEval, category_means

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# Each file in the folder of the ComfyUI loader that reads it (UNETLoader: diffusion_models, VAELoader: vae).
TRANSFORMER_FILE = "diffusion_models/mini_sd3_transformer.safetensors"
TEXT_ENCODER_FILE = "mini_text_encoder.safetensors"
TAESD_FILE = "vae/mini_taesd.safetensors"
VAE_DIFFUSERS_DIR = "vae_diffusers"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class BuildSettings:
    """Defaults are the committed mini world's; tests shrink them to check determinism in seconds."""

    seed: int = 0
    autoencoder_steps: int = 1000
    autoencoder_batch: int = 8
    autoencoder_lr: float = 5e-4  # 1e-3 sometimes stalls near 0.08 MSE with bf16 autocast; 2e-3 always does
    dataset_size: int = 20000
    denoiser_steps: int = 3600
    denoiser_batch: int = 64
    denoiser_lr: float = 1e-3
    layers: int = 4
    eval_per_category: int = 32
    eval_guidance: float = 4.0
    eval_steps: int = 10
    half_precision: bool = True


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _half(state: dict[str, torch.Tensor], enabled: bool) -> dict[str, torch.Tensor]:
    return {k: v.half() if enabled and v.is_floating_point() else v for k, v in state.items()}


@torch.no_grad()
def evaluate(transformer, text_encoder, vae, scaling_factor: float, settings: BuildSettings,
             guidance: float | None = None) -> dict[str, Any]:
    """Mean MiniGenEval score on a fixed category-balanced held-out prompt set, per category and overall."""
    prompts = denoiser.heldout_prompt_set(settings.eval_per_category, seed=settings.seed)
    guidance = settings.eval_guidance if guidance is None else guidance
    scores = []
    for start in range(0, len(prompts), 64):
        chunk = prompts[start : start + 64]
        latents = denoiser.sample(transformer, text_encoder, chunk, seed=settings.seed * 1000 + start,
                                  steps=settings.eval_steps, guidance=guidance)
        images = autoencoder.to_uint8(vae.decoder(latents / scaling_factor))
        scores.append(MiniGenEval()(images, chunk))
    all_scores = torch.cat(scores)
    return {"mean": float(all_scores.nanmean()), "per_category": category_means(all_scores, prompts),
            "guidance": guidance, "steps": settings.eval_steps, "prompts": len(prompts)}


def build(out_dir: str | Path = WEIGHTS_DIR, settings: BuildSettings = BuildSettings(), *,
          progress: bool = True) -> dict[str, Any]:
    """Build every mini-world file into ``out_dir`` and return the manifest (also written as manifest.json)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    started = time.perf_counter()
    bars = _Bars(progress)

    bar = bars.new(settings.autoencoder_steps, "autoencoder")
    vae, vae_report = autoencoder.train_autoencoder(
        settings.autoencoder_steps, batch_size=settings.autoencoder_batch, lr=settings.autoencoder_lr,
        seed=settings.seed, progress=lambda step, loss: bars.step(bar, loss))
    scaling = vae_report.scaling_factor
    if settings.half_precision:  # measure what is committed: the fp16 weights, run in float32
        vae.load_state_dict({k: v.half().float() for k, v in vae.state_dict().items()})

    bar = bars.new(settings.dataset_size, "encode scenes")
    data = denoiser.encode_scenes(vae, scaling, settings.dataset_size, settings.seed + 1,
                                  progress=lambda done: bars.to(bar, done))
    bar = bars.new(settings.denoiser_steps, "transformer")
    transformer, text_encoder, denoiser_report = denoiser.train_denoiser(
        data, settings.denoiser_steps, layers=settings.layers, batch_size=settings.denoiser_batch,
        lr=settings.denoiser_lr, seed=settings.seed, progress=lambda step, loss: bars.step(bar, loss))
    if settings.half_precision:
        transformer.load_state_dict({k: v.half().float() for k, v in transformer.state_dict().items()})
    bars.close()

    scores = evaluate(transformer, text_encoder, vae, scaling, settings)
    unguided = evaluate(transformer, text_encoder, vae, scaling, settings, guidance=1.0)

    config_json = json.dumps(denoiser.transformer_config(settings.layers))
    atomic_save_safetensors(_half(transformer.state_dict(), settings.half_precision), out_dir / TRANSFORMER_FILE,
                            {"format": "diffusers-sd3-transformer", "config": config_json})
    atomic_save_safetensors(text_encoder.state_dict(), out_dir / TEXT_ENCODER_FILE,
                            {"config": json.dumps(text_encoder.config)})
    atomic_save_safetensors(_half(autoencoder.taesd_state_dict(vae, scaling), settings.half_precision),
                            out_dir / TAESD_FILE, {"format": "comfyui-taesd", "scaling_factor": repr(scaling)})
    vae.register_to_config(scaling_factor=scaling, shift_factor=0.0)
    if settings.half_precision:
        vae = vae.half()
    vae.save_pretrained(out_dir / VAE_DIFFUSERS_DIR, safe_serialization=True)

    files = sorted(p for p in out_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {
        "settings": asdict(settings),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - started, 1),
        "autoencoder": {"heldout_psnr_db": round(vae_report.heldout_psnr, 3), "scaling_factor": scaling,
                        "seconds": round(vae_report.seconds, 1)},
        "transformer": {"final_loss": round(denoiser_report.final_loss, 5),
                        "seconds": round(denoiser_report.seconds, 1),
                        "parameters": sum(p.numel() for p in transformer.parameters())},
        "minigeneval_heldout": scores,
        "minigeneval_heldout_no_guidance": unguided,
        "files": {str(p.relative_to(out_dir)): {"sha256": sha256(p), "bytes": p.stat().st_size} for p in files},
    }
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


class _Bars:
    """tqdm bars for the build stages (or nothing)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.current = None

    def new(self, total: int, description: str):
        self.close()
        if self.enabled:
            from tqdm import tqdm

            self.current = tqdm(total=total, desc=description, unit="it")
        return self.current

    def step(self, bar, loss: float) -> None:
        if bar is not None:
            bar.update(1)
            if bar.n % 20 == 0:
                bar.set_postfix(loss=f"{loss:.4f}")

    def to(self, bar, done: int) -> None:
        if bar is not None:
            bar.update(done - bar.n)

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None
