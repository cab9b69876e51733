"""A GPU smoke test and timing of the trainer: the mini world and tiny diffusers SD3 / FLUX in bfloat16.

    python benchmarks/gpu_check.py --device cuda --out DIR          # on a GPU machine
    python benchmarks/gpu_check.py --device cpu --quick --out DIR   # a quick run of the same code on a CPU

Parts (each in its own try/except, so one failure does not hide the others' results):
1. miniworld_stepwise / miniworld_flow_grpo: ``train()`` on configs/miniworld.yaml (credit.method stepwise, then
   flow_grpo) for a few iterations; seconds per iteration by phase, peak CUDA memory, finite rewards and losses;
   then the stepwise / flow_grpo ratio of the seconds per iteration.
2. diffusers_sd3 / diffusers_flux: the tiny random pipelines of tests/tiny_models.py saved with save_pretrained and
   loaded through the 'diffusers' backend (model.options dtype bfloat16), 2 iterations with jpeg_compressibility.

Prints one JSON summary and writes it to DIR/gpu_check.json (rewritten after every part, so a run cut short still
leaves the parts that finished).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for entry in (ROOT, ROOT / "tests"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

import torch  # noqa: E402

from sfgrpo_core.config import load_config  # noqa: E402
from sfgrpo_core.training.trainer import train  # noqa: E402

PHASES = ("rollout", "rewards", "update")
# Fields of a metrics record that must be finite numbers.
FINITE_FIELDS = ("reward_mean", "reward_std", "loss", "ratio_mean", "approx_kl", "grad_norm", "clip_fraction")


def _finite(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_finite(item) for item in value)
    return isinstance(value, (int, float)) and math.isfinite(value)


def _reset_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_memory_mib(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def summarize_run(records: list[dict[str, Any]], device: str, wall_seconds: float) -> dict[str, Any]:
    """Per-phase seconds (every iteration, and the mean without the first, warm-up one when there are more),
    peak memory, finite checks and the last record's main numbers."""
    per_iteration = {phase: [round(float(r.get(f"seconds_{phase}", float("nan"))), 4) for r in records]
                     for phase in PHASES}
    totals = [round(sum(per_iteration[phase][i] for phase in PHASES), 4) for i in range(len(records))]
    steady = totals[1:] if len(totals) > 1 else totals
    not_finite = sorted({name for record in records for name in FINITE_FIELDS
                         if name in record and not _finite(record[name])})
    # per-step lists hold None for the steps whose reward the loss does not use (not computed: scored_states)
    not_finite += sorted({name for record in records for name in ("step_reward_mean", "gain_abs_mean")
                          if name in record and not _finite([value for value in record[name] if value is not None])})
    missing = [name for name in ("reward_mean", "loss") if any(name not in record for record in records)]
    return {
        "iterations": len(records),
        "wall_seconds_total": round(wall_seconds, 2),
        "seconds_per_iteration": totals,
        "seconds_per_iteration_steady_mean": _mean(steady),
        "seconds_by_phase": per_iteration,
        "seconds_by_phase_steady_mean": {phase: _mean(values[1:] if len(values) > 1 else values)
                                         for phase, values in per_iteration.items()},
        "peak_memory_mib": _peak_memory_mib(device),
        "reward_mean": [record.get("reward_mean") for record in records],
        "loss": [record.get("loss") for record in records],
        "approx_kl": [record.get("approx_kl") for record in records],
        "reward_missing": [record.get("reward_missing") for record in records],
        "active_transitions": [record.get("active_transitions") for record in records],
        "finite": not not_finite and not missing and len(records) > 0,
        "not_finite_fields": not_finite,
        "missing_fields": missing,
    }


def run_training(config, device: str, model=None) -> dict[str, Any]:
    _reset_memory(device)
    start = time.perf_counter()
    result = train(config, model=model)
    wall = time.perf_counter() - start
    summary = summarize_run(result.records, device, wall)
    summary["outputs"] = sorted(path.name for path in result.run_dir.iterdir())
    return summary


def miniworld_part(method: str, device: str, iterations: int, out_dir: Path) -> dict[str, Any]:
    config = load_config(str(ROOT / "configs" / "miniworld.yaml")).replace(**{
        "model.device": device, "train.iterations": iterations, "train.eval_every": 0,
        "credit.method": method, "train.output_dir": str(out_dir / f"miniworld_{method}"),
    })
    summary = run_training(config, device)
    summary["config"] = {"group_size": config.train.group_size, "groups": config.train.groups_per_iteration,
                         "steps": config.sampler.steps, "substeps": config.credit.substeps, "dtype": "float32"}
    return summary


def diffusers_part(architecture: str, device: str, iterations: int, latent_size: int, out_dir: Path,
                   work_dir: Path, dtype: str = "bfloat16") -> dict[str, Any]:
    import tiny_models

    builder = {"sd3": tiny_models.tiny_sd3_pipeline, "flux": tiny_models.tiny_flux_pipeline}[architecture]
    folder = work_dir / f"tiny_{architecture}"
    builder().save_pretrained(str(folder))
    options = {"dtype": dtype, "latent_size": latent_size, "max_sequence_length": 8}
    prompts = ["a red cube", "two blue spheres", "a green cat"]
    config = load_config(str(ROOT / "configs" / "miniworld.yaml")).replace(**{
        "model.name": "diffusers", "model.path": str(folder), "model.device": device,
        "model.options": json.dumps(options), "train.reward": "jpeg_compressibility", "train.reward_options": "{}",
        "train.prompts": prompts, "train.eval_prompts": prompts[:1], "train.group_size": 4,
        "train.groups_per_iteration": 2, "train.iterations": iterations, "train.eval_every": 0,
        "train.reward_batch_size": 16, "train.output_dir": str(out_dir / f"diffusers_{architecture}"),
        "sampler.steps": 4, "credit.method": "stepwise", "credit.substeps": 2, "lora.rank": 4, "lora.alpha": 8.0,
    })
    _reset_memory(device)
    from sfgrpo_core import models
    from sfgrpo_core.training.diagnose import diagnose

    # sfgrpo diagnose first, on its own copy of the model: where the update makes a NaN, finite_update names the
    # module (the tiny FLUX's loss was NaN in bfloat16 on CUDA, never on a CPU).
    checks = diagnose(config.replace(**{"train.output_dir": str(work_dir / f"diagnose_{architecture}")}),
                      model=models.build("diffusers", path=str(folder), device=device, **options))
    model = models.build("diffusers", path=str(folder), device=device, **options)
    dtypes = sorted({str(parameter.dtype) for parameter in model.module.parameters()})
    summary = run_training(config, device, model=model)
    summary["diagnose"] = [check.line() for check in checks]
    summary["config"] = {"options": options, "group_size": 4, "groups": 2, "steps": 4, "substeps": 2,
                         "transformer_dtypes_before_lora": dtypes,
                         "lora_dtypes": sorted({str(p.dtype) for n, p in model.module.named_parameters()
                                                if "lora_" in n})}
    return summary


def environment(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "device": device}
    for name in ("diffusers", "transformers", "peft", "numpy"):
        try:
            info[name] = __import__(name).__version__
        except Exception as error:  # noqa: BLE001 - report, never fail here
            info[name] = f"unavailable: {error}"
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    info["cuda_available"] = torch.cuda.is_available()
    info["cpu_threads"] = torch.get_num_threads()
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="gpu_check_out")
    parser.add_argument("--quick", action="store_true", help="1 mini world iteration per method (CPU test)")
    parser.add_argument("--iterations", type=int, default=None, help="mini world iterations (default 4, quick 1)")
    parser.add_argument("--latent-size", type=int, default=16, help="latent size of the tiny diffusers models")
    parser.add_argument("--parts", default="miniworld,sd3,flux", help="comma-separated subset of the parts")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="dtype of the tiny diffusers models")
    parser.add_argument("--sdpa-math", action="store_true",
                        help="run attention through PyTorch's math SDPA kernel (to tell kernel problems apart)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    iterations = args.iterations or (1 if args.quick else 4)
    parts = set(args.parts.split(","))
    summary: dict[str, Any] = {"environment": environment(args.device), "quick": args.quick,
                               "miniworld_iterations": iterations, "results": {}, "errors": {}}
    if args.sdpa_math:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sdpa_kernel(SDPBackend.MATH).__enter__()  # for the whole process
        summary["sdpa"] = "math"
    started = time.perf_counter()

    def save() -> None:
        summary["seconds_total"] = round(time.perf_counter() - started, 1)
        (out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")

    def attempt(name: str, function, *arguments) -> None:
        print(f"[gpu_check] {name} ...", flush=True)
        begin = time.perf_counter()
        try:
            summary["results"][name] = function(*arguments)
            print(f"[gpu_check] {name} done in {time.perf_counter() - begin:.1f} s", flush=True)
        except BaseException as error:  # noqa: BLE001 - keep going with the other parts (Ctrl-C still stops)
            if isinstance(error, KeyboardInterrupt):
                raise
            summary["errors"][name] = traceback.format_exc()
            print(f"[gpu_check] {name} FAILED after {time.perf_counter() - begin:.1f} s:\n{summary['errors'][name]}",
                  flush=True)
        save()

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as temporary:
        runs = Path(temporary) / "runs"
        if "miniworld" in parts:
            for method in ("stepwise", "flow_grpo"):
                attempt(f"miniworld_{method}", miniworld_part, method, args.device, iterations, runs)
            results = summary["results"]
            if "miniworld_stepwise" in results and "miniworld_flow_grpo" in results:
                stepwise = results["miniworld_stepwise"]["seconds_per_iteration_steady_mean"]
                flow = results["miniworld_flow_grpo"]["seconds_per_iteration_steady_mean"]
                summary["miniworld_ratio_stepwise_over_flow_grpo"] = round(stepwise / flow, 3) if flow else None
        for architecture in ("sd3", "flux"):
            if architecture in parts:
                attempt(f"diffusers_{architecture}", diffusers_part, architecture, args.device, 2, args.latent_size,
                        runs, Path(temporary), args.dtype)
    summary["ok"] = not summary["errors"] and all(part.get("finite") for part in summary["results"].values())
    save()
    print(json.dumps(summary, indent=2), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
