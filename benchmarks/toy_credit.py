"""Stepwise credit against Flow-GRPO's credit on the toy world, where `sfgrpo bench signal` finds the step rewards
informative (a continuous reward; Stepwise's gains line up with the true per-step gains at 0.57-0.96, Flow-GRPO's
final reward at -0.03-0.44). If per-step credit helps anywhere here, it should be there.

    .venv/bin/python benchmarks/toy_credit.py [--seeds 0,1,2,3,4] [--iterations 40] [--out DIR]

The two arms differ in the credit only (configs/toy.yaml: the Flow-GRPO SDE, shared initial noise, T' = 5; the
swap sets credit.method flow_grpo). Each run is `sfgrpo train` with its held-out evaluation (the toy's eval prompts)
every 10 iterations; runs already finished are kept (resumable run by run). Writes OUT/runs/<arm>/seed<k>/ (the
runs' metrics.jsonl) and OUT/toy_credit.json: the held-out curve per arm and seed, and Stepwise minus the swap, seed
by seed, with its mean and standard error at every evaluation.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

from sfgrpo_core.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
ARMS = {"stepwise": [], "flow_grpo_credit": ["--credit.method", "flow_grpo"]}


def heldout_curve(run: Path) -> dict[int, dict[str, float]]:
    """Held-out reward and training seconds so far at each evaluation of a run."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [record for record in records if "loss" in record]
    curve = {}
    for record in records:
        if "eval_reward_mean" in record:
            before = [r["seconds_elapsed"] for r in trained if r["iteration"] < record["iteration"]]
            curve[record["iteration"]] = {"heldout": record["eval_reward_mean"],
                                          "seconds": before[-1] if before else 0.0}
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "toy_credit")
    args = parser.parse_args()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    curves: dict[str, dict[int, dict[int, dict[str, float]]]] = {arm: {} for arm in ARMS}
    for seed in seeds:
        for arm, changes in ARMS.items():
            run = args.out / "runs" / arm / f"seed{seed}"
            if not (run / "lora.safetensors").is_file():
                command = [sys.executable, "-m", "sfgrpo_core.cli", "train", str(ROOT / "configs" / "toy.yaml"),
                           "--train.seed", str(seed), "--train.iterations", str(args.iterations),
                           "--train.output_dir", str(run), *changes]
                if (run / "checkpoints").is_dir():
                    command.append("--resume")
                subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            curves[arm][seed] = heldout_curve(run)
            print(f"{arm} seed {seed}: " + ", ".join(f"{i}: {v['heldout']:.3f} ({v['seconds']:.0f} s)"
                                                     for i, v in sorted(curves[arm][seed].items())), flush=True)
    points = sorted(curves["stepwise"][seeds[0]])
    difference = {}
    for point in points:
        values = np.array([curves["stepwise"][s][point]["heldout"] - curves["flow_grpo_credit"][s][point]["heldout"]
                           for s in seeds])
        standard_error = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan
        difference[str(point)] = {"per_seed": values.tolist(), "mean": float(values.mean()), "se": standard_error}
        print(f"iteration {point:>3}: stepwise - flow_grpo credit {values.mean():+.3f} +- {standard_error:.3f} (SE, "
              f"{len(values)} seeds)")
    summary = {"command": "python benchmarks/toy_credit.py " + " ".join(sys.argv[1:]), "seeds": seeds,
               "curves": {arm: {str(s): {str(i): v for i, v in c.items()} for s, c in by_seed.items()}
                          for arm, by_seed in curves.items()},
               "stepwise_minus_flow_grpo_credit": difference,
               "seconds_per_iteration": {arm: float(np.mean([c[max(c)]["seconds"] / max(c) for c in by_seed.values()]))
                                         for arm, by_seed in curves.items()}}
    atomic_write_text(args.out / "toy_credit.json", json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
