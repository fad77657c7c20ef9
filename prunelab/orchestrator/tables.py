"""The report and the per-trial table rendered: markdown, CSV, LaTeX, and a sweep's parent-run
files.

:mod:`prunelab.orchestrator.results` says what the report holds (rows, scores, intervals,
ratios); this module says how it prints: which cells are bold (the paired bootstrap test of
:func:`prunelab.intervals.not_worse`, see :func:`_best_cells`), ``75.0 ± 4.3`` in markdown,
``75.0 $\\pm$ 4.3`` in LaTeX, and the bounds in ``<column>_ci_low`` / ``<column>_ci_high``
columns in CSV.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from prunelab import intervals
from prunelab import metrics as metric_table
from prunelab.orchestrator.results import (
    CI_SUFFIXES,
    DEFAULT_COLUMNS,
    MEAN_RATIO_HEADER,
    MISSING,
    Report,
    ReportRow,
    TrialTuple,
    budget_label,
    budget_order,
    build_report,
    read_trials,
)

__all__ = [
    "latex_escape",
    "report_artifacts",
    "report_csv",
    "report_latex",
    "report_markdown",
    "results_rows",
    "trials_columns",
    "trials_csv",
    "trials_markdown",
]


def _score_text(value: float) -> str:
    return f"{value:.1f}"


def _ratio_text(value: float) -> str:
    return f"{100 * value:.1f}"


@dataclass(frozen=True)
class _Cell:
    """One value cell of the report.

    ``text``: the number as printed (or the trial's status, or :data:`MISSING`); ``value``:
    the printed number (None: not a number); ``low`` / ``high``: the printed interval bounds
    and ``half``: the printed ``±`` half-width (None: no interval); ``replicates`` /
    ``samples``: what the bold rule's paired test compares (None: no replicates).
    """

    text: str
    value: float | None = None
    low: str | None = None
    high: str | None = None
    half: str | None = None
    replicates: np.ndarray | None = None
    samples: tuple | None = None


def _number_cell(
    value: float,
    interval: tuple[float, float] | None,
    text: Callable[[float], str],
    replicates: np.ndarray | None,
    samples: tuple | None,
) -> _Cell:
    """A number, with the half-width ``max(value - low, high - value)`` of its interval."""
    shown = text(value)
    if interval is None:
        return _Cell(shown, float(shown), replicates=replicates, samples=samples)
    low, high = interval
    half = max(value - low, high - value, 0.0)
    return _Cell(shown, float(shown), text(low), text(high), text(half), replicates, samples)


def _cell_values(row: ReportRow, report: Report) -> list[_Cell]:
    """A row's benchmark cells, then its mean-ratio cell."""
    cells: list[_Cell] = []
    for benchmark in report.benchmarks:
        score = row.scores.get(benchmark)
        if score is not None:
            cells.append(_number_cell(score, row.intervals.get(benchmark), _score_text,
                                      row.replicates.get(benchmark),
                                      row.samples.get(benchmark)))  # fmt: skip
        else:
            status = row.status.get(benchmark)
            cells.append(_Cell(MISSING if status in (None, "finished") else status))
    if row.mean_ratio is not None:
        samples = tuple(row.samples.get(b) for b in report.ratio_benchmarks)
        cells.append(_number_cell(row.mean_ratio, row.mean_interval, _ratio_text,
                                  row.mean_replicates, samples))  # fmt: skip
    else:
        cells.append(_Cell(MISSING))
    for column in report.columns:  # cost columns: never bold
        shown = metric_table.format_value(metric_table.lookup(column), row.extras.get(column))
        cells.append(_Cell(MISSING if shown is None else shown))
    return cells


def _not_worse(best: _Cell, cell: _Cell) -> bool:
    """Whether ``cell`` is not significantly worse than ``best`` by the paired bootstrap test;
    False when they cannot be paired (replicates missing or of unequal length, or trials on
    other samples)."""
    if best.replicates is None or cell.replicates is None or best.samples != cell.samples:
        return False
    if len(best.replicates) != len(cell.replicates):
        return False
    return intervals.not_worse(best.replicates, cell.replicates)


def _bold_column(cells: Mapping[int, _Cell]) -> set[int]:
    """The rows of one column at one (model, budget) to print in bold: the largest printed
    value (ties all), and every row not significantly worse than each of them by the paired
    bootstrap test (:func:`prunelab.intervals.not_worse`). A row that cannot be paired with a
    best one (no replicates, other samples) is bold only at the best value. When every row of
    the group is bold, nothing stands out and none is."""
    shown = {index: cell for index, cell in cells.items() if cell.value is not None}
    if not shown:
        return set()
    top = max(cell.value for cell in shown.values() if cell.value is not None)
    bests = [shown[index] for index, cell in shown.items() if cell.value == top]
    bold = {index for index, cell in shown.items() if cell.value == top}
    for index, cell in shown.items():
        if index not in bold and all(_not_worse(best, cell) for best in bests):
            bold.add(index)
    return set() if len(bold) == len(cells) else bold


def _best_cells(report: Report) -> set[tuple[int, int]]:
    """(row index, value column) pairs to print in bold: at each (model, budget) with at least
    two pruned rows, per column, the rows of :func:`_bold_column`."""
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
            column_cells = {index: row_cells[column] for index, row_cells in cells.items()}
            best.update((index, column) for index in _bold_column(column_cells))
    return best


def budget_text(row: ReportRow) -> str:
    """The row's budget and, for a pruned row, the average it achieved over the LLM's layers:
    ``64 tokens (avg 64.0)``; a method that counts its budget as kept tokens at a later layer
    averages more (``64 tokens (avg 98.0)``)."""
    if row.is_baseline or row.mean_visual is None:
        return row.budget
    return f"{row.budget} (avg {row.mean_visual:.1f})"


def _label_cells(row: ReportRow, report: Report) -> list[str]:
    labels = [row.method, budget_text(row)]
    labels += [
        "" if row.variant[c] is None else str(row.variant[c]) for c in report.variant_columns
    ]
    return labels


@dataclass(frozen=True)
class _Style:
    """How a format prints value cells: bold markup, the ``±`` separator, a status word."""

    bold: Callable[[str], str]
    plus_minus: str
    status: Callable[[str], str]


_MARKDOWN = _Style(lambda text: f"**{text}**", " ± ", lambda text: text)


def _render_cell(cell: _Cell, style: _Style, bold: bool) -> str:
    if cell.value is None:
        return style.status(cell.text)
    text = cell.text if cell.half is None else f"{cell.text}{style.plus_minus}{cell.half}"
    return style.bold(text) if bold else text


def _render_rows(report: Report, style: _Style) -> list[tuple[str, list[str]]]:
    """(model, cells) per row: labels then values (with ``±``), bold ones styled."""
    best = _best_cells(report)
    out = []
    for index, row in enumerate(report.rows):
        values = [
            _render_cell(cell, style, (index, column) in best)
            for column, cell in enumerate(_cell_values(row, report))
        ]
        out.append((row.model, _label_cells(row, report) + values))
    return out


def _header(report: Report) -> list[str]:
    extras = [_column_header(name) for name in report.columns]
    return [
        "method", "budget", *report.variant_columns, *report.benchmarks, MEAN_RATIO_HEADER,
        *extras,
    ]  # fmt: skip


def _column_header(name: str) -> str:
    """A cost column's header: its metric's column name (``TFLOPs``), else its name."""
    metric = metric_table.lookup(name)
    return metric.column if metric is not None and metric.column else name


def random_weights_note(report: Report) -> str | None:
    """The line printed under a report with random-weight models (``source: tiny``): their
    scores are meaningless; fidelity to the unpruned model is what they measure."""
    if not report.random_models:
        return None
    return (
        f"note: {', '.join(report.random_models)} has random weights (a tiny config): its "
        "scores say nothing about a method; compare fidelity to the unpruned model "
        "(--columns fidelity_top1,fidelity_kl)"
    )


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
    for model, cells in _render_rows(report, _MARKDOWN):
        lines.append("| " + " | ".join(_markdown_escape(c) for c in [model, *cells]) + " |")
    note = random_weights_note(report)
    if note is not None:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def report_csv(report: Report) -> str:
    """The report as CSV: the markdown table's cells without bold and without ``±``; a value
    column some row has an interval in is followed by ``<column>_ci_low`` and
    ``<column>_ci_high`` (the printed bounds; empty where a row has none)."""
    header = _header(report)
    labels = len(header) - len(report.benchmarks) - 1 - len(report.columns)
    rows = [(row.model, _label_cells(row, report), _cell_values(row, report))
            for row in report.rows]  # fmt: skip
    with_ci = {column for _, _, cells in rows for column, cell in enumerate(cells)
               if cell.half is not None}  # fmt: skip
    head = ["model", *header[:labels]]
    for column, name in enumerate(header[labels:]):
        head += [name] + ([name + suffix for suffix in CI_SUFFIXES] if column in with_ci else [])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(head)
    for model, label_cells, cells in rows:
        line = [model, *label_cells]
        for column, cell in enumerate(cells):
            line.append(cell.text)
            if column in with_ci:
                line += [cell.low or "", cell.high or ""]
        writer.writerow(line)
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


_LATEX = _Style(
    lambda text: f"\\textbf{{{text}}}",
    " $\\pm$ ",
    lambda text: "--" if text == MISSING else latex_escape(text),
)


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
    rendered = _render_rows(report, _LATEX)
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
        # value cells come rendered (markup is ours, status words escaped)
        escaped = [latex_escape(c) for c in cells[:labels]] + cells[labels:]
        lines.append(" & ".join(escaped) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


# -- the per-trial table ------------------------------------------------------------------------
def trials_columns() -> list[tuple[str, str]]:
    """(metric, header) of the per-trial table's metric columns: the entries of
    :data:`prunelab.metrics.METRICS` with a ``column``, in the table's order."""
    return [(metric.name, str(metric.column)) for metric in metric_table.table_columns()]


def results_rows(trials: Iterable[TrialTuple | tuple]) -> list[dict]:
    """Rows (trial, status, metrics[, replicates[, error]]) -> per-trial rows sorted by model,
    benchmark, method, budget (largest first), layer. A row's ``error`` is the trial's error
    (``trials.error``) unless it finished (then it is empty: an error there is an earlier
    attempt's, which the trial's ``attempts.json`` keeps)."""
    columns = trials_columns()
    given = list(trials)
    rows = []
    for entry, (trial, status, metrics, _) in zip(given, read_trials(given), strict=True):
        error = entry[4] if len(entry) > 4 and status != "finished" else None
        row = {
            "model": trial.model,
            "benchmark": trial.benchmark,
            "method": trial.method,
            "budget": budget_label(trial),
            "layer": "" if trial.prune_layer is None else str(trial.prune_layer),
            "status": status,
            "error": error or "",
        }
        for key, _ in columns:
            row[key] = metrics.get(key)
        row["_sort"] = (
            trial.model,
            trial.benchmark,
            not trial.is_baseline,
            trial.method,
            budget_order(trial),
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
    """Per-trial rows (:func:`results_rows`) as CSV with raw metric values (in the unit of
    their :data:`prunelab.metrics.METRICS` entry, as MLflow has them: ``score_ratio`` in %)
    and, after ``status``, the ``error`` of a trial that did not finish."""
    buffer = io.StringIO()
    fields = ["model", "benchmark", "method", "budget", "layer", "status", "error"] + [
        key for key, _ in trials_columns()
    ]
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def report_artifacts(trials: Iterable[TrialTuple]) -> dict[str, str | bytes]:
    """The files of a sweep's parent run: ``table.md``, ``table.csv``, ``table.tex`` (the
    report), ``pareto.png`` (score ratio vs TFLOPs per model) and ``trials.csv`` (every
    trial's cost and quality metrics; the error of each that did not finish: the trials are
    given as (trial, status, metrics, replicates, error))."""
    from prunelab.orchestrator.plots import pareto_png  # matplotlib only when plotting

    given = list(trials)  # (trial, status, metrics[, replicates[, error]])
    report = build_report(read_trials(given), DEFAULT_COLUMNS)
    return {
        "table.md": report_markdown(report),
        "table.csv": report_csv(report),
        "table.tex": report_latex(report),
        "pareto.png": pareto_png(report),
        "trials.csv": trials_csv(results_rows(given)),
    }
