"""`sfgrpo demo` (what `make demo` runs): train a LoRA on the committed mini world through a headless ComfyUI.

It starts ComfyUI with this pack, submits workflows/api/train_lora.json over the HTTP API (the same path as
`sfgrpo run`), and writes into the output folder: the LoRA (ComfyUI's native format, as LoraLoaderModelOnly reads
it), before_after.png (the held-out prompt on top; row "base": the base model, row "with LoRA": the LoRA, same
seeds; each image's MiniGenEval score under it),
reward_curve.png, metrics.json (held-out reward before and after, timings, the per-iteration records) and the
ComfyUI run folder (server log, the trainer's run folder with config, metrics.jsonl and checkpoints).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text
from ..shipped import shipped_dir
from .runner import WorkflowError, run_workflow
from .server import ComfyServer, ComfyUIError

TRAIN_WORKFLOW = shipped_dir("workflows") / "api" / "train_lora.json"
TRAIN_NODE = "12"
SCORE_NODES = ("21", "22")  # Score of the base model's images, Score of the images with the LoRA


def before_after_grid(before: Sequence[Path], after: Sequence[Path], path: Path, *, prompt: str = "",
                      scores: tuple[Sequence[float], Sequence[float]] = ((), ())) -> Path:
    """One PNG that explains itself: the prompt on top, the ``before`` images (base model) in the row labelled
    "base", the ``after`` images (with the LoRA, same seeds) in the row "with LoRA", in file-name order, each
    image shown at 2x with its score under it and each row's mean score beside its label (scores: NaN or missing
    values are shown as "missing")."""
    from PIL import Image, ImageDraw, ImageFont

    rows = [[Image.open(file).convert("RGB") for file in sorted(files)] for files in (before, after)]
    scale, label_width, header, footer = 2, 150, 34, 18
    width, height = rows[0][0].size[0] * scale, rows[0][0].size[1] * scale
    columns = max(len(row) for row in rows)
    grid = Image.new("RGB", (label_width + width * columns, header + (height + footer) * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    font, small = ImageFont.load_default(size=14), ImageFont.load_default(size=12)
    draw.text((6, 8), f'prompt: "{prompt}"  (same seed per column)' if prompt else "same seed per column",
              fill="black", font=font)
    for row_index, (row, label) in enumerate(zip(rows, ("base", "with LoRA"), strict=True)):
        top = header + row_index * (height + footer)
        row_scores = [float(value) for value in scores[row_index]]
        finite = [value for value in row_scores if math.isfinite(value)]
        draw.text((6, top + height // 2 - 16), label, fill="black", font=font)
        if finite:
            draw.text((6, top + height // 2 + 4), f"mean {sum(finite) / len(finite):.3f}", fill="dimgray", font=small)
        for column, image in enumerate(row):
            left = label_width + column * width
            grid.paste(image.resize((width, height), Image.Resampling.NEAREST), (left, top))
            if column < len(row_scores):
                value = row_scores[column]
                text = f"{value:.3f}" if math.isfinite(value) else "missing"
                draw.text((left + 4, top + height + 2), text, fill="black", font=small)
    grid.save(path)
    return path


def scores_from_node_text(lines: Sequence[str]) -> list[float]:
    """The per-image scores a Score node shows ("image i: 0.4000" or "image i: missing" lines) as floats (NaN =
    missing), in image order."""
    found = re.findall(r"^image (\d+): (\S+)$", "\n".join(lines), flags=re.MULTILINE)
    return [math.nan if value == "missing" else float(value) for _, value in sorted(found, key=lambda x: int(x[0]))]


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
    workflow = json.loads(TRAIN_WORKFLOW.read_text())
    prompt = str(workflow[SCORE_NODES[0]]["inputs"].get("prompts", ""))
    node_scores = tuple(scores_from_node_text(result.outputs.get(node, {}).get("text", [])) for node in SCORE_NODES)
    before_after_grid(before, after, out_dir / "before_after.png", prompt=prompt,
                      scores=(node_scores[0], node_scores[1]))
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
        "score_before_after_on_node": [result.outputs.get(node, {}).get("text", []) for node in SCORE_NODES],
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
