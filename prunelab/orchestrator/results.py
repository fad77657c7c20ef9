"""Trial parameters, baseline-relative metrics, and the paper-style results table.

The report (``prunelab report``, ``table.md`` / ``table.csv`` / ``table.tex`` on a sweep's parent
run) is shaped like the tables of the seed papers: per model, the unpruned model first ("upper
bound"), then one row per method at each budget (largest budget first); one column per
benchmark holding its headline score, and a last column with the mean over benchmarks of the
score ratio (score / unpruned score, in %). At each (model, budget) the best pruned value of a
column is bold (``**x**`` in markdown, ``\\textbf{x}`` in LaTeX, plain in CSV).

The per-trial table with every cost metric (``trials.csv`` on the parent run) is
:func:`results_rows` + :func:`trials_markdown` / :func:`trials_csv`; its metric columns are the
entries of :data:`prunelab.metrics.METRICS` that name a ``column``.

Trials are given as (trial, status, metrics): the trial a :class:`~prunelab.trial.Trial` or its
stored form (the ``trials.config`` mapping), read once through :meth:`Trial.from_dict`.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prunelab import metrics as metric_table
from prunelab.metrics import ratio, relative_metrics
from prunelab.trial import Trial

__all__ = [
    "Report",
    "ReportRow",
    "as_trial",
    "budget_cell",
    "budget_label",
    "build_report",
    "relative_metrics",
    "report_artifacts",
    "report_csv",
    "report_latex",
    "report_markdown",
    "results_rows",
    "trial_params",
    "trials_columns",
    "trials_csv",
    "trials_markdown",
]

UPPER_BOUND = "upper bound"
MEAN_RATIO_HEADER = "mean score ratio (%)"
MISSING = "-"  # a cell without a value (LaTeX prints "--")

TrialLike = Trial | Mapping[str, Any]  # a Trial, or its stored form (``trials.config``)
TrialTuple = tuple[TrialLike, str, Mapping[str, Any] | None]  # (trial, status, metrics)
_Trials = list[tuple[Trial, str, Mapping[str, Any]]]  # read: metrics {} when there are none

# metric names the paper-style report reads
SCORE, TFLOPS = "score", "tflops"


def as_trial(trial: TrialLike) -> Trial:
    """``trial`` itself, or the :class:`Trial` of a stored trial config."""
    return trial if isinstance(trial, Trial) else Trial.from_dict(trial)


def _read(trials: Iterable[TrialTuple]) -> _Trials:
    """(trial, status, metrics) triples with the trial as a :class:`Trial`."""
    return [(as_trial(trial), status, metrics or {}) for trial, status, metrics in trials]


def trial_params(trial: TrialLike) -> dict[str, Any]:
    """MLflow params of a trial: the axes (None when the method does not use one) and hparams."""
    return as_trial(trial).params()


def budget_label(trial: TrialLike) -> str:
    """Short budget of a trial for run names and listings: ``64``, ``22.2%`` or ``all``."""
    trial = as_trial(trial)
    if trial.keep_tokens is not None:
        return str(trial.keep_tokens)
    if trial.keep_ratio is not None:
        return f"{100 * trial.keep_ratio:.1f}%"
    return "all"


def budget_cell(trial: TrialLike) -> str:
    """Budget as the report prints it: ``64 tokens``, ``22.2%``, or ``upper bound`` (unpruned)."""
    trial = as_trial(trial)
    if trial.keep_tokens is not None:
        return f"{trial.keep_tokens} tokens"
    if trial.keep_ratio is not None:
        return f"{100 * trial.keep_ratio:.1f}%"
    return UPPER_BOUND


def _number(value: Any) -> float | None:
    """A finite float, or None (missing, NaN or infinite)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# -- the paper-style report ---------------------------------------------------------------------
@dataclass
class ReportRow:
    """One row of the report: a model's method at one budget (and variant), over benchmarks.

    ``scores`` / ``ratios`` / ``tflops``: benchmark -> value of the finished trial (None when
    the trial is not finished or the value is undefined); ``status``: benchmark -> the trial's
    status (benchmarks without a trial for this row are absent).
    """

    model: str
    method: str
    budget: str
    variant: dict[str, Any]  # variant column (layer, seed) -> value, when the sweep varies it
    is_baseline: bool
    order: tuple  # sort key within the model
    scores: dict[str, float | None] = field(default_factory=dict)
    ratios: dict[str, float | None] = field(default_factory=dict)
    tflops: dict[str, float | None] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)
    mean_ratio: float | None = None  # mean over the report's ratio benchmarks, as a fraction
    mean_tflops: float | None = None  # mean TFLOPs per sample over the row's benchmarks


@dataclass
class Report:
    """The report of one sweep: rows grouped per model (in order), columns per benchmark.

    ``variant_columns``: extra row labels shown because the sweep varies them (``layer``,
    ``seed``); ``ratio_benchmarks``: the benchmarks whose unpruned score is known and non-zero,
    over which ``mean_ratio`` averages.
    """

    benchmarks: list[str]
    rows: list[ReportRow]
    variant_columns: list[str]
    ratio_benchmarks: list[str]

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(row.model for row in self.rows))


def _budget_order(trial: Trial) -> tuple:
    """Unpruned first, then absolute budgets, then ratios, each largest first."""
    if trial.keep_tokens is not None:
        return (1, -float(trial.keep_tokens))
    if trial.keep_ratio is not None:
        return (2, -float(trial.keep_ratio))
    return (0 if trial.is_baseline else 3, 0.0)


def _varying_hparams(trials: _Trials) -> dict[str, list[str]]:
    """Per method, the hyperparameters that take more than one value in the sweep."""
    values: dict[str, dict[str, set[str]]] = {}
    for trial, _, _ in trials:
        per_method = values.setdefault(trial.method, {})
        for name, value in trial.hparams.items():
            per_method.setdefault(name, set()).add(repr(value))
    return {
        method: sorted(name for name, seen in hps.items() if len(seen) > 1)
        for method, hps in values.items()
    }


def _varies(trials: _Trials, axis: str) -> bool:
    """Whether some method runs at more than one value of ``axis`` (per model and budget)."""
    seen: dict[tuple, set] = {}
    for trial, _, _ in trials:
        if trial.is_baseline:
            continue
        group = (trial.model, trial.method, budget_cell(trial))
        seen.setdefault(group, set()).add(getattr(trial, axis))
    return any(len(values) > 1 for values in seen.values())


def _models(trials: _Trials) -> list[str]:
    """The sweep's models, in order of first appearance."""
    return list(dict.fromkeys(trial.model for trial, _, _ in trials))


def build_report(trials: Iterable[TrialTuple]) -> Report:
    """The paper-style report of a sweep's trials, each given as (trial, status, metrics).

    Score ratios are recomputed here from each trial's score and its (model, benchmark)
    unpruned score, so they are right even for trials logged before their baseline finished.
    A row's mean ratio needs every ratio benchmark finished; otherwise it is None.
    """
    trials = _read(trials)
    benchmarks = list(dict.fromkeys(trial.benchmark for trial, _, _ in trials))
    axis_of = {"layer": "prune_layer", "seed": "seed"}
    variant_columns = [label for label, axis in axis_of.items() if _varies(trials, axis)]
    hparams = _varying_hparams(trials)
    baseline_scores: dict[tuple[str, str], float | None] = {}
    for trial, status, metrics in trials:
        if trial.is_baseline and status == "finished":
            baseline_scores[(trial.model, trial.benchmark)] = _number(metrics.get(SCORE))

    rows: dict[tuple, ReportRow] = {}
    for trial, status, metrics in trials:
        method = trial.method
        varying = hparams.get(method, [])
        if varying:
            shown = ", ".join(f"{name}={trial.hparams[name]}" for name in varying)
            method = f"{method} ({shown})"
        variant = {label: getattr(trial, axis_of[label]) for label in variant_columns}
        budget = budget_cell(trial)
        key = (trial.model, method, budget, tuple(variant.items()))
        row = rows.get(key)
        if row is None:
            row = rows[key] = ReportRow(
                model=trial.model,
                method=method,
                budget=budget,
                variant=variant,
                is_baseline=trial.is_baseline,
                order=(
                    _budget_order(trial),
                    method,
                    tuple(-1 if v is None else v for v in variant.values()),
                ),
            )
        benchmark = trial.benchmark
        row.status[benchmark] = status
        finished = status == "finished"
        score = _number(metrics.get(SCORE)) if finished else None
        row.scores[benchmark] = score
        row.ratios[benchmark] = ratio(score, baseline_scores.get((trial.model, benchmark)))
        row.tflops[benchmark] = _number(metrics.get(TFLOPS)) if finished else None

    ratio_benchmarks = [
        b for b in benchmarks if any(baseline_scores.get((m, b)) for m in _models(trials))
    ]
    for row in rows.values():
        wanted = [b for b in ratio_benchmarks if baseline_scores.get((row.model, b))]
        ratios = [row.ratios.get(b) for b in wanted]
        if wanted and all(r is not None for r in ratios):
            row.mean_ratio = statistics.fmean(r for r in ratios if r is not None)
        costs = [t for t in row.tflops.values() if t is not None]
        row.mean_tflops = statistics.fmean(costs) if costs else None

    models = _models(trials)
    ordered = sorted(rows.values(), key=lambda r: (models.index(r.model), r.order))
    return Report(benchmarks, ordered, variant_columns, ratio_benchmarks)


def _score_text(value: float) -> str:
    return f"{value:.1f}"


def _ratio_text(value: float) -> str:
    return f"{100 * value:.1f}"


def _cell_values(row: ReportRow, report: Report) -> list[tuple[str, float | None]]:
    """(text, value) of a row's benchmark and mean-ratio cells; value None: not a number."""
    cells: list[tuple[str, float | None]] = []
    for benchmark in report.benchmarks:
        score = row.scores.get(benchmark)
        if score is not None:
            cells.append((_score_text(score), score))
        else:
            status = row.status.get(benchmark)
            cells.append((MISSING if status in (None, "finished") else status, None))
    if row.mean_ratio is not None:
        cells.append((_ratio_text(row.mean_ratio), row.mean_ratio))
    else:
        cells.append((MISSING, None))
    return cells


def _best_cells(report: Report) -> set[tuple[int, int]]:
    """(row index, value column) pairs to print in bold: at each (model, budget) with at least
    two pruned rows, the largest displayed value of each column among them (ties all bold,
    unless every row has the same value)."""
    groups: dict[tuple[str, str], list[int]] = {}
    for index, row in enumerate(report.rows):
        if not row.is_baseline:
            groups.setdefault((row.model, row.budget), []).append(index)
    best: set[tuple[int, int]] = set()
    for members in groups.values():
        if len(members) < 2:
            continue
        cells = {index: _cell_values(report.rows[index], report) for index in members}
        for column in range(len(report.benchmarks) + 1):
            shown = {
                index: float(text)
                for index, row_cells in cells.items()
                for text, value in [row_cells[column]]
                if value is not None
            }
            if len(set(shown.values())) < 2 and len(shown) == len(members):
                continue  # every row has the same value: none is best
            if not shown:
                continue
            top = max(shown.values())
            best.update((index, column) for index, value in shown.items() if value == top)
    return best


def _label_cells(row: ReportRow, report: Report) -> list[str]:
    labels = [row.method, row.budget]
    labels += [
        "" if row.variant[c] is None else str(row.variant[c]) for c in report.variant_columns
    ]
    return labels


def _render_rows(report: Report, bold: Callable[[str], str]) -> list[tuple[str, list[str]]]:
    """(model, cells) per row: labels then values, best values wrapped by ``bold``."""
    best = _best_cells(report)
    out = []
    for index, row in enumerate(report.rows):
        values = [
            bold(text) if (index, column) in best else text
            for column, (text, _) in enumerate(_cell_values(row, report))
        ]
        out.append((row.model, _label_cells(row, report) + values))
    return out


def _header(report: Report) -> list[str]:
    return ["method", "budget", *report.variant_columns, *report.benchmarks, MEAN_RATIO_HEADER]


def _markdown_escape(text: str) -> str:
    return text.replace("|", "\\|")


def report_markdown(report: Report) -> str:
    """The report as one GitHub-flavoured markdown table (model in the first column)."""
    head = ["model", *_header(report)]
    labels = 3 + len(report.variant_columns)
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * labels + "---:|" * (len(head) - labels),
    ]
    for model, cells in _render_rows(report, lambda text: f"**{text}**"):
        lines.append("| " + " | ".join(_markdown_escape(c) for c in [model, *cells]) + " |")
    return "\n".join(lines) + "\n"


def report_csv(report: Report) -> str:
    """The report as CSV: the markdown table's cells, without bold."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["model", *_header(report)])
    for model, cells in _render_rows(report, lambda text: text):
        writer.writerow([model, *cells])
    return buffer.getvalue()


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped (for a tabular cell)."""
    return "".join(_LATEX_SPECIAL.get(char, char) for char in text)


def report_latex(report: Report) -> str:
    """The report as a booktabs ``tabular``: a header row per model, a rule between budgets.

    Needs ``\\usepackage{booktabs}``.
    """
    head = _header(report)
    labels = 2 + len(report.variant_columns)
    values = len(head) - labels
    lines = [
        "\\begin{tabular}{" + "l" * labels + "r" * values + "}",
        "\\toprule",
        " & ".join(latex_escape(h.capitalize() if i < labels else h) for i, h in enumerate(head))
        + " \\\\",
    ]
    rendered = _render_rows(report, lambda text: f"\\textbf{{{text}}}")
    previous: tuple[str, str] | None = None
    for row, (model, cells) in zip(report.rows, rendered, strict=True):
        if previous is None or previous[0] != model:
            lines += [
                "\\midrule",
                f"\\multicolumn{{{len(head)}}}{{l}}{{\\textit{{{latex_escape(model)}}}}} \\\\",
            ]
        elif previous[1] != row.budget:
            lines.append("\\midrule")
        previous = (model, row.budget)
        escaped = [latex_escape(c) for c in cells[:labels]]
        # value cells: bold markup is ours, the numbers/status words need escaping only
        escaped += [
            c if c.startswith("\\textbf{") else "--" if c == MISSING else latex_escape(c)
            for c in cells[labels:]
        ]
        lines.append(" & ".join(escaped) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


# -- the per-trial table ------------------------------------------------------------------------
def trials_columns() -> list[tuple[str, str]]:
    """(metric, header) of the per-trial table's metric columns: the entries of
    :data:`prunelab.metrics.METRICS` with a ``column``, in the table's order."""
    return [(metric.name, str(metric.column)) for metric in metric_table.table_columns()]


def results_rows(trials: Iterable[TrialTuple]) -> list[dict]:
    """Rows (trial, status, metrics) -> per-trial rows sorted by model, benchmark, method,
    budget (largest first), layer."""
    columns = trials_columns()
    rows = []
    for trial, status, metrics in _read(trials):
        row = {
            "model": trial.model,
            "benchmark": trial.benchmark,
            "method": trial.method,
            "budget": budget_label(trial),
            "layer": "" if trial.prune_layer is None else str(trial.prune_layer),
            "status": status,
        }
        for key, _ in columns:
            row[key] = metrics.get(key)
        row["_sort"] = (
            trial.model,
            trial.benchmark,
            not trial.is_baseline,
            trial.method,
            _budget_order(trial),
            trial.prune_layer or 0,
        )
        rows.append(row)
    rows.sort(key=lambda r: r.pop("_sort"))
    return rows


def _fmt(key: str, value: Any) -> str:
    """A metric cell of the per-trial markdown table, in the format of the metric's entry."""
    text = metric_table.format_value(metric_table.lookup(key), value)
    return MISSING if text is None else text


def trials_markdown(rows: Sequence[dict]) -> str:
    """Per-trial rows (:func:`results_rows`) as a markdown table of cost and quality metrics."""
    columns = trials_columns()
    head = ["model", "benchmark", "method", "budget", "layer"] + [t for _, t in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["model"], row["benchmark"], row["method"], row["budget"], row["layer"]]
        if row["status"] != "finished":
            cells += [row["status"]] + [""] * (len(columns) - 1)
        else:
            cells += [_fmt(key, row[key]) for key, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def trials_csv(rows: Sequence[dict]) -> str:
    """Per-trial rows (:func:`results_rows`) as CSV with raw metric values."""
    buffer = io.StringIO()
    fields = ["model", "benchmark", "method", "budget", "layer", "status"] + [
        key for key, _ in trials_columns()
    ]
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def report_artifacts(trials: Iterable[TrialTuple]) -> dict[str, str | bytes]:
    """The files of a sweep's parent run: ``table.md``, ``table.csv``, ``table.tex`` (the
    report), ``pareto.png`` (score ratio vs TFLOPs per model) and ``trials.csv`` (every
    trial's cost and quality metrics)."""
    from prunelab.orchestrator.plots import pareto_png  # matplotlib only when plotting

    trials = _read(trials)
    report = build_report(trials)
    return {
        "table.md": report_markdown(report),
        "table.csv": report_csv(report),
        "table.tex": report_latex(report),
        "pareto.png": pareto_png(report),
        "trials.csv": trials_csv(results_rows(trials)),
    }
