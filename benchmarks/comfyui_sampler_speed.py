"""Is the pack's SDE sampler as cheap as ComfyUI's own euler? Both through the stock KSampler of a headless ComfyUI.

    python benchmarks/comfyui_sampler_speed.py [--rounds 7] [--steps 20] [--batch 8] [--out FILE.json]

One ComfyUI (CPU) runs the same graph (the mini world's transformer from UNETLoader, the pack's text encoder,
KSampler at cfg 4, SaveLatent) with sampler_name euler, sfgrpo_ddim_sde and sfgrpo_flow_sde in turn, round after
round, each round with a new seed so that KSampler runs again while the loaders stay cached. A run's time is
ComfyUI's own, from its execution_start to its execution_success message; the medians are compared, so a noisy
machine slows every sampler alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from sfgrpo_core.headless.runner import _Client
from sfgrpo_core.headless.server import ComfyServer

SAMPLERS = ("euler", "sfgrpo_ddim_sde", "sfgrpo_flow_sde")


def graph(sampler: str, seed: int, steps: int, batch: int) -> dict[str, Any]:
    return {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": "mini_sd3_transformer.safetensors",
                                                        "weight_dtype": "default"}},
        "clip": {"class_type": "SFGRPOMiniWorldTextEncoder", "inputs": {}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": "two red circles"}},
        "neg": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["pos", 0]}},
        "empty": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["unet", 0], "seed": seed, "steps": steps, "cfg": 4.0, "sampler_name": sampler,
            "scheduler": "simple", "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["empty", 0],
            "denoise": 1.0}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": "bench"}},
    }


def run_seconds(client: _Client, prompt: dict[str, Any], timeout: float = 600.0) -> float:
    """ComfyUI's execution time of one prompt (execution_start -> execution_success, from its history)."""
    prompt_id = client.json("POST", "/prompt", {"prompt": prompt})["prompt_id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = client.json("GET", f"/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("completed"):
            stamps = {kind: data["timestamp"] for kind, data in entry["status"]["messages"]}
            return (stamps["execution_success"] - stamps["execution_start"]) / 1000.0
        if entry and entry.get("status", {}).get("status_str") == "error":
            raise RuntimeError(f"the prompt failed: {entry['status']}")
        time.sleep(0.05)
    raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default="", help="also write the result here as JSON")
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {sampler: [] for sampler in SAMPLERS}
    with tempfile.TemporaryDirectory() as scratch, ComfyServer(Path(scratch) / "comfy") as server:
        client = _Client(server.url)
        for sampler in SAMPLERS:  # warm-up: loads the model, first calls
            run_seconds(client, graph(sampler, 10_000, args.steps, args.batch))
        for round_index in range(args.rounds):
            for sampler in SAMPLERS:
                seconds[sampler].append(run_seconds(client, graph(sampler, round_index, args.steps, args.batch)))
    medians = {sampler: statistics.median(values) for sampler, values in seconds.items()}
    result = {
        "median_seconds": {sampler: round(value, 4) for sampler, value in medians.items()},
        "over_euler": {sampler: round(value / medians["euler"], 3) for sampler, value in medians.items()},
        "seconds": seconds, "rounds": args.rounds, "steps": args.steps, "batch": args.batch,
        "graph": "UNETLoader (mini world) -> KSampler cfg 4 -> SaveLatent, ComfyUI on CPU",
    }
    print(json.dumps({key: result[key] for key in ("median_seconds", "over_euler")}, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
