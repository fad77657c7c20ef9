"""Conformance with lmms-eval 0.7.3: prunelab's prompts, per-sample scores, aggregates and
generation settings against lmms-eval's OWN task code, on generated data.

For each benchmark, 1,000+ (row, generated text) pairs covering the normalisation edge cases
(punctuation, number words, contractions, option formats, Chinese text, yes/no variants,
numbers with % and commas, full-width characters, reasoning blocks, stop strings) are scored
twice: by prunelab's offline path (:func:`score_rows`, the parquet path's ``sample_from_row``)
and by lmms-eval's ``doc_to_text`` / filters / ``process_results`` / aggregation functions,
behind lmms-eval's response pipeline (the ``until`` cut, the evaluator's reasoning-tag strip,
``ConfigurableTask.process_results``' strip). Per-sample scores and prompts must be identical,
aggregates equal after unit conversion (lmms-eval fractions, prunelab percentages).

lmms-eval is installed by ``make setup`` (``pip install --no-deps lmms-eval==0.7.3`` and the
``conformance`` extra). Its task modules are loaded from the installed files; three
third-party packages they import are replaced by empty modules because none of their code runs
in the functions under test (see :func:`_install_stubs`).
"""

from __future__ import annotations

import ast
import copy
import importlib
import importlib.util
import random
import re
import sys
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from prunelab.workers.benchmarks import build_benchmark, scoring
from prunelab.workers.benchmarks.lmms import metric_key
from prunelab.workers.benchmarks.offline import ScoredRows, score_rows

SETUP_HINT = (
    "lmms-eval 0.7.3 is not installed: run `make setup` (it installs lmms-eval==0.7.3 with "
    "--no-deps and prunelab's `conformance` extra), then rerun this test"
)
PER_BENCHMARK = 1000  # generated predictions per benchmark, at least
REL = 1e-12  # aggregates: identical up to float summation order


# -- lmms-eval's own code --------------------------------------------------------------------------
def _install_stubs(root: Path) -> None:
    """Make lmms-eval's task modules importable without its heavy dependencies.

    - ``lmms_eval.tasks`` and ``lmms_eval.filters`` are registered as bare packages over their
      real directories, so their submodules load from the installed files while their
      ``__init__`` (the TaskManager, which imports ``datasets`` / ``accelerate``; the filter
      registry) is not executed: neither is used by the functions under test.
    - ``datasets`` (``lmms_eval.api.filter`` imports ``Dataset`` for an annotation,
      ``gqa/utils.py`` imports ``load_dataset`` for ``gqa_process_docs``), ``evaluate``
      (``lmms_eval.api.registry``, for ``get_metric(hf_evaluate_metric=True)``) and
      ``sacrebleu`` (``lmms_eval.api.metrics``' BLEU / chrF / TER) are empty modules: the code
      that uses them never runs here.
    """
    for name in ("tasks", "filters"):
        package = types.ModuleType(f"lmms_eval.{name}")
        package.__path__ = [str(root / name)]
        sys.modules.setdefault(f"lmms_eval.{name}", package)
    stubs: dict[str, dict[str, Any]] = {
        "datasets": {"Dataset": type("Dataset", (), {}), "load_dataset": None},
        "evaluate": {"load": None},
        "sacrebleu": {},
    }
    for name, attributes in stubs.items():
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__dict__.update(attributes)
            sys.modules[name] = module


def _source_default(path: Path, pattern: str) -> str:
    """The Python literal that ``pattern``'s one group finds in ``path``, evaluated."""
    match = re.search(pattern, path.read_text(encoding="utf-8"))
    assert match, f"{path}: no {pattern!r}"
    return ast.literal_eval(match.group(1))


class LmmsEval:
    """lmms-eval 0.7.3's task functions and defaults, loaded from the installed package."""

    def __init__(self) -> None:
        spec = importlib.util.find_spec("lmms_eval")
        if spec is None or not spec.submodule_search_locations:
            pytest.fail(SETUP_HINT, pytrace=False)
        from importlib.metadata import version

        assert version("lmms_eval") == "0.7.3", f"lmms-eval {version('lmms_eval')}: {SETUP_HINT}"
        self.root = Path(next(iter(spec.submodule_search_locations)))
        _install_stubs(self.root)
        try:
            self.utils = importlib.import_module("lmms_eval.utils")
            self.metrics = importlib.import_module("lmms_eval.api.metrics")
            self.reasoning = importlib.import_module("lmms_eval.api.reasoning")
        except ImportError as exc:
            pytest.fail(f"{exc}: {SETUP_HINT}", pytrace=False)
        from loguru import logger

        logger.disable("lmms_eval")  # its aggregations log every category
        # the CLI's --reasoning_tags default, TaskConfig's fewshot_delimiter (the `until` of a
        # task that gives none) and the llava model's max_new_tokens default
        self.reasoning_tags = ast.literal_eval(
            _source_default(
                self.root / "__main__.py", r'"--reasoning_tags",[^)]*?default=(\'.*?\'),'
            )
        )
        self.fewshot_delimiter = _source_default(
            self.root / "api" / "task.py", r"fewshot_delimiter: str = (\"[^\"]*\")"
        )
        self.default_max_new_tokens = _source_default(
            self.root / "models" / "simple" / "llava.py", r'gen_kwargs\["max_new_tokens"\] = (\d+)'
        )

    def task(self, module: str) -> types.ModuleType:
        return importlib.import_module(f"lmms_eval.tasks.{module}")

    def config(self, task_yaml: str) -> dict[str, Any]:
        """A task yaml with its includes, as lmms-eval loads it (``!function`` left unbuilt)."""
        return self.utils.load_yaml_config(str(self.root / "tasks" / task_yaml), mode="simple")

    def prompt_kwargs(self, task_yaml: str) -> dict[str, Any]:
        """``lmms_eval_specific_kwargs`` as a task hands them to ``doc_to_text`` for a model
        without its own entry (``_prepare_model_specific_config``: the default merged in)."""
        kwargs = dict(self.config(task_yaml)["lmms_eval_specific_kwargs"])
        kwargs.update(kwargs["default"])
        return kwargs

    def generation(self, task_yaml: str) -> tuple[int, tuple[str, ...]]:
        """(max_new_tokens, until) of a task: its generation_kwargs, ``until`` defaulting to
        ``[fewshot_delimiter]`` (``TaskConfig.__post_init__``), max_new_tokens to the llava
        model's default."""
        kwargs = self.config(task_yaml).get("generation_kwargs") or {}
        until = kwargs.get("until", [self.fewshot_delimiter])
        until = [until] if isinstance(until, str) else until
        return kwargs.get("max_new_tokens", self.default_max_new_tokens), tuple(until)

    def response(
        self, text: str, until: Sequence[str], extract: Callable[[str], str] | None = None
    ) -> str:
        """What a ``process_results`` receives for generated ``text``: cut at ``until`` (the
        model), the task's filter, the evaluator's reasoning-tag strip (CLI default), the
        ``ConfigurableTask.process_results`` strip."""
        for term in until:
            if term:
                text = text.split(term)[0]
        if extract is not None:
            text = extract(text)
        return self.reasoning.strip_reasoning_tags(text, self.reasoning_tags).strip()


@pytest.fixture(scope="module")
def lmms() -> LmmsEval:
    return LmmsEval()


# -- generated data ----------------------------------------------------------------------------
RNG_SEED = 20240607
DECORATIONS: tuple[Callable[[str], str], ...] = (
    lambda s: s,
    lambda s: s,
    str.upper,
    str.capitalize,
    str.lower,
    lambda s: s + ".",
    lambda s: s + " .",
    lambda s: s + "!",
    lambda s: f" {s} \n",
    lambda s: s.replace(" ", "  "),
    lambda s: s.replace(" ", "\t"),
    lambda s: f"{s}\n\nASSISTANT: {s} again",
    lambda s: f"{s}ASSISTANT: no",
    lambda s: f"<think>It could be no.</think>{s}",
    lambda s: f"</think> {s}",
    lambda s: f"<analysis>hmm</analysis>\n{s}",
    lambda s: f"The answer is {s}.",
    lambda s: f"{s}, I think",
    lambda s: f"({s})",
    lambda s: s + "." * 40,
)


def decorated(rng: random.Random, base: str) -> str:
    """``base`` with a random decoration (case, punctuation, spacing, stop string, reasoning)."""
    return rng.choice(DECORATIONS)(base)


def predictions(rng: random.Random, pool: Sequence[str], count: int) -> list[str]:
    """``count`` texts: each of ``pool`` once as is, then decorated draws."""
    out = list(pool)[:count]
    while len(out) < count:
        out.append(decorated(rng, rng.choice(pool)))
    return out


VQA_WORDS = (
    "man's", "mans", "man", "two", "2", "yes", "no", "Yes", "red", "Red.", "t-shirt", "tshirt",
    "1,000", "1000", "3.5", "none", "0", "a dog", "dog", "the cat", "dont", "don't", "it's",
    "it is", "coffee table", "coffee  table", "unanswerable", "Unanswerable", "nokia", "Nokia",
    "New York.", "new york", "50%", "$5", "well-known", "e.g", "(yes)", "yes!", "a/b", "ten", "10",
    "eleven", "红色", "东京", "twas", "yall", "45%%", "yes" + "." * 40, "no" + "." * 33, "?",
    "left, right", "5.", "1,000,000", "can't", "cant", "two people", "2 people", "bird's eye",
    "yes .", "Yes, it is", "one", "1", "ＳＴＯＰ",
)  # fmt: skip


def vqa_answers(rng: random.Random) -> list[str]:
    """Ten human answers: unanimous, a 7 / 3 split, or scattered (a few with stray spaces)."""
    mode = rng.randrange(3)
    if mode == 0:
        return [rng.choice(VQA_WORDS)] * 10
    if mode == 1:
        a, b = rng.sample(VQA_WORDS, 2)
        return [a] * 7 + [b] * 3
    return [rng.choice(VQA_WORDS) + rng.choice(("", "", " ", "\n")) for _ in range(10)]


def vqa_docs(kind: str, rng: random.Random, count: int) -> tuple[list[dict], list[str]]:
    docs, texts = [], []
    for i in range(count):
        answers = vqa_answers(rng)
        doc: dict[str, Any] = {"question_id": i, "question": rng.choice(QUESTIONS)}
        if kind == "vqav2":  # answer records; some without answer_id (equal records)
            with_ids = rng.random() < 0.8
            doc["answers"] = [
                {
                    "answer": a,
                    "answer_confidence": "yes",
                    **({"answer_id": j + 1} if with_ids else {}),
                }
                for j, a in enumerate(answers)
            ]
            doc["answer_type"] = rng.choice(("yes/no", "number", "other"))
        else:
            doc["answers"] = answers
        if kind == "vizwiz":
            doc["category"] = rng.choice(("unanswerable", "other", "yes/no", "number"))
        docs.append(doc)
        base = rng.choice(answers) if rng.random() < 0.6 else rng.choice(VQA_WORDS)
        texts.append(decorated(rng, base))
    return docs, texts


QUESTIONS = (
    "what brand is this?", "How many dogs are there?", "what is the MAN holding?",
    "is it raining?", "这是什么颜色？", "What's written on the sign?", "  where is this?  ",
)  # fmt: skip


# -- the two sides -----------------------------------------------------------------------------
def run_prunelab(
    kind: str, docs: Sequence[dict], texts: Sequence[str], **config: Any
) -> ScoredRows:
    rows = [
        (line, {**copy.deepcopy(doc), "id": f"s{line}", "prediction": text})
        for line, (doc, text) in enumerate(zip(docs, texts, strict=True), start=1)
    ]
    return score_rows({"name": kind, "kind": kind, **config}, rows, "lmms_eval")


def assert_samples(
    scored: ScoredRows, expected_scores: Sequence[float], expected_prompts: Sequence[str]
) -> None:
    assert len(scored.samples) == len(expected_scores) >= PER_BENCHMARK
    scores = [s["score"] for s in scored.samples]
    wrong = [(i, scores[i], e) for i, e in enumerate(expected_scores) if scores[i] != e]
    assert not wrong, f"{len(wrong)} per-sample scores differ, first: {wrong[:5]}"
    prompts = [s["prompt"] for s in scored.samples]
    differ = [(p, e) for p, e in zip(prompts, expected_prompts, strict=True) if p != e]
    assert not differ, f"{len(differ)} prompts differ, first: {differ[:2]}"
    assert 0 < sum(expected_scores) < len(expected_scores), "the data should score both ways"


def assert_metrics(metrics: dict[str, float], expected: dict[str, float]) -> None:
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, rel=REL, abs=1e-9), name


def assert_generation(lmms: LmmsEval, kind: str, task_yaml: str, **config: Any) -> None:
    benchmark = build_benchmark({"kind": kind, "path": "-", **config})
    assert (benchmark.max_new_tokens, benchmark.until) == lmms.generation(task_yaml)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)  # lmms-eval's `mean` aggregation


def by_category(docs: Sequence[dict], values: Sequence[float], column: str) -> dict[str, float]:
    """``score.<category>``: 100 x the mean of lmms-eval's per-sample values per category."""
    out: dict[str, list[float]] = {}
    for doc, value in zip(docs, values, strict=True):
        out.setdefault(doc[column], []).append(value)
    return {metric_key(c): 100 * mean(v) for c, v in out.items()}


# -- open-ended VQA ----------------------------------------------------------------------------
VQA_TASKS = {
    "vqav2": ("vqav2/vqav2_val.yaml", "vqav2.utils", "vqav2_process_results", "vqav2_doc_to_text"),
    "textvqa": ("textvqa/textvqa_val.yaml", "textvqa.utils", "textvqa_process_results",
                "textvqa_doc_to_text"),
    "vizwiz": ("vizwiz_vqa/vizwiz_vqa_val.yaml", "vizwiz_vqa.utils", "vizwiz_vqa_process_results",
               "vizwiz_vqa_doc_to_text"),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(VQA_TASKS))
def test_vqa_benchmarks(lmms: LmmsEval, kind: str) -> None:
    task_yaml, module, process, to_text = VQA_TASKS[kind]
    utils = lmms.task(module)
    docs, texts = vqa_docs(kind, random.Random(RNG_SEED), PER_BENCHMARK)
    _, until = lmms.generation(task_yaml)
    kwargs = lmms.prompt_kwargs(task_yaml)
    expected = [
        float(getattr(utils, process)(copy.deepcopy(d), [lmms.response(t, until)])["exact_match"])
        for d, t in zip(docs, texts, strict=True)
    ]
    prompts = [getattr(utils, to_text)(copy.deepcopy(d), kwargs) for d in docs]
    scored = run_prunelab(kind, docs, texts)
    assert_samples(scored, expected, prompts)
    column = {"vqav2": "answer_type", "vizwiz": "category"}.get(kind)
    aggregate = {"score": 100 * mean(expected)}
    if column:
        aggregate.update(by_category(docs, expected, column))
    assert_metrics(scored.metrics, aggregate)
    assert_generation(lmms, kind, task_yaml)


def test_evalai_processor_matches(lmms: LmmsEval) -> None:
    processor = lmms.task("_task_utils.vqa_eval_metric").EvalAIAnswerProcessor()
    rng = random.Random(RNG_SEED)
    texts = [*VQA_WORDS, *(decorated(rng, rng.choice(VQA_WORDS)) for _ in range(PER_BENCHMARK))]
    for text in texts:
        assert scoring.vqa_normalize(text) == processor(text), text
        assert scoring.vqa_punctuation(text) == processor.process_punctuation(text), text
        assert scoring.vqa_digit_article(text) == processor.process_digit_article(text), text


# -- GQA ---------------------------------------------------------------------------------------
def test_gqa(lmms: LmmsEval) -> None:
    utils, rng = lmms.task("gqa.utils"), random.Random(RNG_SEED + 1)
    task_yaml = "gqa/gqa.yaml"
    words = ("yes", "no", "coffee table", "left", "right", "t-shirt", "the man", "Red", "狗")
    docs = [
        {"imageId": f"n{i}", "question": rng.choice(QUESTIONS), "answer": rng.choice(words)}
        for i in range(PER_BENCHMARK)
    ]
    pool = (*words, "yes .", "coffee  table", "Yes.", "LEFT!", "tshirt", " left ", "no,")
    texts = [decorated(rng, d["answer"]) if rng.random() < 0.5 else rng.choice(pool) for d in docs]
    _, until = lmms.generation(task_yaml)
    kwargs = lmms.prompt_kwargs(task_yaml)
    expected = [
        float(
            lmms.metrics.exact_match_hf_evaluate(
                predictions=[lmms.response(t, until)], references=[d["answer"]],
                ignore_case=True, ignore_punctuation=True,
            )["exact_match"]
        )
        for d, t in zip(docs, texts, strict=True)
    ]  # fmt: skip
    prompts = [utils.gqa_doc_to_text(d, kwargs) for d in docs]
    scored = run_prunelab("gqa", docs, texts)
    assert_samples(scored, expected, prompts)
    assert_metrics(scored.metrics, {"score": 100 * mean(expected)})
    assert_generation(lmms, "gqa", task_yaml)


# -- multiple choice ---------------------------------------------------------------------------
OPTION_TEXTS = ("teddy bear", "rabbit", "cat", "dog", "red car", "猫", "A dog", "none", "3", "nan")


def option_predictions(rng: random.Random, options: Sequence[str], answer: str) -> str:
    """A generated answer to a multiple-choice question: a letter in one of many formats,
    an option's text, or something else."""
    letter = rng.choice([answer, answer, *(chr(65 + i) for i in range(len(options))), "E"])
    text = options[ord(letter) - 65] if ord(letter) - 65 < len(options) else "unknown"
    forms = (
        "{l}", "{l}.", "({l})", "{l})", "{l}) {t}", "{l}. {t}", "{l}: {t}", "The answer is {l}",
        "The answer is {l}. Because the cat is on the left.", "Answer: {l}", "Option {l}",
        "option {lower}", "{lower}", "{lower}.", "{t}", "It is {t}.", "I choose {l}", "答案是{l}",
        "选{l}", "{l}\n\nASSISTANT: B", "<think>maybe A</think>{l}", "I think {l} or B",
        "Both (A) and ({l})", "", "A dog", "The correct answer is ({l}).", "{l},", "**{l}**",
        "  {l}  ", "{l} is right", "None of them", "Cat",
    )  # fmt: skip
    return rng.choice(forms).format(l=letter, t=text, lower=letter.lower())


def test_scienceqa_img(lmms: LmmsEval) -> None:
    utils, rng = lmms.task("scienceqa.utils"), random.Random(RNG_SEED + 2)
    task_yaml = "scienceqa/scienceqa_img.yaml"
    docs = []
    for _ in range(PER_BENCHMARK):
        choices = rng.sample(OPTION_TEXTS, rng.randint(2, 5))
        hint = rng.choice(("", "", "Look at the picture.", "图中有一只猫。"))
        docs.append({"question": rng.choice(QUESTIONS), "choices": choices,
                     "answer": rng.randrange(len(choices)), "hint": hint,
                     "subject": rng.choice(("natural science", "social science"))})  # fmt: skip
    texts = [option_predictions(rng, d["choices"], chr(65 + d["answer"])) for d in docs]
    _, until = lmms.generation(task_yaml)
    kwargs = lmms.prompt_kwargs(task_yaml)
    expected = [
        float(utils.sqa_process_results(d, [lmms.response(t, until)])["exact_match"])
        for d, t in zip(docs, texts, strict=True)
    ]
    prompts = [utils.sqa_doc_to_text(d, kwargs) for d in docs]
    scored = run_prunelab("scienceqa_img", docs, texts)
    assert_samples(scored, expected, prompts)
    aggregate = {"score": 100 * mean(expected), **by_category(docs, expected, "subject")}
    assert_metrics(scored.metrics, aggregate)
    assert_generation(lmms, "scienceqa_img", task_yaml)


def test_ai2d(lmms: LmmsEval) -> None:
    utils, rng = lmms.task("ai2d.utils"), random.Random(RNG_SEED + 3)
    task_yaml = "ai2d/ai2d.yaml"
    config = lmms.config(task_yaml)
    (step,) = config["filter_list"][0]["filter"]  # flexible-extract, as the yaml builds it
    extract_filter = utils.MultiChoiceRegexFilter(
        **{k: v for k, v in step.items() if k != "function"}
    )
    docs = []
    for _ in range(PER_BENCHMARK):
        options = rng.sample(OPTION_TEXTS, rng.randint(2, 4))
        docs.append({"question": rng.choice(QUESTIONS), "options": options,
                     "answer": str(rng.randrange(len(options)))})  # fmt: skip
    texts = [option_predictions(rng, d["options"], chr(65 + int(d["answer"]))) for d in docs]
    _, until = lmms.generation(task_yaml)
    kwargs = lmms.prompt_kwargs(task_yaml)
    target = config["model_specific_target_kwargs"]["default"]
    expected = []
    for d, t in zip(docs, texts, strict=True):
        response = lmms.response(t, until, lambda r, d=d: extract_filter.apply([[r]], [d])[0])
        result = lmms.metrics.exact_match_hf_evaluate(
            predictions=[response], references=[utils.ai2d_doc_to_target(d, target)],
            ignore_case=True, ignore_punctuation=True,
        )  # fmt: skip
        expected.append(float(result["exact_match"]))
    prompts = [utils.ai2d_doc_to_text(d, kwargs) for d in docs]
    scored = run_prunelab("ai2d", docs, texts)
    assert_samples(scored, expected, prompts)
    assert_metrics(scored.metrics, {"score": 100 * mean(expected)})
    assert_generation(lmms, "ai2d", task_yaml)


def test_seedbench2_plus(lmms: LmmsEval) -> None:
    utils, rng = lmms.task("seedbench_2_plus.utils"), random.Random(RNG_SEED + 4)
    task_yaml = "seedbench_2_plus/seedbench_2_plus.yaml"
    docs = []
    for i in range(PER_BENCHMARK):
        choices = [rng.choice((*OPTION_TEXTS, "chart_12.png", "map.jpg")) for _ in range(4)]
        docs.append({"question_id": str(i), "question": rng.choice(QUESTIONS) + " <img>",
                     **{f"choice_{k}": c for k, c in zip("ABCD", choices, strict=True)},
                     "answer": rng.choice("ABCD"),
                     "question_image_type": rng.choice(("chart", "map", "web"))})  # fmt: skip
    texts = [option_predictions(rng, [d[f"choice_{k}"] for k in "ABCD"], d["answer"]) for d in docs]
    _, until = lmms.generation(task_yaml)
    kwargs = lmms.prompt_kwargs(task_yaml)
    results = [
        utils.seed_process_result(d, [lmms.response(t, until)])
        for d, t in zip(docs, texts, strict=True)
    ]
    expected = [float(utils.seed_aggregation_result([r["seedbench_2_plus_all"]])) for r in results]
    prompts = [utils.seed_doc_to_text(d, kwargs) for d in docs]
    scored = run_prunelab("seedbench2_plus", docs, texts)
    assert_samples(scored, expected, prompts)
    aggregate = {
        "score": 100 * utils.seed_aggregation_result([r["seedbench_2_plus_all"] for r in results])
    }
    for kind in ("chart", "map", "web"):
        key = f"seedbench_2_plus_{kind.capitalize()}"
        aggregate[f"score.{kind}"] = 100 * utils.seed_aggregation_result(
            [r[key] for r in results if key in r]
        )
    assert_metrics(scored.metrics, aggregate)
    assert_generation(lmms, "seedbench2_plus", task_yaml)


def test_realworldqa(lmms: LmmsEval) -> None:
    utils, rng = lmms.task("realworldqa.utils"), random.Random(RNG_SEED + 5)
    task_yaml = "realworldqa/realworldqa.yaml"
    docs, texts = [], []
    for _ in range(PER_BENCHMARK):
        if rng.random() < 0.6:
            options = rng.sample(OPTION_TEXTS, 4)
            lines = "\n".join(f"{k}. {o}" for k, o in zip("ABCD", options, strict=True))
            question = f"{rng.choice(QUESTIONS)}\n\n{lines}\n{utils.REPLACE_PROMPT}"
            answer = rng.choice("ABCD")
            texts.append(option_predictions(rng, options, answer))
        else:
            question = (
                f"{rng.choice(QUESTIONS)} Please answer directly with a single word or number."
            )
            answer = rng.choice(("3", "0", "Downhill", "left", "2"))
            pool = ("3", "three", "3.", "Three", "0", "zero", "downhill", "Downhill.", "2", "two")
            texts.append(decorated(rng, rng.choice(pool)))
        docs.append({"question": question, "answer": answer})
    _, until = lmms.generation(task_yaml)
    kwargs = lmms.prompt_kwargs(task_yaml)
    expected = [
        float(utils.realworldqa_process_results(d, [lmms.response(t, until)])["exact_match"])
        for d, t in zip(docs, texts, strict=True)
    ]
    prompts = [utils.realworldqa_doc_to_text(d, kwargs) for d in docs]
    scored = run_prunelab("realworldqa", docs, texts)
    assert_samples(scored, expected, prompts)
    assert_metrics(scored.metrics, {"score": 100 * mean(expected)})
    assert_generation(lmms, "realworldqa", task_yaml)


def test_mcq_extraction_matches(lmms: LmmsEval) -> None:
    extract = lmms.task("_task_utils.mcq_extract").extract_mcq_answer
    rng = random.Random(RNG_SEED + 6)
    texts = [option_predictions(rng, OPTION_TEXTS[:4], rng.choice("ABCD")) for _ in range(3000)]
    texts += [decorated(rng, t) for t in texts[:1000]]
    for choices in (None, ["A", "B", "C", "D"], ["A", "B"]):
        for text in texts:
            assert scoring.extract_mcq_answer(text, choices) == extract(text, choices), text


# -- MMBench -----------------------------------------------------------------------------------
def mmbench_docs(rng: random.Random, count: int) -> list[dict]:
    """MMBench rows in circular groups: a main row (index < 1e6) and up to three variants
    (index + k * 1e6) with the options rotated; some groups without their main row."""
    docs: list[dict] = []
    question_id = 0
    while len(docs) < count:
        question_id += 1
        n_options = rng.choice((2, 3, 4, 4))
        options = rng.sample(OPTION_TEXTS, n_options)
        answer = rng.randrange(n_options)
        hint = rng.choice((None, None, "nan", "", "A farm.", "一个农场。", float("nan")))
        category = rng.choice(("attribute_recognition", "object_localization", "ocr"))
        variants = range(rng.randint(1, 4))
        skip_main = rng.random() < 0.05
        for k in variants:
            if k == 0 and skip_main:
                continue
            shift = k % n_options
            rotated = options[shift:] + options[:shift]
            doc: dict[str, Any] = {
                "index": question_id + k * 1_000_000,
                "question": rng.choice(QUESTIONS),
                "answer": chr(65 + (answer - shift) % n_options),
                "hint": hint,
                "category": category,
                "L2-category": "perception",
                "source": "generated",
                "split": "dev",
            }
            for j, letter in enumerate("ABCD"):
                doc[letter] = rotated[j] if j < n_options else rng.choice((None, "nan", None))
            if rng.random() < 0.3:
                doc["E"] = None
            docs.append(doc)
    return docs


@pytest.mark.parametrize("language", ["en", "cn"])
def test_mmbench_circular(lmms: LmmsEval, language: str) -> None:
    import pandas as pd

    utils = lmms.task(f"mmbench.{language}_utils")
    task_yaml = f"mmbench/mmbench_{language}_dev.yaml"
    rng = random.Random(RNG_SEED + 7)
    docs = mmbench_docs(rng, PER_BENCHMARK)
    texts = [option_predictions(rng, [d[k] or "" for k in "ABCD"], d["answer"]) for d in docs]
    _, until = lmms.generation(task_yaml)
    kwargs = lmms.prompt_kwargs(task_yaml)
    results = [
        utils.mmbench_process_results(d, [lmms.response(t, until)])["gpt_eval_score"]
        for d, t in zip(docs, texts, strict=True)
    ]
    evaluator = utils.mmbench_evaluator

    def row_hit(result: dict) -> float:  # one row alone through eval_sub_data, as eval_result
        frame = pd.DataFrame([result])  # prepares its frame
        frame["prediction"] = [str(x) for x in frame["prediction"]]
        for key in list(frame.keys()):
            frame[key.lower() if key not in "ABCD" else key] = frame.pop(key)
        return float(evaluator.eval_sub_data(frame, {result["index"]: result["answer"]}, True))

    expected = [row_hit(r) for r in results]
    prompts = [utils.mmbench_doc_to_text(d, kwargs) for d in docs]
    scored = run_prunelab("mmbench", docs, texts, language=language)
    assert_samples(scored, expected, prompts)
    overall, per_category, _ = evaluator.eval_result(results, eval_method="static")
    aggregate = {"score": 100 * overall, "mmbench_vanilla": 100 * mean(expected)}
    aggregate.update({f"score.{c}": 100 * v for c, v in per_category.items()})
    assert_metrics(scored.metrics, aggregate)
    assert {k for k in scored.metrics if k.startswith("score.")} == {
        f"score.{c}" for c in per_category
    }
    assert_generation(lmms, "mmbench", task_yaml, language=language)


# -- MMStar ------------------------------------------------------------------------------------
def test_mmstar(lmms: LmmsEval) -> None:
    utils, rng = lmms.task("mmstar.utils"), random.Random(RNG_SEED + 8)
    task_yaml = "mmstar/mmstar.yaml"
    fine = [(c, l2) for c, l2s in utils.eval_type_dict.items() for l2 in l2s]
    docs = []
    for i in range(PER_BENCHMARK):
        options = rng.sample(OPTION_TEXTS, 4)
        listed = ", ".join(f"{k}: {o}" for k, o in zip("ABCD", options, strict=True))
        question = (
            f"{rng.choice(QUESTIONS)}{rng.choice(('', utils.replace_prompt))}\nOptions: {listed}"
        )
        category, l2 = rng.choice(fine[: rng.choice((6, 18))])  # uneven fine categories
        docs.append({"index": i, "question": question, "answer": rng.choice("ABCD"),
                     "category": category, "l2_category": l2})  # fmt: skip
    texts = [
        option_predictions(rng, d["question"].split("Options: ")[1].split(", "), d["answer"])
        for d in docs
    ]
    _, until = lmms.generation(task_yaml)
    kwargs = lmms.prompt_kwargs(task_yaml)
    results = [
        utils.mmstar_process_results(d, [lmms.response(t, until)])
        for d, t in zip(docs, texts, strict=True)
    ]
    expected = [float(r["average"]["score"]) for r in results]
    prompts = [utils.mmstar_doc_to_text(d, kwargs) for d in docs]
    scored = run_prunelab("mmstar", docs, texts)
    assert_samples(scored, expected, prompts)
    aggregate = {"score": 100 * utils.mmstar_aggregate_results([r["average"] for r in results])}
    for category in {d["category"] for d in docs}:
        subset = [r[category] for r in results if category in r]
        aggregate[metric_key(category)] = 100 * utils.mmstar_aggregate_results(subset)
    assert_metrics(scored.metrics, aggregate)
    assert_generation(lmms, "mmstar", task_yaml)


# -- ChartQA, OCRBench -------------------------------------------------------------------------
def test_chartqa(lmms: LmmsEval) -> None:
    utils, rng = lmms.task("chartqa.utils"), random.Random(RNG_SEED + 9)
    task_yaml = "chartqa/chartqa.yaml"
    targets = ("45", "0.45", "12%", "1,000", "1000", "0", "Yes", "brazil", "Brazil ", "3.14", "-2")
    pool = (
        "45%%", "45.", "45%", "46", "47.5", "1000", "1,000", "Brazil.", " brazil ", "brazil", "nan",
        "inf", "1e3", "0.0", "0", "yes", "12", "0.12", "12.5%", "3.1", "-2.05", "45 %", "四十五",
    )  # fmt: skip
    docs = [
        {"question": rng.choice(QUESTIONS), "answer": rng.choice(targets),
         "type": rng.choice(("human_test", "augmented_test"))}
        for _ in range(PER_BENCHMARK)
    ]  # fmt: skip
    texts = [decorated(rng, rng.choice(pool)) for _ in docs]
    _, until = lmms.generation(task_yaml)
    kwargs = lmms.prompt_kwargs(task_yaml)
    results = [
        utils.chartqa_process_results(d, [lmms.response(t, until)])
        for d, t in zip(docs, texts, strict=True)
    ]
    expected = [float(r["relaxed_overall"]) for r in results]
    prompts = [utils.chartqa_doc_to_text(d, kwargs) for d in docs]
    scored = run_prunelab("chartqa", docs, texts)
    assert_samples(scored, expected, prompts)
    human = [r["relaxed_human_split"] for r in results if "relaxed_human_split" in r]
    augmented = [r["relaxed_augmented_split"] for r in results if "relaxed_augmented_split" in r]
    aggregate = {"score": 100 * mean(expected), "score.human_test": 100 * mean(human),
                 "score.augmented_test": 100 * mean(augmented)}  # fmt: skip
    assert_metrics(scored.metrics, aggregate)
    assert_generation(lmms, "chartqa", task_yaml)


def test_ocrbench(lmms: LmmsEval, tmp_path: Path) -> None:
    utils, rng = lmms.task("ocrbench.utils"), random.Random(RNG_SEED + 10)
    task_yaml = "ocrbench/ocrbench.yaml"
    question_types = list(utils.OCRBench_score)
    words = ("STOP", "Hello World", "x ^ { 2 } + 1", "42", "forty-two", "北京", "$5", "May 3")
    docs = []
    for _ in range(PER_BENCHMARK):
        qtype = rng.choice(question_types)
        dataset = (
            "HME100k"
            if qtype.startswith("Handwritten Mathematical")
            else rng.choice(("IIIT5K", "docVQA", "FUNSD"))
        )
        answer: Any = rng.sample(words, rng.randint(1, 2))
        answer = answer[0] if rng.random() < 0.2 else answer
        docs.append({"question": rng.choice(QUESTIONS), "answer": answer, "dataset": dataset,
                     "question_type": qtype})  # fmt: skip
    fullwidth = {"STOP": "ＳＴＯＰ", "Hello World": "Ｈｅｌｌｏ\u3000Ｗｏｒｌｄ", "42": "４２"}
    pool = (*words, *fullwidth.values(), "x^{2}+1", "X^{2}+1", "it says stop", "hello\nworld")
    texts = [decorated(rng, rng.choice(pool)) for _ in docs]
    _, until = lmms.generation(task_yaml)
    kwargs = lmms.prompt_kwargs(task_yaml)
    results = [
        utils.ocrbench_process_results(d, [lmms.response(t, until)])["ocrbench_accuracy"]
        for d, t in zip(docs, texts, strict=True)
    ]
    expected = [float(r["score"]) for r in results]
    prompts = [utils.ocrbench_doc_to_text(d, kwargs) for d in docs]
    scored = run_prunelab("ocrbench", docs, texts)
    assert_samples(scored, expected, prompts)
    utils.OCRBench_score.update(dict.fromkeys(utils.OCRBench_score, 0))  # module-level tally
    final = utils.ocrbench_aggregate_accuracy(
        results, types.SimpleNamespace(output_path=str(tmp_path))
    )
    recognition = sum(
        r["score"] for r in results if r["question_type"] in scoring.OCRBENCH_RECOGNITION
    )
    aggregate = {"ocrbench_correct": 1000 * final, "score": 1000 * mean(expected),
                 "ocrbench_text_recognition": recognition}  # fmt: skip
    assert_metrics(scored.metrics, aggregate)
    assert_generation(lmms, "ocrbench", task_yaml)


# -- yes / no ----------------------------------------------------------------------------------
YES_NO = (
    "Yes", "No", "yes.", "No.", "y", "N", "Yes, there is.", "No, there is not.", "not sure",
    "There is no dog", "YES", "n.o", "", "maybe", " no", "yesno", "no yes", "Nope", "是",
    "There is not a dog.", "I see no. Dog", "no,", "Noo",
)  # fmt: skip


def test_mme(lmms: LmmsEval) -> None:
    utils, rng = lmms.task("mme.utils"), random.Random(RNG_SEED + 11)
    task_yaml = "mme/mme.yaml"
    categories = [*utils.eval_type_dict["Perception"], *utils.eval_type_dict["Cognition"]]
    docs = []
    for image in range(PER_BENCHMARK // 2 + 1):
        category = rng.choice([*categories, "artwork_extra"])  # not MME's: lmms-eval's cognition
        for answer in rng.choice((("Yes", "No"), ("No", "Yes"), ("Yes", "Yes."))):
            question = f"Is there a thing {image}?{rng.choice((utils.replace_prompt, ''))}"
            docs.append({"question_id": f"{category}/{image}.png", "question": question,
                         "answer": answer, "category": category})  # fmt: skip
    texts = [decorated(rng, rng.choice(YES_NO)) for _ in docs]
    _, until = lmms.generation(task_yaml)
    kwargs = lmms.prompt_kwargs(task_yaml)
    results = [
        next(iter(utils.mme_process_results(d, [lmms.response(t, until)]).items()))
        for d, t in zip(docs, texts, strict=True)
    ]
    expected = [float(value["score"]) for _, value in results]
    prompts = [utils.mme_doc_to_text(d, kwargs) for d in docs]
    scored = run_prunelab("mme", docs, texts)
    assert_samples(scored, expected, prompts)
    totals = {
        key: utils.mme_aggregate_results([v for k, v in results if k == key])
        for key in ("mme_perception_score", "mme_cognition_score")
    }
    perception, cognition = totals["mme_perception_score"], totals["mme_cognition_score"]
    aggregate = {"score": perception, "mme_perception": perception, "mme_cognition": cognition}
    assert_metrics(scored.metrics, aggregate)
    assert_generation(lmms, "mme", task_yaml)


def test_pope(lmms: LmmsEval) -> None:
    utils, rng = lmms.task("pope.utils"), random.Random(RNG_SEED + 12)
    task_yaml = "pope/pope.yaml"
    docs = [
        {"question_id": str(i), "question": f" Is there a thing {i} in the image? ",
         "answer": rng.choice(("yes", "no", "Yes ")),
         "category": rng.choice(("adversarial", "popular", "random"))}
        for i in range(PER_BENCHMARK)
    ]  # fmt: skip
    texts = [decorated(rng, rng.choice(YES_NO)) for _ in docs]
    _, until = lmms.generation(task_yaml)
    kwargs = lmms.prompt_kwargs(task_yaml)
    results = [
        utils.pope_process_results(d, [lmms.response(t, until)])
        for d, t in zip(docs, texts, strict=True)
    ]
    expected = [float(r["pope_accuracy"]["score"]) for r in results]
    prompts = [utils.pope_doc_to_text(d, kwargs) for d in docs]
    scored = run_prunelab("pope", docs, texts)
    assert_samples(scored, expected, prompts)

    def aggregates(subset: Sequence[dict], prefix: str) -> dict[str, float]:
        names = ("accuracy", "precision", "recall", "f1_score", "yes_ratio")
        return {
            f"{prefix}{name.removesuffix('_score')}": 100
            * getattr(utils, f"pope_aggregate_{name}")([r[f"pope_{name}"] for r in subset])
            for name in names
        }

    aggregate = aggregates(results, "pope_")
    aggregate["score"] = aggregate["pope_f1"]
    for category in ("adversarial", "popular", "random"):
        subset = [r for r, d in zip(results, docs, strict=True) if d["category"] == category]
        aggregate[f"score.{category}"] = aggregates(subset, "")["f1"]
    assert_metrics(scored.metrics, aggregate)
    assert_generation(lmms, "pope", task_yaml)


def test_reasoning_strip_matches(lmms: LmmsEval) -> None:
    rng = random.Random(RNG_SEED + 13)
    parts = ("<think>", "</think>", "<analysis>", "</analysis>", "A", " yes ", "\n", "<THINK>")
    texts = ["".join(rng.choice(parts) for _ in range(rng.randint(0, 7))) for _ in range(3000)]
    assert [list(p) for p in scoring.REASONING_TAGS] == lmms.reasoning_tags
    for text in texts:
        expected = lmms.reasoning.strip_reasoning_tags(text, lmms.reasoning_tags)
        assert scoring.strip_reasoning_blocks(text) == expected, text


# -- official: the documented differences, one hand-written example each --------------------------
def _one(kind: str, doc: dict, text: str, scoring_rule: str, **config: Any) -> float:
    rows = [(1, {**doc, "id": "x", "prediction": text})]
    scored = score_rows({"name": kind, "kind": kind, **config}, rows, scoring_rule)
    return scored.samples[0]["score"]


OFFICIAL_DIFFERENCES = [
    # (kind, row, prediction, lmms_eval score, official score)
    pytest.param("vqav2", {"question": "How many?", "answers": [
        {"answer": "two", "answer_id": i} for i in range(10)]}, "two", 1.0, 0.0,
        id="vqav2-unanimous-answers-stay-raw"),
    pytest.param("vqav2", {"question": "Whose?", "answers": [
        {"answer": a, "answer_id": i} for i, a in enumerate(["man's"] * 9 + ["mans"])]},
        "man's", 1.0, 1.0, id="vqav2-possessive-scores-both-ways"),
    pytest.param("mme", {"question_id": "count/1.png", "question": "Two? Please answer yes or no.",
        "answer": "No", "category": "count"}, "N", 1.0, 0.0, id="mme-lone-letter"),
    pytest.param("mme", {"question_id": "count/1.png", "question": "Two?", "answer": "Yes",
        "category": "count"}, "<think>no</think>Yes", 1.0, 0.0, id="mme-reasoning-block"),
    pytest.param("pope", {"question": "Is there a dog?", "answer": "no"}, "No, there is not.",
        0.0, 1.0, id="pope-first-sentence"),
    pytest.param("mmstar", {"question": "Colour?\nOptions: A: red, B: blue, C: green, D: white",
        "answer": "A", "l2_category": "recognition", "category": "fine-grained perception"},
        "The answer is A. Because the car is red.", 0.0, 1.0, id="mmstar-phrase-bug"),
    pytest.param("mmstar", {"question": "Colour?\nOptions: A: red, B: blue, C: green, D: white",
        "answer": "B", "l2_category": "recognition", "category": "fine-grained perception"},
        "Answer: B", 1.0, 0.0, id="mmstar-first-character"),
    pytest.param("ocrbench", {"question": "What is written?", "answer": ["STOP"],
        "dataset": "IIIT5K", "question_type": "Regular Text Recognition"}, "ＳＴＯＰ", 1.0, 0.0,
        id="ocrbench-fullwidth"),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "row", "text", "lmms_eval", "official"), OFFICIAL_DIFFERENCES)
def test_official_differences(
    kind: str, row: dict, text: str, lmms_eval: float, official: float
) -> None:
    assert _one(kind, row, text, "lmms_eval") == lmms_eval
    assert _one(kind, row, text, "official") == official


def test_official_aggregates() -> None:
    """POPE's yes-ratio (predicted vs true yes), MMStar's accuracy over questions (vs the mean
    over fine categories), MME's cognition total (MME's 4 subtasks vs every non-perception one)."""
    pope = [({"question": "Dog?", "answer": a}, p) for a, p in
            (("yes", "yes"), ("yes", "Yes, a dog."), ("no", "yes"), ("no", "no"))]  # fmt: skip
    rows = [(i, {**r, "id": i, "prediction": p}) for i, (r, p) in enumerate(pope, start=1)]
    lmms_eval = score_rows({"kind": "pope"}, rows, "lmms_eval").metrics
    official = score_rows({"kind": "pope"}, rows, "official").metrics
    assert lmms_eval["pope_yes_ratio"] == 50.0  # two of the four answers are yes
    assert official["pope_yes_ratio"] == 75.0  # three of the four predictions say yes
    assert lmms_eval["pope_accuracy"] == 50.0 and official["pope_accuracy"] == 75.0

    def star(i: int, l2: str, right: bool) -> tuple[int, dict]:
        row = {"question": "Q?\nOptions: A: a, B: b", "answer": "A", "l2_category": l2,
               "category": "math", "id": i, "prediction": "A" if right else "B"}  # fmt: skip
        return i, row

    stars = [star(1, "geometry", True), star(2, "geometry", True), star(3, "geometry", False),
             star(4, "statistical reasoning", False)]  # fmt: skip
    assert score_rows({"kind": "mmstar"}, stars, "lmms_eval").metrics["score"] == pytest.approx(
        100 * (2 / 3 + 0) / 2
    )
    assert score_rows({"kind": "mmstar"}, stars, "official").metrics["score"] == 50.0

    mme = [
        (i, {"question_id": f"{c}/1.png", "question": "Q?", "answer": "Yes", "category": c,
             "id": i, "prediction": "Yes"})
        for i, c in enumerate(("code_reasoning", "code_reasoning", "extra", "extra"), start=1)
    ]  # fmt: skip
    assert score_rows({"kind": "mme"}, mme, "lmms_eval").metrics["mme_cognition"] == 400.0
    assert score_rows({"kind": "mme"}, mme, "official").metrics["mme_cognition"] == 200.0


def test_prompts_do_not_depend_on_scoring() -> None:
    docs, texts = vqa_docs("vqav2", random.Random(RNG_SEED + 14), 20)
    rows = [
        (i, {**d, "id": i, "prediction": t})
        for i, (d, t) in enumerate(zip(docs, texts, strict=True))
    ]
    prompts = [
        [s["prompt"] for s in score_rows({"kind": "vqav2"}, rows, rule).samples]
        for rule in ("lmms_eval", "official")
    ]
    assert prompts[0] == prompts[1]
