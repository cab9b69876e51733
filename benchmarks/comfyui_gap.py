"""Is the ComfyUI node's learning the CLI's? The same recipe, trained through the ComfyUI Train LoRA node (a headless
ComfyUI running workflows/api/train_lora.json, as `make demo` does) and through `sfgrpo train configs/miniworld.yaml`,
with several seeds each; every LoRA is then scored by one evaluator (the core's mini world with the LoRA loaded from
its lora_diffusers.safetensors; the held-out MiniGenEval prompts of `sfgrpo bench paper`, the same evaluation noise
for every LoRA, so the comparison is paired).

    python benchmarks/comfyui_gap.py [--seeds 0,1,2] [--iterations 40] [--out benchmarks/results/comfyui_gap]

Resumable: a seed whose LoRA exists is not retrained. Writes OUT/{node,cli}/seed<k>/ (metrics.jsonl, the LoRA) and
OUT/comfyui_gap.json (per front end and seed: held-out score, its standard error, strict accuracy; mean and std).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from sfgrpo_core.atomic import atomic_write_text
from sfgrpo_core.config import load_config
from sfgrpo_core.headless.demo import run_demo
from sfgrpo_core.lora.adapters import load_lora_state_dict
from sfgrpo_core.miniworld.denoiser import heldout_prompt_set
from sfgrpo_core.training.metrics import json_safe
from sfgrpo_core.training.trainer import build_session, evaluate, train

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "miniworld.yaml"
FILES = ("lora_diffusers.safetensors", "metrics.jsonl", "config.json")


def train_node(seed: int, iterations: int, out: Path) -> None:
    """The Train LoRA node in a headless ComfyUI (no evaluations in the run: the evaluator below scores it)."""
    with tempfile.TemporaryDirectory() as scratch:
        metrics = run_demo(Path(scratch) / "demo", [f"Train LoRA.seed={seed}", f"Train LoRA.iterations={iterations}",
                                                     "Train LoRA.eval_every=0"])
        out.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            shutil.copy2(Path(metrics["run_folder"]) / name, out / name)


def train_cli(seed: int, iterations: int, out: Path) -> None:
    """`sfgrpo train configs/miniworld.yaml` with the seed and budget (no evaluations in the run)."""
    run_dir = out / "train"
    config = load_config(RECIPE).replace(**{"train.seed": seed, "train.iterations": iterations,
                                            "train.eval_every": 0, "train.output_dir": str(run_dir)})
    train(config)
    for name in FILES:
        shutil.copy2(run_dir / name, out / name)
    shutil.rmtree(run_dir)


def diffusers_to_peft(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A diffusers-format LoRA (alpha / r folded into lora_B, keys under 'transformer.') as the trainer's peft keys."""
    return {key.removeprefix("transformer."): tensor / scale if ".lora_B." in key else tensor
            for key, tensor in state.items()}


def evaluate_all(folders: dict[str, Path], eval_prompts_per_category: int, eval_samples: int) -> dict[str, Any]:
    """Score the base model and every LoRA with one evaluator and one evaluation noise (train.seed 0)."""
    from sfgrpo_core.miniworld.geneval import category_means

    config = load_config(RECIPE).replace(**{
        "train.eval_prompts": heldout_prompt_set(eval_prompts_per_category), "train.eval_samples": eval_samples,
        "train.output_dir": "unused: build_session writes nothing"})
    session = build_session(config)
    scale = config.lora.alpha / config.lora.rank
    fresh = {name: value.clone() for name, value in session.model.module.state_dict().items() if "lora_" in name}
    results = {}
    for name, folder in {"base": None, **folders}.items():
        if folder is None:
            session.model.module.load_state_dict(fresh, strict=False)
        else:
            state = diffusers_to_peft(load_file(str(folder / "lora_diffusers.safetensors")), scale)
            load_lora_state_dict(session.model.module, state)
        result = evaluate(session)
        scores = result.scores.numpy().astype(np.float64)
        results[name] = {
            "heldout": float(scores.mean()), "heldout_se": float(scores.std(ddof=1) / math.sqrt(len(scores))),
            "strict": float((scores == 1.0).mean()), "samples": int(scores.size),
            "per_category": category_means(result.scores, result.prompts)}
        print(f"[comfyui gap] {name}: held-out {results[name]['heldout']:.3f} +- {results[name]['heldout_se']:.3f}, "
              f"strict {results[name]['strict']:.3f}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "comfyui_gap"))
    args = parser.parse_args()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    out = Path(args.out)
    folders: dict[str, Path] = {}
    for seed in seeds:
        for front_end, trainer in (("node", train_node), ("cli", train_cli)):
            folder = out / front_end / f"seed{seed}"
            if not (folder / "lora_diffusers.safetensors").is_file():
                print(f"[comfyui gap] training {front_end} seed {seed}", flush=True)
                trainer(seed, args.iterations, folder)
            folders[f"{front_end}/seed{seed}"] = folder
    results = evaluate_all(folders, eval_prompts_per_category=8, eval_samples=8)
    summary: dict[str, Any] = {"command": "python benchmarks/comfyui_gap.py --seeds " + args.seeds,
                               "iterations": args.iterations, "recipe": str(RECIPE.relative_to(ROOT)),
                               "results": results}
    base = results["base"]["heldout"]
    for front_end in ("node", "cli"):
        finals = [results[f"{front_end}/seed{seed}"]["heldout"] for seed in seeds]
        summary[front_end] = {"seeds": seeds, "heldout": finals, "mean": float(np.mean(finals)),
                              "std": float(np.std(finals, ddof=1)) if len(finals) > 1 else None,
                              "gain_over_base": float(np.mean(finals) - base)}
    differences = [results[f"node/seed{seed}"]["heldout"] - results[f"cli/seed{seed}"]["heldout"] for seed in seeds]
    summary["node_minus_cli"] = {"per_seed": differences, "mean": float(np.mean(differences)),
                                 "std": float(np.std(differences, ddof=1)) if len(differences) > 1 else None}
    atomic_write_text(out / "comfyui_gap.json", json.dumps(json_safe(summary), indent=1) + "\n")
    print(json.dumps({key: summary[key] for key in ("node", "cli", "node_minus_cli")}, indent=1))


if __name__ == "__main__":
    main()
