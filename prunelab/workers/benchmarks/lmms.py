"""Benchmarks read from local parquet files in the layout of the public lmms-eval datasets.

A benchmark config names a ``path``: a parquet file, or a directory laid out as the Hugging Face
dataset is (``<path>/<split>-*.parquet``, ``<path>/<split>.parquet``, ``<path>/data/<split>-*``
or ``<path>/<split>/*.parquet``). Columns are those of the lmms-eval dataset (image as a
``{"bytes": ...}`` struct or raw bytes, question, answers or options, category).

Each class reproduces its lmms-eval 0.7.3 task (named in its docstring): the prompt is the
task's ``doc_to_text`` with the default ``lmms_eval_specific_kwargs`` (``prompt`` is that
post-prompt), ``max_new_tokens`` and ``until`` are its ``generation_kwargs``, and with
``scoring: lmms_eval`` (the default) ``score`` / ``aggregate`` are its ``process_results`` and
aggregation on the response as lmms-eval's evaluator hands it over
(:func:`scoring.lmms_response`). With ``scoring: official``, the benchmarks whose authors score
differently (``authors_rule``: VQAv2, MME, POPE, MMStar, OCRBench) use the authors' rule on
the stripped prediction; the others keep lmms-eval's. Prompts do not depend on ``scoring``.

``samples(limit, seed)`` takes a seeded subset (pairs of questions on one MME image, and
circular variants of one MMBench question, stay together: ``Sample.unit``);
:meth:`ParquetBenchmark.sample_from_row` turns one row (a dict of its columns) into a sample,
for the parquet files and for offline scoring (:mod:`prunelab.workers.benchmarks.offline`)
alike. Metrics keep prunelab's names and units: ``score`` (a percentage unless the docstring
says otherwise), ``score.<category>`` and extras such as ``mme_perception`` or ``pope_f1``.

A missing or malformed file is reported by :meth:`ParquetBenchmark.check` (sweep validation);
``describe`` names each file with its size and a hash of its parquet footer (schema, row groups,
statistics), so changed data changes the trial key while a copied data directory does not.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from prunelab.workers.benchmarks import register_benchmark, scoring
from prunelab.workers.benchmarks.base import Sample, check_scoring

__all__ = [
    "AI2D",
    "CHARTQA_PROMPT",
    "FEWSHOT_DELIMITER",
    "GQA",
    "LLAVA_MAX_NEW_TOKENS",
    "MC_PROMPT",
    "MMBENCH_CN_PROMPT",
    "MME",
    "MMSTAR_PROMPT",
    "POPE",
    "SEED_PROMPT",
    "VIZWIZ_PROMPT",
    "VQA_PROMPT",
    "ChartQA",
    "ColumnError",
    "DatasetError",
    "MMBench",
    "MMStar",
    "MissingDataError",
    "OCRBench",
    "ParquetBenchmark",
    "RealWorldQA",
    "ScienceQAImg",
    "SeedBench2Plus",
    "TextVQA",
    "VQAv2",
    "VizWiz",
    "decode_image",
    "metric_key",
    "resolve_files",
]

# lmms-eval's default post-prompts (task yaml, `lmms_eval_specific_kwargs.default.post_prompt`)
VQA_PROMPT = "\nAnswer the question using a single word or phrase."
MC_PROMPT = "\nAnswer with the option's letter from the given choices directly."
MMSTAR_PROMPT = "\nAnswer with the option's letter from the given choices directly"  # no period
SEED_PROMPT = "Answer with the option's letter from the given choices directly."  # after a \n
MMBENCH_CN_PROMPT = "\n请直接使用所提供的选项字母作为答案回答。"
VIZWIZ_PROMPT = (
    "\nWhen the provided information is insufficient, respond with 'Unanswerable'."
    "\nAnswer the question using a single word or phrase."
)
CHARTQA_PROMPT = "\nAnswer the question with a single word."
MME_BUILTIN_PROMPT = " Please answer yes or no."  # removed when a post-prompt is added
REALWORLDQA_INSTRUCTION = (  # removed when a post-prompt is added (the default adds none)
    "Please answer directly with only the letter of the correct option and nothing else."
)
MMBENCH_OPTIONS = "There are several options:"  # mmbench.yaml metadata.sys_prompt

# generation defaults of a task whose generation_kwargs do not say
LLAVA_MAX_NEW_TOKENS = 1024
"""max_new_tokens of lmms-eval's default model ``llava`` (models/simple/llava.py)."""
FEWSHOT_DELIMITER = "\n\n"
"""``until`` of a task without one (lmms-eval ``TaskConfig``: ``[fewshot_delimiter]``)."""

IMAGE = "image"
Result = tuple[Sample, str, float]  # (sample, prediction, per-sample score)


class DatasetError(ValueError):
    """A benchmark's data file is missing or malformed; the message names the path."""


class MissingDataError(DatasetError):
    """A benchmark's data is not there: no such path, or no file of the split."""


class ColumnError(DatasetError):
    """One row lacks a column or holds a value the benchmark cannot read; ``column`` names it.

    The message is ``missing column 'answer'`` or ``column 'answer': <problem>``; the caller
    says where the row is (a parquet file and row, a line of an offline file).
    """

    def __init__(self, column: str, problem: str | None = None) -> None:
        self.column = column
        self.problem = problem
        super().__init__(
            f"column {column!r}: {problem}" if problem else f"missing column {column!r}"
        )


def resolve_files(path: str | Path, split: str) -> list[Path]:
    """The parquet files of ``split`` at ``path`` (a file, or a dataset directory)."""
    root = Path(path).expanduser()
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise MissingDataError(f"{root}: no such file or directory")
    patterns = (
        f"{split}-*.parquet",
        f"{split}.parquet",
        f"data/{split}-*.parquet",
        f"data/{split}.parquet",
        f"{split}/*.parquet",
    )
    for pattern in patterns:
        files = sorted(p for p in root.glob(pattern) if p.is_file())
        if files:
            return files
    raise MissingDataError(
        f"{root}: no parquet file of split {split!r} (looked for {', '.join(patterns)})"
    )


def _footer_hash(path: Path) -> str:
    """sha256 of a parquet file's footer (its metadata), first 16 hex digits."""
    with path.open("rb") as f:
        f.seek(0, io.SEEK_END)
        size = f.tell()
        if size < 12:
            return "not-parquet"
        f.seek(size - 8)
        tail = f.read(8)
        length = int.from_bytes(tail[:4], "little")
        if tail[4:] != b"PAR1" or length > size - 12:
            return "not-parquet"
        f.seek(size - 8 - length)
        return hashlib.sha256(f.read(length)).hexdigest()[:16]


def decode_image(value: Any) -> np.ndarray:
    """An image cell (``{"bytes": b"...", "path": ...}`` or bytes) as (H, W, 3) uint8 RGB."""
    with Image.open(io.BytesIO(_cell_bytes(value))) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _cell_bytes(value: Any) -> bytes:
    data = value.get("bytes") if isinstance(value, dict) else value
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise DatasetError(f"image cell holds no encoded bytes ({type(value).__name__})")
    return bytes(data)


class EncodedImage:
    """A sample's image as its encoded bytes, decoded to (H, W, 3) uint8 RGB when used
    (``np.asarray(image)``): a trial holds its samples' compressed images, not their pixels,
    and the decoding runs where the sample is prepared (on the worker's prefetch thread).

    Built by :meth:`from_cell`, which reads the header only, so a cell that is not an image
    is a :class:`DatasetError` when the samples are listed; pixel data that fails to decode
    later raises one naming ``where``.
    """

    __slots__ = ("data", "shape", "where")

    def __init__(self, data: bytes, shape: tuple[int, int, int], where: str) -> None:
        self.data, self.shape, self.where = data, shape, where

    @classmethod
    def from_cell(cls, value: Any, where: str) -> EncodedImage:
        try:
            data = _cell_bytes(value)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
        except DatasetError as exc:
            raise DatasetError(f"{where}: {exc}") from None
        except (OSError, ValueError) as exc:  # PIL: not an image it can read
            raise DatasetError(f"{where}: the image cell does not decode: {exc}") from None
        return cls(data, (height, width, 3), where)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        try:
            pixels = decode_image(self.data)
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{self.where}: the image does not decode: {exc}") from None
        return pixels if dtype is None else pixels.astype(dtype)

    def __repr__(self) -> str:
        return f"EncodedImage({self.where}, {len(self.data)} bytes, shape={self.shape})"


def _read_rows(files: Sequence[Path], column: str, indices: Sequence[int]) -> list[Any]:
    """Values of ``column`` at global row ``indices`` (over ``files`` concatenated), reading
    only the row groups that hold them."""
    position: dict[int, list[int]] = {}
    for k, i in enumerate(indices):
        position.setdefault(int(i), []).append(k)
    out: list[Any] = [None] * len(indices)
    offset = 0
    for path in files:
        reader = pq.ParquetFile(path)
        for group in range(reader.metadata.num_row_groups):
            rows = reader.metadata.row_group(group).num_rows
            wanted = [i for i in position if offset <= i < offset + rows]
            if wanted:
                values = reader.read_row_group(group, columns=[column]).column(column)
                for i in wanted:
                    value = values[i - offset].as_py()
                    for k in position[i]:
                        out[k] = value
            offset += rows
    return out


def metric_key(category: str) -> str:
    """``score.<category>`` with characters MLflow rejects in metric names replaced by ``_``."""
    return "score." + re.sub(r"[^A-Za-z0-9_\-. /]", "_", category.strip())


def _mean_metrics(results: Sequence[Result], scale: float = 100.0) -> dict[str, float]:
    """``score`` = scale x mean per-sample score, and the same per category."""
    metrics = {"score": scale * statistics.fmean(r[2] for r in results)} if results else {}
    for category in sorted({r[0].category for r in results if r[0].category}):
        values = [r[2] for r in results if r[0].category == category]
        metrics[metric_key(category)] = scale * statistics.fmean(values)
    return metrics


def _text(value: Any) -> str:
    """A category cell as text; None and NaN (pandas-written missing values) as ''."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = str(value)
    return "" if text.strip().lower() == "nan" else text


def _missing(value: Any) -> bool:
    """Whether a cell is missing as pandas' ``isna`` sees a scalar: None or NaN."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _string(row: Mapping[str, Any], column: str) -> str:
    """A text cell; anything else is a :class:`ColumnError`."""
    value = row[column]
    if not isinstance(value, str):
        raise ColumnError(column, f"expected text, got {_kind(value)}")
    return value


def _strings(row: Mapping[str, Any], column: str) -> list[str]:
    """A cell holding a list of texts."""
    value = row[column]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ColumnError(column, f"expected a list of texts, got {_kind(value)}")
    return list(value)


def _letters(count: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(count)]


def _option_lines(letters: Sequence[str], texts: Sequence[Any]) -> str:
    return "\n".join(f"{letter}. {text}" for letter, text in zip(letters, texts, strict=False))


def _placeholder() -> np.ndarray:
    return np.zeros((1, 1, 3), np.uint8)


def _row_sample(question: str, answers: list[str], extra: dict[str, Any] | None = None) -> Sample:
    """A sample of a row before :meth:`ParquetBenchmark.sample_from_row` fills in its id, image
    and category."""
    return Sample("", _placeholder(), question, answers, extra=extra or {})


@dataclass
class ParquetBenchmark:
    """A benchmark read from lmms-eval-layout parquet files (subclasses: one per dataset).

    ``path``: file or dataset directory; ``split``: which split's files a directory offers;
    ``prompt``: lmms-eval's default post-prompt of the task, as its ``doc_to_text`` places it;
    ``category_column``: per-category metrics from this column when the files have it;
    ``scoring``: ``lmms_eval`` or ``official`` (see the module docstring).
    ``max_new_tokens`` / ``until``: the task's generation settings (not configurable here: a
    trial's ``eval.max_new_tokens`` overrides the first).
    """

    name: str = ""
    path: str = ""
    split: str = "test"
    prompt: str = ""
    category_column: str | None = None
    metric: str = "accuracy"
    scoring: str = "lmms_eval"
    max_new_tokens: int = field(default=LLAVA_MAX_NEW_TOKENS, init=False)
    until: tuple[str, ...] = field(default=(FEWSHOT_DELIMITER,), init=False)

    kind: ClassVar[str] = ""
    dataset: ClassVar[str] = ""  # the Hugging Face dataset the files come from
    required: ClassVar[tuple[str, ...]] = ()  # besides the image column
    optional: ClassVar[tuple[str, ...]] = ()
    has_image: ClassVar[bool] = True  # False: images come from elsewhere (GQA)
    authors_rule: ClassVar[bool] = False  # True: `official` scores by the authors' rule
    version: ClassVar[int] = 2  # 2: lmms-eval 0.7.3 prompts, scoring and generation settings

    def __post_init__(self) -> None:
        self.name = self.name or self.kind
        check_scoring(self.scoring)
        if not str(self.path).strip():
            raise ValueError(f"benchmark {self.name!r}: `path` (its parquet file or directory)")

    # -- files -------------------------------------------------------------------------------
    def download_hint(self) -> str:
        """Where the data comes from and where it goes, for a missing-data message."""
        return (
            f"get the Hugging Face dataset {self.dataset} (`huggingface-cli download "
            f"{self.dataset} --repo-type dataset`) and put its parquet files of split "
            f"{self.split!r} under {self.path}"
        )

    def files(self) -> list[Path]:
        return resolve_files(self.path, self.split)

    def _columns(self) -> tuple[str, ...]:
        """Columns every file must have (the category column is used when present)."""
        return self.required

    def _check_file(self, path: Path, columns: Sequence[str]) -> None:
        try:
            schema = pq.read_schema(path)
        except (OSError, pa.ArrowException) as exc:
            raise DatasetError(f"{path}: not a readable parquet file ({exc})") from None
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise DatasetError(
                f"{path}: missing column(s) {', '.join(missing)} (it has {', '.join(schema.names)})"
            )

    def check(self) -> None:
        """Raise :class:`DatasetError` (naming the path) unless every file of the split exists,
        reads as parquet and has the columns this benchmark needs."""
        columns = [*self._columns(), *([IMAGE] if self.has_image else [])]
        for path in self.files():
            self._check_file(path, columns)

    def _describe_files(self, files_of: Any) -> list[dict[str, Any]] | str:
        try:
            files = files_of()
        except DatasetError:
            return "missing"
        return [
            {"file": p.name, "bytes": p.stat().st_size, "footer": _footer_hash(p)} for p in files
        ]

    def describe(self) -> dict[str, Any]:
        """Kind, split, prompt, category column, generation settings, and each file's name,
        size and footer hash. Not the scoring rule: a trial's key hashes it as
        ``eval.scoring``, and the planner describes a benchmark once for every rule."""
        return {
            "name": self.name,
            "kind": self.kind,
            "split": self.split,
            "prompt": self.prompt,
            "category_column": self.category_column,
            "max_new_tokens": self.max_new_tokens,
            "until": list(self.until),
            "files": self._describe_files(self.files),
            "version": self.version,
        }

    # -- samples -----------------------------------------------------------------------------
    def _table(self) -> pa.Table:
        files = self.files()
        present = set(pq.read_schema(files[0]).names)
        optional = (*self.optional, *([self.category_column] if self.category_column else []))
        wanted = [*self._columns(), *(c for c in optional if c in present)]
        wanted = list(dict.fromkeys(wanted))
        return pa.concat_tables(pq.read_table(f, columns=wanted) for f in files)

    def _groups(self, rows: list[dict[str, Any]]) -> list[Any] | None:
        """Per row, the key of the group that must be sampled whole (None: rows alone)."""
        return None

    def _choose(self, rows: list[dict[str, Any]], limit: int | None, seed: int) -> list[int]:
        """Sorted row indices of a seeded subset of at most ``limit`` rows (whole groups)."""
        n = len(rows)
        if limit is None or limit >= n:
            return list(range(n))
        groups = self._groups(rows)
        if groups is None:
            chosen = np.random.default_rng(seed).choice(n, limit, replace=False)
            return sorted(int(i) for i in chosen)
        members: dict[Any, list[int]] = {}
        for i, key in enumerate(groups):
            members.setdefault(key, []).append(i)
        keys = list(members)
        picked: list[int] = []
        for k in np.random.default_rng(seed).permutation(len(keys)):
            group = members[keys[int(k)]]
            if picked and len(picked) + len(group) > limit:
                continue
            picked.extend(group)
            if len(picked) >= limit:
                break
        return sorted(picked)

    def _images(self, indices: list[int], rows: list[dict[str, Any]]) -> list[Any]:
        return _read_rows(self.files(), IMAGE, indices)

    def sample_count(self) -> int | None:
        """Rows of the split, from the files' footers (None: the data is not there)."""
        try:
            files = self.files()
        except MissingDataError:
            return None
        return sum(pq.ParquetFile(f).metadata.num_rows for f in files)

    def samples(self, limit: int | None, seed: int = 0) -> list[Sample]:
        """``limit`` samples (all when None) chosen by ``seed``, in file order; a row the
        benchmark cannot read is a :class:`DatasetError` naming the path and row."""
        rows = self._table().to_pylist()
        indices = self._choose(rows, limit, seed)
        images = self._images(indices, [rows[i] for i in indices])
        samples = []
        for i, image in zip(indices, images, strict=True):
            try:
                encoded = EncodedImage.from_cell(image, f"{self.path}: row {i}")
                samples.append(self.sample_from_row(rows[i], str(i), encoded))
            except ColumnError as exc:
                raise DatasetError(f"{self.path}: row {i}: {exc}") from None
        return samples

    def sample_from_row(
        self, row: Mapping[str, Any], sample_id: str, image: np.ndarray | EncodedImage | None = None
    ) -> Sample:
        """The sample of one row (its columns by name, the image decoded or encoded
        (:class:`EncodedImage`), or None for a 1x1 placeholder): prompt, answers, category and
        what the scorer needs. Raises :class:`ColumnError` for a missing required column or an
        unreadable value."""
        for column in self.required:
            if column not in row:
                raise ColumnError(column)
        sample = self._sample(row)
        sample.id = sample_id
        sample.image = image if image is not None else _placeholder()
        if self.category_column:
            sample.category = _text(row.get(self.category_column))
        return sample

    def _sample(self, row: Mapping[str, Any]) -> Sample:
        """A sample from a row (id, image and category are filled in by ``sample_from_row``)."""
        raise NotImplementedError

    # -- scoring -----------------------------------------------------------------------------
    def response(self, prediction: str) -> str:
        """The text the scoring rule reads: the stripped prediction for an authors' rule
        (``official`` on a benchmark with ``authors_rule``), else lmms-eval's response
        (:func:`scoring.lmms_response`: reasoning blocks and surrounding whitespace removed)."""
        if self.scoring == "official" and self.authors_rule:
            return prediction.strip()
        return scoring.lmms_response(prediction)

    def score(self, prediction: str, sample: Sample) -> float:
        """The per-sample score (0 to 1) of a prediction already cut at ``until``."""
        return self._score(self.response(prediction), sample)

    def _score(self, text: str, sample: Sample) -> float:
        raise NotImplementedError

    def aggregate(self, results: Sequence[Result]) -> dict[str, float]:
        """Official metrics from (sample, prediction, score) of every sample: by default
        ``score`` = 100 x mean and ``score.<category>`` likewise (lmms-eval's ``mean``)."""
        return _mean_metrics(results)


# -- open-ended VQA ----------------------------------------------------------------------------
def _vqa_answers(row: Mapping[str, Any]) -> tuple[list[str], list[Any]]:
    """The human answers of a row and, per answer, the rest of its record: answers are texts
    (the rest is their position) or ``{answer, answer_id, ...}`` records."""
    cells = row["answers"]
    if cells is None:
        return [], []
    if not isinstance(cells, (list, tuple)):
        raise ColumnError("answers", f"expected a list, got {_kind(cells)}")
    answers, records = [], []
    for position, cell in enumerate(cells):
        if isinstance(cell, dict):
            answer = cell.get("answer")
            rest = tuple(sorted(((k, v) for k, v in cell.items() if k != "answer"), key=str))
        else:
            answer, rest = cell, position
        if not isinstance(answer, str):
            raise ColumnError("answers", f"answer {position} is {_kind(answer)}, not text")
        answers.append(answer)
        records.append(rest)
    return answers, records


@dataclass
class _VQA(ParquetBenchmark):
    """VQA accuracy against ten human answers (see :func:`scoring.vqa_accuracy`)."""

    split: str = "validation"
    prompt: str = VQA_PROMPT
    metric: str = "vqa_accuracy"
    required: ClassVar[tuple[str, ...]] = ("question", "answers")
    capitalize: ClassVar[bool] = False  # lmms-eval capitalises TextVQA / VizWiz questions
    rules: ClassVar[dict[str, str]] = {"lmms_eval": "always", "official": "always"}
    by_record: ClassVar[bool] = False  # humans told apart by whole answer records (VQAv2)

    def _sample(self, row: Mapping[str, Any]) -> Sample:
        question = _string(row, "question")
        question = question.capitalize() if self.capitalize else question
        answers, records = _vqa_answers(row)
        return _row_sample(question + self.prompt, answers, extra={"answer_records": records})

    def _score(self, text: str, sample: Sample) -> float:
        return scoring.vqa_accuracy(
            text,
            sample.answers,
            normalize_answers=self.rules[self.scoring],
            answer_records=sample.extra["answer_records"] if self.by_record else None,
        )


@register_benchmark
@dataclass
class TextVQA(_VQA):
    """TextVQA (lmms-lab/textvqa, split validation; lmms-eval task ``textvqa_val``): the
    question capitalised (``str.capitalize``); prediction and answers through the EvalAI
    processor (``textvqa_process_results``, the TextVQA authors' evaluator too)."""

    max_new_tokens: int = field(default=LLAVA_MAX_NEW_TOKENS, init=False)
    until: tuple[str, ...] = field(default=("ASSISTANT:",), init=False)
    kind: ClassVar[str] = "textvqa"
    dataset: ClassVar[str] = "lmms-lab/textvqa"
    capitalize: ClassVar[bool] = True


@register_benchmark
@dataclass
class VizWiz(_VQA):
    """VizWiz-VQA (lmms-lab/VizWiz-VQA, split val; task ``vizwiz_vqa_val``): as TextVQA, with
    VizWiz's unanswerable instruction; categories: answer type."""

    split: str = "val"
    prompt: str = VIZWIZ_PROMPT
    category_column: str | None = "category"
    max_new_tokens: int = field(default=LLAVA_MAX_NEW_TOKENS, init=False)
    until: tuple[str, ...] = field(default=("ASSISTANT:",), init=False)
    kind: ClassVar[str] = "vizwiz"
    dataset: ClassVar[str] = "lmms-lab/VizWiz-VQA"
    capitalize: ClassVar[bool] = True


@register_benchmark
@dataclass
class VQAv2(_VQA):
    """VQAv2 (lmms-lab/VQAv2, split validation; task ``vqav2_val``): answers are ``{answer,
    answer_id, ...}`` records; categories: answer type. ``lmms_eval``: punctuation and
    digit/article rules on the prediction and on every answer (``vqav2_process_results``);
    ``official``: the VQA evaluation's ``vqaEval.py`` (answers raw unless they disagree, then
    punctuation only)."""

    category_column: str | None = "answer_type"
    max_new_tokens: int = field(default=16, init=False)
    kind: ClassVar[str] = "vqav2"
    dataset: ClassVar[str] = "lmms-lab/VQAv2"
    rules: ClassVar[dict[str, str]] = {"lmms_eval": "punctuation_digits", "official": "if_disagree"}
    by_record: ClassVar[bool] = True
    authors_rule: ClassVar[bool] = True


# -- GQA ---------------------------------------------------------------------------------------
@register_benchmark
@dataclass
class GQA(ParquetBenchmark):
    """GQA (lmms-lab/GQA; task ``gqa``): questions in ``testdev_balanced_instructions``
    (``imageId``, ``question``, ``answer``), images in ``testdev_balanced_images`` (``id``,
    ``image``) at ``images_path`` (default: the sibling directory of ``path``). Exact match
    ignoring case and ASCII punctuation (:func:`scoring.exact_match`)."""

    split: str = "testdev"
    prompt: str = VQA_PROMPT
    images_path: str = ""
    metric: str = "exact_match"
    max_new_tokens: int = field(default=16, init=False)
    kind: ClassVar[str] = "gqa"
    dataset: ClassVar[str] = "lmms-lab/GQA"
    required: ClassVar[tuple[str, ...]] = ("imageId", "question", "answer")
    has_image: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.images_path:
            base = Path(self.path).expanduser()
            root = base.parent.parent if base.is_file() else base.parent
            self.images_path = str(root / "testdev_balanced_images")

    def image_files(self) -> list[Path]:
        return resolve_files(self.images_path, self.split)

    def check(self) -> None:
        super().check()
        for path in self.image_files():
            self._check_file(path, ["id", IMAGE])

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "image_files": self._describe_files(self.image_files)}

    def _images(self, indices: list[int], rows: list[dict[str, Any]]) -> list[Any]:
        files = self.image_files()
        ids = pa.concat_tables(pq.read_table(f, columns=["id"]) for f in files)
        where = {str(v): i for i, v in enumerate(ids.column("id").to_pylist())}
        missing = sorted({str(r["imageId"]) for r in rows} - set(where))
        if missing:
            raise DatasetError(f"{self.images_path}: no image with id {', '.join(missing[:5])}")
        return _read_rows(files, IMAGE, [where[str(r["imageId"])] for r in rows])

    def _sample(self, row: Mapping[str, Any]) -> Sample:
        return _row_sample(
            _string(row, "question") + self.prompt,
            [_string(row, "answer")],
            extra={"image_id": str(row["imageId"])},
        )

    def _score(self, text: str, sample: Sample) -> float:
        return scoring.exact_match(text, sample.answers[0])


# -- yes / no ----------------------------------------------------------------------------------
def _with_post_prompt(question: str, prompt: str, builtin: str) -> str:
    """lmms-eval's ``mme_doc_to_text`` / ``mmstar_doc_to_text``: the stripped question; a
    non-empty post-prompt replaces the question's own ``builtin`` instruction."""
    question = question.strip()
    return question.replace(builtin, "") + prompt if prompt else question


@register_benchmark
@dataclass
class MME(ParquetBenchmark):
    """MME (lmms-lab/MME, split test; task ``mme``): two yes/no questions per image
    (``question_id`` is the image, the sample's ``unit``). ``score`` = perception total (sum of
    the 10 perception subtasks' acc + acc+, max 2000); also ``mme_cognition`` (max 800),
    ``mme_acc``, ``mme_acc_plus`` and ``score.<subtask>``. ``lmms_eval``: ``parse_pred_ans``
    (:func:`scoring.mme_parse`), every non-perception subtask counted as cognition;
    ``official``: MME's ``calculation.py`` (:func:`scoring.mme_parse_official`, the 4
    cognition subtasks). lmms-eval asserts two questions per image; a lone question here is an
    image of one. Sampling keeps an image's questions together."""

    prompt: str = VQA_PROMPT
    category_column: str | None = "category"
    metric: str = "mme_perception"
    max_new_tokens: int = field(default=16, init=False)
    kind: ClassVar[str] = "mme"
    dataset: ClassVar[str] = "lmms-lab/MME"
    required: ClassVar[tuple[str, ...]] = ("question_id", "question", "answer", "category")
    authors_rule: ClassVar[bool] = True

    def _groups(self, rows: list[dict[str, Any]]) -> list[Any]:
        return [str(r["question_id"]) for r in rows]

    def _sample(self, row: Mapping[str, Any]) -> Sample:
        question = _with_post_prompt(_string(row, "question"), self.prompt, MME_BUILTIN_PROMPT)
        answer = _string(row, "answer").lower().strip().replace(".", "")
        if answer not in ("yes", "no"):
            raise ColumnError("answer", f"{row['answer']!r} is neither yes nor no")
        image = str(row["question_id"])
        sample = _row_sample(question, [answer], extra={"image_id": image})
        sample.unit = image
        return sample

    def _score(self, text: str, sample: Sample) -> float:
        parse = scoring.mme_parse if self.scoring == "lmms_eval" else scoring.mme_parse_official
        return float(parse(text) == sample.answers[0])

    def aggregate(self, results: Sequence[Result]) -> dict[str, float]:
        totals = scoring.mme_scores(
            ((s.category, s.extra["image_id"], score > 0.5) for s, _, score in results),
            cognition=None if self.scoring == "lmms_eval" else scoring.MME_COGNITION,
        )
        metrics = {
            "score": totals.pop("perception"),
            "mme_cognition": totals.pop("cognition"),
            "mme_acc": totals.pop("acc"),
            "mme_acc_plus": totals.pop("acc_plus"),
        }
        metrics["mme_perception"] = metrics["score"]
        metrics.update({metric_key(c): v for c, v in sorted(totals.items())})
        return metrics


@register_benchmark
@dataclass
class POPE(ParquetBenchmark):
    """POPE (lmms-lab/POPE, split test; task ``pope``): yes/no object probing; categories
    adversarial, popular, random. ``score`` = F1 (yes positive) over all samples; also
    ``pope_accuracy``, ``pope_precision``, ``pope_recall``, ``pope_f1``, ``pope_yes_ratio`` (in
    %) and the F1 of each category as ``score.<category>``. ``lmms_eval``: only an exact
    ``yes`` / ``no`` counts and the yes-ratio is that of the answers
    (:func:`scoring.pope_metrics_lmms`); ``official``: POPE's ``evaluate.py``
    (:func:`scoring.pope_label`, :func:`scoring.pope_metrics`)."""

    prompt: str = VQA_PROMPT
    category_column: str | None = "category"
    metric: str = "pope_f1"
    max_new_tokens: int = field(default=128, init=False)
    kind: ClassVar[str] = "pope"
    dataset: ClassVar[str] = "lmms-lab/POPE"
    required: ClassVar[tuple[str, ...]] = ("question", "answer")
    authors_rule: ClassVar[bool] = True

    def _sample(self, row: Mapping[str, Any]) -> Sample:
        answer = _string(row, "answer").lower().strip()
        if answer not in ("yes", "no"):
            raise ColumnError("answer", f"{row['answer']!r} is neither yes nor no")
        return _row_sample(_string(row, "question").strip() + self.prompt, [answer])

    def _label(self, text: str) -> str:
        return text.lower().strip() if self.scoring == "lmms_eval" else scoring.pope_label(text)

    def _score(self, text: str, sample: Sample) -> float:
        return float(self._label(text) == sample.answers[0])

    def aggregate(self, results: Sequence[Result]) -> dict[str, float]:
        rule = scoring.pope_metrics_lmms if self.scoring == "lmms_eval" else scoring.pope_metrics

        def metrics_of(subset: Sequence[Result]) -> dict[str, float]:
            return rule([(self._label(self.response(p)), s.answers[0]) for s, p, _ in subset])

        overall = metrics_of(results)
        metrics = {"score": overall["f1"], **{f"pope_{k}": v for k, v in overall.items()}}
        for category in sorted({s.category for s, _, _ in results if s.category}):
            subset = [r for r in results if r[0].category == category]
            metrics[metric_key(category)] = metrics_of(subset)["f1"]
        return metrics


# -- multiple choice ---------------------------------------------------------------------------
@register_benchmark
@dataclass
class ScienceQAImg(ParquetBenchmark):
    """ScienceQA-IMG (lmms-lab/ScienceQA, config ScienceQA-IMG, split test; task
    ``scienceqa_img``): ``choices`` list, ``answer`` its index, a true ``hint`` shown as
    ``Context: ...`` (``sqa_doc_to_text``); :func:`scoring.scienceqa_match`; categories:
    subject."""

    prompt: str = MC_PROMPT
    category_column: str | None = "subject"
    max_new_tokens: int = field(default=16, init=False)
    kind: ClassVar[str] = "scienceqa_img"
    dataset: ClassVar[str] = "lmms-lab/ScienceQA"
    required: ClassVar[tuple[str, ...]] = ("question", "choices", "answer")
    optional: ClassVar[tuple[str, ...]] = ("hint",)

    def _sample(self, row: Mapping[str, Any]) -> Sample:
        question, choices = _string(row, "question"), row["choices"]
        if not isinstance(choices, (list, tuple)):
            raise ColumnError("choices", f"expected a list, got {_kind(choices)}")
        letters = _letters(len(choices))
        answer = row["answer"]
        if not isinstance(answer, int) or not -len(letters) <= answer < len(letters):
            raise ColumnError(
                "answer", f"{answer!r} is not an index into the {len(letters)} choices"
            )
        context = row.get("hint", "")
        context = f"Context: {context}\n" if context else context  # a false hint as f"{hint}"
        text = f"{context}{question}\n{_option_lines(letters, choices)}{self.prompt}"
        options = dict(zip(letters, choices, strict=True))
        return _row_sample(text, [letters[answer]], extra={"options": options})

    def _score(self, text: str, sample: Sample) -> float:
        return scoring.scienceqa_match(text, sample.answers[0])


@register_benchmark
@dataclass
class AI2D(ParquetBenchmark):
    """AI2D (lmms-lab/ai2d, split test; task ``ai2d``): ``options`` list, ``answer`` its index
    as text. The ``flexible-extract`` filter (:func:`scoring.leading_option_letter`) on the
    raw response, then exact match ignoring case and ASCII punctuation (so ``(A)`` and ``a``
    count, ``The answer is A`` does not)."""

    prompt: str = MC_PROMPT
    max_new_tokens: int = field(default=16, init=False)
    kind: ClassVar[str] = "ai2d"
    dataset: ClassVar[str] = "lmms-lab/ai2d"
    required: ClassVar[tuple[str, ...]] = ("question", "options", "answer")

    def _sample(self, row: Mapping[str, Any]) -> Sample:
        question, options = _string(row, "question"), row["options"]
        if not isinstance(options, (list, tuple)):
            raise ColumnError("options", f"expected a list, got {_kind(options)}")
        letters = _letters(len(options))
        try:
            answer = letters[int(row["answer"])]
        except (TypeError, ValueError, IndexError):
            problem = f"{row['answer']!r} is not an index into the {len(letters)} options"
            raise ColumnError("answer", problem) from None
        text = f"{question}\n{_option_lines(letters, options)}{self.prompt}"
        return _row_sample(
            text, [answer], extra={"options": dict(zip(letters, options, strict=True))}
        )

    def response(self, prediction: str) -> str:
        """The filter runs on the raw response, before lmms-eval's evaluator strips it."""
        return super().response(scoring.leading_option_letter(prediction))

    def _score(self, text: str, sample: Sample) -> float:
        return scoring.hf_exact_match(
            text, sample.answers[0], ignore_case=True, ignore_punctuation=True
        )


@register_benchmark
@dataclass
class SeedBench2Plus(ParquetBenchmark):
    """SEED-Bench-2-Plus (doolayer/SEED-Bench-2-Plus, split test; task ``seedbench_2_plus``):
    ``choice_A``-``choice_D`` (a choice naming a .jpg / .png file shown as ``<image>``),
    ``answer`` a letter; :func:`scoring.seedbench_match`; categories: ``question_image_type``
    (chart, map, web)."""

    prompt: str = SEED_PROMPT
    category_column: str | None = "question_image_type"
    max_new_tokens: int = field(default=16, init=False)
    until: tuple[str, ...] = field(default=("ASSISTANT:",), init=False)
    kind: ClassVar[str] = "seedbench2_plus"
    dataset: ClassVar[str] = "doolayer/SEED-Bench-2-Plus"
    required: ClassVar[tuple[str, ...]] = (
        "question", "choice_A", "choice_B", "choice_C", "choice_D", "answer",
    )  # fmt: skip

    def _sample(self, row: Mapping[str, Any]) -> Sample:
        letters = ("A", "B", "C", "D")
        choices = {k: _string(row, f"choice_{k}") for k in letters}
        shown = {k: "<image>" if "jpg" in v or "png" in v else v for k, v in choices.items()}
        lines = "\n".join(f"{k}. {v}" for k, v in shown.items())
        text = f"{_string(row, 'question')}\n{lines}\n{self.prompt}"
        answer = _string(row, "answer")
        if answer.strip().upper() not in choices:  # compared case-blind, stripped
            raise ColumnError("answer", f"{answer!r} is not one of the options A, B, C, D")
        return _row_sample(text, [answer], extra={"options": choices})

    def _score(self, text: str, sample: Sample) -> float:
        return scoring.seedbench_match(text, sample.answers[0])


@register_benchmark
@dataclass
class RealWorldQA(ParquetBenchmark):
    """RealWorldQA (lmms-lab/RealWorldQA, split test; task ``realworldqa``): the stripped
    question carries its options and instruction (the default post-prompt is empty); a letter
    answer by :func:`scoring.extract_mcq_answer`, any other by exact match
    (:func:`scoring.realworldqa_match`)."""

    max_new_tokens: int = field(default=16, init=False)
    kind: ClassVar[str] = "realworldqa"
    dataset: ClassVar[str] = "lmms-lab/RealWorldQA"
    required: ClassVar[tuple[str, ...]] = ("question", "answer")

    def _sample(self, row: Mapping[str, Any]) -> Sample:
        question = _with_post_prompt(_string(row, "question"), self.prompt, REALWORLDQA_INSTRUCTION)
        return _row_sample(question, [_string(row, "answer")])

    def _score(self, text: str, sample: Sample) -> float:
        return scoring.realworldqa_match(text, sample.answers[0])


_MMBENCH_LANGUAGES: dict[str, tuple[str, int, tuple[str, ...]]] = {
    "en": (MC_PROMPT, 1024, ("ASSISTANT:",)),  # mmbench_en_dev
    "cn": (MMBENCH_CN_PROMPT, 256, (FEWSHOT_DELIMITER,)),  # mmbench_cn_dev
}
"""Per MMBench language: default post-prompt, max_new_tokens, until."""


@register_benchmark
@dataclass
class MMBench(ParquetBenchmark):
    """MMBench (lmms-lab/MMBench, configs en / cn, split dev; tasks ``mmbench_en_dev`` /
    ``mmbench_cn_dev``): options in columns A-E, optional ``hint``. The prompt is
    ``"{hint} {question} There are several options:\\nA. ...\\n{post_prompt}"``
    (``mmbench_doc_to_text``; a ``"nan"`` hint is dropped in English only). ``language`` (en,
    cn) sets the default post-prompt and the generation settings.

    Scoring is lmms-eval's static evaluation (:func:`scoring.mmbench_choice`, task
    ``mmbench_en_dev_static``; the GPT fallback of the ``_dev`` tasks cannot run offline) under
    both rules. With ``circular`` (default) a question is right only when every circular
    variant present (same ``index`` mod 1e6, the sample's ``unit``) is right, and is counted
    through its main row (``index`` < 1e6, whose category it takes) as CircularEval does;
    sampling keeps variants together; ``mmbench_vanilla`` is the per-row accuracy.
    """

    split: str = "dev"
    prompt: str | None = None  # None: the language's default
    category_column: str | None = "category"
    circular: bool = True
    language: str = "en"
    max_new_tokens: int = field(default=1024, init=False)
    until: tuple[str, ...] = field(default=("ASSISTANT:",), init=False)
    kind: ClassVar[str] = "mmbench"
    dataset: ClassVar[str] = "lmms-lab/MMBench"
    required: ClassVar[tuple[str, ...]] = ("index", "question", "answer", "A", "B")
    optional: ClassVar[tuple[str, ...]] = ("C", "D", "E", "hint")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.language not in _MMBENCH_LANGUAGES:
            raise ValueError(f"language={self.language!r}: expected one of en, cn")
        prompt, self.max_new_tokens, self.until = _MMBENCH_LANGUAGES[self.language]
        self.prompt = prompt if self.prompt is None else self.prompt

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "language": self.language, "circular": self.circular}

    def _groups(self, rows: list[dict[str, Any]]) -> list[Any] | None:
        return [int(r["index"]) % 1_000_000 for r in rows] if self.circular else None

    def _hint(self, row: Mapping[str, Any]) -> Any | None:
        """The hint the prompt shows, or None (missing; ``"nan"`` too in English)."""
        hint = row.get("hint")
        if _missing(hint) or (self.language == "en" and hint == "nan"):
            return None
        return hint

    def _prompt(self, row: Mapping[str, Any]) -> str:
        # create_options_prompt: the A-E cells that are true, in letter order, shown unless
        # missing or "nan"; the trailing newlines stripped
        shown = sorted((c, row[c]) for c in "ABCDE" if row.get(c))
        lines = "".join(f"{k}. {v}\n" for k, v in shown if not _missing(v) and v != "nan")
        options = f"{MMBENCH_OPTIONS}\n{lines}".rstrip("\n")
        question, hint = _string(row, "question"), self._hint(row)
        query = f"{hint} {question} {options}" if hint is not None else f"{question} {options}"
        return f"{query}\n{self.prompt}"

    def _sample(self, row: Mapping[str, Any]) -> Sample:
        try:
            index = int(row["index"])
        except (TypeError, ValueError):
            raise ColumnError("index", f"{row['index']!r} is not an integer") from None
        # the options the scorer reads (build_choices): A-D, a column the row lacks as "nan"
        choices = {c: row.get(c, "nan") for c in "ABCD"}
        choices = {c: v for c, v in choices.items() if not _missing(v)}
        answer = _string(row, "answer")
        if answer not in choices:
            raise ColumnError(
                "answer", f"{answer!r} is not one of the options {', '.join(choices)}"
            )
        group = index % 1_000_000
        extra = {"choices": choices, "group": group, "main": index < 1_000_000}
        sample = _row_sample(self._prompt(row), [answer], extra=extra)
        sample.unit = str(group)
        return sample

    def _score(self, text: str, sample: Sample) -> float:
        return float(scoring.mmbench_choice(text, sample.extra["choices"]) == sample.answers[0])

    def aggregate(self, results: Sequence[Result]) -> dict[str, float]:
        if not self.circular or not results:
            return _mean_metrics(results)
        groups: dict[int, list[Result]] = {}
        for r in results:
            groups.setdefault(r[0].extra["group"], []).append(r)
        merged = []  # one result per question with a main row: right when all variants are
        for members in groups.values():
            main = [m for m in members if m[0].extra["main"]]
            if main:
                merged.append((main[0][0], main[0][1], float(all(m[2] > 0.5 for m in members))))
        metrics = _mean_metrics(merged)
        metrics["mmbench_vanilla"] = _mean_metrics(results)["score"]
        return metrics


@register_benchmark
@dataclass
class MMStar(ParquetBenchmark):
    """MMStar (Lin-Chen/MMStar, split val; task ``mmstar``): options inside the question text,
    the post-prompt without its final period (``mmstar_doc_to_text``). ``lmms_eval``:
    :func:`scoring.extract_mcq_answer` over A-D; ``score`` the mean over the fine categories
    (``l2_category``) of their accuracies and ``score.<category>`` the same within each core
    category (``mmstar_aggregate_results``). ``official``: MMStar's ``MMStar_eval``
    (:func:`scoring.mmstar_official_match`), accuracies over questions (correct / 1500 and /
    250 per category on the full set)."""

    prompt: str = MMSTAR_PROMPT
    split: str = "val"
    category_column: str | None = "category"
    kind: ClassVar[str] = "mmstar"
    dataset: ClassVar[str] = "Lin-Chen/MMStar"
    required: ClassVar[tuple[str, ...]] = ("question", "answer", "l2_category")
    authors_rule: ClassVar[bool] = True

    def _sample(self, row: Mapping[str, Any]) -> Sample:
        question = _with_post_prompt(_string(row, "question"), self.prompt, MME_BUILTIN_PROMPT)
        extra = {"l2_category": str(row["l2_category"])}
        return _row_sample(question, [_string(row, "answer")], extra=extra)

    def _score(self, text: str, sample: Sample) -> float:
        answer = sample.answers[0]
        if self.scoring == "official":
            return scoring.mmstar_official_match(text, answer)
        return float(
            scoring.extract_mcq_answer(text, ["A", "B", "C", "D"]) == answer.strip().upper()
        )

    def aggregate(self, results: Sequence[Result]) -> dict[str, float]:
        if self.scoring == "official":
            return _mean_metrics(results)

        def macro(subset: Sequence[Result]) -> float:
            by_l2: dict[str, list[float]] = {}
            for s, _, score in subset:
                by_l2.setdefault(s.extra["l2_category"], []).append(score)
            return 100.0 * statistics.fmean(statistics.fmean(v) for v in by_l2.values())

        metrics = {"score": macro(results)} if results else {}
        for category in sorted({s.category for s, _, _ in results if s.category}):
            metrics[metric_key(category)] = macro([r for r in results if r[0].category == category])
        return metrics


# -- ChartQA, OCRBench -------------------------------------------------------------------------
@register_benchmark
@dataclass
class ChartQA(ParquetBenchmark):
    """ChartQA (lmms-lab/ChartQA, split test; task ``chartqa``): relaxed accuracy
    (:func:`scoring.relaxed_correctness`, the authors' rule too); categories: ``type``
    (human_test, augmented_test)."""

    prompt: str = CHARTQA_PROMPT
    category_column: str | None = "type"
    metric: str = "relaxed_accuracy"
    max_new_tokens: int = field(default=16, init=False)
    kind: ClassVar[str] = "chartqa"
    dataset: ClassVar[str] = "lmms-lab/ChartQA"
    required: ClassVar[tuple[str, ...]] = ("question", "answer")

    def _sample(self, row: Mapping[str, Any]) -> Sample:
        return _row_sample(_string(row, "question") + self.prompt, [_string(row, "answer")])

    def _score(self, text: str, sample: Sample) -> float:
        return float(scoring.relaxed_correctness(text, sample.answers[0]))


@register_benchmark
@dataclass
class OCRBench(ParquetBenchmark):
    """OCRBench (echo840/OCRBench, split test; task ``ocrbench``): ``answer`` a list of
    accepted strings (or one), ``dataset`` the source (HME100k scored without spaces),
    ``question_type`` the category. ``lmms_eval`` folds full-width characters first
    (``ocrbench_process_results``); ``official`` (OCRBench's script) does not. ``score`` is the
    final score scaled to the 1000 questions (the count right when all are run; lmms-eval
    reports count / 1000); ``ocrbench_correct`` the count right, ``ocrbench_text_recognition``
    the count right in the six recognition categories; ``score.<question type>`` in %."""

    category_column: str | None = "question_type"
    metric: str = "ocrbench_final_score"
    max_new_tokens: int = field(default=128, init=False)
    kind: ClassVar[str] = "ocrbench"
    dataset: ClassVar[str] = "echo840/OCRBench"
    required: ClassVar[tuple[str, ...]] = ("question", "answer", "dataset")
    authors_rule: ClassVar[bool] = True

    def _sample(self, row: Mapping[str, Any]) -> Sample:
        answers = [_string(row, "answer")] if isinstance(row["answer"], str) else None
        return _row_sample(
            _string(row, "question").strip() + self.prompt,
            answers if answers is not None else _strings(row, "answer"),
            extra={"dataset": _string(row, "dataset")},
        )

    def _score(self, text: str, sample: Sample) -> float:
        return scoring.ocrbench_match(
            text,
            sample.answers,
            sample.extra["dataset"],
            fold_fullwidth_ascii=self.scoring == "lmms_eval",
        )

    def aggregate(self, results: Sequence[Result]) -> dict[str, float]:
        metrics = _mean_metrics(results)
        if results:
            metrics["score"] = 1000.0 * statistics.fmean(r[2] for r in results)
        metrics["ocrbench_correct"] = float(sum(r[2] for r in results))
        metrics["ocrbench_text_recognition"] = float(
            sum(r[2] for r in results if r[0].category in scoring.OCRBENCH_RECOGNITION)
        )
        return metrics
