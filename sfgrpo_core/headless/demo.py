"""`sfgrpo demo` (what `make demo` runs): train a LoRA on the committed mini world through a headless ComfyUI.

It starts ComfyUI with this pack, submits workflows/api/train_lora.json over the HTTP API (the same path as
`sfgrpo run`), and writes into the output folder: the LoRA (ComfyUI's native format, as LoraLoaderModelOnly reads
it), before_after.png (top row: the base model, bottom row: with the LoRA; same seeds, held-out prompt),
reward_curve.png, metrics.json (held-out reward before and after, timings, the per-iteration records) and the
ComfyUI run folder (server log, the trainer's run folder with config, metrics.jsonl and checkpoints).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text
from .runner import WorkflowError, run_workflow
from .server import ComfyServer, ComfyUIError

TRAIN_WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "api" / "train_lora.json"
TRAIN_NODE = "12"


def before_after_grid(before: Sequence[Path], after: Sequence[Path], path: Path) -> Path:
    """One PNG: the ``before`` images in the top row, the ``after`` images below, in file-name order."""
    from PIL import Image

    rows = [[Image.open(file).convert("RGB") for file in sorted(files)] for files in (before, after)]
    width, height = rows[0][0].size
    grid = Image.new("RGB", (width * max(len(row) for row in rows), height * len(rows)), "white")
    for row_index, row in enumerate(rows):
        for column, image in enumerate(row):
            grid.paste(image, (column * width, row_index * height))
    grid.save(path)
    return path


def run_demo(out_dir: str | Path, overrides: Sequence[str] = (), on_event=print) -> dict[str, Any]:
    """Run the demo into ``out_dir`` (emptied first); returns what metrics.json holds."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    started = time.perf_counter()
    with ComfyServer(out_dir / "comfyui") as server:
        on_event(f"ComfyUI ready at {server.url} ({time.perf_counter() - started:.0f} s; log {server.log_path})")
        result = run_workflow(TRAIN_WORKFLOW, server_url=server.url, overrides=overrides, out_dir=out_dir / "files",
                              on_event=on_event)
        if result.status != "success":
            raise WorkflowError(f"the training workflow ended with {result.status}; see {server.log_path}")
        loras = sorted((server.models_dir / "loras" / "sfgrpo").glob("*.safetensors"))
        run_dirs = sorted((server.output_dir / "sfgrpo").iterdir())
    seconds = time.perf_counter() - started
    shutil.copy2(loras[-1], out_dir / "lora_comfyui.safetensors")
    run_dir = run_dirs[-1]
    shutil.copy2(run_dir / "reward_curve.png", out_dir / "reward_curve.png")
    before = [file for file in result.files if file.name.startswith("before")]
    after = [file for file in result.files if file.name.startswith("after")]
    before_after_grid(before, after, out_dir / "before_after.png")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evaluations = [r["eval_reward_mean"] for r in records if "eval_reward_mean" in r]
    metrics = {
        "heldout_reward_before": evaluations[0] if evaluations else None,
        "heldout_reward_after": evaluations[-1] if evaluations else None,
        "heldout_reward_per_evaluation": evaluations,
        "train_reward_first": next((r["reward_mean"] for r in records if "reward_mean" in r), None),
        "train_reward_last": next((r["reward_mean"] for r in reversed(records) if "reward_mean" in r), None),
        "iterations": sum(1 for r in records if "loss" in r),
        "seconds_total": round(seconds, 1),
        "seconds_training": round(records[-1].get("seconds_elapsed", 0.0), 1) if records else 0.0,
        "node_summary": result.outputs.get(TRAIN_NODE, {}).get("text", []),
        "score_before_after_on_node": [result.outputs.get(node, {}).get("text", []) for node in ("21", "22")],
        "run_folder": str(run_dir),
        "records": records,
    }
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sfgrpo demo", description=__doc__.splitlines()[0])
    add_demo_arguments(parser)
    return demo_from_args(parser.parse_args(argv))


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_output", help="output folder (emptied first)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE.INPUT=VALUE",
                        help="change the training workflow, e.g. --set 'Train LoRA.iterations=10'; repeatable")


def demo_from_args(args: argparse.Namespace) -> int:
    try:
        metrics = run_demo(args.out, args.overrides)
    except (WorkflowError, ComfyUIError) as error:
        print(f"sfgrpo demo: {error}", file=sys.stderr)
        return 1
    before, after = metrics["heldout_reward_before"], metrics["heldout_reward_after"]
    print(f"held-out MiniGenEval: {before:.3f} -> {after:.3f} after {metrics['iterations']} iterations "
          f"({metrics['seconds_total']:.0f} s with ComfyUI start-up)")
    print(f"wrote {args.out}/: lora_comfyui.safetensors, before_after.png, reward_curve.png, metrics.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
