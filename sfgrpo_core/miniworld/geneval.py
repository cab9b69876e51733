"""MiniGenEval: a GenEval-style reward for mini-world captions that needs no model weights.

Detection, on any RGB image resized to IMAGE_SIZE x IMAGE_SIZE:
1. a 3x3 binomial blur, which tames pixel noise;
2. each pixel takes the nearest reference colour (the background or a palette colour), or none when all are farther
   than MAX_COLOR_DISTANCE (RGB Euclidean distance, 0-255 units);
3. 4-connected components of one palette colour; those under MIN_AREA pixels (noise) or over MAX_AREA (a coloured
   background) are dropped;
4. shape: the template (ellipse, rectangle, upward triangle, each inscribed in the component's bounding box) of
   highest IoU with the component, if that IoU is at least MIN_SHAPE_IOU and the box is at most MAX_ASPECT long;
   otherwise the component is no object.

Constraints (the score is the fraction that hold, as in GenEval each is checked on the detections):
    single_object, two_objects   each named shape is present
    counting                     the coloured shape is present; exactly `count` of it are
    colors, color_attr           each named shape is present; each is present in its named colour (binding)
    position                     both coloured shapes are present; a pair of them satisfies the relation, i.e. their
                                 centres are at least MIN_RELATION_OFFSET pixels apart in the named direction
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from .scenes import BACKGROUND, COLORS, IMAGE_SIZE, PALETTE, ObjectSpec, PromptSpec, parse_caption

MAX_COLOR_DISTANCE = 60.0
MIN_AREA = 32  # pixels; the smallest rendered object covers about 64
MAX_AREA = IMAGE_SIZE * IMAGE_SIZE // 4
MIN_SHAPE_IOU = 0.7
MAX_ASPECT = 1.5  # longer / shorter side of the bounding box
MIN_RELATION_OFFSET = 4.0  # pixels

_BINOMIAL_3X3 = np.outer([1, 2, 1], [1, 2, 1]).astype(np.float32) / 16
_BACKGROUND_RGB = np.array(BACKGROUND, dtype=np.float32)  # [3]
_COLOR_DIRECTIONS = np.array(list(PALETTE.values()), dtype=np.float32) - _BACKGROUND_RGB  # [len(COLORS), 3]
_COLOR_DIRECTION_NORMS2 = (_COLOR_DIRECTIONS**2).sum(-1)  # [len(COLORS)]


@dataclass(frozen=True)
class Detection:
    """A detected object: centroid (x, y) in pixels of the IMAGE_SIZE image, area in pixels."""

    shape: str
    color: str
    x: float
    y: float
    area: int

    def matches(self, obj: ObjectSpec) -> bool:
        """Whether this detection is the object asked for (any colour fits when the spec names none)."""
        return self.shape == obj.shape and obj.color in (None, self.color)


@dataclass(frozen=True)
class Constraint:
    """One checkable claim of a caption: target is present, occurs exactly `count` times, or <relation> other."""

    kind: Literal["present", "count", "relation"]
    target: ObjectSpec
    count: int | None = None
    relation: str | None = None
    other: ObjectSpec | None = None

    @property
    def description(self) -> str:
        if self.kind == "present":
            return f"a {self.target.phrase} is present"
        if self.kind == "count":
            return f"exactly {self.count} x {self.target.phrase}"
        relation, other = self._relation_and_other()
        return f"a {self.target.phrase} {relation} a {other.phrase}"

    def holds(self, detections: Sequence[Detection]) -> bool:
        matches = [det for det in detections if det.matches(self.target)]
        if self.kind == "present":
            return bool(matches)
        if self.kind == "count":
            return len(matches) == self.count
        relation, other = self._relation_and_other()
        others = [det for det in detections if det.matches(other)]
        return any(relation_holds(a, relation, b) for a in matches for b in others if a is not b)

    def _relation_and_other(self) -> tuple[str, ObjectSpec]:
        """(relation, other) of a "relation" constraint; raises ValueError when one is missing (built wrong)."""
        if self.relation is None or self.other is None:
            raise ValueError(f"a relation constraint needs a relation and another object: {self!r}")
        return self.relation, self.other


def relation_holds(first: Detection, relation: str, second: Detection) -> bool:
    """Whether first <relation> second: centres MIN_RELATION_OFFSET pixels apart that way (y grows downwards)."""
    offsets = {
        "left of": second.x - first.x,
        "right of": first.x - second.x,
        "above": second.y - first.y,
        "below": first.y - second.y,
    }
    return offsets[relation] >= MIN_RELATION_OFFSET


def constraints_for(spec: PromptSpec) -> tuple[Constraint, ...]:
    """The constraints of a spec's caption (see the module docstring)."""
    objects = spec.objects
    if spec.category == "counting":
        return Constraint("present", objects[0]), Constraint("count", objects[0], count=spec.count)
    if spec.category == "position":
        first, second = objects
        return (
            Constraint("present", first),
            Constraint("present", second),
            Constraint("relation", first, relation=spec.relation, other=second),
        )
    present = tuple(Constraint("present", obj) for obj in objects)
    if spec.category in ("colors", "color_attr"):
        return tuple(Constraint("present", ObjectSpec(obj.shape)) for obj in objects) + present
    return present


def as_rgb64(image: Any) -> np.ndarray | None:
    """[IMAGE_SIZE, IMAGE_SIZE, 3] uint8 from a PIL image or an [H, W, 3] uint8 array / tensor, else None.

    Other sizes are resized (bilinear, aspect not kept).
    """
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"))
    else:
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8 or 0 in array.shape:
            return None
    if array.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        resized = Image.fromarray(array).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
        array = np.asarray(resized)
    return array


def segment_colors(image: np.ndarray) -> np.ndarray:
    """[S, S, 3] uint8 -> [S, S] int: k >= 1 where a pixel is mostly COLORS[k - 1], else 0.

    After a 3x3 binomial blur, each pixel is seen as a blend background + t * (colour - background) of the background
    and the palette colour whose blend line passes nearest; it takes that colour when it lies within
    MAX_COLOR_DISTANCE of the line and t >= 0.5 (soft edges cut where they are half object, half background).
    """
    padded = np.pad(image.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    size = image.shape[0]
    smoothed = sum(
        _BINOMIAL_3X3[dy, dx] * padded[dy : dy + size, dx : dx + size] for dy in range(3) for dx in range(3)
    )
    offsets = smoothed - _BACKGROUND_RGB  # [S, S, 3]
    projections = offsets @ _COLOR_DIRECTIONS.T  # [S, S, K]
    blend = np.clip(projections / _COLOR_DIRECTION_NORMS2, 0.0, 1.0)
    squared_distances = (offsets**2).sum(-1, keepdims=True) - blend * (
        2 * projections - blend * _COLOR_DIRECTION_NORMS2
    )
    nearest = squared_distances.argmin(-1)
    chosen_blend = np.take_along_axis(blend, nearest[..., None], -1)[..., 0]
    is_object = (squared_distances.min(-1) <= MAX_COLOR_DISTANCE**2) & (chosen_blend >= 0.5)
    return np.where(is_object, nearest + 1, 0)


def label_components(classes: np.ndarray) -> np.ndarray:
    """[H, W] int classes -> [H, W] int64 labels of 4-connected same-class components of classes > 0.

    A component's label is the smallest flat pixel index in it; pixels of class 0 get -1. Min-label propagation
    between equal-class neighbours with pointer jumping, until nothing changes.
    """
    foreground = classes > 0
    labels = np.where(foreground, np.arange(classes.size).reshape(classes.shape), -1)
    joined_rows = foreground[:, 1:] & (classes[:, 1:] == classes[:, :-1])  # pixel joined to its left neighbour
    joined_cols = foreground[1:] & (classes[1:] == classes[:-1])  # pixel joined to the one above
    while True:
        merged = labels.copy()
        pair_min = np.minimum(labels[:, 1:], labels[:, :-1])
        merged[:, 1:] = np.where(joined_rows, np.minimum(merged[:, 1:], pair_min), merged[:, 1:])
        merged[:, :-1] = np.where(joined_rows, np.minimum(merged[:, :-1], pair_min), merged[:, :-1])
        pair_min = np.minimum(labels[1:], labels[:-1])
        merged[1:] = np.where(joined_cols, np.minimum(merged[1:], pair_min), merged[1:])
        merged[:-1] = np.where(joined_cols, np.minimum(merged[:-1], pair_min), merged[:-1])
        merged[foreground] = merged.ravel()[merged[foreground]]
        if np.array_equal(merged, labels):
            return merged
        labels = merged


@functools.cache
def _shape_templates(height: int, width: int) -> dict[str, np.ndarray]:
    """[height, width] bool masks of each shape inscribed in a box of that many pixels."""
    v = (np.arange(height)[:, None] + 0.5) / height
    u = (np.arange(width)[None, :] + 0.5) / width
    return {
        "circle": (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25,
        "square": np.ones((height, width), dtype=bool),
        "triangle": np.abs(u - 0.5) <= v / 2,
    }


def classify_shape(mask: np.ndarray) -> str | None:
    """Shape of a component from its [h, w] bool mask cropped to its bounding box, or None if it fits none."""
    height, width = mask.shape
    if max(height, width) > MAX_ASPECT * min(height, width):
        return None
    ious = {
        shape: (mask & template).sum() / (mask | template).sum()
        for shape, template in _shape_templates(height, width).items()
    }
    best = max(ious, key=ious.__getitem__)
    return best if ious[best] >= MIN_SHAPE_IOU else None


def detect_objects(image: np.ndarray) -> list[Detection]:
    """Objects in an [IMAGE_SIZE, IMAGE_SIZE, 3] uint8 image, in order of their first pixel (row-major)."""
    classes = segment_colors(image)
    labels = label_components(classes)
    roots, areas = np.unique(labels[labels >= 0], return_counts=True)
    detections = []
    for root, area in zip(roots, areas, strict=True):
        if not MIN_AREA <= area <= MAX_AREA:
            continue
        ys, xs = np.nonzero(labels == root)
        top, left = ys.min(), xs.min()
        mask = np.zeros((ys.max() - top + 1, xs.max() - left + 1), dtype=bool)
        mask[ys - top, xs - left] = True
        shape = classify_shape(mask)
        if shape is not None:
            color = COLORS[classes.flat[root] - 1]
            detections.append(Detection(shape, color, float(xs.mean() + 0.5), float(ys.mean() + 0.5), int(area)))
    return detections


def score_details(image: Any, prompt: str, spec: PromptSpec | None = None) -> dict[str, Any]:
    """Each constraint of the prompt and whether it held on the image, for logging and debugging.

    image: PIL image or [H, W, 3] uint8 array / tensor. spec: used instead of parsing the prompt when given.
    Returns {"prompt", "category", "score" (fraction of constraints held; NaN if the image cannot be scored),
    "constraints": [{"constraint": text, "held": bool or None}], "detections": [Detection as dict]}.
    """
    spec = spec if spec is not None else _parse_prompt(prompt)
    constraints = constraints_for(spec)
    array = as_rgb64(image)
    detections: list[Detection] = []
    held: list[bool | None] = [None] * len(constraints)  # None: the image cannot be scored
    score = math.nan
    if array is not None:
        detections = detect_objects(array)
        held_flags = [constraint.holds(detections) for constraint in constraints]
        held = list(held_flags)
        score = sum(held_flags) / len(held_flags)
    return {
        "prompt": prompt,
        "category": spec.category,
        "score": score,
        "constraints": [{"constraint": c.description, "held": h} for c, h in zip(constraints, held, strict=True)],
        "detections": [asdict(det) for det in detections],
    }


def category_means(scores: torch.Tensor | Sequence[float], prompts: Sequence[str]) -> dict[str, float]:
    """Mean score per category of the prompts (NaN scores left out; NaN for a category with none scored)."""
    values = torch.as_tensor(scores, dtype=torch.float32)
    by_category: dict[str, list[float]] = {}
    for prompt, value in zip(prompts, values.tolist(), strict=True):
        by_category.setdefault(_parse_prompt(prompt).category, []).append(value)
    means = {}
    for category, values_of_category in by_category.items():
        scored = [value for value in values_of_category if not math.isnan(value)]
        means[category] = sum(scored) / len(scored) if scored else math.nan
    return means


class MiniGenEval:
    """GenEval-style reward for mini-world captions: reward(images, prompts, metadata=None) -> float32 [B].

    images: list of PIL images / [H, W, 3] uint8 arrays or tensors, or one [B, H, W, 3] uint8 array or tensor.
    prompts: B captions made by the scenes templates; an unparseable one raises ValueError naming it.
    metadata: optional B mappings (or None); an item's "spec" (PromptSpec) is used instead of parsing its prompt.
    Each score is in [0, 1] (fraction of the prompt's constraints held), NaN for an item that cannot be scored.
    """

    def __call__(
        self,
        images: Sequence[Any] | np.ndarray | torch.Tensor,
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        if len(images) != len(prompts) or (metadata is not None and len(metadata) != len(prompts)):
            raise ValueError(
                f"got {len(images)} images, {len(prompts)} prompts"
                + ("" if metadata is None else f" and {len(metadata)} metadata items")
            )
        specs = [
            (meta or {}).get("spec") or _parse_prompt(prompt)
            for prompt, meta in zip(prompts, metadata or [None] * len(prompts), strict=True)
        ]
        scores = [
            score_details(image, prompt, spec)["score"]
            for image, prompt, spec in zip(images, prompts, specs, strict=True)
        ]
        return torch.tensor(scores, dtype=torch.float32)


def _parse_prompt(prompt: str) -> PromptSpec:
    try:
        return parse_caption(prompt)
    except ValueError as error:
        raise ValueError(f"MiniGenEval cannot parse prompt {prompt!r}: {error}") from error
