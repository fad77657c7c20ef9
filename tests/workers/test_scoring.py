"""The official scoring rules on hand-computed cases, normalisation edge cases included."""

from __future__ import annotations

import pytest

from prunelab.workers.benchmarks import scoring as S

# -- VQA normalisation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("The Two dogs.", "2 dogs"),  # case, article, number word, final period
        ("1,000", "1000"),  # thousands comma dropped by the tokenizer
        ("dont", "don't"),  # contraction restored
        ("none", "0"),  # "none" is a number word
        ("it's red", "it 's red"),  # 's split off
        ("What?", "what"),
        ("Yes\tsir\n", "yes sir"),
        ("a/b", "b"),  # "/" touches no space -> a space; then the article "a" goes
        ("(yes)", "yes"),
        ("yes, it is (red)", "yes it is red"),  # "(" touches a space: deleted; ")" -> space
        ("3.5", "3.5"),  # a period before a digit stays
        ("An apple", "apple"),
        ("ten", "10"),
        ("eleven", "eleven"),  # only zero..ten are mapped
    ],
)
def test_vqa_normalize(raw: str, normalised: str) -> None:
    assert S.vqa_normalize(raw) == normalised


def test_vqa_punctuation_rules() -> None:
    assert S.vqa_punctuation("a-b") == "a b"  # no space next to it: replaced by a space
    assert S.vqa_punctuation("yes !") == "yes "  # touching a space: deleted
    assert S.vqa_punctuation("1,000 - 2") == "1000  2"  # a thousands comma: all deleted
    assert S.vqa_punctuation("3.5.") == "3.5"  # period before a digit kept, final one not
    assert S.vqa_punctuation("e.g") == "eg"


def test_vqa_digit_article() -> None:
    assert S.vqa_digit_article("The  Three  cats") == "3 cats"
    assert S.vqa_digit_article("a an the") == ""
    assert S.vqa_digit_article("isnt") == "isn't"


# -- VQA accuracy ------------------------------------------------------------------------------


def test_vqa_accuracy_all_agree() -> None:
    # every leave-one-out subset has 9 matches -> min(1, 9/3) = 1
    assert S.vqa_accuracy("two", ["2"] * 10, normalize_answers="always") == 1.0


def test_vqa_accuracy_two_of_ten() -> None:
    # leaving out a "yes": 1 match -> 1/3 (2 times); leaving out a "no": 2 -> 2/3 (8 times)
    answers = ["yes"] * 2 + ["no"] * 8
    expected = (2 * (1 / 3) + 8 * (2 / 3)) / 10  # = 0.6
    for mode in ("always", "if_disagree"):
        assert S.vqa_accuracy("Yes.", answers, normalize_answers=mode) == pytest.approx(expected)
    assert expected == pytest.approx(0.6)


def test_vqa_accuracy_three_of_ten() -> None:
    # leaving out a "cat": 2 matches -> 2/3 (3 times); otherwise 3 -> 1 (7 times): 0.9
    answers = ["cat"] * 3 + ["dog"] * 7
    assert S.vqa_accuracy("a cat", answers, normalize_answers="always") == pytest.approx(0.9)
    assert S.vqa_accuracy("bird", answers, normalize_answers="always") == 0.0


def test_vqa_accuracy_official_vqav2_keeps_identical_answers_raw() -> None:
    # the VQAv2 script normalises human answers only when they disagree: ten identical
    # "Nokia" never equal the normalised prediction "nokia"; TextVQA's rule normalises both
    assert S.vqa_accuracy("Nokia", ["Nokia"] * 10, normalize_answers="if_disagree") == 0.0
    assert S.vqa_accuracy("Nokia", ["Nokia"] * 10, normalize_answers="always") == 1.0
    # once they disagree, the VQAv2 script runs only the punctuation rule on the answers (not
    # digit/article), so the normalised prediction "2" matches no "Two"
    answers = ["Two"] * 9 + ["3"]
    assert S.vqa_accuracy("2", answers, normalize_answers="if_disagree") == 0.0
    # lmms-eval's EvalAI processor: "man's" keeps its apostrophe, 40 trailing periods do not
    # turn "yes...." into "yes"
    assert S.vqa_accuracy("man's", ["man's"] * 10, normalize_answers="always") == 1.0
    assert S.vqa_accuracy("yes" + "." * 40, ["yes"] * 10, normalize_answers="always") == 0.0


def test_vqa_accuracy_edge_cases() -> None:
    assert S.vqa_accuracy("yes", [], normalize_answers="always") == 0.0
    with pytest.raises(ValueError, match="normalize_answers"):
        S.vqa_accuracy("yes", ["yes"], normalize_answers="sometimes")


# -- exact match, words ------------------------------------------------------------------------


def test_exact_match() -> None:
    assert S.exact_match("Yes.", "yes") == 1.0
    assert S.exact_match("  Left ", "left") == 1.0
    assert S.exact_match("the red car", "red car") == 0.0  # articles are not dropped for GQA
    assert S.exact_match("t-shirt", "tshirt") == 1.0  # punctuation deleted, not spaced


def test_gqa_rejects_what_lmms_eval_rejects() -> None:
    assert S.exact_match("yes .", "yes") == 0.0
    assert S.exact_match("coffee  table", "coffee table") == 0.0


# -- MME ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "label"),
    [
        ("Yes", "yes"),
        ("No.", "no"),
        ("y", "yes"),
        ("N", "no"),
        ("x", "other"),
        ("Yes, there is a dog.", "yes"),
        ("not sure", "no"),  # "no" within the first 4 characters
        ("There is no dog", "other"),  # yes/no only count in the first 4 characters
        ("", "other"),
    ],
)
def test_mme_parse(prediction: str, label: str) -> None:
    assert S.mme_parse(prediction) == label


def test_mme_scores_acc_and_acc_plus() -> None:
    records = [
        ("existence", "1.jpg", True),
        ("existence", "1.jpg", True),  # image 1: acc 100 + acc+ 100 = 200
        ("existence", "2.jpg", True),
        ("existence", "2.jpg", False),  # image 2: 50 + 0 = 50 -> existence = 125
        ("count", "3.jpg", False),
        ("count", "3.jpg", True),  # count = 50
        ("code_reasoning", "4.png", False),
        ("code_reasoning", "4.png", False),  # code_reasoning = 0
    ]
    scores = S.mme_scores(records)
    assert scores["existence"] == pytest.approx(125.0)
    assert scores["count"] == pytest.approx(50.0)
    assert scores["code_reasoning"] == 0.0
    assert scores["perception"] == pytest.approx(175.0)
    assert scores["cognition"] == 0.0
    assert scores["acc"] == pytest.approx(100 * 4 / 8)
    assert scores["acc_plus"] == pytest.approx(100 * 1 / 4)


# -- POPE --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "label"),
    [
        ("Yes, there is a dog.", "yes"),
        ("No, there is not.", "no"),
        ("There is not a dog", "no"),
        ("Nope", "yes"),  # only the words No / no / not count
        ("I see no. Dog", "no"),
        ("Yes. But no", "yes"),  # only the first sentence
        ("no,", "no"),  # commas deleted first
        ("", "yes"),
    ],
)
def test_pope_label(prediction: str, label: str) -> None:
    assert S.pope_label(prediction) == label


def test_pope_metrics() -> None:
    pairs = [("yes", "yes"), ("yes", "no"), ("no", "no"), ("no", "yes"), ("yes", "yes")]
    m = S.pope_metrics(pairs)  # tp 2, fp 1, tn 1, fn 1
    assert m["accuracy"] == pytest.approx(60.0)
    assert m["precision"] == pytest.approx(200 / 3)
    assert m["recall"] == pytest.approx(200 / 3)
    assert m["f1"] == pytest.approx(200 / 3)
    assert m["yes_ratio"] == pytest.approx(60.0)
    lopsided = S.pope_metrics([("yes", "yes"), ("yes", "no"), ("yes", "no"), ("no", "yes")])
    # tp 1 fp 2 fn 1: precision 1/3, recall 1/2, F1 = 2 * (1/6) / (5/6) = 0.4
    assert lopsided["f1"] == pytest.approx(40.0)
    none_yes = S.pope_metrics([("no", "no"), ("no", "yes")])
    assert (none_yes["precision"], none_yes["recall"], none_yes["f1"]) == (0.0, 0.0, 0.0)
    assert none_yes["accuracy"] == pytest.approx(50.0)


# -- multiple choice ---------------------------------------------------------------------------
# hand-checked against lmms-eval 0.7.3's task code (tests/workers/test_lmms_conformance.py
# compares on 1,000+ generated predictions per benchmark)
@pytest.mark.parametrize(
    ("prediction", "scienceqa", "seedbench", "realworldqa"),
    [
        ("A", 1.0, 1.0, 1.0),
        ("A.", 1.0, 1.0, 1.0),
        ("(A)", 0.0, 0.0, 1.0),
        ("The answer is A", 0.0, 0.0, 1.0),
        ("A) teddy bear", 0.0, 1.0, 1.0),
        ("B. dog", 0.0, 0.0, 0.0),
    ],
)
def test_option_letter_rules(prediction, scienceqa, seedbench, realworldqa) -> None:
    assert S.scienceqa_match(prediction, "A") == scienceqa
    assert S.seedbench_match(prediction, "A") == seedbench
    assert S.realworldqa_match(prediction, "A") == realworldqa


def test_realworldqa_number_words_are_not_numbers() -> None:
    assert S.realworldqa_match("three", "3") == 0.0
    assert S.realworldqa_match("3", "3") == 1.0


def test_extract_mcq_answer() -> None:
    assert S.extract_mcq_answer("(C) because") == "C"
    assert S.extract_mcq_answer("B. dog") == "B"


# -- ChartQA -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "target", "correct"),
    [
        ("12.5", "12", True),  # 0.5 / 12 = 4.2% <= 5%
        ("12.7", "12", False),  # 5.8%
        (" 100 ", "105", True),  # 5 / 105 = 4.8%
        ("45%", "0.45", True),  # a percentage reads as a fraction
        ("45", "0.45", False),
        ("0", "0", True),  # zero target: string equality
        ("0.01", "0", False),
        ("Yes", "yes", True),
        ("42.", "42", True),  # trailing period of the prediction ignored
        ("Brazil", "brazil ", False),  # the target is not stripped (lmms-eval, the authors)
        ("Brazil and Chile", "Brazil", False),
    ],
)
def test_relaxed_correctness(prediction: str, target: str, correct: bool) -> None:
    assert S.relaxed_correctness(prediction, target) is correct


# -- OCRBench ----------------------------------------------------------------------------------


def test_ocrbench_match() -> None:
    assert S.ocrbench_match("The text says HELLO world", ["hello"], "IIIT5K") == 1.0
    assert S.ocrbench_match("helloworld", ["hello world"], "IIIT5K") == 0.0
    assert S.ocrbench_match("Line one\nline two", ["one line"], "FUNSD") == 1.0  # \n -> " "
    assert S.ocrbench_match("it is 42", ["forty-two", "42"], "textVQA") == 1.0
    # HME100k: spaces removed on both sides, case kept
    assert S.ocrbench_match("$x^{2}+1$", ["x ^ { 2 } + 1"], "HME100k") == 1.0
    assert S.ocrbench_match("x^{2}", ["X^{2}"], "HME100k") == 0.0
    assert S.ocrbench_match("X ^ {2}", ["X^{2}"], "HME100k") == 1.0
