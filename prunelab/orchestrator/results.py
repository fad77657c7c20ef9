"""Trial parameters, baseline-relative metrics, and the paper-style results table.

The report (``prunelab report``, ``table.md`` / ``table.csv`` / ``table.tex`` on a sweep's parent
run) is shaped like the tables of the seed papers: per model, the unpruned model first ("upper
bound"), then one row per method at each budget (largest budget first); one column per
benchmark holding its headline score, and a last column with the mean over benchmarks of the
score ratio (score / unpruned score, in %). At each (model, budget) the best pruned value of a
column is bold (``**x**`` in markdown, ``\\textbf{x}`` in LaTeX, plain in CSV).

The per-trial table with every cost metric (``trials.csv`` on the parent run) is
:func:`results_rows` + :func:`trials_markdown` / :func:`trials_csv`.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "TABLE_COLUMNS",
    "Report",
    "ReportRow",
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
    "trials_csv",
    "trials_markdown",
]

AXES = ("model", "benchmark", "method", "keep_ratio", "keep_tokens", "prune_layer", "seed")
UPPER_BOUND = "upper bound"
MEAN_RATIO_HEADER = "mean score ratio (%)"
MISSING = "-"  # a cell without a value (LaTeX prints "--")

TrialTuple = tuple[dict[str, Any], str, dict[str, Any] | None]  # (config, status, metrics)


def trial_params(config: dict[str, Any]) -> dict[str, Any]:
    """MLflow params of a trial: the axes (None when the method does not use one) and hparams."""
    params = {axis: config.get(axis) for axis in AXES}
    for name, value in sorted((config.get("hparams") or {}).items()):
        params[f"method.{name}"] = value
    return params


def budget_label(config: dict[str, Any]) -> str:
    """Short budget of a trial for run names and listings: ``64``, ``22.2%`` or ``all``."""
    if config.get("keep_tokens") is not None:
        return str(config["keep_tokens"])
    if config.get("keep_ratio") is not None:
        return f"{100 * config['keep_ratio']:.1f}%"
    return "all"


def budget_cell(config: dict[str, Any]) -> str:
    """Budget as the report prints it: ``64 tokens``, ``22.2%``, or ``upper bound`` (unpruned)."""
    if config.get("keep_tokens") is not None:
        return f"{config['keep_tokens']} tokens"
    if config.get("keep_ratio") is not None:
        return f"{100 * config['keep_ratio']:.1f}%"
    return UPPER_BOUND


def relative_metrics(metrics: dict[str, Any], baseline: dict[str, Any] | None) -> dict[str, float]:
    """``score_ratio`` and ``flops_ratio`` against the unpruned trial (absent if undefined)."""
    out: dict[str, float] = {}
    if not baseline:
        return out
    for name, source in (("score_ratio", "score"), ("flops_ratio", "tflops")):
        value, reference = metrics.get(source), baseline.get(source)
        if value is not None and reference:
            out[name] = float(value) / float(reference)
    return out


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


def _budget_order(config: dict[str, Any]) -> tuple:
    """Unpruned first, then absolute budgets, then ratios, each largest first."""
    if config.get("keep_tokens") is not None:
        return (1, -float(config["keep_tokens"]))
    if config.get("keep_ratio") is not None:
        return (2, -float(config["keep_ratio"]))
    return (0 if config["method"] == "none" else 3, 0.0)


def _varying_hparams(trials: Sequence[TrialTuple]) -> dict[str, list[str]]:
    """Per method, the hyperparameters that take more than one value in the sweep."""
    values: dict[str, dict[str, set[str]]] = {}
    for config, _, _ in trials:
        per_method = values.setdefault(config["method"], {})
        for name, value in (config.get("hparams") or {}).items():
            per_method.setdefault(name, set()).add(repr(value))
    return {
        method: sorted(name for name, seen in hps.items() if len(seen) > 1)
        for method, hps in values.items()
    }


def _varies(trials: Sequence[TrialTuple], axis: str) -> bool:
    """Whether some method runs at more than one value of ``axis`` (per model and budget)."""
    seen: dict[tuple, set] = {}
    for config, _, _ in trials:
        if config["method"] == "none":
            continue
        group = (config["model"], config["method"], budget_cell(config))
        seen.setdefault(group, set()).add(config.get(axis))
    return any(len(values) > 1 for values in seen.values())


def _models(trials: Sequence[TrialTuple]) -> list[str]:
    """The sweep's models, in order of first appearance."""
    return list(dict.fromkeys(config["model"] for config, _, _ in trials))


def build_report(trials: Iterable[TrialTuple]) -> Report:
    """The paper-style report of a sweep's trials, each given as (config, status, metrics).

    Score ratios are recomputed here from each trial's score and its (model, benchmark)
    unpruned score, so they are right even for trials logged before their baseline finished.
    A row's mean ratio needs every ratio benchmark finished; otherwise it is None.
    """
    trials = list(trials)
    benchmarks = list(dict.fromkeys(config["benchmark"] for config, _, _ in trials))
    variant_columns = [
        label
        for axis, label in (("prune_layer", "layer"), ("seed", "seed"))
        if _varies(trials, axis)
    ]
    axis_of = {"layer": "prune_layer", "seed": "seed"}
    hparams = _varying_hparams(trials)
    baseline_scores: dict[tuple[str, str], float | None] = {}
    for config, status, metrics in trials:
        if config["method"] == "none" and status == "finished":
            baseline_scores[(config["model"], config["benchmark"])] = _number(
                (metrics or {}).get("score")
            )

    rows: dict[tuple, ReportRow] = {}
    for config, status, metrics in trials:
        metrics = metrics or {}
        method = config["method"]
        varying = hparams.get(method, [])
        if varying:
            shown = ", ".join(f"{name}={config['hparams'][name]}" for name in varying)
            method = f"{method} ({shown})"
        variant = {label: config.get(axis_of[label]) for label in variant_columns}
        budget = budget_cell(config)
        key = (config["model"], method, budget, tuple(variant.items()))
        row = rows.get(key)
        if row is None:
            is_baseline = config["method"] == "none"
            row = rows[key] = ReportRow(
                model=config["model"],
                method=method,
                budget=budget,
                variant=variant,
                is_baseline=is_baseline,
                order=(
                    _budget_order(config),
                    method,
                    tuple(-1 if v is None else v for v in variant.values()),
                ),
            )
        benchmark = config["benchmark"]
        row.status[benchmark] = status
        finished = status == "finished"
        score = _number(metrics.get("score")) if finished else None
        reference = baseline_scores.get((config["model"], benchmark))
        row.scores[benchmark] = score
        row.ratios[benchmark] = score / reference if score is not None and reference else None
        row.tflops[benchmark] = _number(metrics.get("tflops")) if finished else None

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
TABLE_COLUMNS = (
    ("score", "score"),
    ("score_ratio", "score ratio"),
    ("avg_visual_tokens", "avg tokens"),
    ("tflops", "TFLOPs"),
    ("flops_ratio", "FLOPs ratio"),
    ("prefill_ms", "prefill ms"),
    ("fidelity_top1", "top-1 agree"),
)


def results_rows(trials: Iterable[TrialTuple]) -> list[dict]:
    """Rows (config, status, metrics) -> per-trial rows sorted by model, benchmark, method,
    budget (largest first), layer."""
    rows = []
    for config, status, metrics in trials:
        row = {
            "model": config["model"],
            "benchmark": config["benchmark"],
            "method": config["method"],
            "budget": budget_label(config),
            "layer": "" if config.get("prune_layer") is None else str(config["prune_layer"]),
            "status": status,
        }
        for key, _ in TABLE_COLUMNS:
            row[key] = (metrics or {}).get(key)
        row["_sort"] = (
            config["model"],
            config["benchmark"],
            config["method"] != "none",
            config["method"],
            _budget_order(config),
            config.get("prune_layer") or 0,
        )
        rows.append(row)
    rows.sort(key=lambda r: r.pop("_sort"))
    return rows


def _fmt(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if key in ("score_ratio", "flops_ratio", "fidelity_top1"):
        return f"{100 * value:.1f}%"
    if key == "tflops":
        return f"{value:.3g}"
    if key in ("avg_visual_tokens", "prefill_ms", "score"):
        return f"{value:.1f}"
    return str(value)


def trials_markdown(rows: Sequence[dict]) -> str:
    """Per-trial rows (:func:`results_rows`) as a markdown table of cost and quality metrics."""
    head = ["model", "benchmark", "method", "budget", "layer"] + [t for _, t in TABLE_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["model"], row["benchmark"], row["method"], row["budget"], row["layer"]]
        if row["status"] != "finished":
            cells += [row["status"]] + [""] * (len(TABLE_COLUMNS) - 1)
        else:
            cells += [_fmt(key, row[key]) for key, _ in TABLE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def trials_csv(rows: Sequence[dict]) -> str:
    """Per-trial rows (:func:`results_rows`) as CSV with raw metric values."""
    buffer = io.StringIO()
    fields = ["model", "benchmark", "method", "budget", "layer", "status"] + [
        key for key, _ in TABLE_COLUMNS
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

    trials = list(trials)
    report = build_report(trials)
    return {
        "table.md": report_markdown(report),
        "table.csv": report_csv(report),
        "table.tex": report_latex(report),
        "pareto.png": pareto_png(report),
        "trials.csv": trials_csv(results_rows(trials)),
    }
