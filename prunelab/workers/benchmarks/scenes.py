"""`scenes`: a synthetic VQA benchmark with the redundancy of real images, deterministic by seed.

``shapes`` fills a grid cell by cell, so almost every visual token carries an object. Real
images are mostly background, and large objects spread over many patches: that redundancy is
why visual-token pruning works. A ``scenes`` image (96 x 96 by default: 12 x 12 = 144 tokens at
the toy tower's 8 px patches; 192 px gives 576) has a dark, mildly textured background and 1 to
4 non-overlapping objects, each a distinct (colour, shape) from ``shapes``' COLORS x SHAPES,
about half of them large (28-40 px, at least 9 patches) and the rest small (14-18 px, 1 to 6
patches: big enough that the toy tower at 8 px patches can tell their shapes apart; at 10-14 px
a linear probe on its features named 67% of small objects right, against 97% of large ones).
On average well over 60 % of the patches hold no object pixel.

Questions cycle by index through six categories. ``color``, ``shape`` and ``position`` are about
one object (a few tokens hold the answer); ``relation``, ``count`` and ``exist`` need more of the
image. yes / no answers are balanced exactly (by index). Answers are one word; scoring is
``shapes``' exact match on the first word.

``extra`` carries what training needs for token-level labels: the objects (colour, shape,
centre, size, bounding box) and the image size; :func:`patch_labels` turns them into a label
per patch and :func:`object_set` into a multi-hot over COLORS x SHAPES.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from prunelab.workers.benchmarks import register_benchmark
from prunelab.workers.benchmarks.base import Sample, check_scoring
from prunelab.workers.benchmarks.shapes import (
    COLORS,
    NUMBERS,
    SHAPES,
    exact_match,
    shapes_vocabulary,
)

__all__ = [
    "CATEGORIES",
    "ScenesBenchmark",
    "label_map",
    "object_mask",
    "object_set",
    "patch_labels",
    "render_scene",
    "scenes_vocabulary",
]

CATEGORIES = ("color", "shape", "position", "relation", "count", "exist")
REFERENCE_SIZE = 96  # lengths in the config are pixels at this image size, scaled with it
REFERENCE_GRID = 12  # the toy tower's 8 px patches at 96 px: large / small is judged on it
BACKGROUND_BASE = (10, 70)  # per-channel range of the dark base colour (objects have one >= 190)
BACKGROUND_GRADIENT = 12.0  # most a linear gradient changes the background across the image
PIXEL_NOISE = 3.0  # std of the per-pixel noise over the whole image
COLOUR_JITTER = 6.0  # std of the per-object shift of its colour
SMALL_MAX_CELLS = 6  # a small object covers at most this many cells of the 12 x 12 grid
PLACEMENT_TRIES = 200  # random positions tried per object before it shrinks or is left out
SCENE_TRIES = 100  # scenes drawn for a sample before giving up on its question

COMBOS = [(colour, shape) for colour in COLORS for shape in SHAPES]


def scenes_vocabulary() -> list[str]:
    """Every word a scenes (or shapes) question or answer uses: one tokenizer serves both."""
    words = {"what", "color", "is", "the", "shape", "object", "objects", "how", "many", "are"}
    words |= {"there", "on", "left", "or", "right", "at", "top", "bottom", "of", "above", "a"}
    words |= {"yes", "no"}
    return sorted(set(shapes_vocabulary()) | words | set(COLORS) | set(SHAPES) | set(NUMBERS))


def object_mask(shape: str, bbox: list[int] | tuple[int, ...], image_size: int) -> np.ndarray:
    """(image_size, image_size) boolean mask of ``shape`` filling its square ``bbox``.

    ``bbox`` is ``[x0, y0, x1, y1]`` with x1, y1 exclusive. Circle: the inscribed disc;
    square: the whole box; triangle: apex up, base and height the box's side; cross: arms
    0.4 of the side wide. A pure function of its arguments (no jitter), so labels can be
    recomputed from ``extra["objects"]``.
    """
    x0, y0, x1, y1 = (int(v) for v in bbox)
    side = x1 - x0
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) + 0.5
    half = side / 2
    u, v = xx - half, yy - half
    if shape == "circle":
        local = u**2 + v**2 <= half**2
    elif shape == "square":
        local = np.ones((side, side), dtype=bool)
    elif shape == "triangle":
        local = np.abs(u) <= (v + half) / 2
    elif shape == "cross":
        arm = 0.2 * side
        local = (np.abs(u) <= arm) | (np.abs(v) <= arm)
    else:
        raise ValueError(f"unknown shape {shape!r}: expected one of {', '.join(SHAPES)}")
    mask = np.zeros((image_size, image_size), dtype=bool)
    mask[y0:y1, x0:x1] = local
    return mask


def label_map(objects: list[dict[str, Any]], image_size: int) -> np.ndarray:
    """(image_size, image_size) int map: 0 background, k + 1 where ``objects[k]`` is drawn."""
    labels = np.zeros((image_size, image_size), dtype=np.int64)
    for k, obj in enumerate(objects):
        labels[object_mask(obj["shape"], obj["bbox"], image_size)] = k + 1
    return labels


def _cell_owners(labels: np.ndarray, edges: np.ndarray, count: int) -> np.ndarray:
    """(cells, cells) map of which object (1-based, 0 none) owns each cell of ``edges``.

    An object owns a cell when it covers the cell's centre pixel, else when it covers at least
    half of the cell's pixels.
    """
    labels = labels[: edges[-1], : edges[-1]]
    starts, sizes = edges[:-1], np.diff(edges)
    centres = starts + sizes // 2
    owners = labels[np.ix_(centres, centres)].copy()
    if count:
        area = np.outer(sizes, sizes)
        onehot = (labels[None] == np.arange(1, count + 1)[:, None, None]).astype(np.int64)
        cover = np.add.reduceat(np.add.reduceat(onehot, starts, axis=1), starts, axis=2)
        best = cover.argmax(axis=0)
        majority = 2 * cover.max(axis=0) >= area
        owners = np.where((owners == 0) & majority, best + 1, owners)
    return owners


def patch_labels(objects: list[dict[str, Any]], image_size: int, patch_size: int) -> list[int]:
    """Per patch (row-major), 0 for background, else 1 + colour index * len(SHAPES) + shape
    index of the object covering the patch's centre pixel (or, failing that, at least half of
    the patch). A remainder narrower than a patch is dropped, as a strided patch embedding does.
    """
    grid = image_size // patch_size
    if grid < 1:
        raise ValueError(f"patch_size={patch_size} is larger than image_size={image_size}")
    edges = np.arange(grid + 1) * patch_size
    owners = _cell_owners(label_map(objects, image_size), edges, len(objects))
    classes = [0] + [
        1 + list(COLORS).index(o["color"]) * len(SHAPES) + SHAPES.index(o["shape"]) for o in objects
    ]
    return [classes[k] for k in owners.ravel().tolist()]


def object_set(objects: list[dict[str, Any]]) -> list[int]:
    """Multi-hot over COLORS x SHAPES (colour-major, as in :func:`patch_labels` minus one)."""
    hot = [0] * (len(COLORS) * len(SHAPES))
    for obj in objects:
        hot[list(COLORS).index(obj["color"]) * len(SHAPES) + SHAPES.index(obj["shape"])] = 1
    return hot


def render_scene(
    objects: list[dict[str, Any]], image_size: int, rng: np.random.Generator
) -> np.ndarray:
    """Draw ``objects`` on a dark textured background as an (S, S, 3) uint8 image.

    Background: a random dark base colour, a faint linear gradient in a random direction and
    low per-pixel noise; it never comes near an object colour (each has a channel >= 190).
    """
    low, high = BACKGROUND_BASE
    base = rng.integers(low, high + 1, size=3).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    amplitude = rng.uniform(0, BACKGROUND_GRADIENT)
    ramp = np.linspace(-0.5, 0.5, image_size, dtype=np.float32)
    gradient = amplitude * (np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None])
    image = base + gradient[..., None]
    for obj in objects:
        colour = np.asarray(COLORS[obj["color"]], dtype=np.float32)
        image[object_mask(obj["shape"], obj["bbox"], image_size)] = colour + rng.normal(
            0, COLOUR_JITTER, size=3
        )
    image = image + rng.normal(0, PIXEL_NOISE, size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


@register_benchmark
@dataclass
class ScenesBenchmark:
    """Synthetic scenes VQA. ``split`` picks a disjoint seed stream (train / val / test).

    Lengths (object sizes, ``margin``, ``midline_gap``, ``relation_gap``) are pixels at a 96 px
    image and scale with ``image_size``. Objects keep ``margin`` between bounding boxes and their
    centres ``midline_gap`` off both midlines (so left / right and top / bottom are clear); a
    large object covers at least 9 and a small one 1 to 6 cells of a 12 x 12 grid (the toy
    tower's 8 px patches at 96 px), else it is placed again. One scoring rule, as ``shapes``.
    """

    kind: ClassVar[str] = "scenes"
    max_new_tokens: ClassVar[int] = 4
    until: ClassVar[tuple[str, ...]] = ()
    name: str = "scenes"
    split: str = "test"
    image_size: int = 96
    size: int = 1000  # samples in the split; `limit` takes a seeded subset
    min_objects: int = 1
    max_objects: int = 4
    large_prob: float = 0.5
    large_min: int = 28
    large_max: int = 40
    small_min: int = 14
    small_max: int = 18
    margin: int = 4
    midline_gap: int = 8
    relation_gap: int = 12
    metric: str = "exact_match"
    scoring: str = "lmms_eval"

    def __post_init__(self) -> None:
        check_scoring(self.scoring)
        if self.image_size < 2 * REFERENCE_GRID:
            raise ValueError(
                f"image_size={self.image_size}: expected at least {2 * REFERENCE_GRID}"
            )
        if not 1 <= self.min_objects <= self.max_objects <= min(len(COMBOS), len(NUMBERS) - 1):
            raise ValueError(
                f"min_objects={self.min_objects}, max_objects={self.max_objects}: expected "
                f"1 <= min_objects <= max_objects <= {min(len(COMBOS), len(NUMBERS) - 1)}"
            )
        if self.max_objects < 2:
            raise ValueError("max_objects must be at least 2 (relation questions need two)")
        if not (0 < self.small_min <= self.small_max < self.large_min <= self.large_max):
            raise ValueError("expected 0 < small_min <= small_max < large_min <= large_max")
        if self.large_max + 2 * self.midline_gap > REFERENCE_SIZE:
            raise ValueError("large_max + 2 * midline_gap must fit in 96 px")
        if not 0 <= self.large_prob <= 1:
            raise ValueError(f"large_prob={self.large_prob}: expected a probability")

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "split": self.split,
            "image_size": self.image_size,
            "size": self.size,
            "min_objects": self.min_objects,
            "max_objects": self.max_objects,
            "large_prob": self.large_prob,
            "large_min": self.large_min,
            "large_max": self.large_max,
            "small_min": self.small_min,
            "small_max": self.small_max,
            "margin": self.margin,
            "midline_gap": self.midline_gap,
            "relation_gap": self.relation_gap,
            "background_base": BACKGROUND_BASE,
            "background_gradient": BACKGROUND_GRADIENT,
            "pixel_noise": PIXEL_NOISE,
            "colour_jitter": COLOUR_JITTER,
            "version": 2,  # 2: small objects 14-18 px (were 10-14)
        }

    def sample_count(self) -> int:
        """Samples in the split."""
        return self.size

    def _split_seed(self) -> int:
        # a different multiplier from shapes': scenes and shapes never share a stream
        return {"train": 1, "val": 2, "test": 3}.get(self.split, 4) * 1_000_033

    def _px(self, length: float) -> int:
        """``length`` (pixels at 96 px) at this image size."""
        return max(1, round(length * self.image_size / REFERENCE_SIZE))

    def sample(self, index: int) -> Sample:
        """The ``index``-th sample of the split (a pure function of split and index)."""
        rng = np.random.default_rng([self._split_seed(), index])
        category = CATEGORIES[index % len(CATEGORIES)]
        want_yes = (index // len(CATEGORIES)) % 2 == 0  # yes / no balanced exactly
        low = max(self.min_objects, 2) if category == "relation" else self.min_objects
        for _ in range(SCENE_TRIES):
            objects = self._scene(rng, int(rng.integers(low, self.max_objects + 1)))
            qa = self._question(category, objects, rng, want_yes)
            if qa is not None:
                break
        else:  # pragma: no cover - a scene that allows the question comes within a few tries
            raise RuntimeError(f"{self.name}: no {category} question for sample {index}")
        question, answer = qa
        image = render_scene(objects, self.image_size, rng)
        return Sample(
            id=f"{self.split}-{index}",
            image=image,
            question=question,
            answers=[answer],
            category=category,
            extra={"objects": objects, "image_size": self.image_size},
        )

    def _scene(self, rng: np.random.Generator, count: int) -> list[dict[str, Any]]:
        """Up to ``count`` objects with distinct (colour, shape); one that fits nowhere as large
        is tried as small, then left out (rare: the count question counts what is drawn)."""
        objects: list[dict[str, Any]] = []
        for combo in rng.permutation(len(COMBOS))[:count]:
            colour, shape = COMBOS[int(combo)]
            large = bool(rng.random() < self.large_prob)
            obj = self._place(rng, colour, shape, large, objects)
            if obj is None and large:
                obj = self._place(rng, colour, shape, False, objects)
            if obj is not None:
                objects.append(obj)
        return objects

    def _place(
        self,
        rng: np.random.Generator,
        colour: str,
        shape: str,
        large: bool,
        others: list[dict[str, Any]],
    ) -> dict[str, Any] | None:
        side = self.image_size
        lo, hi = (self.large_min, self.large_max) if large else (self.small_min, self.small_max)
        lo, hi = self._px(lo), self._px(hi)
        gap, margin = self._px(self.midline_gap), self._px(self.margin)
        edges = np.rint(np.linspace(0, side, REFERENCE_GRID + 1)).astype(int)
        for _ in range(PLACEMENT_TRIES):
            size = int(rng.integers(lo, hi + 1))
            x0, y0 = (int(v) for v in rng.integers(0, side - size + 1, size=2))
            cx, cy = x0 + size / 2, y0 + size / 2
            if abs(cx - side / 2) < gap or abs(cy - side / 2) < gap:
                continue
            box = [x0, y0, x0 + size, y0 + size]
            if any(_near(box, o["bbox"], margin) for o in others):
                continue
            cells = int(
                (_cell_owners(object_mask(shape, box, side).astype(np.int64), edges, 1) > 0).sum()
            )
            if (large and cells < 9) or (not large and not 1 <= cells <= SMALL_MAX_CELLS):
                continue
            return {
                "color": colour,
                "shape": shape,
                "cx": cx,
                "cy": cy,
                "size": size,
                "large": large,
                "bbox": box,
            }
        return None

    def _question(
        self,
        category: str,
        objects: list[dict[str, Any]],
        rng: np.random.Generator,
        want_yes: bool,
    ) -> tuple[str, str] | None:
        """(question, answer), or None when this scene cannot ask ``category``."""
        if not objects:
            return None
        half = self.image_size / 2
        if category == "color":
            kinds = [o["shape"] for o in objects]
            unique = [k for k in SHAPES if kinds.count(k) == 1]
            if not unique:
                return None
            kind = str(rng.choice(unique))
            colour = next(o["color"] for o in objects if o["shape"] == kind)
            return f"what color is the {kind}?", colour
        if category == "shape":
            colours = [o["color"] for o in objects]
            unique = [c for c in COLORS if colours.count(c) == 1]
            if not unique:
                return None
            colour = str(rng.choice(unique))
            kind = next(o["shape"] for o in objects if o["color"] == colour)
            return f"what shape is the {colour} object?", kind
        if category == "position":
            obj = objects[int(rng.integers(len(objects)))]
            name = f"{obj['color']} {obj['shape']}"
            if rng.random() < 0.5:
                answer = "left" if obj["cx"] < half else "right"
                return f"is the {name} on the left or the right?", answer
            answer = "top" if obj["cy"] < half else "bottom"
            return f"is the {name} at the top or the bottom?", answer
        if category == "relation":
            axis = "cx" if rng.random() < 0.5 else "cy"
            gap = self._px(self.relation_gap)
            pairs = [
                (a, b)
                for i, a in enumerate(objects)
                for b in objects[i + 1 :]
                if abs(a[axis] - b[axis]) >= gap
            ]
            if not pairs:
                return None
            a, b = pairs[int(rng.integers(len(pairs)))]
            first, second = (a, b) if a[axis] < b[axis] else (b, a)  # first: left / above
            if not want_yes:
                first, second = second, first
            word = "left of" if axis == "cx" else "above"
            question = (
                f"is the {first['color']} {first['shape']} {word} "
                f"the {second['color']} {second['shape']}?"
            )
            return question, "yes" if want_yes else "no"
        if category == "count":
            return "how many objects are there?", NUMBERS[len(objects)]
        if category == "exist":
            present = {(o["color"], o["shape"]) for o in objects}
            if want_yes:
                colour, kind = sorted(present)[int(rng.integers(len(present)))]
                return f"is there a {colour} {kind}?", "yes"
            absent = [c for c in COMBOS if c not in present]
            # half the "no" questions are hard: they share a colour or a shape with the scene
            near = [c for c in absent if any(c[0] == p[0] or c[1] == p[1] for p in present)]
            pool = near if near and rng.random() < 0.5 else absent
            colour, kind = pool[int(rng.integers(len(pool)))]
            return f"is there a {colour} {kind}?", "no"
        raise ValueError(f"unknown category {category!r}")

    def samples(self, limit: int | None, seed: int = 0) -> list[Sample]:
        """``limit`` samples (all when None) chosen by ``seed`` from the split, in index order."""
        indices = np.arange(self.size)
        if limit is not None and limit < self.size:
            indices = np.sort(np.random.default_rng(seed).choice(self.size, limit, replace=False))
        return [self.sample(int(i)) for i in indices]

    def score(self, prediction: str, sample: Sample) -> float:
        return exact_match(prediction, sample.answers)


def _near(a: list[int], b: list[int], margin: int) -> bool:
    """Whether boxes ``a`` and ``b`` (x0, y0, x1, y1; exclusive ends) come within ``margin``."""
    return (
        a[0] < b[2] + margin
        and b[0] < a[2] + margin
        and a[1] < b[3] + margin
        and b[1] < a[3] + margin
    )
