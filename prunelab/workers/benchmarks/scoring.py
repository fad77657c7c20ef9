"""Official scoring rules of the public VLM benchmarks, as pure functions on strings.

Each rule follows the benchmark's official evaluation as lmms-eval runs it (the reference the
pruning papers report with); where lmms-eval keeps a quirk of the original script, so do we,
and the docstring says so.

- VQA accuracy (VQAv2, TextVQA, VizWiz): the answer normalisation of the official VQA
  evaluation / EvalAI (lower-case, punctuation rules, number words to digits, articles dropped,
  contractions restored) and ``min(#humans that gave the answer / 3, 1)`` averaged over the
  ten leave-one-annotator-out subsets of the ten human answers.
- Exact match (GQA): case and punctuation ignored.
- MME: yes/no parsing of the first characters; per subtask ``acc + acc+`` (acc+ : both
  questions of an image right), perception and cognition totals.
- POPE: the first sentence is ``no`` when it contains the word no/No/not, else ``yes``;
  accuracy, precision, recall, F1 and yes-ratio with ``yes`` as the positive class.
- Multiple choice (MMBench, MMStar, ScienceQA-IMG, AI2D, SEED-Bench-2-Plus, RealWorldQA):
  option extraction from free text (bare letter, ``(B)``, ``The answer is C``, ``Option D``,
  the text of exactly one option, exactly one standalone option letter).
- Relaxed accuracy (ChartQA): within 5% of a numeric target (``x%`` read as ``x/100``), exact
  match (case ignored) otherwise.
- OCRBench: a ground-truth answer contained in the prediction, after lower-casing; for the
  handwritten mathematical expressions (HME100k) case kept and all spaces removed (OCRBench's
  own script; lmms-eval lower-cases only the prediction there).
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "MME_COGNITION",
    "MME_PERCEPTION",
    "OCRBENCH_RECOGNITION",
    "exact_match",
    "extract_choice",
    "mme_parse",
    "mme_scores",
    "normalize_words",
    "ocrbench_match",
    "parse_inline_options",
    "pope_label",
    "pope_metrics",
    "relaxed_correctness",
    "vqa_accuracy",
    "vqa_digit_article",
    "vqa_normalize",
    "vqa_punctuation",
]

# -- VQA accuracy ------------------------------------------------------------------------------
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
_DIGIT_COMMA = re.compile(r"(?<=\d),+(?=\d)")


def vqa_punctuation(text: str) -> str:
    """The official punctuation rule of the VQA evaluation.

    Each mark in the VQA list is deleted when it touches a space somewhere in the text (or the
    text has a thousands comma like ``1,000``), else replaced by a space; then every period not
    followed by a digit is deleted. ``"a-b"`` -> ``"a b"``, ``"yes !"`` -> ``"yes "``,
    ``"1,000"`` -> ``"1000"``, ``"3.5."`` -> ``"3.5"``.
    """
    out = text
    thousands = _DIGIT_COMMA.search(text) is not None
    for mark in _VQA_PUNCT:
        if mark + " " in text or " " + mark in text or thousands:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out)


def vqa_digit_article(text: str) -> str:
    """Lower-case, number words zero..ten (and none) to digits, drop articles, restore
    contractions; words re-joined by single spaces."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def vqa_normalize(text: str) -> str:
    """The EvalAI answer processor: lower-case, drop ``,`` and ``?``, split ``'s`` off the
    word, whitespace to spaces, then the punctuation and digit/article rules."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return vqa_digit_article(vqa_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str], *, normalize_answers: str) -> float:
    """VQA accuracy of ``prediction`` against the human ``answers`` (10 for the VQA datasets).

    ``min(1, #other humans who gave the answer / 3)`` averaged over leaving each human out.
    The prediction is always normalised with :func:`vqa_normalize`. ``normalize_answers``:
    ``"always"`` normalises the human answers the same way (lmms-eval's TextVQA and VizWiz);
    ``"if_disagree"`` follows the official VQAv2 script, which strips the answers and, only
    when they are not all equal, applies the punctuation and digit/article rules to them and
    to the prediction once more. An empty ``answers`` scores 0.
    """
    if normalize_answers not in ("always", "if_disagree"):
        raise ValueError(f"normalize_answers={normalize_answers!r}: 'always' or 'if_disagree'")
    if not answers:
        return 0.0
    predicted = vqa_normalize(prediction)
    if normalize_answers == "always":
        humans = [vqa_normalize(a) for a in answers]
    else:
        humans = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
        if len(set(humans)) > 1:
            humans = [vqa_digit_article(vqa_punctuation(a)) for a in humans]
            predicted = vqa_digit_article(vqa_punctuation(predicted))
    total = 0.0
    for left_out in range(len(humans)):
        matches = sum(1 for j, h in enumerate(humans) if j != left_out and h == predicted)
        total += min(1.0, matches / 3)
    return total / len(humans)


# -- exact match -------------------------------------------------------------------------------
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def exact_match(prediction: str, answer: str) -> float:
    """1.0 when equal after lower-casing, deleting ASCII punctuation and trimming (GQA)."""
    clean = lambda s: " ".join(s.lower().translate(_PUNCT_TABLE).split())  # noqa: E731
    return float(clean(prediction) == clean(answer))


_WORD_NUMBERS = {w: d for w, d in _NUMBER_WORDS.items() if w != "none"}


def normalize_words(text: str) -> str:
    """Lower-case, number words zero..ten to digits, punctuation deleted, single spaces."""
    words = text.lower().translate(_PUNCT_TABLE).split()
    return " ".join(_WORD_NUMBERS.get(w, w) for w in words)


# -- MME ---------------------------------------------------------------------------------------
MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
    "artwork", "OCR",
)  # fmt: skip
MME_COGNITION = (
    "commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning",
)  # fmt: skip


def mme_parse(prediction: str) -> str:
    """``yes``, ``no`` or ``other``: the whole answer, a lone y/n, else yes/no in its first 4
    characters (periods removed, case ignored); ``yes`` wins when both appear there."""
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


def mme_scores(records: Iterable[tuple[str, str, bool]]) -> dict[str, float]:
    """MME totals from ``(category, image id, correct)`` per question.

    Per category: ``acc`` = % of questions right, ``acc+`` = % of images with every question
    right; the category score is the mean over its images of (acc + acc+) of the image, which
    with the official two questions per image equals acc + acc+ of the category (max 200).
    Returns ``{category: score}`` plus ``perception`` and ``cognition`` (sums over the
    categories present of each kind; max 2000 and 800), ``acc`` and ``acc_plus`` (over all).
    """
    per_image: dict[tuple[str, str], list[bool]] = {}
    for category, image, correct in records:
        per_image.setdefault((category, image), []).append(bool(correct))
    per_category: dict[str, list[float]] = {}
    for (category, _), answers in per_image.items():
        acc = 100.0 * sum(answers) / len(answers)
        plus = 100.0 * all(answers)
        per_category.setdefault(category, []).append(acc + plus)
    out = {c: sum(v) / len(v) for c, v in per_category.items()}
    out["perception"] = sum(s for c, s in out.items() if c in MME_PERCEPTION)
    out["cognition"] = sum(s for c, s in out.items() if c in MME_COGNITION)
    questions = [a for answers in per_image.values() for a in answers]
    out["acc"] = 100.0 * sum(questions) / len(questions) if questions else 0.0
    images = list(per_image.values())
    out["acc_plus"] = 100.0 * sum(all(a) for a in images) / len(images) if images else 0.0
    return out


# -- POPE --------------------------------------------------------------------------------------
def pope_label(prediction: str) -> str:
    """``no`` if the first sentence has the word ``No``, ``no`` or ``not``, else ``yes``
    (the POPE / LLaVA evaluation: first sentence up to a period, commas deleted)."""
    first = prediction.split(".")[0].replace(",", "")
    words = first.split(" ")
    return "no" if any(w in ("No", "no", "not") for w in words) else "yes"


def pope_metrics(pairs: Iterable[tuple[str, str]]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (``yes`` positive) and yes-ratio, in %, from
    ``(predicted label, true label)`` pairs. Precision/recall/F1 are 0 when undefined."""
    tp = fp = tn = fn = 0
    for predicted, truth in pairs:
        if predicted == "yes":
            tp, fp = (tp + 1, fp) if truth == "yes" else (tp, fp + 1)
        else:
            tn, fn = (tn + 1, fn) if truth == "no" else (tn, fn + 1)
    total = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": 100.0 * (tp + tn) / total if total else 0.0,
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "yes_ratio": 100.0 * (tp + fp) / total if total else 0.0,
    }


# -- multiple choice ---------------------------------------------------------------------------
_ANSWER_IS = re.compile(
    r"(?:answer\s*(?:is|:)|option)\s*:?\s*[\(\[]?([A-Za-z])(?![A-Za-z0-9])", re.IGNORECASE
)
_LEADING = re.compile(r"^[\(\[]?([A-Z])(?:[\)\]\.:,]|$)")
_PARENTHESISED = re.compile(r"\(([A-Z])\)")
_STANDALONE = re.compile(r"(?<![A-Za-z0-9'])([A-Z])(?![A-Za-z0-9'])")


def extract_choice(prediction: str, options: Mapping[str, str]) -> str | None:
    """The option letter a free-text answer picks, or None.

    ``options`` maps letters (``"A"``...) to option texts (texts may be empty). Tried in order:
    the whole answer is one letter (any case, brackets and trailing punctuation ignored);
    ``The answer is C`` / ``Answer: (C)`` / ``Option C``; a leading ``B.``, ``(B)``, ``B)``,
    ``B:``; exactly one distinct ``(X)`` in the text; the answer equals one option's text, or
    contains exactly one option's text as whole words; exactly one distinct standalone capital
    option letter. Letters not among ``options`` never count.
    """
    text = prediction.strip()
    letters = {k.upper() for k in options}
    if not text or not letters:
        return None
    bare = text.strip(" \t\n()[].:,;!")
    if len(bare) == 1 and bare.upper() in letters:
        return bare.upper()
    match = _ANSWER_IS.search(text)
    if match and match.group(1).upper() in letters:
        return match.group(1).upper()
    match = _LEADING.match(text)
    if match and match.group(1) in letters:
        return match.group(1)
    found = {m for m in _PARENTHESISED.findall(text) if m in letters}
    if len(found) == 1:
        return found.pop()
    said = normalize_words(text)
    texts = {k.upper(): normalize_words(v) for k, v in options.items() if str(v).strip()}
    equal = [k for k, v in texts.items() if v and v == said]
    if len(equal) == 1:
        return equal[0]
    contained = [
        k for k, v in texts.items() if v and re.search(rf"(?<!\S){re.escape(v)}(?!\S)", said)
    ]
    if len(contained) == 1:
        return contained[0]
    found = {m for m in _STANDALONE.findall(text) if m in letters}
    if len(found) == 1:
        return found.pop()
    return None


_INLINE_OPTION = re.compile(r"(?:^|[\s,(])([A-H])\s*[\.:\)]\s+")


def parse_inline_options(question: str) -> dict[str, str]:
    """Options written inside a question (MMStar ``Options: A: x, B: y``, RealWorldQA
    ``A. x\\nB. y``) as ``{letter: text}``; the letters must run A, B, C... from A, else {}."""
    marks = list(_INLINE_OPTION.finditer(question))
    # keep the last run A, B, C... (an earlier stray "A." in the question is not an option)
    start = max((i for i, m in enumerate(marks) if m.group(1) == "A"), default=None)
    if start is None:
        return {}
    run = [marks[start]]
    for mark in marks[start + 1 :]:
        if ord(mark.group(1)) == ord(run[-1].group(1)) + 1:
            run.append(mark)
    options: dict[str, str] = {}
    for i, mark in enumerate(run):
        end = run[i + 1].start() if i + 1 < len(run) else len(question)
        body = question[mark.end() : end].split("\n")[0]
        options[mark.group(1)] = body.strip().rstrip(",;").strip()
    return options


# -- ChartQA -----------------------------------------------------------------------------------
def _to_float(text: str) -> float | None:
    try:
        return float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA relaxed accuracy: numeric answers within ``max_relative_change`` of a non-zero
    numeric target (``"12%"`` reads 0.12), otherwise case-insensitive exact match. Surrounding
    whitespace and a trailing period of the prediction are ignored."""
    prediction = prediction.strip()
    if prediction.endswith(".") and not prediction.endswith(".."):
        prediction = prediction[:-1].rstrip()
    target = target.strip()
    predicted, expected = _to_float(prediction), _to_float(target)
    if predicted is not None and expected:  # a zero target falls back to string equality
        return abs(predicted - expected) / abs(expected) <= max_relative_change
    return prediction.lower() == target.lower()


# -- OCRBench ----------------------------------------------------------------------------------
OCRBENCH_RECOGNITION = (
    "Regular Text Recognition", "Irregular Text Recognition", "Artistic Text Recognition",
    "Handwriting Recognition", "Digit String Recognition", "Non-Semantic Text Recognition",
)  # fmt: skip


def ocrbench_match(prediction: str, answers: Sequence[str], dataset: str) -> float:
    """1.0 when some answer is a substring of the prediction (OCRBench's evaluation).

    Both trimmed with newlines as spaces and lower-cased; for ``dataset == "HME100k"``
    (LaTeX of handwritten expressions, where case matters) case is kept and every space is
    removed instead.
    """
    for answer in answers:
        if dataset == "HME100k":
            gt = answer.strip().replace("\n", " ").replace(" ", "")
            if gt in prediction.strip().replace("\n", " ").replace(" ", ""):
                return 1.0
        elif answer.lower().strip().replace("\n", " ") in prediction.lower().strip().replace(
            "\n", " "
        ):
            return 1.0
    return 0.0
