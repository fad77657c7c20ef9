"""The synthetic scenes benchmark: deterministic, redundant images, answers follow the objects."""

from __future__ import annotations

import string
from collections import Counter

import numpy as np
import pytest

from prunelab.workers.benchmarks import build_benchmark
from prunelab.workers.benchmarks.scenes import (
    CATEGORIES,
    ScenesBenchmark,
    label_map,
    object_set,
    patch_labels,
    scenes_vocabulary,
)
from prunelab.workers.benchmarks.shapes import COLORS, NUMBERS, SHAPES, shapes_vocabulary


@pytest.fixture(scope="module")
def scene_samples():
    """The first 600 test samples (100 per category)."""
    bench = ScenesBenchmark()
    return [bench.sample(i) for i in range(600)]


def words(text: str) -> list[str]:
    return text.lower().translate(str.maketrans("", "", string.punctuation)).split()


def test_deterministic_and_split_disjoint():
    a, b = ScenesBenchmark(), ScenesBenchmark()
    for index in (0, 7, 123):
        x, y = a.sample(index), b.sample(index)
        assert np.array_equal(x.image, y.image)
        assert (x.question, x.answers, x.extra) == (y.question, y.answers, y.extra)
    images = {
        split: ScenesBenchmark(split=split).sample(0).image for split in ("train", "val", "test")
    }
    assert not np.array_equal(images["train"], images["val"])
    assert not np.array_equal(images["train"], images["test"])
    assert not np.array_equal(images["val"], images["test"])
    assert ScenesBenchmark(split="train").sample(0).id == "train-0"


def test_image_shape_and_dtype():
    for size in (96, 192):
        image = ScenesBenchmark(image_size=size).sample(3).image
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
    assert len(
        patch_labels(ScenesBenchmark(image_size=192).sample(0).extra["objects"], 192, 8)
    ) == (576)


def test_objects_are_valid(scene_samples):
    for s in scene_samples:
        objects = s.extra["objects"]
        assert 1 <= len(objects) <= 4 and s.extra["image_size"] == 96
        assert len({(o["color"], o["shape"]) for o in objects}) == len(objects)
        for o in objects:
            x0, y0, x1, y1 = o["bbox"]
            assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96
            assert (o["cx"], o["cy"]) == ((x0 + x1) / 2, (y0 + y1) / 2)
            assert abs(o["cx"] - 48) >= 8 and abs(o["cy"] - 48) >= 8
            assert (28 <= o["size"] <= 40) if o["large"] else (14 <= o["size"] <= 18)
        for i, a in enumerate(objects):  # no overlap: boxes apart by the margin on some axis
            for b in objects[i + 1 :]:
                ax0, ay0, ax1, ay1 = a["bbox"]
                bx0, by0, bx1, by1 = b["bbox"]
                assert bx0 >= ax1 + 4 or ax0 >= bx1 + 4 or by0 >= ay1 + 4 or ay0 >= by1 + 4
        # the background is dark, never an object colour; objects are drawn where they say
        drawn = label_map(objects, 96)
        assert s.image[drawn == 0].max() < 120
        for k, o in enumerate(objects):
            pixels = s.image[drawn == k + 1].astype(int)
            assert np.abs(pixels.mean(axis=0) - COLORS[o["color"]]).max() < 25


def test_answers_follow_objects(scene_samples):
    for s in scene_samples:
        objects = s.extra["objects"]
        present = {(o["color"], o["shape"]) for o in objects}
        q = words(s.question)
        [answer] = s.answers
        if s.category == "color":  # what color is the <shape>
            assert q[:4] == ["what", "color", "is", "the"]
            match = [o for o in objects if o["shape"] == q[4]]
            assert len(match) == 1 and answer == match[0]["color"]
        elif s.category == "shape":  # what shape is the <colour> object
            assert q[:4] == ["what", "shape", "is", "the"] and q[5] == "object"
            match = [o for o in objects if o["color"] == q[4]]
            assert len(match) == 1 and answer == match[0]["shape"]
        elif s.category == "position":  # is the <colour> <shape> on the left or the right
            [obj] = [o for o in objects if (o["color"], o["shape"]) == (q[2], q[3])]
            if q[4:] == ["on", "the", "left", "or", "the", "right"]:
                assert answer == ("left" if obj["cx"] < 48 else "right")
            else:
                assert q[4:] == ["at", "the", "top", "or", "the", "bottom"]
                assert answer == ("top" if obj["cy"] < 48 else "bottom")
        elif s.category == "relation":  # is the <c1> <s1> left of / above the <c2> <s2>
            assert q[:2] == ["is", "the"]
            (c1, s1), (c2, s2) = (q[2], q[3]), (q[-2], q[-1])
            [a] = [o for o in objects if (o["color"], o["shape"]) == (c1, s1)]
            [b] = [o for o in objects if (o["color"], o["shape"]) == (c2, s2)]
            axis = "cx" if q[4:6] == ["left", "of"] else "cy"
            assert axis == "cx" or q[4] == "above"
            assert abs(a[axis] - b[axis]) >= 12
            assert answer == ("yes" if a[axis] < b[axis] else "no")
        elif s.category == "count":
            assert q == ["how", "many", "objects", "are", "there"]
            assert answer == NUMBERS[len(objects)]
        else:
            assert s.category == "exist" and q[:3] == ["is", "there", "a"]
            assert answer == ("yes" if (q[3], q[4]) in present else "no")


def test_categories_cycle_and_yes_no_balance(scene_samples):
    counts = Counter(s.category for s in scene_samples)
    assert set(counts) == set(CATEGORIES) and set(counts.values()) == {100}
    assert [s.category for s in scene_samples[:6]] == list(CATEGORIES)
    yes_no = [s for s in scene_samples if s.answers[0] in ("yes", "no")]
    assert {s.category for s in yes_no} == {"relation", "exist"}
    for group in (yes_no, *([s for s in yes_no if s.category == c] for c in ("relation", "exist"))):
        ratio = sum(s.answers[0] == "yes" for s in group) / len(group)
        assert 0.4 <= ratio <= 0.6, ratio
    sides = Counter(s.answers[0] for s in scene_samples if s.category == "position")
    assert set(sides) == {"left", "right", "top", "bottom"}


def test_object_sizes_in_patches(scene_samples):
    large = small = 0
    for s in scene_samples:
        for o in s.extra["objects"]:
            cells = sum(label > 0 for label in patch_labels([o], 96, 8))
            if o["large"]:
                large += 1
                assert cells >= 9, o
            else:
                small += 1
                assert 1 <= cells <= 6, o
    assert 0.35 <= large / (large + small) <= 0.65


def test_images_are_mostly_background(scene_samples):
    pure, labelled = [], []
    for s in scene_samples:
        objects = s.extra["objects"]
        labels = np.array(patch_labels(objects, 96, 8))
        assert labels.shape == (144,)
        assert set(np.unique(labels)) - {0} == {
            1 + list(COLORS).index(o["color"]) * len(SHAPES) + SHAPES.index(o["shape"])
            for o in objects
        }
        labelled.append(np.mean(labels == 0))
        # pure background: no object pixel in the patch (the drawn colour never goes below 120
        # in its brightest channel; the background never above it)
        bright = s.image.reshape(12, 8, 12, 8, 3).max(axis=(1, 3, 4)) >= 120
        pure.append(1 - bright.mean())
    assert np.mean(pure) >= 0.6 and np.mean(labelled) >= np.mean(pure)


def test_patch_labels_and_object_set():
    objects = [
        {"color": "red", "shape": "square", "bbox": [0, 0, 16, 16]},
        {"color": "purple", "shape": "cross", "bbox": [60, 60, 96, 96]},
    ]
    labels = np.array(patch_labels(objects, 96, 8)).reshape(12, 12)
    red_square = 1 + 0 * len(SHAPES) + 1
    purple_cross = 1 + 4 * len(SHAPES) + 3
    assert (labels[:2, :2] == red_square).all() and labels[2, 2] == 0 and labels[0, 5] == 0
    assert labels[9, 9] == purple_cross and labels[8, 8] == 0  # the cross leaves its corners
    assert set(np.unique(labels)) == {0, red_square, purple_cross}
    hot = object_set(objects)
    assert len(hot) == 20 and sum(hot) == 2 and hot[red_square - 1] == hot[purple_cross - 1] == 1
    assert len(patch_labels(objects, 96, 16)) == 36


def test_vocabulary_covers_questions_and_answers(scene_samples):
    vocabulary = set(scenes_vocabulary())
    assert set(shapes_vocabulary()) <= vocabulary
    used = {w for s in scene_samples[:500] for w in words(s.question) + words(s.answers[0])}
    assert used <= vocabulary, used - vocabulary


def test_build_benchmark_samples_and_score():
    bench = build_benchmark({"name": "scenes", "kind": "scenes"})
    assert isinstance(bench, ScenesBenchmark) and bench.describe()["version"] == 2
    assert bench.describe()["image_size"] == 96 and bench.max_new_tokens == 4
    first, again = bench.samples(limit=10, seed=0), bench.samples(limit=10, seed=0)
    assert [s.id for s in first] == [s.id for s in again] and len(first) == 10
    assert all(np.array_equal(x.image, y.image) for x, y in zip(first, again, strict=True))
    assert [s.id for s in bench.samples(limit=10, seed=1)] != [s.id for s in first]
    ids = [int(s.id.split("-")[1]) for s in first]
    assert ids == sorted(ids)
    s = first[0]
    assert bench.score(f"{s.answers[0].capitalize()}.", s) == 1.0
    assert bench.score(f"{s.answers[0]} because", s) == 1.0
    assert bench.score("maybe", s) == 0.0
    assert build_benchmark({"name": "s", "kind": "scenes", "image_size": 192}).describe() != (
        bench.describe()
    )
    with pytest.raises(ValueError, match="scenes"):
        build_benchmark({"name": "scenes", "kind": "scenes", "colour": 3})
    with pytest.raises(ValueError, match="max_objects"):
        build_benchmark({"name": "scenes", "kind": "scenes", "max_objects": 12})
