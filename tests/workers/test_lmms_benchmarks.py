"""lmms-eval-layout parquet benchmarks: reading, sampling, prompts, checks, scoring rules,
aggregates, generation settings and offline scoring (hand-written cases; the generated
comparison with lmms-eval's own code is test_lmms_conformance.py)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf
from PIL import Image

from prunelab.sweeps import SWEEPS_DIR
from prunelab.workers.benchmarks import build_benchmark
from prunelab.workers.benchmarks.base import cut_at_stops
from prunelab.workers.benchmarks.lmms import (
    MC_PROMPT,
    MMBENCH_CN_PROMPT,
    MMSTAR_PROMPT,
    SEED_PROMPT,
    VQA_PROMPT,
    DatasetError,
    decode_image,
    metric_key,
    resolve_files,
)
from prunelab.workers.benchmarks.offline import RowError, score_rows
from prunelab.workers.benchmarks.shapes import ShapesBenchmark


def png(colour: tuple[int, int, int], size: tuple[int, int] = (6, 4), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", size, colour)
    (image.convert(mode) if mode != "RGB" else image).save(buffer, format="PNG")
    return buffer.getvalue()


def write(path: Path, rows: list[dict], raw_image: bool = False, row_group_size: int = 2) -> Path:
    """A parquet file of ``rows``; ``image`` as lmms-eval's {bytes, path} struct unless raw."""
    rows = [dict(r) for r in rows]
    for i, row in enumerate(rows):
        if "image" in row and not raw_image:
            row["image"] = {"bytes": row["image"], "path": f"{i}.png"}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def bench(kind: str, path: Path, **options):
    return build_benchmark({"name": kind, "kind": kind, "path": str(path), **options})


def scores(benchmark, samples, predictions) -> list[float]:
    """Per-sample scores of ``predictions`` cut at the benchmark's stop strings, as the runner
    scores generated text."""
    return [
        benchmark.score(cut_at_stops(p, benchmark.until), s)
        for s, p in zip(samples, predictions, strict=True)
    ]


def results(benchmark, samples, predictions) -> list[tuple]:
    return list(zip(samples, predictions, scores(benchmark, samples, predictions), strict=True))


def colour(i: int) -> tuple[int, int, int]:
    return (10 * i, 255 - 10 * i, 7)


# -- files and images --------------------------------------------------------------------------


def test_resolve_files_layouts(tmp_path: Path) -> None:
    single = write(tmp_path / "one.parquet", [{"q": "x"}])
    assert resolve_files(single, "test") == [single]
    shards = [
        write(tmp_path / "hub" / f"test-0000{i}-of-00002.parquet", [{"q": "x"}]) for i in (0, 1)
    ]
    write(tmp_path / "hub" / "validation-00000-of-00001.parquet", [{"q": "y"}])
    assert resolve_files(tmp_path / "hub", "test") == shards
    nested = write(tmp_path / "nested" / "data" / "val-00000-of-00001.parquet", [{"q": "x"}])
    assert resolve_files(tmp_path / "nested", "val") == [nested]
    with pytest.raises(DatasetError, match="no parquet file of split 'dev'"):
        resolve_files(tmp_path / "hub", "dev")
    with pytest.raises(DatasetError, match="no such file"):
        resolve_files(tmp_path / "absent", "test")


def test_decode_image_struct_raw_and_grey() -> None:
    rgb = decode_image({"bytes": png((200, 10, 30)), "path": None})
    assert rgb.shape == (4, 6, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == (200, 10, 30)
    assert tuple(decode_image(png((1, 2, 3)))[3, 5]) == (1, 2, 3)
    grey = decode_image(png((90, 90, 90), mode="L"))
    assert grey.shape == (4, 6, 3) and tuple(grey[1, 1]) == (90, 90, 90)
    with pytest.raises(DatasetError, match="no encoded bytes"):
        decode_image({"bytes": None, "path": "x.png"})


def test_samples_hold_their_images_encoded_until_used(tmp_path: Path) -> None:
    """A listed sample keeps its image's encoded bytes (a trial's samples hold compressed
    images, not pixels) and decodes them when used; a cell that is no image fails the listing,
    pixel data that fails to decode fails where it is used, each naming the path and row."""
    import io

    from PIL import Image

    from prunelab.workers.benchmarks.lmms import EncodedImage

    rows = pope_rows(3)
    big = io.BytesIO()
    Image.new("RGB", (300, 200), (7, 8, 9)).save(big, format="PNG")
    rows[1]["image"] = big.getvalue()
    data = write(tmp_path / "POPE" / "test-00000-of-00001.parquet", rows, raw_image=True)
    samples = bench("pope", data.parent).samples(None, 0)
    image = samples[1].image
    assert isinstance(image, EncodedImage) and image.shape == (200, 300, 3)
    assert len(image.data) < 300 * 200 * 3 // 10  # compressed, not pixels
    pixels = np.asarray(image)
    assert pixels.shape == (200, 300, 3) and pixels.dtype == np.uint8
    assert np.array_equal(pixels, decode_image(rows[1]["image"]))
    assert np.asarray(image, dtype=np.float32).dtype == np.float32

    garbage = pope_rows(2)
    garbage[1]["image"] = b"not an image at all"
    path = write(tmp_path / "bad" / "test-00000-of-00001.parquet", garbage, raw_image=True)
    with pytest.raises(DatasetError, match=r"row 1: the image cell does not decode"):
        bench("pope", path.parent).samples(None, 0)
    truncated = EncodedImage.from_cell(big.getvalue()[:200], "somewhere.parquet: row 5")
    assert truncated.shape == (200, 300, 3)  # the header reads
    with pytest.raises(DatasetError, match=r"somewhere.parquet: row 5: the image does not"):
        np.asarray(truncated)


def test_metric_key_is_mlflow_safe() -> None:
    assert metric_key("science & technology") == "score.science _ technology"
    assert metric_key("Doc-oriented VQA") == "score.Doc-oriented VQA"


# -- sampling ----------------------------------------------------------------------------------


def pope_rows(n: int) -> list[dict]:
    categories = ("adversarial", "popular", "random")
    return [
        {
            "question_id": str(i),
            "question": f"Is there a thing {i} in the image?",
            "answer": "yes" if i % 2 == 0 else "no",
            "category": categories[i % 3],
            "image": png(colour(i)),
        }
        for i in range(n)
    ]


def test_limit_and_seeded_sampling(tmp_path: Path) -> None:
    data = write(tmp_path / "POPE" / "test-00000-of-00001.parquet", pope_rows(10), raw_image=True)
    pope = bench("pope", data.parent)
    everything = pope.samples(None, 0)
    assert [s.id for s in everything] == [str(i) for i in range(10)]
    first, again, other = pope.samples(4, 0), pope.samples(4, 0), pope.samples(4, 1)
    ids = [int(s.id) for s in first]
    assert len(ids) == 4 and ids == sorted(ids)
    assert ids == [int(s.id) for s in again]
    assert ids != [int(s.id) for s in other]
    assert ids == sorted(np.random.default_rng(0).choice(10, 4, replace=False).tolist())
    for sample in first:  # the image of each row (row groups read selectively) is its own
        i = int(sample.id)
        assert tuple(np.asarray(sample.image)[0, 0]) == colour(i)
        assert sample.question == f"Is there a thing {i} in the image?{VQA_PROMPT}"
        assert sample.category == ("adversarial", "popular", "random")[i % 3]
    assert len(pope.samples(50, 0)) == 10


def test_shards_are_read_in_order(tmp_path: Path) -> None:
    rows = pope_rows(6)
    write(tmp_path / "POPE" / "test-00000-of-00002.parquet", rows[:4])
    write(tmp_path / "POPE" / "test-00001-of-00002.parquet", rows[4:])
    samples = bench("pope", tmp_path / "POPE").samples(None, 0)
    assert [tuple(np.asarray(s.image)[0, 0]) for s in samples] == [colour(i) for i in range(6)]


# -- checks and identity -----------------------------------------------------------------------


def test_check_reports_missing_unreadable_and_incomplete_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="absent"):
        bench("pope", tmp_path / "absent").check()
    garbage = tmp_path / "garbage" / "test.parquet"
    garbage.parent.mkdir()
    garbage.write_bytes(b"not a parquet file at all")
    with pytest.raises(DatasetError, match=r"garbage/test\.parquet: not a readable parquet"):
        bench("pope", garbage.parent).check()
    rows = [{k: v for k, v in r.items() if k != "answer"} for r in pope_rows(2)]
    incomplete = write(tmp_path / "incomplete" / "test.parquet", rows)
    with pytest.raises(DatasetError, match=r"incomplete/test\.parquet: missing column\(s\) answer"):
        bench("pope", incomplete.parent).check()
    no_image = write(tmp_path / "noimage.parquet", [{"question": "q", "answer": "yes"}])
    with pytest.raises(DatasetError, match=r"missing column.*image"):
        bench("pope", no_image).check()
    with pytest.raises(ValueError, match="path"):
        build_benchmark({"name": "pope", "kind": "pope"})


def test_describe_follows_content_not_location(tmp_path: Path) -> None:
    data = write(tmp_path / "a" / "test.parquet", pope_rows(3))
    copy = tmp_path / "b" / "test.parquet"
    copy.parent.mkdir()
    shutil.copy(data, copy)
    described = bench("pope", data.parent).describe()
    assert described["files"][0]["file"] == "test.parquet"
    assert described == bench("pope", copy.parent).describe()
    write(copy, pope_rows(4))
    assert described != bench("pope", copy.parent).describe()
    assert bench("pope", tmp_path / "absent").describe()["files"] == "missing"
    assert described != bench("pope", data.parent, prompt="").describe()
    # the generation settings are part of the identity; the scoring rule is the trial's
    # (eval.scoring, hashed into its key), so both rules describe the data alike
    assert (described["max_new_tokens"], described["until"]) == (128, ["\n\n"])
    assert described == bench("pope", data.parent, scoring="official").describe()


def test_scoring_is_a_config_key_of_every_benchmark(tmp_path: Path) -> None:
    for kind in ("pope", "mmbench", "textvqa"):
        assert bench(kind, tmp_path, scoring="official").scoring == "official"
        assert bench(kind, tmp_path).scoring == "lmms_eval"
        with pytest.raises(ValueError, match=r"scoring='lenient'"):
            bench(kind, tmp_path, scoring="lenient")
    shapes = build_benchmark({"name": "shapes", "kind": "shapes", "scoring": "official"})
    assert shapes.scoring == "official"
    with pytest.raises(ValueError, match=r"scoring='lenient'"):
        build_benchmark({"name": "shapes", "kind": "shapes", "scoring": "lenient"})
    with pytest.raises(ValueError, match=r"scoring=None"):
        ShapesBenchmark(scoring=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_new_tokens"):  # the task's, not configurable
        bench("pope", tmp_path, max_new_tokens=8)


def test_shapes_generation_settings_and_unchanged_identity() -> None:
    shapes = ShapesBenchmark()
    assert (shapes.max_new_tokens, shapes.until) == (4, ())
    assert (ShapesBenchmark.max_new_tokens, ShapesBenchmark.until) == (4, ())
    expected = {"name": "shapes", "split": "test", "grid": 3, "cell_px": 16,
                "empty_prob": 0.35, "size": 1000, "version": 1}  # fmt: skip
    assert shapes.describe() == expected == ShapesBenchmark(scoring="official").describe()


# lmms-eval 0.7.3 generation_kwargs: max_new_tokens (1024, the llava model's default, when the
# task gives none) and until (["\n\n"], TaskConfig's fewshot_delimiter, when it gives none)
GENERATION = {
    "vqav2": (16, ("\n\n",)), "textvqa": (1024, ("ASSISTANT:",)),
    "vizwiz": (1024, ("ASSISTANT:",)), "gqa": (16, ("\n\n",)), "mme": (16, ("\n\n",)),
    "pope": (128, ("\n\n",)), "scienceqa_img": (16, ("\n\n",)), "ai2d": (16, ("\n\n",)),
    "seedbench2_plus": (16, ("ASSISTANT:",)), "realworldqa": (16, ("\n\n",)),
    "mmbench": (1024, ("ASSISTANT:",)), "mmstar": (1024, ("\n\n",)),
    "chartqa": (16, ("\n\n",)), "ocrbench": (128, ("\n\n",)),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(GENERATION))
def test_generation_settings(kind: str, tmp_path: Path) -> None:
    benchmark = bench(kind, tmp_path)
    assert (benchmark.max_new_tokens, benchmark.until) == GENERATION[kind]
    assert (type(benchmark).max_new_tokens, type(benchmark).until) == GENERATION[kind]
    cn = bench("mmbench", tmp_path, language="cn")
    assert (cn.max_new_tokens, cn.until, cn.prompt) == (256, ("\n\n",), MMBENCH_CN_PROMPT)


def test_cut_at_stops() -> None:
    assert cut_at_stops("yes\n\nASSISTANT: no", ("ASSISTANT:",)) == "yes\n\n"
    assert cut_at_stops("yes\n\nASSISTANT: no", ("\n\n", "ASSISTANT:")) == "yes"
    assert cut_at_stops("yes", ("", "\n\n")) == "yes"


# -- open-ended VQA ----------------------------------------------------------------------------


def test_textvqa(tmp_path: Path) -> None:
    rows = [
        {"question": "what brand is this?", "answers": ["Nokia"] * 10, "image": png(colour(0))},
        {"question": "what number?", "answers": ["two"] * 3 + ["3"] * 7, "image": png(colour(1))},
    ]
    textvqa = bench("textvqa", write(tmp_path / "textvqa" / "validation.parquet", rows).parent)
    textvqa.check()
    first, second = textvqa.samples(None, 0)
    assert first.question == "What brand is this?" + VQA_PROMPT  # capitalised, like lmms-eval
    assert textvqa.score("nokia", first) == 1.0  # human answers normalised too
    assert textvqa.score("2", second) == pytest.approx(0.9)
    assert textvqa.aggregate([(first, "nokia", 1.0), (second, "2", 0.9)]) == {"score": 95.0}
    # the EvalAI processor on both sides: "man's" -> "man 's" on each, so it scores
    possessive = textvqa.sample_from_row({"question": "whose?", "answers": ["man's"] * 10}, "p")
    assert textvqa.score("man's", possessive) == 1.0
    assert textvqa.score("<think>a dog</think> Man's.", possessive) == 1.0  # lmms-eval's strip
    assert textvqa.score("Man's\n\nASSISTANT: no", possessive) == 0.0  # the runner cuts first


def test_vqav2_answer_records_and_categories(tmp_path: Path) -> None:
    answers = [{"answer": "Red", "answer_confidence": "yes", "answer_id": i} for i in range(10)]
    rows = [
        {
            "question": "What colour?",
            "answers": answers,
            "answer_type": "other",
            "image": png(colour(0)),
        }
    ]
    vqav2 = bench("vqav2", write(tmp_path / "VQAv2" / "validation.parquet", rows).parent)
    (sample,) = vqav2.samples(None, 0)
    assert sample.answers == ["Red"] * 10 and sample.category == "other"
    # lmms-eval (vqav2_process_results): punctuation and digit/article rules on both sides
    assert vqav2.score("red", sample) == 1.0 and vqav2.score("Red.", sample) == 1.0
    # official (vqaEval.py): identical answers stay raw, the prediction is lower-cased
    official = bench("vqav2", tmp_path / "VQAv2", scoring="official")
    assert official.score("red", sample) == 0.0 and official.score("Red", sample) == 0.0

    def records(words: list[str]) -> dict:
        return {"question": "q", "answers": [{"answer": w, "answer_id": i} for i, w in
                                             enumerate(words)]}  # fmt: skip

    possessive = vqav2.sample_from_row(records(["man's"] * 10), "p")
    assert vqav2.score("man's", possessive) == 1.0  # no "'s" split, no comma dropping here
    assert vqav2.score("man's", vqav2.sample_from_row(records(["mans"] * 10), "q")) == 0.0
    assert vqav2.score("yes" + "." * 40, vqav2.sample_from_row(records(["yes"] * 10), "y")) == 0.0
    assert vqav2.score("yes" + "." * 32, vqav2.sample_from_row(records(["yes"] * 10), "y")) == 1.0
    # humans are told apart by their whole record: equal records leave out together
    same = vqav2.sample_from_row({"question": "q", "answers": [{"answer": "red"}] * 10}, "s")
    assert vqav2.score("red", same) == 0.0


def test_vizwiz(tmp_path: Path) -> None:
    rows = [
        {
            "question": "what is this?",
            "answers": ["unanswerable"] * 6 + ["soup"] * 4,
            "category": "unanswerable",
            "image": png(colour(0)),
        }
    ]
    vizwiz = bench("vizwiz", write(tmp_path / "VizWiz-VQA" / "val.parquet", rows).parent)
    (sample,) = vizwiz.samples(None, 0)
    assert sample.question.startswith("What is this?\nWhen the provided information")
    assert vizwiz.score("Unanswerable", sample) == 1.0
    # leaving out a "soup": 3 others -> 1 (4 times); leaving out another: 4 -> 1 (6 times)
    assert vizwiz.score("soup", sample) == 1.0
    assert vizwiz.score("bread", sample) == 0.0


def test_gqa_joins_images_by_id(tmp_path: Path) -> None:
    questions = [
        {"id": "q1", "imageId": "n2", "question": "Is it red?", "answer": "no"},
        {"id": "q2", "imageId": "n1", "question": "Which side?", "answer": "left"},
    ]
    images = [{"id": "n1", "image": png(colour(1))}, {"id": "n2", "image": png(colour(2))}]
    root = tmp_path / "GQA"
    write(root / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet", questions)
    write(root / "testdev_balanced_images" / "testdev-00000-of-00001.parquet", images)
    gqa = bench("gqa", root / "testdev_balanced_instructions")  # images: the sibling dir
    gqa.check()
    first, second = gqa.samples(None, 0)
    assert tuple(np.asarray(first.image)[0, 0]) == colour(2)
    assert tuple(np.asarray(second.image)[0, 0]) == colour(1)
    assert gqa.score("Left.", second) == 1.0 and gqa.score("the left", second) == 0.0
    assert gqa.score(" left ", second) == 1.0  # lmms-eval strips the response
    assert gqa.score("left .", second) == 0.0  # ... but keeps inner spaces (HF exact match)
    table = gqa.sample_from_row(
        {"imageId": "n1", "question": "What?", "answer": "coffee table"}, "t"
    )
    assert gqa.score("Coffee table!", table) == 1.0 and gqa.score("coffee  table", table) == 0.0
    assert "image_files" in gqa.describe()
    shutil.rmtree(root / "testdev_balanced_images")
    with pytest.raises(DatasetError, match="testdev_balanced_images"):
        gqa.check()


# -- yes / no ----------------------------------------------------------------------------------


def mme_rows() -> list[dict]:
    rows = []
    for image, category in (
        ("a.jpg", "existence"),
        ("b.jpg", "existence"),
        ("c.png", "code_reasoning"),
    ):
        for answer in ("Yes", "No"):
            rows.append(
                {
                    "question_id": f"{category}/{image}",
                    "question": f"Is there {answer}? Please answer yes or no.",
                    "answer": answer,
                    "category": category,
                    "image": png(colour(len(rows))),
                }
            )
    return rows


def test_mme_prompt_sampling_and_totals(tmp_path: Path) -> None:
    mme = bench("mme", write(tmp_path / "MME" / "test.parquet", mme_rows()).parent)
    samples = mme.samples(None, 0)
    assert samples[0].question == "Is there Yes?" + VQA_PROMPT  # MME's own instruction swapped
    assert (
        bench("mme", tmp_path / "MME", prompt="")
        .samples(None, 0)[0]
        .question.endswith("Please answer yes or no.")
    )
    for seed in range(5):  # the two questions of an image stay together
        chosen = mme.samples(4, seed)
        assert len(chosen) == 4
        pairs = {s.extra["image_id"] for s in chosen}
        assert len(pairs) == 2 and {s.unit for s in chosen} == pairs
    predictions = ["Yes", "No", "Yes", "Yes", "no", "yes"]
    results = [(s, p, mme.score(p, s)) for s, p in zip(samples, predictions, strict=True)]
    # lmms-eval's parse_pred_ans reads a lone "N" and strips periods; MME's calculation.py not
    official = bench("mme", tmp_path / "MME", scoring="official")
    no = samples[1]
    assert (mme.score("N", no), official.score("N", no)) == (1.0, 0.0)
    assert (mme.score("n.o", no), official.score("n.o", no)) == (1.0, 0.0)
    assert (mme.score("No, it is not", no), official.score("No, it is not", no)) == (1.0, 1.0)
    # existence: a.jpg both right (200), b.jpg one right (50) -> 125; code_reasoning: c.png
    # both wrong -> 0
    metrics = mme.aggregate(results)
    assert metrics["score"] == pytest.approx(125.0) == metrics["mme_perception"]
    assert metrics["mme_cognition"] == 0.0
    assert metrics["score.existence"] == pytest.approx(125.0)
    assert metrics["score.code_reasoning"] == 0.0
    assert metrics["mme_acc"] == pytest.approx(100 * 3 / 6)
    assert metrics["mme_acc_plus"] == pytest.approx(100 / 3)


def test_pope_aggregate(tmp_path: Path) -> None:
    pope = bench("pope", write(tmp_path / "pope.parquet", pope_rows(6)))
    samples = pope.samples(None, 0)  # answers yes,no,yes,no,yes,no; categories a,p,r,a,p,r
    predictions = ["Yes", "Yes", "No", "No, not", "yes.", "no"]
    # lmms-eval: only an exact yes / no (case and spaces aside) counts
    lmms = results(pope, samples, predictions)
    assert [r[2] for r in lmms] == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    metrics = pope.aggregate(lmms)  # tp 1, fp 1, fn 1 ("No, not" and "yes." are in no cell)
    assert metrics["pope_accuracy"] == pytest.approx(100 * 2 / 6)
    assert metrics["pope_precision"] == metrics["pope_recall"] == pytest.approx(50.0)
    assert metrics["score"] == metrics["pope_f1"] == pytest.approx(50.0)
    assert metrics["pope_yes_ratio"] == pytest.approx(50.0)  # of the answers: 3 of 6 are yes
    # official: POPE's evaluate.py reads the first sentence for no / not
    pope = bench("pope", tmp_path / "pope.parquet", scoring="official")
    results_ = results(pope, samples, predictions)
    assert [r[2] for r in results_] == [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    metrics = pope.aggregate(results_)  # tp 2, fp 1, tn 2, fn 1
    assert metrics["pope_accuracy"] == pytest.approx(100 * 4 / 6)
    assert metrics["pope_precision"] == pytest.approx(200 / 3)
    assert metrics["pope_recall"] == pytest.approx(200 / 3)
    assert metrics["score"] == metrics["pope_f1"] == pytest.approx(200 / 3)
    assert metrics["pope_yes_ratio"] == pytest.approx(50.0)  # of the predictions: 3 of 6
    # adversarial: (yes,yes), (no,no) -> F1 100; popular: (yes,no), (yes,yes) -> P 1/2 R 1
    assert metrics["score.adversarial"] == pytest.approx(100.0)
    assert metrics["score.popular"] == pytest.approx(200 / 3)
    assert metrics["score.random"] == 0.0  # (no,yes), (no,no): no true positive


# -- multiple choice ---------------------------------------------------------------------------


def test_mmbench_prompt_and_circular_eval(tmp_path: Path) -> None:
    nan = None  # a missing option or hint (lmms-eval files also hold the text "nan")
    rows = [
        {"index": 7, "question": "Which animal?", "hint": "A farm.", "answer": "B", "A": "cat",
         "B": "dog", "C": "cow", "D": nan, "category": "recognition", "image": png(colour(0))},
        {"index": 1_000_007, "question": "Which animal?", "hint": "nan", "answer": "A",
         "A": "dog", "B": "cow", "C": "cat", "D": nan, "category": "recognition",
         "image": png(colour(1))},
        {"index": 8, "question": "How many?", "hint": nan, "answer": "A", "A": "1", "B": "2",
         "C": nan, "D": nan, "category": "counting", "image": png(colour(2))},
    ]  # fmt: skip
    mmbench = bench("mmbench", write(tmp_path / "MMBench" / "en" / "dev.parquet", rows).parent)
    mmbench.check()
    samples = mmbench.samples(None, 0)
    # mmbench_doc_to_text: "{hint} {question} There are several options:\nA. ...\n{post}"
    options = "There are several options:\nA. cat\nB. dog\nC. cow"
    assert samples[0].question == f"A farm. Which animal? {options}\n{MC_PROMPT}"
    assert samples[1].question.startswith("Which animal? There are")  # a "nan" hint: none
    assert samples[2].extra["choices"] == {"A": "1", "B": "2"}
    assert [s.unit for s in samples] == ["7", "7", "8"]
    predictions = ["B", "C", "A."]  # variant 2 of question 7 wrong
    results = [(s, p, mmbench.score(p, s)) for s, p in zip(samples, predictions, strict=True)]
    assert [r[2] for r in results] == [1.0, 0.0, 1.0]
    assert mmbench.score("The answer is (B) dog", samples[0]) == 1.0
    assert mmbench.score("A cat, I think", samples[0]) == 0.0  # "A" read as the letter
    metrics = mmbench.aggregate(results)
    assert metrics["score"] == pytest.approx(50.0)  # question 7 fails circularly, 8 passes
    assert metrics["mmbench_vanilla"] == pytest.approx(200 / 3)
    assert metrics["score.recognition"] == 0.0 and metrics["score.counting"] == 100.0
    assert all(len({s.extra["group"] for s in mmbench.samples(2, seed)}) == 1 for seed in range(4))
    # a question is counted through its main row (index < 1e6), as CircularEval does
    assert mmbench.aggregate(results[1:])["score"] == 100.0  # question 7 without its main row
    bad = write(tmp_path / "bad.parquet", [{**rows[2], "answer": "C"}])
    with pytest.raises(DatasetError, match=r"row 0: column 'answer': 'C' is not one of the opt"):
        bench("mmbench", bad).samples(None, 0)


def test_mmbench_cn_config_reads_the_cn_dev_files(tmp_path: Path, monkeypatch) -> None:
    """The shipped MMBench-CN config: lmms-eval's mmbench_cn_dev (lmms-lab/MMBench, config cn,
    split dev) read from $PRUNELAB_DATA/MMBench/cn in MMBench's layout, with CircularEval, and
    lmms-eval's Chinese post-prompt; the rest as the MMBench-EN config."""
    monkeypatch.setenv("PRUNELAB_DATA", str(tmp_path))

    def shipped(name: str) -> dict:
        loaded = OmegaConf.load(SWEEPS_DIR / "benchmark" / f"{name}.yaml")
        config = OmegaConf.to_container(loaded, resolve=True)
        assert isinstance(config, dict)
        return config

    cn, en = shipped("mmbench_cn"), shipped("mmbench")
    assert cn["name"] == "mmbench_cn" and cn["path"] == f"{tmp_path}/MMBench/cn"
    assert en["path"] == f"{tmp_path}/MMBench/en"
    prompt = "\n请直接使用所提供的选项字母作为答案回答。"  # lmms-eval's post_prompt for cn
    assert cn["language"] == "cn" and "language" not in en
    different = ("name", "path", "language")
    assert {k: v for k, v in cn.items() if k not in different} == {
        k: v for k, v in en.items() if k not in different
    }  # kind mmbench, split dev
    animal, other = "attribute_recognition", "object_localization"  # English, as in en
    rows = [
        {"index": 3, "question": "图中是哪种动物？", "hint": "一个农场。", "answer": "B",
         "A": "猫", "B": "狗", "C": "牛", "D": None, "category": animal, "image": png(colour(0))},
        {"index": 1_000_003, "question": "图中是哪种动物？", "hint": "一个农场。", "answer": "C",
         "A": "牛", "B": "猫", "C": "狗", "D": None, "category": animal, "image": png(colour(1))},
        {"index": 4, "question": "有几个？", "hint": None, "answer": "A", "A": "1", "B": "2",
         "C": None, "D": None, "category": other, "image": png(colour(2))},
    ]  # fmt: skip
    write(tmp_path / "MMBench" / "cn" / "dev-00000-of-00001.parquet", rows)
    write(tmp_path / "MMBench" / "en" / "dev-00000-of-00001.parquet", rows[:1])  # not read
    mmbench_cn = build_benchmark(cn)
    mmbench_cn.check()
    described = mmbench_cn.describe()
    assert (described["kind"], described["split"]) == ("mmbench", "dev")
    assert (described["language"], described["prompt"], described["max_new_tokens"]) == (
        "cn",
        prompt,
        256,
    )
    assert [f["file"] for f in described["files"]] == ["dev-00000-of-00001.parquet"]
    samples = mmbench_cn.samples(None, 0)
    assert len(samples) == 3
    options = "There are several options:\nA. 猫\nB. 狗\nC. 牛"
    assert samples[0].question == f"一个农场。 图中是哪种动物？ {options}\n{prompt}"
    assert samples[2].question == f"有几个？ There are several options:\nA. 1\nB. 2\n{prompt}"
    assert samples[0].category == animal
    assert tuple(np.asarray(samples[1].image)[0, 0]) == colour(1)
    predictions = ["B", "C", "B"]  # question 3 right in both orders, question 4 wrong
    results = [(s, p, mmbench_cn.score(p, s)) for s, p in zip(samples, predictions, strict=True)]
    assert [r[2] for r in results] == [1.0, 1.0, 0.0]
    metrics = mmbench_cn.aggregate(results)
    assert metrics["score"] == pytest.approx(50.0)  # circular: 3 passes, 4 fails
    assert metrics["mmbench_vanilla"] == pytest.approx(200 / 3)
    assert metrics[f"score.{animal}"] == 100.0 and metrics[f"score.{other}"] == 0.0


def test_mmstar_macro_average_over_fine_categories(tmp_path: Path) -> None:
    def row(i: int, l2: str, category: str) -> dict:
        question = f"Q{i}?\nOptions: A: red, B: blue, C: green, D: white"
        return {"index": i, "question": question, "answer": "A", "category": category,
                "l2_category": l2, "image": png(colour(i))}  # fmt: skip

    rows = [row(0, "counting", "math"), row(1, "counting", "math"), row(2, "geometry", "math"),
            row(3, "emotion", "coarse perception")]  # fmt: skip
    mmstar = bench("mmstar", write(tmp_path / "MMStar" / "val.parquet", rows).parent)
    samples = mmstar.samples(None, 0)
    assert samples[0].question.endswith("D: white" + MMSTAR_PROMPT)
    assert MMSTAR_PROMPT.endswith("directly")  # lmms-eval's, without a final period
    predictions = ["A", "B. blue", "red", "(A)"]  # extract_mcq_answer reads no option text
    results = [(s, p, mmstar.score(p, s)) for s, p in zip(samples, predictions, strict=True)]
    assert [r[2] for r in results] == [1.0, 0.0, 0.0, 1.0]
    metrics = mmstar.aggregate(results)
    # fine categories: counting 0.5, geometry 0, emotion 1 -> mean 1/2
    assert metrics["score"] == pytest.approx(50.0)
    assert metrics["score.math"] == pytest.approx(25.0)  # mean(0.5, 0)
    assert metrics["score.coarse perception"] == pytest.approx(100.0)
    # official: MMStar_eval's first-character rule, accuracy over questions
    official = bench("mmstar", tmp_path / "MMStar", scoring="official")
    assert scores(official, samples, ["A", "b", "Answer: A", "(a) red"]) == [1.0, 0.0, 1.0, 1.0]
    metrics = official.aggregate(results)
    assert metrics["score"] == pytest.approx(50.0) and metrics["score.math"] == pytest.approx(
        100 / 3
    )
    phrase = "The answer is A. Because the car is red."  # B of "Because" wins in lmms-eval
    assert (mmstar.score(phrase, samples[0]), official.score(phrase, samples[0])) == (0.0, 1.0)


def test_scienceqa_ai2d_seedbench(tmp_path: Path) -> None:
    sqa_rows = [
        {
            "question": "Which is a mammal?",
            "choices": ["frog", "whale"],
            "answer": 1,
            "hint": "Look closely.",
            "subject": "natural science",
            "image": png(colour(0)),
        }
    ]
    sqa = bench("scienceqa_img", write(tmp_path / "sqa.parquet", sqa_rows))
    (sample,) = sqa.samples(None, 0)
    assert (
        sample.question
        == "Context: Look closely.\nWhich is a mammal?\nA. frog\nB. whale" + MC_PROMPT
    )
    assert sample.answers == ["B"] and sample.category == "natural science"
    # sqa_process_results: the letter (any case) or "B." and more; nothing else
    assert scores(sqa, [sample] * 5, ["B", "b", "B. whale", "b.", "A"]) == [1, 1, 1, 0, 0]
    assert scores(sqa, [sample] * 4, ["(B)", "The answer is B", "B) whale", "whale"]) == [0] * 4
    no_hint = sqa.sample_from_row({**sqa_rows[0], "hint": ""}, "h")
    assert no_hint.question == "Which is a mammal?\nA. frog\nB. whale" + MC_PROMPT

    ai2d_rows = [
        {
            "question": "What eats grass?",
            "options": ["sun", "cow", "hawk"],
            "answer": "1",
            "image": png(colour(1)),
        }
    ]
    ai2d = bench("ai2d", write(tmp_path / "ai2d.parquet", ai2d_rows))
    (sample,) = ai2d.samples(None, 0)
    assert sample.answers == ["B"] and "C. hawk" in sample.question
    # flexible-extract ("B." -> "B"), then exact match ignoring case and punctuation
    assert scores(ai2d, [sample] * 5, ["B", "(B)", "b.", " B. cow", "B.\n\nC."]) == [1] * 5
    assert scores(ai2d, [sample] * 3, ["The answer is B", "B) cow", "cow"]) == [0] * 3

    seed_rows = [
        {
            "question_id": "x",
            "question": "Max value?",
            "choice_A": "1",
            "choice_B": "5",
            "choice_C": "9",
            "choice_D": "3",
            "answer": "C",
            "question_image_type": "chart",
            "image": png(colour(2)),
        }
    ]
    seed = bench("seedbench2_plus", write(tmp_path / "seed.parquet", seed_rows))
    (sample,) = seed.samples(None, 0)
    assert sample.question == f"Max value?\nA. 1\nB. 5\nC. 9\nD. 3\n{SEED_PROMPT}"
    assert seed.score("C", sample) == 1.0 and sample.category == "chart"
    # seed_process_result: the first character of the answer
    assert scores(seed, [sample] * 4, ["c", "C) 9", "C. 9", "Clearly 9"]) == [1] * 4
    assert scores(seed, [sample] * 3, ["(C)", "The answer is C", "9"]) == [0] * 3
    image_choice = seed.sample_from_row({**seed_rows[0], "choice_B": "img/b.png"}, "i")
    assert "\nB. <image>\n" in image_choice.question
    assert seed.aggregate([(sample, "C", 1.0)]) == {"score": 100.0, "score.chart": 100.0}


def test_realworldqa_letters_and_free_answers(tmp_path: Path) -> None:
    rows = [
        {"question": "How many cars?\nA. 1\nB. 2\nC. 3\nPlease answer directly with only the "
         "letter of the correct option and nothing else.", "answer": "B", "image": png(colour(0))},
        {"question": "How many lanes? Please answer directly with a single word or number.",
         "answer": "3", "image": png(colour(1))},
    ]  # fmt: skip
    rwqa = bench("realworldqa", write(tmp_path / "RealWorldQA" / "test.parquet", rows).parent)
    letter, free = rwqa.samples(None, 0)
    assert letter.question == rows[0]["question"]  # no prompt added
    # extract_mcq_answer: the letter in many formats, not the option's text
    assert (
        scores(rwqa, [letter] * 5, ["B.", "(B)", "The answer is B", "B) 2", "I choose B"])
        == [1.0] * 5
    )
    assert scores(rwqa, [letter] * 3, ["A", "2", "b"]) == [0.0] * 3
    assert scores(rwqa, [free] * 4, ["3.", " 3 ", "Three.", "4"]) == [1.0, 1.0, 0.0, 0.0]


# -- ChartQA, OCRBench -------------------------------------------------------------------------


def test_chartqa(tmp_path: Path) -> None:
    rows = [
        {"type": "human_test", "question": "Peak?", "answer": "40", "image": png(colour(0))},
        {"type": "augmented_test", "question": "Share?", "answer": "12%", "image": png(colour(1))},
    ]
    chartqa = bench("chartqa", write(tmp_path / "ChartQA" / "test.parquet", rows).parent)
    human, augmented = chartqa.samples(None, 0)
    assert human.question == "Peak?\nAnswer the question with a single word."
    assert chartqa.score("41", human) == 1.0 and chartqa.score("43", human) == 0.0
    assert chartqa.score("0.12", augmented) == 1.0
    assert chartqa.score("12%%", augmented) == 1.0  # every trailing % stripped, then / 100
    assert chartqa.score("40.", human) == 1.0  # float("40.")
    brazil = chartqa.sample_from_row({"question": "Who?", "answer": "Brazil"}, "b")
    assert chartqa.score(" brazil ", brazil) == 1.0 and chartqa.score("Brazil.", brazil) == 0.0
    metrics = chartqa.aggregate([(human, "41", 1.0), (augmented, "x", 0.0)])
    assert metrics == {"score": 50.0, "score.augmented_test": 0.0, "score.human_test": 100.0}


def test_ocrbench(tmp_path: Path) -> None:
    rows = [
        {"dataset": "IIIT5K", "question": "what is written?",
         "question_type": "Regular Text Recognition", "answer": ["STOP"], "image": png(colour(0))},
        {"dataset": "HME100k", "question": "latex?",
         "question_type": "Handwritten Mathematical Expression Recognition",
         "answer": ["x ^ 2"], "image": png(colour(1))},
        {"dataset": "docVQA", "question": "total?", "question_type": "Doc-oriented VQA",
         "answer": ["$5", "5 dollars"], "image": png(colour(2))},
        {"dataset": "docVQA", "question": "date?", "question_type": "Doc-oriented VQA",
         "answer": ["May"], "image": png(colour(3))},
    ]  # fmt: skip
    ocr = bench("ocrbench", write(tmp_path / "OCRBench" / "test.parquet", rows).parent)
    samples = ocr.samples(None, 0)
    predictions = ["It says stop", "$x^2$", "5 dollars", "June"]
    results = [(s, p, ocr.score(p, s)) for s, p in zip(samples, predictions, strict=True)]
    assert [r[2] for r in results] == [1.0, 1.0, 1.0, 0.0]
    metrics = ocr.aggregate(results)
    assert metrics["score"] == pytest.approx(750.0)  # 3 of 4, scaled to the 1000 questions
    assert metrics["ocrbench_correct"] == 3.0
    assert metrics["ocrbench_text_recognition"] == 1.0
    assert metrics["score.Doc-oriented VQA"] == pytest.approx(50.0)
    # lmms-eval 0.7.3 folds full-width characters; OCRBench's script does not
    official = bench("ocrbench", tmp_path / "OCRBench", scoring="official")
    assert (ocr.score("ＳＴＯＰ", samples[0]), official.score("ＳＴＯＰ", samples[0])) == (1.0, 0.0)


# -- end to end --------------------------------------------------------------------------------


def test_run_trial_on_a_parquet_benchmark(tmp_path: Path) -> None:
    """One real trial of the tiny model on a tiny POPE file: the official metrics come out."""
    from tiny_models import load_tiny, tiny_trial

    from prunelab.workers.runner import run_trial

    data = write(tmp_path / "POPE" / "test-00000-of-00001.parquet", pope_rows(5))
    trial = tiny_trial(
        "tiny-llava", "fastv", limit=4, keep_ratio=0.25, prune_layer=2, benchmark="pope",
        benchmark_config={"name": "pope", "kind": "pope", "path": str(data.parent)},
    )  # fmt: skip
    loaded, adapter = load_tiny("tiny-llava")
    output = run_trial(loaded, adapter, trial)
    metrics = output.metrics
    assert metrics["samples"] == 4 and len(output.predictions) == 4
    for key in ("pope_accuracy", "pope_precision", "pope_recall", "pope_f1", "pope_yes_ratio"):
        assert 0.0 <= metrics[key] <= 100.0
    assert metrics["score"] == metrics["pope_f1"]
    # the per-sample scores the predictions carry give the accuracy the aggregate reports
    correct = [p["score"] for p in output.predictions]
    assert metrics["pope_accuracy"] == pytest.approx(100 * sum(correct) / 4)
    categories = {p["category"] for p in output.predictions}
    assert {k for k in metrics if k.startswith("score.")} == {f"score.{c}" for c in categories}


# -- offline scoring ---------------------------------------------------------------------------


def test_score_rows_matches_the_parquet_path(tmp_path: Path) -> None:
    """Rows scored offline give the prompts, scores and metrics of the same rows from parquet."""
    rows = mme_rows()
    config = {"name": "mme", "kind": "mme", "path": str(tmp_path / "MME")}
    write(tmp_path / "MME" / "test.parquet", rows)
    mme = build_benchmark(config)
    samples = mme.samples(None, 0)
    predictions = ["Yes\n\nNo", "No", "<think>no</think>Yes", "Yes", "no", "yes"]
    expected = results(mme, samples, predictions)
    lines = [
        (i + 3, {**{k: v for k, v in r.items() if k != "image"}, "id": str(i), "prediction": p})
        for i, (r, p) in enumerate(zip(rows, predictions, strict=True))
    ]
    scored = score_rows(config, lines, "lmms_eval")
    assert [s["prompt"] for s in scored.samples] == [s.question for s in samples]
    assert [s["score"] for s in scored.samples] == [r[2] for r in expected]
    assert scored.samples[0] == {"id": "0", "score": 1.0, "prompt": samples[0].question,
                                 "prediction": "Yes", "category": "existence"}  # fmt: skip
    # the benchmark's own aggregate, and the score's bootstrap interval (as a trial logs it)
    ci = {k: scored.metrics.pop(k) for k in ("score_ci_low", "score_ci_high")}
    assert scored.metrics == mme.aggregate(expected)
    assert ci["score_ci_low"] <= scored.metrics["score"] <= ci["score_ci_high"]
    official = score_rows(config, lines, "official")
    assert official.samples[2]["score"] == 0.0  # MME's own rule reads "<thi"


def test_score_rows_reports_bad_rows_by_line() -> None:
    config = {"name": "textvqa", "kind": "textvqa"}  # no path needed offline
    good = {"id": 1, "question": "what?", "answers": ["a"] * 10, "prediction": "a"}
    assert score_rows(config, [(1, good)], "lmms_eval").metrics == {
        "score": 100.0, "score_ci_low": 100.0, "score_ci_high": 100.0,
    }  # fmt: skip

    def error(row: object, line: int = 3) -> str:
        with pytest.raises(RowError) as caught:
            score_rows(config, [(1, good), (line, row)], "lmms_eval")
        message = str(caught.value)
        assert "\n" not in message and message.startswith(f"line {line}: ")
        return message

    missing = error({k: v for k, v in good.items() if k != "answers"})
    assert missing.startswith("line 3: missing column 'answers' (textvqa rows need id, prediction")
    assert error({**good, "id": 2, "prediction": None}) == (
        "line 3: column 'prediction': expected text, got null"
    )
    assert error({**good, "id": 2, "answers": "a"}) == (
        "line 3: column 'answers': expected a list, got str"
    )
    assert (
        error({**good, "id": 2, "question": 7})
        == "line 3: column 'question': expected text, got int"
    )
    assert error(dict(good), 5) == "line 5: column 'id': '1' is also on line 1"
    assert error(["not", "an", "object"]) == "line 3: expected a JSON object, got list"
    assert issubclass(RowError, ValueError)
    with pytest.raises(ValueError, match="scoring='strict'"):
        score_rows(config, [(1, good)], "strict")
    with pytest.raises(ValueError, match="no rows"):
        score_rows(config, [], "lmms_eval")
    with pytest.raises(ValueError, match="'shapes' has no dataset rows"):
        score_rows({"name": "shapes", "kind": "shapes"}, [(1, good)], "lmms_eval")


def test_score_rows_cuts_predictions_at_the_stop_strings() -> None:
    row = {"id": "q1", "question": "what?", "answers": ["yes"] * 10}
    rows = [(1, {**row, "prediction": "yes ASSISTANT: no"})]
    scored = score_rows({"kind": "textvqa"}, rows, "lmms_eval")  # until ("ASSISTANT:",)
    assert scored.samples[0]["prediction"] == "yes " and scored.samples[0]["score"] == 1.0
    rows = [(1, {**row, "prediction": "yes\n\nno, not really"})]
    scored = score_rows({"kind": "vizwiz"}, rows, "lmms_eval")  # "\n\n" is no stop here
    assert scored.samples[0]["score"] == 0.0
