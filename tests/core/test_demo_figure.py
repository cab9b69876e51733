"""The demo's before/after picture carries its prompt, row labels and each image's score."""

import math

import numpy as np
from PIL import Image

from sfgrpo_core.headless.demo import before_after_grid, scores_from_node_text


def _pngs(folder, prefix, colours):
    paths = []
    for index, colour in enumerate(colours):
        path = folder / f"{prefix}_{index:05d}_.png"
        Image.new("RGB", (64, 64), colour).save(path)
        paths.append(path)
    return paths


def test_scores_are_read_from_the_score_nodes_text():
    text = ["image 0: 0.5000\nimage 1: missing\nimage 2: 0.2500\nmean: 0.3750 (2 of 3 scored)"]
    scores = scores_from_node_text(text)
    assert scores[0] == 0.5 and math.isnan(scores[1]) and scores[2] == 0.25


def test_before_after_grid_has_a_header_labels_and_a_score_under_each_image(tmp_path):
    before = _pngs(tmp_path, "before", [(200, 0, 0)] * 3)
    after = _pngs(tmp_path, "after", [(0, 0, 200)] * 3)
    path = before_after_grid(before, after, tmp_path / "grid.png", prompt="a red circle",
                             scores=([0.5, math.nan, 0.25], [1.0, 0.75, 0.5]))
    grid = np.asarray(Image.open(path).convert("RGB"))
    label_width, header, footer, size = 150, 34, 18, 128
    assert grid.shape == (header + 2 * (size + footer), label_width + 3 * size, 3)
    assert (grid[:header] < 128).any()  # the prompt line
    assert (grid[header:, :label_width] < 128).any()  # "base" / "with LoRA"
    below_first = grid[header + size : header + size + footer, label_width : label_width + size]
    assert (below_first < 128).any()  # a score under the first image
    top_left = grid[header + 10, label_width + 10]
    assert tuple(top_left) == (200, 0, 0)  # images at 2x, base row first
    assert tuple(grid[header + size + footer + 10, label_width + 10]) == (0, 0, 200)
