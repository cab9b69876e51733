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

The soft option (MiniGenEval(soft=True), reward options {"soft": true}) scores detection confidences instead of
pass/fail checks, so that the score moves continuously with the pixels. Each hard threshold becomes a ramp or
sigmoid of width SOFT_*. The components are still the hard rule's (for connectivity only), so a change of
connectivity (two objects' pixels merging into one component, or one splitting) remains a jump; nothing else is.
Distances d in RGB units, t the blend of step 2.
1. pixels (soft_membership, soft_color_assignment): a pixel's weight w in [0, 1] in its component is
       ramp(t: 0 at 0.5, 1 at 0.5 + SOFT_BLEND_WIDTH) * ramp(d: 0 at MAX_COLOR_DISTANCE, 1 at SOFT_DISTANCE_WIDTH less)
       * ramp(d of the next nearest colour - d: 0 at 0, 1 at SOFT_MARGIN_WIDTH),
   0 wherever the hard rule's decision for the pixel flips, so a pixel joins, leaves or changes component at
   weight 0; its colour probabilities are p_k = softmax_k(-d_k^2 / (2 SOFT_COLOR_SIGMA^2)).
2. components (soft_candidates), from mass M = sum w and peak P = max w:
       objectness A = P * window(M / P), the area window [MIN_AREA, MAX_AREA] with ramps of SOFT_AREA_WIDTH;
       colour     C(k) = sum w p_k / M;  centroid: w-weighted;
       shape      S(s) = softmax_s(IoU_s / SOFT_SHAPE_TEMPERATURE) * sigmoid((IoU_s - MIN_SHAPE_IOU) / SOFT_IOU_SCALE)
                         * sigmoid((MAX_ASPECT - aspect_s) / SOFT_ASPECT_SCALE),
   with IoU_s the soft IoU of the component's mask with an anti-aliased template placed by the mask's moments (best
   of a few scales; a bounding box would jump when one faint pixel joins). Confidence that a component is the object
   (shape s, colour c): A * S(s) * C(c), with C = 1 when the caption names no colour.
3. truth values in [0, 1] (Constraint.truth): present = the largest confidence; count = P(exactly `count` of the
   components are the object), taking them as independent events with their confidences (Poisson-binomial);
   relation = max over pairs of components of conf(first) * conf(second)
   * sigmoid((offset in the named direction - MIN_RELATION_OFFSET) / SOFT_OFFSET_SCALE).
The score is the mean truth value of the caption's constraints; NaN when the image cannot be scored. On rendered
scenes it is about 0.98 (the hard score 1.0); soft=False is the hard reward, unchanged.
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

# The soft option's scales (see the module docstring): each spreads one hard threshold above into a smooth step.
SOFT_COLOR_SIGMA = 30.0  # RGB units; palette blend lines lie >= 108 apart, so a pixel on one is sure of its colour
SOFT_DISTANCE_WIDTH = 40.0  # RGB units; pixel weight 0 at MAX_COLOR_DISTANCE from its colour, 1 from 40 nearer
SOFT_MARGIN_WIDTH = 80.0  # RGB units; pixel weight 1 once the next nearest colour is 80 farther than the nearest
SOFT_BLEND_WIDTH = 0.5  # pixel weight 0 at blend t = 0.5 (half background), 1 at t = 1 (the pure colour)
SOFT_AREA_WIDTH = 0.5  # objectness ramps over MIN_AREA (and MAX_AREA) * (1 -+ 0.5)
SOFT_IOU_SCALE = 0.05  # IoU units; a rendered shape's best template IoU is >= 0.94, its fit then >= 0.99
SOFT_SHAPE_TEMPERATURE = 0.03  # IoU units; a rendered shape's template beats the next best by >= 0.09
SOFT_ASPECT_SCALE = 0.05  # long / short side units
SOFT_OFFSET_SCALE = 1.0  # pixels
SOFT_FIT_SCALES = (0.85, 0.925, 1.0, 1.075, 1.15)  # template box sizes tried on each axis, x the moment box
# Box side / standard deviation of a filled shape along x and y: ellipse 4, rectangle sqrt(12), upward triangle
# sqrt(24) across and sqrt(18) down (its density grows linearly from the apex).
_BOX_PER_STD = {"circle": (4.0, 4.0), "square": (12**0.5, 12**0.5), "triangle": (24**0.5, 18**0.5)}

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
class Candidate:
    """A soft detection (the soft option): a component with its confidences, each in [0, 1].

    x, y: centroid in pixels, weighted by the pixels' weights; mass: those weights summed (pixels).
    objectness: the component is an object and not noise or a background. shapes / colors: shape name (colour
    name) -> confidence that the component is that shape (of that colour). See soft_candidates.
    """

    x: float
    y: float
    mass: float
    objectness: float
    shapes: Mapping[str, float]
    colors: Mapping[str, float]

    def confidence(self, obj: ObjectSpec) -> float:
        """Confidence in [0, 1] that this component is the object asked for (colour factor 1 when none named)."""
        color = 1.0 if obj.color is None else self.colors[obj.color]
        return self.objectness * self.shapes[obj.shape] * color


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

    def truth(self, candidates: Sequence[Candidate]) -> float:
        """Soft truth value in [0, 1] of this constraint on soft detections (see the module docstring)."""
        targets = [candidate.confidence(self.target) for candidate in candidates]
        if self.kind == "present":
            return max(targets, default=0.0)
        if self.kind == "count":
            return probability_of_exactly(targets, self.count or 0)
        relation, other = self._relation_and_other()
        others = [candidate.confidence(other) for candidate in candidates]
        return max(
            (
                targets[i] * others[j] * soft_relation(first, relation, second)
                for i, first in enumerate(candidates)
                for j, second in enumerate(candidates)
                if i != j
            ),
            default=0.0,
        )

    def _relation_and_other(self) -> tuple[str, ObjectSpec]:
        """(relation, other) of a "relation" constraint; raises ValueError when one is missing (built wrong)."""
        if self.relation is None or self.other is None:
            raise ValueError(f"a relation constraint needs a relation and another object: {self!r}")
        return self.relation, self.other


def relation_holds(first: Detection, relation: str, second: Detection) -> bool:
    """Whether first <relation> second: centres MIN_RELATION_OFFSET pixels apart that way (y grows downwards)."""
    return relation_offset(first, relation, second) >= MIN_RELATION_OFFSET


def relation_offset(first: Detection | Candidate, relation: str, second: Detection | Candidate) -> float:
    """How far (pixels) first's centre lies from second's in the relation's direction; negative the other way."""
    offsets = {
        "left of": second.x - first.x,
        "right of": first.x - second.x,
        "above": second.y - first.y,
        "below": first.y - second.y,
    }
    return offsets[relation]


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
    return _classes_from(*blend_geometry(image))


def blend_geometry(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[S, S, 3] uint8 -> (blend t, squared distance), each [S, S, len(COLORS)] float32, of the blurred pixels.

    Pixel p after a 3x3 binomial blur, against colour k's blend line background + t (colour_k - background),
    t in [0, 1]: t is the blend of its nearest point on that segment, the distance (RGB units, squared) is to it.
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
    return blend, squared_distances


def _classes_from(blend: np.ndarray, squared_distances: np.ndarray) -> np.ndarray:
    """segment_colors' hard rule on blend_geometry's output: [S, S] int, COLORS index + 1 or 0."""
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


def ramp(values: np.ndarray | float, zero: float, one: float) -> np.ndarray:
    """Piecewise-linear step, elementwise, float64: 0 at or beyond `zero`, 1 at or beyond `one` (either order)."""
    return np.clip((np.asarray(values, dtype=np.float64) - zero) / (one - zero), 0.0, 1.0)


def sigmoid(values: np.ndarray | float) -> np.ndarray:
    """Logistic function 1 / (1 + exp(-x)), elementwise, float64."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(values, dtype=np.float64)))


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """exp(logits) normalised to sum 1 along axis (shifted by the max for stability), float64."""
    shifted = np.exp(logits - logits.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def soft_color_assignment(squared_distances: np.ndarray) -> np.ndarray:
    """[S, S, K] squared distances to the blend lines (RGB units^2) -> [S, S, K] float64 colour probabilities.

    p_k = softmax_k(-d_k^2 / (2 SOFT_COLOR_SIGMA^2)): the soft version of "the nearest palette colour".
    """
    return softmax(-np.maximum(squared_distances.astype(np.float64), 0.0) / (2 * SOFT_COLOR_SIGMA**2))


def soft_membership(blend: np.ndarray, squared_distances: np.ndarray) -> np.ndarray:
    """[S, S, K] blend_geometry output -> [S, S] float64 in [0, 1]: the weight a pixel has in its hard component.

    With c the pixel's nearest colour and c' the next nearest (distances d in RGB units),
    weight = ramp(t_c: 0 at 0.5, 1 at 0.5 + SOFT_BLEND_WIDTH)
             * ramp(d_c: 0 at MAX_COLOR_DISTANCE, 1 at MAX_COLOR_DISTANCE - SOFT_DISTANCE_WIDTH)
             * ramp(d_c' - d_c: 0 at 0, 1 at SOFT_MARGIN_WIDTH).
    Each factor is 0 exactly where segment_colors' decision for the pixel flips (half background; too far from
    every colour; two colours equally near), so a pixel joins, leaves or changes component with weight 0.
    """
    distances = np.sqrt(np.maximum(squared_distances.astype(np.float64), 0.0))
    ordered = np.sort(distances, axis=-1)
    nearest = distances.argmin(-1)[..., None]
    mostly_object = ramp(np.take_along_axis(blend, nearest, -1)[..., 0], 0.5, 0.5 + SOFT_BLEND_WIDTH)
    near_line = ramp(ordered[..., 0], MAX_COLOR_DISTANCE, MAX_COLOR_DISTANCE - SOFT_DISTANCE_WIDTH)
    unambiguous = ramp(ordered[..., 1] - ordered[..., 0], 0.0, SOFT_MARGIN_WIDTH)
    return mostly_object * near_line * unambiguous


def soft_objectness(mass: np.ndarray, peak: np.ndarray) -> np.ndarray:
    """Confidence in [0, 1], elementwise, that components of these pixel weight sums and maxima are objects.

    peak * window(mass / peak): mass / peak (pixels) is the area at full weight, and the window is the hard
    [MIN_AREA, MAX_AREA] with each edge spread over a ramp across edge * (1 -+ SOFT_AREA_WIDTH). An object fading
    evenly keeps its area, so its objectness falls with its peak weight down to 0 instead of vanishing in one step.
    """
    low, high = 1 - SOFT_AREA_WIDTH, 1 + SOFT_AREA_WIDTH
    area = mass / np.maximum(peak, 1e-12)
    return peak * ramp(area, low * MIN_AREA, high * MIN_AREA) * ramp(area, high * MAX_AREA, low * MAX_AREA)


def shape_mask(weights: np.ndarray) -> np.ndarray:
    """[P] pixel weights of a component (some > 0) -> [P] soft shape mask min(1, w / level) in [0, 1].

    level = sum w^2 / sum w, the weight-weighted mean weight: the mask ignores how strong the component is overall
    (that is objectness), keeps weaker pixels in proportion, and is continuous in the weights.
    """
    level = (weights**2).sum() / weights.sum()
    return np.minimum(weights / level, 1.0)


def template_coverage(
    shape: str, centre: tuple[float, float], width: np.ndarray, height: np.ndarray, x: np.ndarray, y: np.ndarray
) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of pixel centres (x, y) by a shape template; broadcasts width, height, x, y.

    The template is the shape inscribed in a width x height box (pixels) placed so that the shape's centroid is at
    centre = (cx, cy); the triangle points up as in _shape_templates. Coverage = clip(0.5 - signed distance to the
    outline (pixels, positive outside), 0, 1): continuous in the box, about the area of the pixel inside.
    """
    dx, dy = x - centre[0], y - centre[1]
    if shape == "circle":
        a, b = width / 2, height / 2
        radius = np.sqrt((dx / a) ** 2 + (dy / b) ** 2)  # 1 on the ellipse
        gradient = np.sqrt((dx / a**2) ** 2 + (dy / b**2) ** 2) / np.maximum(radius, 1e-9)
        distance = (radius - 1) / np.maximum(gradient, 1e-9)
    elif shape == "square":
        distance = np.maximum(np.abs(dx) - width / 2, np.abs(dy) - height / 2)
    else:  # triangle: apex at the top centre, base at the bottom; the centroid is 2/3 of the way down
        below_apex = dy + 2 * height / 3
        side = (np.abs(dx) * height - below_apex * width / 2) / np.sqrt(height**2 + (width / 2) ** 2)
        distance = np.maximum(below_apex - height, side)
    return np.clip(0.5 - distance, 0.0, 1.0)


def template_fits(xs: np.ndarray, ys: np.ndarray, mask: np.ndarray) -> dict[str, tuple[float, float]]:
    """Shape name -> (IoU, aspect) of its best template for a component's pixels: columns xs, rows ys [P] int and
    soft mask [P] in [0, 1].

    Each template is placed by the mask's moments (centroid; box side = std * _BOX_PER_STD, the ratio of a filled
    shape's box to its standard deviation) and scaled by SOFT_FIT_SCALES on each axis. IoU: the best soft IoU
    sum min(mask, T) / sum max(mask, T) over those scales (a max of continuous functions, so continuous in the mask,
    unlike the hard rule's bounding box); aspect: long side / short side of the moment box (>= 1).
    """
    x, y, total = xs + 0.5, ys + 0.5, mask.sum()
    centre = (float((mask * x).sum() / total), float((mask * y).sum() / total))
    # standard deviations, at least that of a 1-pixel-wide line (1 / sqrt(12)) so that no box is empty
    spread = [
        max(float(np.sqrt((mask * (v - c) ** 2).sum() / total)), 0.3) for v, c in zip((x, y), centre, strict=True)
    ]
    scales = np.asarray(SOFT_FIT_SCALES)
    boxes = {shape: (spread[0] * kx, spread[1] * ky) for shape, (kx, ky) in _BOX_PER_STD.items()}
    reach = scales.max() * max(max(box) for box in boxes.values()) + 1  # every template lies within centre +- reach
    left, top = int(min(xs.min(), centre[0] - reach)), int(min(ys.min(), centre[1] - reach))
    right, bottom = int(max(xs.max(), centre[0] + reach)) + 1, int(max(ys.max(), centre[1] + reach)) + 1
    window = np.zeros((bottom - top, right - left))
    window[ys - top, xs - left] = mask
    grid_y, grid_x = np.mgrid[top:bottom, left:right]
    pixel_x, pixel_y, values = grid_x.ravel() + 0.5, grid_y.ravel() + 0.5, window.ravel()
    fits = {}
    for shape, (width, height) in boxes.items():
        coverage = template_coverage(
            shape, centre, width * scales[:, None, None], height * scales[None, :, None], pixel_x, pixel_y
        )  # [F, F, window pixels]
        iou = (np.minimum(values, coverage).sum(-1) / np.maximum(values, coverage).sum(-1)).max()
        fits[shape] = (float(iou), max(width, height) / min(width, height))
    return fits


def soft_shape_confidences(xs: np.ndarray, ys: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Shape name -> confidence in [0, 1] of a component (arguments as template_fits), from its template fits:

    confidence(s) = softmax_s(IoU_s / SOFT_SHAPE_TEMPERATURE) (s is the best fit)
                    * sigmoid((IoU_s - MIN_SHAPE_IOU) / SOFT_IOU_SCALE) (it fits at all)
                    * sigmoid((MAX_ASPECT - aspect_s) / SOFT_ASPECT_SCALE) (its box is not too long).
    """
    fits = template_fits(xs, ys, mask)
    iou, aspect = (np.array(values) for values in zip(*fits.values(), strict=True))
    fit = sigmoid((iou - MIN_SHAPE_IOU) / SOFT_IOU_SCALE) * sigmoid((MAX_ASPECT - aspect) / SOFT_ASPECT_SCALE)
    confidences = softmax(iou / SOFT_SHAPE_TEMPERATURE) * fit
    return {shape: float(value) for shape, value in zip(fits, confidences, strict=True)}


def soft_relation(first: Detection | Candidate, relation: str, second: Detection | Candidate) -> float:
    """Soft truth of first <relation> second: sigmoid((offset - MIN_RELATION_OFFSET) / SOFT_OFFSET_SCALE)."""
    return float(sigmoid((relation_offset(first, relation, second) - MIN_RELATION_OFFSET) / SOFT_OFFSET_SCALE))


def probability_of_exactly(probabilities: Sequence[float], count: int) -> float:
    """P(exactly `count` of independent events hold) given their probabilities (the Poisson-binomial law)."""
    if count < 0:
        return 0.0
    distribution = np.zeros(count + 1)  # P(N = 0..count) over the events seen so far; mass beyond count is dropped
    distribution[0] = 1.0
    for probability in probabilities:
        distribution[1:] = distribution[1:] * (1 - probability) + distribution[:-1] * probability
        distribution[0] *= 1 - probability
    return float(distribution[count])


def soft_candidates(image: np.ndarray) -> list[Candidate]:
    """Soft detections in an [IMAGE_SIZE, IMAGE_SIZE, 3] uint8 image, in order of their first pixel (row-major).

    The components are segment_colors' (hard labels, for connectivity only); each pixel counts with its
    soft_membership weight w: mass = sum w, centroid = w-weighted mean of the pixel centres, colours[k] =
    sum w p_k / mass with p = soft_color_assignment, objectness = soft_objectness, shapes = soft_shape_confidences of
    shape_mask(w). Components of objectness 0 are left out.
    """
    blend, squared_distances = blend_geometry(image)
    labels = label_components(_classes_from(blend, squared_distances))
    weights = soft_membership(blend, squared_distances)  # [S, S]
    colors = soft_color_assignment(squared_distances)  # [S, S, K]
    foreground = labels >= 0
    roots, index = np.unique(labels[foreground], return_inverse=True)
    ys, xs = np.nonzero(foreground)  # row-major, as labels[foreground]
    pixel_weights, pixel_colors = weights[foreground], colors[foreground]

    def per_component(values: np.ndarray) -> np.ndarray:
        return np.bincount(index, values, len(roots))

    masses = per_component(pixel_weights)
    color_sums = np.stack([per_component(pixel_weights * pixel_colors[:, k]) for k in range(len(COLORS))], 1)
    sums_x, sums_y = per_component(pixel_weights * (xs + 0.5)), per_component(pixel_weights * (ys + 0.5))
    peaks = np.zeros(len(roots))
    np.maximum.at(peaks, index, pixel_weights)
    objectness = soft_objectness(masses, peaks)
    candidates = []
    for component in np.flatnonzero(objectness > 0):
        members = index == component
        mass = masses[component]
        candidates.append(
            Candidate(
                x=float(sums_x[component] / mass),
                y=float(sums_y[component] / mass),
                mass=float(mass),
                objectness=float(objectness[component]),
                shapes=soft_shape_confidences(xs[members], ys[members], shape_mask(pixel_weights[members])),
                colors={color: float(color_sums[component, k] / mass) for k, color in enumerate(COLORS)},
            )
        )
    return candidates


def score_details(image: Any, prompt: str, spec: PromptSpec | None = None, soft: bool = False) -> dict[str, Any]:
    """Each constraint of the prompt and whether it held on the image, for logging and debugging.

    image: PIL image or [H, W, 3] uint8 array / tensor. spec: used instead of parsing the prompt when given.
    Returns {"prompt", "category", "score" (fraction of constraints held; NaN if the image cannot be scored),
    "constraints": [{"constraint": text, "held": bool or None}], "detections": [Detection as dict]}.
    soft: "score" is instead the mean soft truth value; each constraint also has "truth" (float in [0, 1], None if
    the image cannot be scored) beside its hard "held", and "candidates" lists the soft detections (as dicts).
    """
    if soft:
        return _soft_score_details(image, prompt, spec)
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


def soft_truths(image: np.ndarray, spec: PromptSpec) -> tuple[list[Candidate], list[float]]:
    """(soft detections, truth value in [0, 1] of each of constraints_for(spec)) on an [IMAGE_SIZE, IMAGE_SIZE, 3]
    uint8 image."""
    candidates = soft_candidates(image)
    return candidates, [constraint.truth(candidates) for constraint in constraints_for(spec)]


def soft_score(image: Any, spec: PromptSpec) -> float:
    """The soft option's score of an image (as score_details takes it): the mean truth value of the spec's
    constraints, in [0, 1]; NaN if the image cannot be scored."""
    array = as_rgb64(image)
    if array is None:
        return math.nan
    truths = soft_truths(array, spec)[1]
    return sum(truths) / len(truths)


def _soft_score_details(image: Any, prompt: str, spec: PromptSpec | None) -> dict[str, Any]:
    """score_details(..., soft=True): the hard details, with the soft score, truth values and candidates."""
    details = score_details(image, prompt, spec)
    array = as_rgb64(image)
    details["candidates"] = []
    for item in details["constraints"]:
        item["truth"] = None
    if array is not None:
        candidates, truths = soft_truths(array, spec if spec is not None else _parse_prompt(prompt))
        details["score"] = sum(truths) / len(truths)
        details["candidates"] = [asdict(candidate) for candidate in candidates]
        for item, truth in zip(details["constraints"], truths, strict=True):
            item["truth"] = truth
    return details


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
    soft: score the mean soft truth value of the constraints instead (detection confidences, smooth in the pixels;
    see the module docstring); False gives the pass/fail reward.
    """

    def __init__(self, soft: bool = False):
        if not isinstance(soft, bool | np.bool_):
            raise ValueError(
                f"MiniGenEval option 'soft' must be a boolean, got {soft!r} ({type(soft).__name__}); "
                'pass true or false, e.g. reward options {"soft": true}'
            )
        self.soft = bool(soft)

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
            soft_score(image, spec) if self.soft else score_details(image, prompt, spec)["score"]
            for image, prompt, spec in zip(images, prompts, specs, strict=True)
        ]
        return torch.tensor(scores, dtype=torch.float32)


def _parse_prompt(prompt: str) -> PromptSpec:
    try:
        return parse_caption(prompt)
    except ValueError as error:
        raise ValueError(f"MiniGenEval cannot parse prompt {prompt!r}: {error}") from error
