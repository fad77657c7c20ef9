"""`shapes`: a synthetic VQA benchmark generated in code, deterministic by seed.

Each image is a grid of cells (3 x 3 by default); a cell is empty or holds one coloured shape.
A question is about one position (colour or shape there), a count, or an existence check, so
which visual tokens matter depends on the question. Answers are one word; scoring is exact match
after lower-casing and stripping punctuation.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from prunelab.workers.benchmarks import register_benchmark
from prunelab.workers.benchmarks.base import Sample, check_scoring

__all__ = ["COLORS", "SHAPES", "ShapesBenchmark", "exact_match", "render", "shapes_vocabulary"]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 200),
}
SHAPES = ("circle", "square", "triangle", "cross")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CATEGORIES = ("color", "shape", "count", "exist")


def shapes_vocabulary() -> list[str]:
    """Every word a shapes question or answer uses."""
    words = {"what", "color", "is", "the", "shape", "at", "how", "many", "shapes", "are", "there"}
    words |= {"a", "yes", "no", "answer", "with", "one", "word"}
    return sorted(words | set(COLORS) | set(SHAPES) | set(ROWS) | set(COLS) | set(NUMBERS))


def _shape_mask(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size) boolean mask of a shape filling most of a cell."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    c = size / 2
    r = size * rng.uniform(0.32, 0.42)
    if kind == "circle":
        return (yy - c) ** 2 + (xx - c) ** 2 <= r**2
    if kind == "square":
        return (np.abs(yy - c) <= r * 0.85) & (np.abs(xx - c) <= r * 0.85)
    if kind == "triangle":
        top, bottom = c - r, c + r
        half_width = (yy - top) / (bottom - top) * r
        return (yy >= top) & (yy <= bottom) & (np.abs(xx - c) <= half_width)
    if kind == "cross":
        arm = r * 0.35
        return ((np.abs(yy - c) <= arm) | (np.abs(xx - c) <= arm)) & (
            (np.abs(yy - c) <= r) & (np.abs(xx - c) <= r)
        )
    raise ValueError(f"unknown shape {kind!r}")


def render(
    cells: list[tuple[str, str] | None], grid: int, cell_px: int, rng: np.random.Generator
) -> np.ndarray:
    """Draw ``cells`` (row-major; (colour, shape) or None) as a (G*px, G*px, 3) uint8 image."""
    size = grid * cell_px
    image = np.full((size, size, 3), 30, dtype=np.float32)
    image += rng.normal(0, 6, size=image.shape)
    for index, cell in enumerate(cells):
        if cell is None:
            continue
        colour, kind = cell
        row, col = divmod(index, grid)
        mask = _shape_mask(kind, cell_px, rng)
        patch = image[row * cell_px : (row + 1) * cell_px, col * cell_px : (col + 1) * cell_px]
        patch[mask] = np.asarray(COLORS[colour], dtype=np.float32) + rng.normal(0, 8, size=3)
    return np.clip(image, 0, 255).astype(np.uint8)


def exact_match(prediction: str, answers: list[str]) -> float:
    """1.0 if the first word of ``prediction`` equals an answer (case and punctuation ignored)."""
    table = str.maketrans("", "", string.punctuation)
    words = prediction.lower().translate(table).split()
    first = words[0] if words else ""
    return float(first in {a.lower().translate(table).strip() for a in answers})


@register_benchmark
@dataclass
class ShapesBenchmark:
    """Synthetic shapes VQA. ``split`` picks a disjoint seed stream (train / test).

    One scoring rule (first word, exact match): ``scoring`` is accepted (``lmms_eval`` or
    ``official``, as for every benchmark) and changes nothing, so ``describe`` leaves it out.
    Answers are one word: 4 new tokens, no stop strings.
    """

    kind: ClassVar[str] = "shapes"
    max_new_tokens: ClassVar[int] = 4
    until: ClassVar[tuple[str, ...]] = ()
    name: str = "shapes"
    split: str = "test"
    grid: int = 3
    cell_px: int = 16
    empty_prob: float = 0.35
    size: int = 1000  # samples in the split; `limit` takes a seeded subset
    metric: str = "exact_match"
    scoring: str = "lmms_eval"

    def __post_init__(self) -> None:
        check_scoring(self.scoring)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "split": self.split,
            "grid": self.grid,
            "cell_px": self.cell_px,
            "empty_prob": self.empty_prob,
            "size": self.size,
            "version": 1,
        }

    def sample_count(self) -> int:
        """Samples in the split."""
        return self.size

    def _split_seed(self) -> int:
        return {"train": 1, "val": 2, "test": 3}.get(self.split, 4) * 1_000_003

    def sample(self, index: int) -> Sample:
        """The ``index``-th sample of the split (a pure function of split and index)."""
        rng = np.random.default_rng([self._split_seed(), index])
        n = self.grid * self.grid
        cells: list[tuple[str, str] | None] = []
        for _ in range(n):
            if rng.random() < self.empty_prob:
                cells.append(None)
            else:
                cells.append((str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))))
        if all(c is None for c in cells):
            cells[int(rng.integers(n))] = (str(rng.choice(list(COLORS))), str(rng.choice(SHAPES)))
        image = render(cells, self.grid, self.cell_px, rng)
        category = CATEGORIES[index % len(CATEGORIES)]
        question, answer = self._question(category, cells, rng)
        return Sample(
            id=f"{self.split}-{index}",
            image=image,
            question=question,
            answers=[answer],
            category=category,
            extra={"cells": cells, "grid": self.grid},
        )

    def _question(
        self, category: str, cells: list[tuple[str, str] | None], rng: np.random.Generator
    ) -> tuple[str, str]:
        occupied = [i for i, c in enumerate(cells) if c is not None]
        if category in ("color", "shape"):
            index = int(rng.choice(occupied))
            row, col = divmod(index, self.grid)
            where = f"the {ROWS[row * 3 // self.grid]} {COLS[col * 3 // self.grid]}"
            colour, kind = cells[index]  # type: ignore[misc]
            if category == "color":
                return f"what color is the shape at {where}?", colour
            return f"what shape is at {where}?", kind
        if category == "count":
            colour = str(rng.choice(list(COLORS)))
            count = sum(1 for c in cells if c is not None and c[0] == colour)
            return f"how many {colour} shapes are there?", NUMBERS[count]
        colour, kind = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
        if rng.random() < 0.5 and occupied:  # balance yes / no
            colour, kind = cells[int(rng.choice(occupied))]  # type: ignore[misc]
        present = any(c == (colour, kind) for c in cells)
        return f"is there a {colour} {kind}?", "yes" if present else "no"

    def samples(self, limit: int | None, seed: int = 0) -> list[Sample]:
        """``limit`` samples (all when None) chosen by ``seed`` from the split, in index order."""
        indices = np.arange(self.size)
        if limit is not None and limit < self.size:
            indices = np.sort(np.random.default_rng(seed).choice(self.size, limit, replace=False))
        return [self.sample(int(i)) for i in indices]

    def score(self, prediction: str, sample: Sample) -> float:
        return exact_match(prediction, sample.answers)
