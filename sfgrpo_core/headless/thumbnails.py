"""Thumbnails for ComfyUI's template browser: ``workflows/<name>.jpg`` beside each example graph, made from what the
graph really produces.

    python -m sfgrpo_core.headless.thumbnails [--out workflows]

Starts a ComfyUI with this pack, runs each example that finishes in seconds (sde_vs_euler, tweedie_preview,
score_images, sample_with_lora) through the HTTP API and tiles its output images; train_lora (minutes) runs with 2
iterations and shows its reward curve beside its before/after images. The templates for real models (SD3.5, FLUX),
whose weights are not here, get a card with the model, the reward and the files they need. The frontend asks for
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
# credit_signal's nodes (8: MiniGenEval, 9: mini_pickscore) at a size of minutes, not the example's quarter hour.
SIGNAL_QUICK = tuple(f"{node}.{key}={value}" for node in (8, 9) for key, value in (("batches", 1), ("groups", 2)))


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


# Templates whose models cannot be had here: name -> (title, subtitle, the files they need).
MODEL_TEMPLATES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "train_lora_sd35_pickscore": ("SD3.5 Medium", "Stepwise-Flow-GRPO LoRA, PickScore",
                                  ("checkpoints/sd3.5_medium", "text_encoders/clip_l, clip_g, t5xxl",
                                   "rewards/PickScore_v1")),
    "train_lora_flux_ocr": ("FLUX.1-dev", "Stepwise-Flow-GRPO LoRA, OCR + PickScore",
                            ("diffusion_models/flux1-dev", "text_encoders/clip_l, t5xxl", "vae/ae",
                             "rewards/PickScore_v1")),
}


def card(title: str, subtitle: str, files: Sequence[str], size: int = SIZE) -> Any:
    """A ``size`` x ``size`` card: the model's name, what the graph trains, and the files it needs."""
    from PIL import Image, ImageDraw, ImageFont

    canvas = Image.new("RGB", (size, size), (32, 32, 32))
    draw = ImageDraw.Draw(canvas)
    for row in range(size):  # a dark blue-to-violet band behind the title
        if row < size * 0.45:
            draw.line([(0, row), (size, row)], fill=(40 + row // 4, 48, 96 + row // 3))
    big, small = ImageFont.load_default(size=34), ImageFont.load_default(size=15)
    draw.text((size // 2, int(size * 0.2)), title, font=big, fill=(240, 240, 240), anchor="mm")
    draw.text((size // 2, int(size * 0.34)), subtitle, font=small, fill=(220, 220, 235), anchor="mm")
    draw.text((16, int(size * 0.52)), "models/", font=small, fill=(200, 200, 200))
    for index, line in enumerate(files):
        draw.text((28, int(size * 0.52) + 24 * (index + 1)), line, font=small, fill=(170, 200, 170))
    return canvas


def make_thumbnails(out: Path = WORKFLOWS) -> list[Path]:
    """Run every example graph and write ``out/<name>.jpg``; returns the files written."""
    written = []
    with tempfile.TemporaryDirectory() as scratch, ComfyServer(Path(scratch) / "comfyui") as server:
        for api_file in sorted((WORKFLOWS / "api").glob("*.json")):
            name = api_file.stem
            if name in MODEL_TEMPLATES:
                path = out / f"{name}.jpg"
                card(*MODEL_TEMPLATES[name]).save(path, quality=88)
                written.append(path)
                continue
            overrides = {"train_lora": TRAIN_QUICK, "credit_signal": SIGNAL_QUICK}.get(name, ())
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
