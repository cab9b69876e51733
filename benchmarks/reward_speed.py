"""Milliseconds per image of every shipped reward on this machine.

    python benchmarks/reward_speed.py [--rewards pickscore,ocr,...] [--size 512] [--batch 8] [--out FILE.json]

Model-backed rewards (PickScore, CLIPScore, aesthetic, HPSv2.1, ImageReward) are timed on random-initialised models
of their real architecture and size (tests/reward_stand_ins.py, ``build_stand_in(size="real")``): no weights can be
downloaded here, and the compute of a forward pass does not depend on the weights' values. Each reward scores the
same images (a rendered text line on a plain background, as an OCR prompt asks for, at ``--size`` px) in batches of
``--batch``; the fastest of ``--repeats`` timed calls after one warm-up call is reported. No timing is asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for entry in (ROOT, ROOT / "tests"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from sfgrpo_core import rewards  # noqa: E402
from sfgrpo_core.atomic import atomic_write_text  # noqa: E402

TEXT = "OPEN 24 HOURS"
PROMPT = f'a shop window with a neon sign that says "{TEXT}"'
MINI_WORLD_CAPTION = "a red circle"
# Rewards that need model weights: timed on a random-initialised model of the real size.
MODEL_BACKED = ("pickscore", "clip", "aesthetic", "hps", "imagereward")
DEFAULT_REWARDS = ("jpeg_compressibility", "mini_geneval", "ocr", "nsfw", "pickscore", "clip", "aesthetic", "hps")


def text_images(count: int, size: int) -> list[Image.Image]:
    """``count`` RGB images of ``size`` px: the prompt's text in black on slightly different light backgrounds."""
    images = []
    font = ImageFont.load_default(size=max(8, size // 10))
    for index in range(count):
        image = Image.new("RGB", (size, size), (235 - 7 * index % 40, 230, 220))
        ImageDraw.Draw(image).text((size // 12, size // 2 - size // 16), TEXT, fill=(10, 10, 10), font=font)
        images.append(image)
    return images


def time_reward(reward: rewards.Reward, images: list[Image.Image], prompts: list[str], repeats: int) -> float:
    """Milliseconds per image: the fastest of ``repeats`` calls on all ``images`` after one warm-up call."""
    rewards.score(reward, images, prompts)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        rewards.score(reward, images, prompts)
        times.append(time.perf_counter() - start)
    return 1000 * min(times) / len(images)


def measure(names: list[str], size: int, batch: int, repeats: int) -> list[dict[str, Any]]:
    """One record per reward: ms per image, or why it could not be timed here."""
    from reward_stand_ins import build_stand_in

    results = []
    for name in names:
        record: dict[str, Any] = {"reward": name, "image_px": size, "batch": batch}
        try:
            with tempfile.TemporaryDirectory() as folder:
                options = build_stand_in(name, Path(folder), size="real") if name in MODEL_BACKED else {}
                reward = rewards.load(name, **options)
                image_px = 64 if name == "mini_geneval" else size  # the mini world's own resolution
                prompts = [MINI_WORLD_CAPTION if name == "mini_geneval" else PROMPT] * batch
                record.update(image_px=image_px, weights="random-init, real size" if name in MODEL_BACKED else "real",
                              ms_per_image=time_reward(reward, text_images(batch, image_px), prompts, repeats))
        except Exception as error:  # report and go on: one reward's missing extra must not hide the others
            record["error"] = f"{type(error).__name__}: {error}"
        print(f"{name:22s} " + (f"{record['ms_per_image']:9.1f} ms/image at {record['image_px']} px"
                                if "ms_per_image" in record else f"not timed: {record['error']}"), flush=True)
        results.append(record)
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rewards", default=",".join(DEFAULT_REWARDS), help="comma-separated reward names")
    parser.add_argument("--size", type=int, default=512, help="image size in px (mini_geneval: always 64)")
    parser.add_argument("--batch", type=int, default=8, help="images per reward call")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per reward (the fastest counts)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")


def run_from_args(args: argparse.Namespace) -> int:
    import torch

    names = [name.strip() for name in args.rewards.split(",") if name.strip()]
    unknown = [name for name in names if name not in rewards.available()]
    if unknown:
        print(f"reward_speed.py: --rewards: unknown {', '.join(unknown)}; choose from "
              f"{', '.join(rewards.available())}")
        return 2
    if args.size < 16 or args.batch < 1 or args.repeats < 1:
        print("reward_speed.py: --size must be >= 16, --batch and --repeats >= 1")
        return 2
    results = measure(names, args.size, args.batch, args.repeats)
    if args.out:
        document = {"command": "python benchmarks/reward_speed.py " + " ".join(
            f"--{key} {value}" for key, value in vars(args).items() if key in ("rewards", "size", "batch", "repeats")),
            "torch_threads": torch.get_num_threads(), "results": results}
        atomic_write_text(Path(args.out), json.dumps(document, indent=2) + "\n")
    return 0 if all("ms_per_image" in record for record in results) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
