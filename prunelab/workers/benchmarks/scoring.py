"""Scoring rules of the public VLM benchmarks, as pure functions on strings.

Two families of rules live here, and each function's docstring says which one it is:

- **lmms-eval 0.7.3** (prunelab's default, ``scoring: lmms_eval``): the task's
  ``process_results`` / filter / metric in ``lmms_eval/tasks/<task>/``, quirks included (each
  quirk is named where it is reproduced), applied to the model's text after lmms-eval's own
  response pipeline (:func:`lmms_response`).
- **The benchmark authors' script** (``scoring: official``), only where lmms-eval departs from
  it: the official VQA evaluation (``vqaEval.py``), MME's ``calculation.py``, POPE's
  ``evaluate.py``, MMStar's ``MMStar_eval``, OCRBench's evaluation.

The benchmark classes of :mod:`prunelab.workers.benchmarks.lmms` pick the rule.
"""

from __future__ import annotations

import re
import statistics
import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "MME_COGNITION",
    "MME_PERCEPTION",
    "OCRBENCH_RECOGNITION",
    "REASONING_TAGS",
    "VQA_RULES",
    "exact_match",
    "extract_mcq_answer",
    "fold_fullwidth",
    "hf_exact_match",
    "leading_option_letter",
    "lmms_response",
    "mmbench_choice",
    "mmbench_infer_option",
    "mmbench_infer_text",
    "mme_parse",
    "mme_parse_official",
    "mme_scores",
    "mmstar_official_match",
    "ocrbench_match",
    "pope_label",
    "pope_metrics",
    "pope_metrics_lmms",
    "realworldqa_match",
    "relaxed_correctness",
    "scienceqa_match",
    "seedbench_match",
    "strip_reasoning_blocks",
    "vqa_accuracy",
    "vqa_digit_article",
    "vqa_normalize",
    "vqa_punctuation",
]

# -- lmms-eval's response pipeline --------------------------------------------------------------
REASONING_TAGS: tuple[tuple[str, str], ...] = (
    ("<think>", "</think>"),
    ("<analysis>", "</analysis>"),
)
"""The default of lmms-eval's ``--reasoning_tags`` (``lmms_eval/__main__.py``): the blocks its
evaluator strips from every response before scoring."""


def strip_reasoning_blocks(text: str, tags: Iterable[tuple[str, str]] = REASONING_TAGS) -> str:
    """``text`` without its reasoning blocks, stripped (``lmms_eval.api.reasoning.
    strip_reasoning_tags``).

    Per tag pair: every ``start ... end`` block is cut out (an ``end`` found after a ``start``);
    then, when an ``end`` is left without any ``start`` (a chat template that pre-fills the
    opening tag), only what follows its last occurrence is kept. Tags are case-sensitive.
    """
    result = text
    for start_tag, end_tag in tags:
        while start_tag in result and end_tag in result:
            start = result.find(start_tag)
            end = result.find(end_tag, start)
            if end == -1:
                break
            result = result[:start] + result[end + len(end_tag) :]
        if end_tag in result and start_tag not in result:
            result = result.rsplit(end_tag, 1)[-1]
    return result.strip()


def lmms_response(text: str) -> str:
    """The response text an lmms-eval 0.7.3 ``process_results`` receives for a generated
    ``text`` (already cut at the task's ``until`` strings): reasoning blocks stripped by the
    evaluator (:func:`strip_reasoning_blocks`, CLI default tags), then surrounding whitespace
    (``ConfigurableTask.process_results`` strips every ``generate_until`` result)."""
    return strip_reasoning_blocks(text).strip()


# -- VQA accuracy -------------------------------------------------------------------------------
# Contractions written without the apostrophe, as the official VQA evaluation restores them.
_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<")
_VQA_PUNCT += ("@", "`", ",", "?", "!")
# A period not followed by a digit (the official pattern's look-behind is malformed, so "5."
# loses its period but "3.5" keeps it).
_PERIOD = re.compile(r"\.(?!\d)")
# The official script passes re.UNICODE (32) as ``sub``'s third positional argument, which is
# ``count``: at most 32 periods are deleted ("yes" + 40 periods keeps 8 of them).
_PERIOD_LIMIT = 32
_DIGIT_COMMA = re.compile(r"(?<=\d),+(?=\d)")


def vqa_punctuation(text: str) -> str:
    """The punctuation rule of the VQA evaluation (``processPunctuation``; lmms-eval's
    ``EvalAIAnswerProcessor.process_punctuation`` is the same).

    Each mark in the VQA list is deleted when it touches a space somewhere in the text (or the
    text has a thousands comma like ``1,000``), else replaced by a space; then the first 32
    periods not followed by a digit are deleted. ``"a-b"`` -> ``"a b"``, ``"yes !"`` ->
    ``"yes "``, ``"1,000"`` -> ``"1000"``, ``"3.5."`` -> ``"3.5"``.
    """
    out = text
    thousands = _DIGIT_COMMA.search(text) is not None
    for mark in _VQA_PUNCT:
        if mark + " " in text or " " + mark in text or thousands:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_PERIOD_LIMIT)


def vqa_digit_article(text: str) -> str:
    """Lower-case, number words zero..ten (and none) to digits, drop articles, restore
    contractions; words re-joined by single spaces (``processDigitArticle``)."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def vqa_normalize(text: str) -> str:
    """The EvalAI answer processor (``EvalAIAnswerProcessor.__call__``): lower-case, drop ``,``
    and ``?``, split ``'s`` off the word (``it's`` -> ``it 's``), whitespace to spaces, then
    the punctuation and digit/article rules."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return vqa_digit_article(vqa_punctuation(text))


def _vqa_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


VQA_RULES = ("always", "punctuation_digits", "if_disagree")
"""The answer normalisations :func:`vqa_accuracy` knows (see there)."""


def _vqa_sides(prediction: str, answers: Sequence[str], rule: str) -> tuple[str, list[str]]:
    """The prediction and the human answers as ``rule`` normalises them."""
    if rule == "always":
        return vqa_normalize(prediction), [vqa_normalize(a) for a in answers]
    predicted = vqa_digit_article(vqa_punctuation(_vqa_whitespace(prediction)))
    if rule == "punctuation_digits":
        return predicted, [vqa_digit_article(vqa_punctuation(_vqa_whitespace(a))) for a in answers]
    humans = list(answers)  # if_disagree: raw answers, punctuation only when they disagree
    if len(set(humans)) > 1:
        humans = [vqa_punctuation(a) for a in humans]
    return predicted, humans


def vqa_accuracy(
    prediction: str,
    answers: Sequence[str],
    *,
    normalize_answers: str,
    answer_records: Sequence[Any] | None = None,
) -> float:
    """VQA accuracy of ``prediction`` against the human ``answers`` (10 for the VQA datasets):
    the mean over the humans of ``min(1, #other humans who gave the prediction / 3)``.

    ``normalize_answers``:

    - ``"always"``: the EvalAI processor (:func:`vqa_normalize`) on the prediction and on every
      answer (lmms-eval ``textvqa_process_results``, ``vizwiz_vqa_process_results``; also the
      TextVQA authors' evaluator).
    - ``"punctuation_digits"``: newlines and tabs to spaces, stripped, then the punctuation and
      digit/article rules on both sides (lmms-eval ``vqav2_process_results``).
    - ``"if_disagree"``: the official VQA evaluation (``vqaEval.py``): the prediction as in
      ``punctuation_digits``; the answers raw, and only when they are not all equal, through
      the punctuation rule (not the digit/article one).

    ``answer_records``: per answer, the rest of its record (``answer_id``, ...). "Other humans"
    are the answers whose (normalised answer, record) differs from the left-out one, as both
    VQAv2 scripts compare whole answer dicts; None: by position. Unknown ``normalize_answers``
    raises ValueError; no answers score 0 (lmms-eval's VizWiz guard).
    """
    if normalize_answers not in VQA_RULES:
        raise ValueError(f"normalize_answers={normalize_answers!r}: one of {', '.join(VQA_RULES)}")
    if not answers:
        return 0.0
    predicted, humans = _vqa_sides(prediction, answers, normalize_answers)
    records = list(answer_records) if answer_records is not None else list(range(len(humans)))
    keys = list(zip(humans, records, strict=True))
    accuracies = []
    for left_out in keys:
        matches = sum(1 for key in keys if key != left_out and key[0] == predicted)
        accuracies.append(min(1, matches / 3))
    return float(statistics.mean(accuracies))  # exact mean, as lmms-eval's statistics.mean


# -- exact match (GQA, AI2D) -------------------------------------------------------------------
_ASCII_PUNCT = str.maketrans("", "", string.punctuation)


def _numpy_str(text: str) -> str:
    """``text`` as a numpy unicode array element holds it: trailing NULs dropped."""
    return text.rstrip("\x00")


def hf_exact_match(
    prediction: str, reference: str, *, ignore_case: bool, ignore_punctuation: bool
) -> float:
    """1.0 when equal after the options, as lmms-eval's ``exact_match_hf_evaluate`` (the
    Hugging Face ``evaluate`` metric) computes it on numpy strings: ``ignore_case`` lower-cases
    (numpy keeps a string's length, so a character that lower-cases to two is cut),
    ``ignore_punctuation`` deletes ASCII ``string.punctuation``; no whitespace is touched."""
    sides = []
    for text in (prediction, reference):
        text = _numpy_str(text)
        if ignore_case:
            text = _numpy_str(text.lower()[: len(text)])
        if ignore_punctuation:
            text = _numpy_str(text.translate(_ASCII_PUNCT))
        sides.append(text)
    return float(sides[0] == sides[1])


def exact_match(prediction: str, answer: str) -> float:
    """GQA's rule in lmms-eval (task ``gqa``: metric ``exact_match`` with ``ignore_case`` and
    ``ignore_punctuation``): the stripped prediction equals the answer once both are
    lower-cased and ASCII punctuation is deleted; spaces count (``"yes ."`` is not ``"yes"``)."""
    return hf_exact_match(prediction.strip(), answer, ignore_case=True, ignore_punctuation=True)


# -- MME ----------------------------------------------------------------------------------------
MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
    "artwork", "OCR",
)  # fmt: skip
MME_COGNITION = (
    "commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning",
)  # fmt: skip


def mme_parse(prediction: str) -> str:
    """``yes``, ``no`` or ``other`` (lmms-eval ``mme`` ``parse_pred_ans``, "brought from Otter
    Eval"): lower-cased, stripped, periods removed; the whole answer, a lone y/n, else yes/no
    in its first 4 characters (``yes`` wins when both appear there)."""
    text = prediction.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def mme_parse_official(prediction: str) -> str:
    """``yes``, ``no`` or ``other`` by MME's own ``calculation.py`` (``parse_pred_ans`` after
    lower-casing): ``yes`` when its first 4 characters hold "yes", else ``no`` when they hold
    "no"; no period removal and no lone ``y`` / ``n``."""
    head = prediction.lower()[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def mme_scores(
    records: Iterable[tuple[str, str, bool]], *, cognition: Sequence[str] | None = MME_COGNITION
) -> dict[str, float]:
    """MME totals from ``(category, image id, correct)`` per question.

    Per category: ``acc`` = % of questions right, ``acc+`` = % of images with every question
    right; the category score is the mean over its images of (acc + acc+) of the image, which
    with the official two questions per image equals acc + acc+ of the category (max 200).
    Returns ``{category: score}`` plus ``perception`` (the sum over the 10 perception
    categories present, max 2000), ``cognition`` (the sum over ``cognition``: the 4 official
    ones as MME's ``calculation.py``, or None for every non-perception category as lmms-eval's
    ``mme_process_results`` routes them; max 800), ``acc`` and ``acc_plus`` (over all).
    """
    per_image: dict[tuple[str, str], list[bool]] = {}
    for category, image, correct in records:
        per_image.setdefault((category, image), []).append(bool(correct))
    per_category: dict[str, list[float]] = {}
    for (category, _), answers in per_image.items():
        acc = 100.0 * sum(answers) / len(answers)
        plus = 100.0 * all(answers)
        per_category.setdefault(category, []).append(acc + plus)
    scores = {c: sum(v) / len(v) for c, v in per_category.items()}
    cognitive = [
        c for c in scores if (c not in MME_PERCEPTION if cognition is None else c in cognition)
    ]
    out = dict(scores)
    out["perception"] = sum(s for c, s in scores.items() if c in MME_PERCEPTION)
    out["cognition"] = sum(scores[c] for c in cognitive)
    questions = [a for answers in per_image.values() for a in answers]
    out["acc"] = 100.0 * sum(questions) / len(questions) if questions else 0.0
    images = list(per_image.values())
    out["acc_plus"] = 100.0 * sum(all(a) for a in images) / len(images) if images else 0.0
    return out


# -- POPE ---------------------------------------------------------------------------------------
def pope_label(prediction: str) -> str:
    """``no`` if the first sentence has the word ``No``, ``no`` or ``not``, else ``yes``
    (POPE's ``evaluate.py``: first sentence up to a period, commas deleted, split on spaces)."""
    first = prediction.split(".")[0].replace(",", "")
    words = first.split(" ")
    return "no" if any(w in ("No", "no", "not") for w in words) else "yes"


def _binary_metrics(tp: int, fp: int, fn: int, correct: int, total: int) -> dict[str, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": 100.0 * correct / total if total else 0.0,
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
    }


def pope_metrics(pairs: Iterable[tuple[str, str]]) -> dict[str, float]:
    """POPE's ``evaluate.py`` metrics, in %, from ``(predicted label, true label)`` pairs of
    :func:`pope_label` labels: accuracy, precision, recall, F1 (``yes`` positive; 0 when
    undefined) and yes-ratio, the share of *predicted* yes."""
    pairs = list(pairs)
    tp = sum(1 for p, t in pairs if p == "yes" and t == "yes")
    fp = sum(1 for p, t in pairs if p == "yes" and t != "yes")
    fn = sum(1 for p, t in pairs if p != "yes" and t == "yes")
    correct = sum(1 for p, t in pairs if p == t)
    out = _binary_metrics(tp, fp, fn, correct, len(pairs))
    out["yes_ratio"] = 100.0 * (tp + fp) / len(pairs) if pairs else 0.0
    return out


def pope_metrics_lmms(pairs: Iterable[tuple[str, str]]) -> dict[str, float]:
    """lmms-eval ``pope`` aggregates (``pope_aggregate_*``), in % (lmms-eval reports
    fractions), from ``(prediction, true label)`` with the prediction lower-cased and stripped:
    right only when it is exactly the label; a prediction that is neither ``yes`` nor ``no``
    is in no cell of precision / recall; yes-ratio is the share of *true* yes."""
    pairs = list(pairs)
    tp = sum(1 for p, t in pairs if p == "yes" and t == "yes")
    fp = sum(1 for p, t in pairs if p == "yes" and t == "no")
    fn = sum(1 for p, t in pairs if p == "no" and t == "yes")
    correct = sum(1 for p, t in pairs if p == t)
    out = _binary_metrics(tp, fp, fn, correct, len(pairs))
    labelled = [t for _, t in pairs if t in ("yes", "no")]
    out["yes_ratio"] = 100.0 * labelled.count("yes") / len(labelled) if labelled else 0.0
    return out


# -- multiple choice ----------------------------------------------------------------------------
_MCQ_LETTERS = tuple("ABCDEFGH")
_MCQ_EDGE = (",", ".", "!", "?", ";", ":", "'", '"')  # stripped from both ends, in this order
_MCQ_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is",
    "the best answer is", "best answer is", "the correct option is", "correct option is",
    "the best option is", "best option is", "the choice is", "choice is",
    "the correct choice is", "correct choice is", "i choose", "i select", "i pick",
    "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选",
    "答えは",
)  # fmt: skip
# (prefix, suffix, priority) of a letter written as "(A)", "A.", "A:", "A)", "A "
_MCQ_MARKS = (("(", ")", 6), ("", ".", 5), ("", ":", 4), ("", ")", 3), ("", " ", 2))
_MCQ_START, _MCQ_END, _MCQ_PHRASE = 10, 9, 7


def _mcq_candidates(text: str, letters: Sequence[str]) -> list[tuple[int, int, str]]:
    """(priority, position, letter) of every way ``text`` (padded with spaces) names a letter."""
    found = []
    for prefix, suffix, priority in _MCQ_MARKS:
        for letter in letters:
            mark = prefix + letter + suffix
            if mark in text:
                found.append((priority, text.rfind(mark), letter))
    lowered = text.lower()
    for phrase in _MCQ_PHRASES:
        at = lowered.find(phrase)
        if at != -1:
            for letter in letters:
                position = text.find(letter, at + len(phrase))
                if position != -1:
                    found.append((_MCQ_PHRASE, position, letter))
    core = text.strip()
    for letter in letters:
        if core.startswith(letter) and (len(core) == 1 or not core[1].isalpha()):
            found.append((_MCQ_START, 0, letter))
    for letter in letters:
        if core.endswith(letter) and (len(core) == 1 or not core[-2].isalpha()):
            found.append((_MCQ_END, len(text) - 1, letter))
    return found


def extract_mcq_answer(response: str, choices: Sequence[str] | None = None) -> str:
    """The choice letter an answer names, or ``""`` (lmms-eval
    ``tasks/_task_utils/mcq_extract.extract_mcq_answer``; used by RealWorldQA, MMStar and the
    static MMBench fallback).

    The response is stripped, then stripped of ``, . ! ? ; : ' "`` (each in turn) and padded
    with spaces. Candidates, by priority: the stripped text starts with a letter not followed
    by a letter (10); ends with one not preceded by a letter (9); an answer phrase ("the
    answer is", "i choose", "答案是", "选", ...) followed anywhere later by the letter (7);
    ``(A)`` (6), ``A.`` (5), ``A:`` (4), ``A)`` (3), ``A `` (2), each at its last occurrence;
    only when there is none, any occurrence of the letter (0). The highest priority wins,
    then the later position. ``choices`` default to A-H; letters are case-sensitive.
    """
    if not response or not response.strip():
        return ""
    letters = list(choices) if choices else list(_MCQ_LETTERS)
    text = response.strip()
    for char in _MCQ_EDGE:
        text = text.strip(char)
    text = f" {text} "
    found = _mcq_candidates(text, letters)
    if not found:
        found = [(0, text.rfind(letter), letter) for letter in letters if letter in text]
    if not found:
        return ""
    return max(found, key=lambda c: (c[0], c[1]))[2]


_MMBENCH_LETTERS = "ABCDE"
_MMBENCH_MARKS = (
    ("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."), (":", ""),
    (":", ","), (":", "."), (":", ")"), (":", ")."),
)  # fmt: skip


def mmbench_infer_option(answer: str) -> str | None:
    """The letter A-E an answer writes as a token, or None (MMBench's ``can_infer_option``,
    lmms-eval ``mmbench_evals.MMBench_Evaluator``).

    Tokens are the whitespace-split words. Exactly one distinct bare letter among the tokens
    picks it, unless ``A`` is a token of an answer of more than 3 tokens ("a quantifier");
    otherwise the first of ``A.``, ``A,``, ``A:``, ``A)``, ``A).``, ``(A)``, ``(A).``, ``:A``,
    ``:A,``, ``:A.``, ``:A)``, ``:A).`` forms that exactly one letter takes.
    """
    if "Failed to obtain answer via API" in answer:
        return None
    tokens = [t.strip() for t in answer.split()]

    def written(prefix: str, suffix: str) -> list[str]:
        return [c for c in _MMBENCH_LETTERS if prefix + c + suffix in tokens]

    bare = written("", "")
    if len(bare) == 1 and not ("A" in tokens and len(tokens) > 3):
        return bare[0]
    for prefix, suffix in _MMBENCH_MARKS:
        letters = written(prefix, suffix)
        if len(letters) == 1:
            return letters[0]
    return None


def mmbench_infer_text(answer: str, choices: Mapping[str, Any]) -> str | None:
    """The letter of the only option whose text (lower-cased) the lower-cased answer contains,
    or None (MMBench's ``can_infer_text``)."""
    said = answer.lower()
    found = [k for k, v in choices.items() if str(v).lower() in said]
    return found[0] if len(found) == 1 else None


def mmbench_choice(prediction: str, choices: Mapping[str, Any]) -> str:
    """The letter lmms-eval's static MMBench evaluation reads from a prediction, or ``""``
    (``MMBench_Evaluator.eval_sub_data`` with ``static_only``, the rule of task
    ``mmbench_en_dev_static``; the ``mmbench_*_dev`` tasks ask GPT where this falls back).

    ``choices``: the options A-D that are not missing (``build_choices``). The prefetch
    (:func:`mmbench_infer_option`, then :func:`mmbench_infer_text`), else
    :func:`extract_mcq_answer` over the sorted choice letters.
    """
    inferred = mmbench_infer_option(prediction) or mmbench_infer_text(prediction, choices)
    if inferred:
        return inferred
    return extract_mcq_answer(prediction, sorted(choices))


def scienceqa_match(prediction: str, letter: str) -> float:
    """lmms-eval ``sqa_process_results`` ("how llava parse it"): 1.0 when the stripped
    prediction is the letter (any case), or starts with an upper-case character and a period
    (``B. whale``) and that character is the letter; ``(B)`` and ``The answer is B`` fail."""
    target = letter.strip().lower()
    text = prediction.strip()
    if text.lower() == target:
        return 1.0
    if len(text) >= 2 and text[0].isupper() and text[1] == ".":
        return float(text[0].lower() == target)
    return 0.0


_LEADING_LETTER = re.compile(r"^\s*([A-Z])\.")


def leading_option_letter(response: str) -> str:
    """AI2D's ``flexible-extract`` filter (lmms-eval ``ai2d`` ``MultiChoiceRegexFilter``): the
    letter of a response that starts with ``A.`` (leading whitespace allowed), else the
    response unchanged."""
    match = _LEADING_LETTER.match(response)
    return match.group(1) if match else response


def seedbench_match(prediction: str, answer: str) -> float:
    """lmms-eval ``seed_process_result`` + ``seed_aggregation_result``: the first character of
    the stripped prediction equals the answer letter, case ignored (``A) teddy bear`` counts,
    ``(A)`` does not)."""
    text = prediction.strip()
    if len(text) > 1:
        text = text[0]
    return float(text.lower().strip() == answer.lower().strip())


def realworldqa_match(prediction: str, answer: str) -> float:
    """lmms-eval ``realworldqa_process_results``: a letter answer (A-D, any case) by
    :func:`extract_mcq_answer` over A-D; any other answer when the prediction, lower-cased,
    stripped and without trailing periods, equals it lower-cased (``three`` is not ``3``)."""
    truth = answer.strip()
    if truth.upper() in ("A", "B", "C", "D"):
        return float(extract_mcq_answer(prediction, ["A", "B", "C", "D"]) == truth.upper())
    return float(prediction.lower().strip().rstrip(".") == truth.lower())


def mmstar_official_match(prediction: str, answer: str) -> float:
    """MMStar's own rule (``MMStar_eval`` in the MMStar repository; lmms-eval dropped it for
    :func:`extract_mcq_answer`): both lower-cased, stripped, newlines as spaces; right when
    the answer is the prediction's first character, or the character after a leading ``(``,
    ``option `` or ``the answer is ``."""
    truth = answer.lower().strip().replace("\n", " ")
    text = prediction.lower().strip().replace("\n", " ")
    for prefix in ("", "(", "option ", "the answer is "):
        if text.startswith(prefix):
            if len(text) <= len(prefix):
                return 0.0  # the script's IndexError, caught as a miss
            if text[len(prefix)] == truth:
                return 1.0
    return 0.0


# -- ChartQA ------------------------------------------------------------------------------------
def _to_float(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA relaxed accuracy (lmms-eval ``chartqa`` ``relaxed_correctness``, from Qwen-VL /
    pix2struct, the authors' rule): when both read as numbers (Python ``float``; ``x%`` as
    ``x / 100`` after stripping every trailing ``%``) and the target is not zero, within
    ``max_relative_change`` of it; otherwise equal after lower-casing. Nothing is stripped."""
    predicted, expected = _to_float(prediction), _to_float(target)
    if predicted is not None and expected:
        return abs(predicted - expected) / abs(expected) <= max_relative_change
    return prediction.lower() == target.lower()


# -- OCRBench -----------------------------------------------------------------------------------
OCRBENCH_RECOGNITION = (
    "Regular Text Recognition", "Irregular Text Recognition", "Artistic Text Recognition",
    "Handwriting Recognition", "Digit String Recognition", "Non-Semantic Text Recognition",
)  # fmt: skip


def fold_fullwidth(text: str) -> str:
    """Full-width ASCII (U+FF01-U+FF5E) to ASCII and the ideographic space to a space
    (lmms-eval ``ocrbench`` ``_fold_fullwidth_ascii``)."""
    return "".join(
        chr(ord(c) - 0xFEE0) if 0xFF01 <= ord(c) <= 0xFF5E else " " if c == "\u3000" else c
        for c in text
    )


def ocrbench_match(
    prediction: str, answers: Sequence[str], dataset: str, *, fold_fullwidth_ascii: bool = False
) -> float:
    """1.0 when some answer is a substring of the prediction (OCRBench's evaluation).

    Both stripped, newlines as spaces and lower-cased; for ``dataset == "HME100k"`` (LaTeX of
    handwritten expressions) case is kept and every space removed instead.
    ``fold_fullwidth_ascii``: fold full-width characters first (:func:`fold_fullwidth`, not
    for HME100k) as lmms-eval 0.7.3 ``ocrbench_process_results`` does; OCRBench's own script
    does not.
    """
    for answer in answers:
        if dataset == "HME100k":
            truth = answer.strip().replace("\n", " ").replace(" ", "")
            said = prediction.strip().replace("\n", " ").replace(" ", "")
        else:
            if fold_fullwidth_ascii:
                answer, prediction = fold_fullwidth(answer), fold_fullwidth(prediction)
            truth = answer.lower().strip().replace("\n", " ")
            said = prediction.lower().strip().replace("\n", " ")
        if truth in said:
            return 1.0
    return 0.0
