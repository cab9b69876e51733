"""The mini world's decode (TAESD, bfloat16 autocast) in the default and the channels-last layout, side by side.

    .venv/bin/python benchmarks/decode_layouts.py [--threads 1] [--images 48] [--rounds 5]

Decoding every step's clean estimate is the largest part of a Stepwise iteration on a CPU (README, "What an
iteration costs"); build_mini_world keeps the autoencoder channels-last because of what this prints. Rounds
alternate the two layouts so that a noisy machine slows both alike; the best round of each is compared.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch


def decode_seconds(vae, latents: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        vae.decode(latents, return_dict=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from sfgrpo_core.miniworld.denoiser import LATENT_CHANNELS, LATENT_SIZE
    from sfgrpo_core.miniworld.world import load_components

    _, _, vae = load_components()
    layouts = {"contiguous": vae, "channels_last": copy.deepcopy(vae).to(memory_format=torch.channels_last)}
    latents = torch.randn(args.images, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE,
                          generator=torch.Generator().manual_seed(0))
    best = {name: float("inf") for name in layouts}
    for _ in range(args.rounds + 1):  # the first round warms up
        for name, module in layouts.items():
            best[name] = min(best[name], decode_seconds(module, latents))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        images = {name: module.decode(latents[:8], return_dict=False)[0].float() for name, module in layouts.items()}
    result = {
        "ms_per_image": {name: round(1000 * seconds / args.images, 2) for name, seconds in best.items()},
        "contiguous_over_channels_last": round(best["contiguous"] / best["channels_last"], 3),
        "max_abs_difference": float((images["contiguous"] - images["channels_last"]).abs().max()),
        "threads": args.threads, "images": args.images,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
