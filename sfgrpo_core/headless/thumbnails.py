"""Thumbnails for ComfyUI's template browser: ``workflows/<name>.jpg`` beside each example graph, made from what the
graph really produces.

    python -m sfgrpo_core.headless.thumbnails [--out workflows]

Starts a ComfyUI with this pack, runs each example that finishes in seconds (sde_vs_euler, tweedie_preview,
score_images, sample_with_lora) through the HTTP API and tiles its output images; train_lora (minutes) runs with 2
iterations and shows its reward curve beside its before/after images. The frontend asks for
``/api/workflow_templates/sfgrpo/<name>.jpg``, which ComfyUI serves from the folder of the templates.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..shipped import shipped_dir
from .runner import run_workflow
from .server import ComfyServer

WORKFLOWS = shipped_dir("workflows")
SIZE = 320
# Quick settings for train_lora's thumbnail run (node 12 is Train LoRA in workflows/api/train_lora.json).
TRAIN_QUICK = ("12.iterations=2", "12.eval_every=1", "12.eval_samples=1", "12.checkpoint_every=1")


def tile(images: Sequence[Path], size: int = SIZE) -> Any:
    """A ``size`` x ``size`` RGB image: ``images`` in a near-square grid (nearest-neighbour scaled), on dark grey."""
    from PIL import Image

    opened = [Image.open(path).convert("RGB") for path in images]
    columns = max(1, round(len(opened) ** 0.5 + 0.49))
    rows = max(1, -(-len(opened) // columns))
    cell = size // max(columns, rows)
    canvas = Image.new("RGB", (size, size), (32, 32, 32))
    left0, top0 = (size - cell * columns) // 2, (size - cell * rows) // 2
    for index, image in enumerate(opened):
        scale = min(cell / image.width, cell / image.height)  # fill the cell, small images enlarged
        image = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))),
                             Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)
        row, column = divmod(index, columns)
        canvas.paste(image, (left0 + column * cell + (cell - image.width) // 2,
                             top0 + row * cell + (cell - image.height) // 2))
    return canvas


def make_thumbnails(out: Path = WORKFLOWS) -> list[Path]:
    """Run every example graph and write ``out/<name>.jpg``; returns the files written."""
    written = []
    with tempfile.TemporaryDirectory() as scratch, ComfyServer(Path(scratch) / "comfyui") as server:
        for api_file in sorted((WORKFLOWS / "api").glob("*.json")):
            name = api_file.stem
            overrides = TRAIN_QUICK if name == "train_lora" else ()
            result = run_workflow(api_file, server_url=server.url, overrides=overrides,
                                  out_dir=Path(scratch) / name, on_event=lambda line: None)
            images = sorted(path for path in result.files if path.suffix == ".png")
            if name == "train_lora":  # the reward curve first, then a few before / after images
                images = sorted(images, key=lambda path: "reward_curve" not in path.name)[:5]
            path = out / f"{name}.jpg"
            tile(images[:16]).save(path, quality=88)
            written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(WORKFLOWS), help="folder of the UI workflows (default: workflows/)")
    args = parser.parse_args(argv)
    for path in make_thumbnails(Path(args.out)):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
