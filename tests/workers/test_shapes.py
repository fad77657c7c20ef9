"""The synthetic shapes benchmark: deterministic, answers consistent with the image content."""

import numpy as np

from prunelab.workers.benchmarks import build_benchmark
from prunelab.workers.benchmarks.shapes import NUMBERS, ShapesBenchmark, exact_match


def test_deterministic_and_split_disjoint():
    a, b = ShapesBenchmark(), ShapesBenchmark()
    sa, sb = a.samples(8, seed=3), b.samples(8, seed=3)
    assert [s.id for s in sa] == [s.id for s in sb]
    assert all(
        np.array_equal(x.image, y.image) and x.question == y.question
        for x, y in zip(sa, sb, strict=True)
    )
    train = ShapesBenchmark(split="train").sample(0)
    assert not np.array_equal(train.image, ShapesBenchmark().sample(0).image)
    assert ShapesBenchmark().samples(8, seed=4) != sa


def test_answers_follow_cells():
    bench = ShapesBenchmark()
    for index in range(40):
        s = bench.sample(index)
        cells = s.extra["cells"]
        if s.category == "count":
            colour = s.question.split()[2]
            assert s.answers == [NUMBERS[sum(1 for c in cells if c and c[0] == colour)]]
        elif s.category == "exist":
            _, _, _, colour, kind = s.question.rstrip("?").split()
            assert s.answers == ["yes" if (colour, kind) in cells else "no"]
        else:
            assert any(c and s.answers[0] in c for c in cells)
    assert {bench.sample(i).category for i in range(4)} == {"color", "shape", "count", "exist"}


def test_exact_match_normalises():
    assert exact_match("Red.", ["red"]) == 1.0
    assert exact_match("red circle", ["red"]) == 1.0
    assert exact_match("blue", ["red"]) == 0.0
    assert exact_match("", ["red"]) == 0.0


def test_build_benchmark_rejects_bad_config():
    import pytest

    with pytest.raises(ValueError, match="kind='nope'"):
        build_benchmark({"name": "x", "kind": "nope"})
    with pytest.raises(ValueError, match="shapes"):
        build_benchmark({"name": "shapes", "kind": "shapes", "colour": 3})
