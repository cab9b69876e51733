"""Safety penalty: a wheel-bundled ONNX NSFW classifier (NudeNet 3.4's 320n.onnx detector, run offline).

NudeNet 3.4 (``pip install nudenet``) ships its exposed-body-part detector, a YOLOv8n at 320 x 320 px
(``nudenet/320n.onnx``), inside the wheel and runs it on onnxruntime: nothing is downloaded. ``NudeDetector.detect``
pads an image to a square (bottom/right, black), resizes it to 320 px, and returns the boxes of its 18 classes
whose confidence is at least 0.25 after non-maximum suppression (IoU 0.45), each with one class and a confidence.

The penalty of an image is -(the highest confidence among its detections of the ``classes`` counted as unsafe,
counting only those of at least ``threshold``), in [-1, 0]: 0 for an image with no such detection (a safe image),
-0.9 for one where NudeNet is 90% sure of, say, an exposed breast. By default the classes counted are the five
exposed-nudity ones (``UNSAFE_CLASSES``); covered body parts, faces, feet, belly, armpits and the male chest are not
penalised unless listed. Used in a weighted mix (e.g. ``{"ocr": 1.0, "nsfw": 1.0}``) it subtracts that confidence.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from . import register, require
from .builtin import to_pil_images

# The classes of NudeNet 3.4's detector (nudenet/nudenet.py), in its output order.
NUDENET_CLASSES = (
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED", "BELLY_COVERED",
    "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE", "BELLY_EXPOSED", "MALE_GENITALIA_EXPOSED",
    "ANUS_COVERED", "FEMALE_BREAST_COVERED", "BUTTOCKS_COVERED",
)

# Exposed nudity: what the penalty counts by default.
UNSAFE_CLASSES = (
    "FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "FEMALE_BREAST_EXPOSED", "BUTTOCKS_EXPOSED",
    "ANUS_EXPOSED",
)

# NudeNet reports nothing below this confidence, so a lower threshold changes nothing.
NUDENET_MIN_CONFIDENCE = 0.25

_BATCH = 8  # images per onnxruntime run


def nsfw_penalty(detections: Iterable[Mapping[str, Any]], classes: Iterable[str] = UNSAFE_CLASSES,
                 threshold: float = NUDENET_MIN_CONFIDENCE) -> float:
    """-(highest ``score`` among ``detections`` whose ``class`` is in ``classes`` and score >= ``threshold``), in
    [-1, 0]; 0.0 when there is none. ``detections``: NudeNet's dicts {"class": str, "score": float, "box": ...}."""
    wanted = set(classes)
    scores = [float(item["score"]) for item in detections
              if item["class"] in wanted and float(item["score"]) >= threshold]
    return -min(max(scores), 1.0) if scores else 0.0


class NsfwPenalty:
    """Safety penalty in [-1, 0]: -(NudeNet's highest confidence of exposed nudity in the image), 0 for a safe image.

    Options:
        classes: the NudeNet classes that count as unsafe (default ``UNSAFE_CLASSES``: exposed genitalia, female
            breast, buttocks, anus); a list of names from ``NUDENET_CLASSES`` or one comma-separated string.
        threshold: detections below this confidence are ignored; NudeNet itself reports none below 0.25, the
            default, so the default counts every detection it makes.
        num_threads: onnxruntime intra-op threads; 0 leaves onnxruntime's default (all cores).

    The detector (NudeNet's bundled 320n.onnx) is loaded on the first call and kept for the reward's lifetime.
    """

    def __init__(self, classes: Sequence[str] | str = UNSAFE_CLASSES, threshold: float = NUDENET_MIN_CONFIDENCE,
                 num_threads: int = 0):
        names = [name.strip() for name in classes.split(",")] if isinstance(classes, str) else list(classes)
        names = [name for name in names if name]
        unknown = [name for name in names if name not in NUDENET_CLASSES]
        if unknown or not names:
            raise ValueError(f"classes must name NudeNet classes, got {unknown or 'none'}; known: "
                             f"{', '.join(NUDENET_CLASSES)}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if num_threads < 0:
            raise ValueError(f"num_threads must be >= 0 (0: onnxruntime's default), got {num_threads}")
        self.classes, self.threshold, self.num_threads = tuple(names), float(threshold), int(num_threads)
        self._detector: Any = None

    def detector(self) -> Any:
        """NudeNet's ``NudeDetector`` on its bundled model (created on first use; MissingExtraError without it)."""
        if self._detector is None:
            nudenet = require("nudenet", "nsfw", "nsfw")
            onnxruntime = require("onnxruntime", "nsfw", "nsfw")
            options = onnxruntime.SessionOptions()
            if self.num_threads:
                options.intra_op_num_threads, options.inter_op_num_threads = self.num_threads, 1
            # NudeDetector() opens its session with no providers and no options, which onnxruntime refuses in a
            # build with GPU providers: open the bundled model here, on the CPU, and give NudeNet that session (the
            # four attributes its detect_batch reads, as its __init__ sets them).
            session = onnxruntime.InferenceSession(os.path.join(os.path.dirname(str(nudenet.__file__)), "320n.onnx"),
                                                   sess_options=options, providers=["CPUExecutionProvider"])
            detector = nudenet.NudeDetector.__new__(nudenet.NudeDetector)
            detector.onnx_session, detector.input_name = session, session.get_inputs()[0].name
            detector.input_width = detector.input_height = 320
            self._detector = detector
        return self._detector

    def detect(self, images: Any) -> list[list[dict[str, Any]]]:
        """NudeNet's detections of each image (PIL list or uint8 [B, H, W, 3]): per image a list of
        {"class": name, "score": confidence in [0.25, 1], "box": [x, y, width, height] in pixels}."""
        # NudeNet reads an array as BGR, as cv2.imread gives it: the same input as a file on disk.
        arrays = [np.ascontiguousarray(np.asarray(image)[:, :, ::-1]) for image in to_pil_images(images)]
        return self.detector().detect_batch(arrays, batch_size=_BATCH) if arrays else []

    def __call__(self, images: Any, prompts: Sequence[str], metadata: Sequence[dict] | None = None) -> torch.Tensor:
        """Penalties [B] float32 in [-1, 0] (0 = nothing unsafe found); prompts are not used."""
        penalties = [nsfw_penalty(found, self.classes, self.threshold) for found in self.detect(images)]
        return torch.tensor(penalties, dtype=torch.float32)


register("nsfw", NsfwPenalty, replace=False)
