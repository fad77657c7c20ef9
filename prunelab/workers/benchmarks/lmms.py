"""Benchmarks read from local parquet files in the layout of the public lmms-eval datasets.

A benchmark config names a ``path``: a parquet file, or a directory laid out as the Hugging Face
dataset is (``<path>/<split>-*.parquet``, ``<path>/<split>.parquet``, ``<path>/data/<split>-*``
or ``<path>/<split>/*.parquet``). Columns are those of the lmms-eval dataset (image as a
``{"bytes": ...}`` struct or raw bytes, question, answers or options, category); the prompt
appended to each question is lmms-eval's default for the task. ``samples(limit, seed)`` takes
a seeded subset (pairs of questions on one MME image, and circular variants of one MMBench
question, stay together). Scoring rules are in :mod:`prunelab.workers.benchmarks.scoring`;
``aggregate`` turns per-sample results into the official metrics (``score`` plus extras such as
``mme_perception`` or ``pope_f1``, and ``score.<category>``).

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from prunelab.workers.benchmarks import register_benchmark, scoring
from prunelab.workers.benchmarks.base import Sample

__all__ = [
    "AI2D",
    "GQA",
    "MC_PROMPT",
    "MME",
    "POPE",
    "VQA_PROMPT",
    "ChartQA",
    "DatasetError",
    "MMBench",
    "MMStar",
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

VQA_PROMPT = "\nAnswer the question using a single word or phrase."
MC_PROMPT = "\nAnswer with the option's letter from the given choices directly."
VIZWIZ_PROMPT = (
    "\nWhen the provided information is insufficient, respond with 'Unanswerable'."
    "\nAnswer the question using a single word or phrase."
)
CHARTQA_PROMPT = "\nAnswer the question with a single word."
MME_BUILTIN_PROMPT = " Please answer yes or no."
IMAGE = "image"
Result = tuple[Sample, str, float]  # (sample, prediction, per-sample score)


class DatasetError(ValueError):
    """A benchmark's data file is missing or malformed; the message names the path."""


def resolve_files(path: str | Path, split: str) -> list[Path]:
    """The parquet files of ``split`` at ``path`` (a file, or a dataset directory)."""
    root = Path(path).expanduser()
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DatasetError(f"{root}: no such file or directory")
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
    raise DatasetError(
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
    data = value.get("bytes") if isinstance(value, dict) else value
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise DatasetError(f"image cell holds no encoded bytes ({type(value).__name__})")
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


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
    """A cell as text; None and NaN (pandas-written missing values) as ''."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = str(value)
    return "" if text.strip().lower() == "nan" else text


def _row_sample(question: str, answers: list[str], extra: dict[str, Any] | None = None) -> Sample:
    """A sample of a parquet row before ``ParquetBenchmark.samples`` fills in its id, image and
    category (the image is a 1x1 placeholder until then)."""
    return Sample("", np.zeros((1, 1, 3), np.uint8), question, answers, extra=extra or {})


@dataclass
class ParquetBenchmark:
    """A benchmark read from lmms-eval-layout parquet files (subclasses: one per dataset).

    ``path``: file or dataset directory; ``split``: which split's files a directory offers;
    ``prompt``: appended to each question (lmms-eval's default post-prompt);
    ``category_column``: per-category metrics from this column when the files have it.
    """

    name: str = ""
    path: str = ""
    split: str = "test"
    prompt: str = ""
    category_column: str | None = None
    metric: str = "accuracy"

    kind: ClassVar[str] = ""
    required: ClassVar[tuple[str, ...]] = ()  # besides the image column
    optional: ClassVar[tuple[str, ...]] = ()
    has_image: ClassVar[bool] = True  # False: images come from elsewhere (GQA)
    version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        self.name = self.name or self.kind
        if not str(self.path).strip():
            raise ValueError(f"benchmark {self.name!r}: `path` (its parquet file or directory)")

    # -- files -------------------------------------------------------------------------------
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
        """Kind, split, prompt, category column, and each file's name, size and footer hash."""
        return {
            "name": self.name,
            "kind": self.kind,
            "split": self.split,
            "prompt": self.prompt,
            "category_column": self.category_column,
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

    def samples(self, limit: int | None, seed: int = 0) -> list[Sample]:
        """``limit`` samples (all when None) chosen by ``seed``, in file order."""
        rows = self._table().to_pylist()
        indices = self._choose(rows, limit, seed)
        images = self._images(indices, [rows[i] for i in indices])
        samples = []
        for i, image in zip(indices, images, strict=True):
            row = rows[i]
            sample = self._sample(row)
            sample.id = str(i)
            sample.image = decode_image(image)
            if self.category_column:
                sample.category = _text(row.get(self.category_column))
            samples.append(sample)
        return samples

    def _sample(self, row: dict[str, Any]) -> Sample:
        """A sample from a row (id, image and category are filled in by ``samples``)."""
        raise NotImplementedError

    # -- scoring -----------------------------------------------------------------------------
    def score(self, prediction: str, sample: Sample) -> float:
        raise NotImplementedError

    def aggregate(self, results: Sequence[Result]) -> dict[str, float]:
        """Official metrics from (sample, prediction, score) of every sample: by default
        ``score`` = 100 x mean and ``score.<category>`` likewise."""
        return _mean_metrics(results)


# -- open-ended VQA ----------------------------------------------------------------------------
@dataclass
class _VQA(ParquetBenchmark):
    """VQA accuracy against ten human answers (see :func:`scoring.vqa_accuracy`)."""

    split: str = "validation"
    prompt: str = VQA_PROMPT
    metric: str = "vqa_accuracy"
    required: ClassVar[tuple[str, ...]] = ("question", "answers")
    normalize_answers: ClassVar[str] = "always"
    capitalize: ClassVar[bool] = False  # lmms-eval capitalises TextVQA / VizWiz questions

    def _sample(self, row: dict[str, Any]) -> Sample:
        question = _text(row["question"])
        question = question.capitalize() if self.capitalize else question
        answers = [
            _text(a.get("answer")) if isinstance(a, dict) else _text(a)
            for a in (row["answers"] or [])
        ]
        return _row_sample(question + self.prompt, answers)

    def score(self, prediction: str, sample: Sample) -> float:
        return scoring.vqa_accuracy(
            prediction, sample.answers, normalize_answers=self.normalize_answers
        )


@register_benchmark
@dataclass
class TextVQA(_VQA):
    """TextVQA (lmms-lab/textvqa, split validation); answers normalised like the prediction."""

    kind: ClassVar[str] = "textvqa"
    capitalize: ClassVar[bool] = True


@register_benchmark
@dataclass
class VizWiz(_VQA):
    """VizWiz-VQA (lmms-lab/VizWiz-VQA, split val); categories: answer type."""

    split: str = "val"
    prompt: str = VIZWIZ_PROMPT
    category_column: str | None = "category"
    kind: ClassVar[str] = "vizwiz"
    capitalize: ClassVar[bool] = True


@register_benchmark
@dataclass
class VQAv2(_VQA):
    """VQAv2 (lmms-lab/VQAv2, split validation): answers are ``{answer, ...}`` records,
    normalised only when they disagree (the official script); categories: answer type."""

    category_column: str | None = "answer_type"
    kind: ClassVar[str] = "vqav2"
    normalize_answers: ClassVar[str] = "if_disagree"


# -- GQA ---------------------------------------------------------------------------------------
@register_benchmark
@dataclass
class GQA(ParquetBenchmark):
    """GQA (lmms-lab/GQA): questions in ``testdev_balanced_instructions`` (``imageId``,
    ``question``, ``answer``), images in ``testdev_balanced_images`` (``id``, ``image``) at
    ``images_path`` (default: the sibling directory of ``path``). Exact match."""

    split: str = "testdev"
    prompt: str = VQA_PROMPT
    images_path: str = ""
    metric: str = "exact_match"
    kind: ClassVar[str] = "gqa"
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

    def _sample(self, row: dict[str, Any]) -> Sample:
        return _row_sample(
            _text(row["question"]) + self.prompt,
            [_text(row["answer"])],
            extra={"image_id": _text(row["imageId"])},
        )

    def score(self, prediction: str, sample: Sample) -> float:
        return scoring.exact_match(prediction, sample.answers[0])


# -- yes / no ----------------------------------------------------------------------------------
@register_benchmark
@dataclass
class MME(ParquetBenchmark):
    """MME (lmms-lab/MME, split test): two yes/no questions per image (``question_id`` is
    the image). ``score`` = perception total (sum of the 10 perception subtasks' acc + acc+,
    max 2000); also ``mme_cognition`` (4 subtasks, max 800), ``mme_acc``, ``mme_acc_plus``
    and ``score.<subtask>``. Sampling keeps an image's questions together."""

    prompt: str = VQA_PROMPT
    category_column: str | None = "category"
    metric: str = "mme_perception"
    kind: ClassVar[str] = "mme"
    required: ClassVar[tuple[str, ...]] = ("question_id", "question", "answer", "category")

    def _groups(self, rows: list[dict[str, Any]]) -> list[Any]:
        return [_text(r["question_id"]) for r in rows]

    def _sample(self, row: dict[str, Any]) -> Sample:
        question = _text(row["question"]).strip()
        if self.prompt:  # lmms-eval swaps MME's own instruction for the post-prompt
            question = question.replace(MME_BUILTIN_PROMPT, "") + self.prompt
        return _row_sample(
            question,
            [_text(row["answer"]).lower().strip().replace(".", "")],
            extra={"image_id": _text(row["question_id"])},
        )

    def score(self, prediction: str, sample: Sample) -> float:
        return float(scoring.mme_parse(prediction) == sample.answers[0])

    def aggregate(self, results: Sequence[Result]) -> dict[str, float]:
        totals = scoring.mme_scores(
            (s.category, s.extra["image_id"], score > 0.5) for s, _, score in results
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
    """POPE (lmms-lab/POPE, split test): yes/no object probing; categories adversarial,
    popular, random. ``score`` = F1 (yes positive) over all samples; also ``pope_accuracy``,
    ``pope_precision``, ``pope_recall``, ``pope_f1``, ``pope_yes_ratio`` and the F1 of each
    category as ``score.<category>``."""

    prompt: str = VQA_PROMPT
    category_column: str | None = "category"
    metric: str = "pope_f1"
    kind: ClassVar[str] = "pope"
    required: ClassVar[tuple[str, ...]] = ("question", "answer")

    def _sample(self, row: dict[str, Any]) -> Sample:
        return _row_sample(
            _text(row["question"]).strip() + self.prompt,
            [_text(row["answer"]).lower().strip()],
        )

    def score(self, prediction: str, sample: Sample) -> float:
        return float(scoring.pope_label(prediction) == sample.answers[0])

    def aggregate(self, results: Sequence[Result]) -> dict[str, float]:
        def pairs(subset: Sequence[Result]) -> list[tuple[str, str]]:
            return [(scoring.pope_label(p), s.answers[0]) for s, p, _ in subset]

        overall = scoring.pope_metrics(pairs(results))
        metrics = {"score": overall["f1"], **{f"pope_{k}": v for k, v in overall.items()}}
        for category in sorted({s.category for s, _, _ in results if s.category}):
            subset = [r for r in results if r[0].category == category]
            metrics[metric_key(category)] = scoring.pope_metrics(pairs(subset))["f1"]
        return metrics


# -- multiple choice ---------------------------------------------------------------------------
def _options_text(options: dict[str, str]) -> str:
    return "\n".join(f"{k}. {v}" for k, v in options.items())


@dataclass
class _MultipleChoice(ParquetBenchmark):
    """Options shown as ``A. text`` lines after the question; the letter is extracted from
    the answer (:func:`scoring.extract_choice`) and compared with the right one."""

    prompt: str = MC_PROMPT
    metric: str = "accuracy"

    def _options(self, row: dict[str, Any]) -> dict[str, str]:
        raise NotImplementedError

    def _answer(self, row: dict[str, Any], options: dict[str, str]) -> str:
        return _text(row["answer"]).strip().upper()

    def _question(self, row: dict[str, Any], options: dict[str, str]) -> str:
        return f"{_text(row['question'])}\n{_options_text(options)}{self.prompt}"

    def _sample(self, row: dict[str, Any]) -> Sample:
        options = self._options(row)
        answer = self._answer(row, options)
        if answer not in options:
            raise DatasetError(
                f"{self.path}: answer {answer!r} is not one of the options {sorted(options)}"
            )
        return _row_sample(
            self._question(row, options),
            [answer],
            extra={"options": options},
        )

    def score(self, prediction: str, sample: Sample) -> float:
        return float(
            scoring.extract_choice(prediction, sample.extra["options"]) == sample.answers[0]
        )


def _letter_columns(row: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Options from columns ``A``, ``B``... (``choice_A``...) that hold text, in order."""
    options = {}
    for letter in "ABCDEFGH":
        value = _text(row.get(prefix + letter))
        if value.strip():
            options[letter] = value
    return options


@register_benchmark
@dataclass
class MMBench(_MultipleChoice):
    """MMBench (lmms-lab/MMBench, config en, split dev): options in columns A-E, optional
    ``hint`` before the question. With ``circular`` (default) a question counts as right only
    when every circular variant present (same ``index`` mod 1e6) is right (CircularEval), and
    sampling keeps variants together; ``mmbench_vanilla`` is the plain accuracy."""

    split: str = "dev"
    category_column: str | None = "category"
    circular: bool = True
    kind: ClassVar[str] = "mmbench"
    required: ClassVar[tuple[str, ...]] = ("index", "question", "answer", "A", "B")
    optional: ClassVar[tuple[str, ...]] = ("C", "D", "E", "hint")

    def _groups(self, rows: list[dict[str, Any]]) -> list[Any] | None:
        return [int(r["index"]) % 1_000_000 for r in rows] if self.circular else None

    def _options(self, row: dict[str, Any]) -> dict[str, str]:
        return _letter_columns(row)

    def _question(self, row: dict[str, Any], options: dict[str, str]) -> str:
        hint = _text(row.get("hint")).strip()
        body = super()._question(row, options)
        return f"{hint}\n{body}" if hint else body

    def _sample(self, row: dict[str, Any]) -> Sample:
        sample = super()._sample(row)
        sample.extra["group"] = int(row["index"]) % 1_000_000
        return sample

    def aggregate(self, results: Sequence[Result]) -> dict[str, float]:
        if not self.circular:
            return _mean_metrics(results)
        groups: dict[int, list[Result]] = {}
        for r in results:
            groups.setdefault(r[0].extra["group"], []).append(r)
        # one result per question: right only when all its variants are right
        merged = [
            (members[0][0], members[0][1], float(all(m[2] > 0.5 for m in members)))
            for members in groups.values()
        ]
        metrics = _mean_metrics(merged)
        metrics["mmbench_vanilla"] = _mean_metrics(results)["score"]
        return metrics


@register_benchmark
@dataclass
class MMStar(_MultipleChoice):
    """MMStar (Lin-Chen/MMStar, split val): options inside the question text; ``score`` is
    the mean over the 18 fine categories (``l2_category``) of their accuracies, as MMStar
    reports, ``score.<category>`` the same over each of the 6 core categories."""

    split: str = "val"
    category_column: str | None = "category"
    kind: ClassVar[str] = "mmstar"
    required: ClassVar[tuple[str, ...]] = ("question", "answer", "l2_category")

    def _options(self, row: dict[str, Any]) -> dict[str, str]:
        options = scoring.parse_inline_options(_text(row["question"]))
        return options or {k: "" for k in "ABCD"}

    def _question(self, row: dict[str, Any], options: dict[str, str]) -> str:
        return _text(row["question"]).strip() + self.prompt

    def _sample(self, row: dict[str, Any]) -> Sample:
        sample = super()._sample(row)
        sample.extra["l2_category"] = _text(row["l2_category"])
        return sample

    def aggregate(self, results: Sequence[Result]) -> dict[str, float]:
        def macro(subset: Sequence[Result]) -> float:
            by_l2: dict[str, list[float]] = {}
            for s, _, score in subset:
                by_l2.setdefault(s.extra["l2_category"], []).append(score)
            return 100.0 * statistics.fmean(statistics.fmean(v) for v in by_l2.values())

        metrics = {"score": macro(results)} if results else {}
        for category in sorted({s.category for s, _, _ in results if s.category}):
            metrics[metric_key(category)] = macro([r for r in results if r[0].category == category])
        return metrics


@register_benchmark
@dataclass
class ScienceQAImg(_MultipleChoice):
    """ScienceQA-IMG (lmms-lab/ScienceQA, config ScienceQA-IMG, split test): ``choices`` list,
    ``answer`` its index, ``hint`` shown as ``Context: ...``; categories: subject."""

    category_column: str | None = "subject"
    kind: ClassVar[str] = "scienceqa_img"
    required: ClassVar[tuple[str, ...]] = ("question", "choices", "answer")
    optional: ClassVar[tuple[str, ...]] = ("hint",)

    def _options(self, row: dict[str, Any]) -> dict[str, str]:
        return {chr(ord("A") + i): _text(c) for i, c in enumerate(row["choices"] or [])}

    def _answer(self, row: dict[str, Any], options: dict[str, str]) -> str:
        return chr(ord("A") + int(row["answer"]))

    def _question(self, row: dict[str, Any], options: dict[str, str]) -> str:
        hint = _text(row.get("hint")).strip()
        context = f"Context: {hint}\n" if hint else ""
        return f"{context}{super()._question(row, options)}"


@register_benchmark
@dataclass
class AI2D(_MultipleChoice):
    """AI2D (lmms-lab/ai2d, split test): ``options`` list, ``answer`` its index as text."""

    kind: ClassVar[str] = "ai2d"
    required: ClassVar[tuple[str, ...]] = ("question", "options", "answer")

    def _options(self, row: dict[str, Any]) -> dict[str, str]:
        return {chr(ord("A") + i): _text(c) for i, c in enumerate(row["options"] or [])}

    def _answer(self, row: dict[str, Any], options: dict[str, str]) -> str:
        return chr(ord("A") + int(_text(row["answer"]).strip()))


@register_benchmark
@dataclass
class SeedBench2Plus(_MultipleChoice):
    """SEED-Bench-2-Plus (doolayer/SEED-Bench-2-Plus, split test): ``choice_A``-``choice_D``,
    ``answer`` a letter; categories: ``question_image_type`` (chart, map, web)."""

    category_column: str | None = "question_image_type"
    kind: ClassVar[str] = "seedbench2_plus"
    required: ClassVar[tuple[str, ...]] = ("question", "choice_A", "choice_B", "answer")
    optional: ClassVar[tuple[str, ...]] = ("choice_C", "choice_D")

    def _options(self, row: dict[str, Any]) -> dict[str, str]:
        return _letter_columns(row, "choice_")


@register_benchmark
@dataclass
class RealWorldQA(ParquetBenchmark):
    """RealWorldQA (lmms-lab/RealWorldQA, split test): the question carries its options and
    instruction (no prompt added). A letter answer is scored by option extraction over the
    options written in the question; any other answer by exact match after lower-casing,
    deleting punctuation and writing number words as digits."""

    kind: ClassVar[str] = "realworldqa"
    required: ClassVar[tuple[str, ...]] = ("question", "answer")

    def _sample(self, row: dict[str, Any]) -> Sample:
        question = _text(row["question"])
        return _row_sample(
            question + self.prompt,
            [_text(row["answer"]).strip()],
            extra={"options": scoring.parse_inline_options(question)},
        )

    def score(self, prediction: str, sample: Sample) -> float:
        answer, options = sample.answers[0], sample.extra["options"]
        if len(answer) == 1 and answer.upper() in options:
            return float(scoring.extract_choice(prediction, options) == answer.upper())
        return float(scoring.normalize_words(prediction) == scoring.normalize_words(answer))


# -- ChartQA, OCRBench -------------------------------------------------------------------------
@register_benchmark
@dataclass
class ChartQA(ParquetBenchmark):
    """ChartQA (lmms-lab/ChartQA, split test): relaxed accuracy; categories: ``type``
    (human_test, augmented_test)."""

    prompt: str = CHARTQA_PROMPT
    category_column: str | None = "type"
    metric: str = "relaxed_accuracy"
    kind: ClassVar[str] = "chartqa"
    required: ClassVar[tuple[str, ...]] = ("question", "answer")

    def _sample(self, row: dict[str, Any]) -> Sample:
        return _row_sample(
            _text(row["question"]) + self.prompt,
            [_text(row["answer"])],
        )

    def score(self, prediction: str, sample: Sample) -> float:
        return float(scoring.relaxed_correctness(prediction, sample.answers[0]))


@register_benchmark
@dataclass
class OCRBench(ParquetBenchmark):
    """OCRBench (echo840/OCRBench, split test): ``answer`` a list of accepted strings,
    ``dataset`` the source (HME100k scored without spaces), ``question_type`` the category.
    ``score`` is the official final score scaled to the 1000 questions (the count right when
    all are run); ``ocrbench_correct`` the count right, ``ocrbench_text_recognition`` the
    count right in the six recognition categories; ``score.<question type>`` in %."""

    category_column: str | None = "question_type"
    metric: str = "ocrbench_final_score"
    kind: ClassVar[str] = "ocrbench"
    required: ClassVar[tuple[str, ...]] = ("question", "answer", "dataset")

    def _sample(self, row: dict[str, Any]) -> Sample:
        answer = row["answer"]
        answers = [_text(a) for a in answer] if isinstance(answer, list) else [_text(answer)]
        return _row_sample(
            _text(row["question"]).strip() + self.prompt,
            answers,
            extra={"dataset": _text(row["dataset"])},
        )

    def score(self, prediction: str, sample: Sample) -> float:
        return scoring.ocrbench_match(prediction, sample.answers, sample.extra["dataset"])

    def aggregate(self, results: Sequence[Result]) -> dict[str, float]:
        metrics = _mean_metrics(results)
        if results:
            metrics["score"] = 1000.0 * statistics.fmean(r[2] for r in results)
        metrics["ocrbench_correct"] = float(sum(r[2] for r in results))
        metrics["ocrbench_text_recognition"] = float(
            sum(r[2] for r in results if r[0].category in scoring.OCRBENCH_RECOGNITION)
        )
        return metrics
