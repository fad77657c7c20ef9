"""Plots of a sweep's report for its parent run and for papers: the Pareto plot of score ratio vs
compute.

Per model a panel of mean score ratio (%) against TFLOPs per sample. Each series is one method,
or one variant of a method (the pruning layer, the seed, the hyperparameters that vary in the
sweep; see :func:`_line_label`): every method gets one colour, and the variants of a method are
told apart by marker and line style, the same variant (say ``layer 2``) drawing the same way for
every method. Each point carries its budget as a small label (``64`` tokens, ``22.2%``); the
unpruned model is a black star, with a dashed line at 100%. Each pruned point with a 95%
interval of its mean score ratio (``ReportRow.mean_interval``, the paired bootstrap interval of
:mod:`prunelab.intervals`) gets a vertical error bar from the interval's low to its high bound
(asymmetric where the interval is). One legend for the whole figure sits below the panels,
never on the data.

Formats (:data:`FIGURE_FORMATS`): PDF and SVG keep text as text (TrueType fonts embedded in
the PDF, ``pdf.fonttype`` 42; ``<text>`` elements in the SVG), so the labels are searchable
and LaTeX includes the figure as is; PNG is rendered at 300 dpi. :func:`figure_format` reads
the format from a file's extension.

Size: the figure is :data:`SINGLE_COLUMN` (3.5 in) or :data:`DOUBLE_COLUMN` (7.0 in) wide, as
a figure spanning one or both columns of a two-column paper; see :func:`pareto_figure`.

Rendered through an explicit ``Figure`` on matplotlib's Agg canvas (no display needed), so
nothing touches pyplot's global state. The paper styling (font sizes, font types) is read
from matplotlib's global rcParams while a figure is drawn and saved; one lock serialises the
renders of this module so that plots can be made from any thread.
"""

from __future__ import annotations

import io
import math
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePath

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from prunelab.orchestrator.results import FIDELITY, Report, ReportRow

__all__ = [
    "DOUBLE_COLUMN",
    "FIGURE_FORMATS",
    "SINGLE_COLUMN",
    "SeriesStyle",
    "figure_format",
    "pareto_figure",
    "pareto_intervals",
    "pareto_png",
    "pareto_points",
    "series_styles",
]

SINGLE_COLUMN = 3.5  # inches: one column of a two-column paper
DOUBLE_COLUMN = 7.0  # inches: both columns
FIGURE_FORMATS = ("pdf", "svg", "png")
PNG_DPI = 300

_MIN_PANEL_INCHES = 2.3  # narrowest panel: sets how many panels share a row
_PANEL_ASPECT = 0.75  # panel height / width, within the bounds below
_PANEL_HEIGHT_INCHES = (1.8, 2.6)
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<")
_LINESTYLES = ("-", "--", ":", "-.")
_BASELINE_LABEL = "none (unpruned)"
_FONT_POINTS = 8.0  # axis labels and titles; ticks and the legend one point smaller
_BUDGET_POINTS = 5.5  # the budget labels on the points
_STYLE = {
    "font.size": _FONT_POINTS,
    "axes.titlesize": _FONT_POINTS,
    "axes.labelsize": _FONT_POINTS,
    "xtick.labelsize": _FONT_POINTS - 1,
    "ytick.labelsize": _FONT_POINTS - 1,
    "legend.fontsize": _FONT_POINTS - 1,
    "axes.linewidth": 0.6,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "pdf.fonttype": 42,  # TrueType: text stays text (Type 3 would not be searchable)
    "ps.fonttype": 42,
    "svg.fonttype": "none",  # <text> elements, not glyph outlines
    "svg.hashsalt": "prunelab",  # the same report gives the same SVG
}
_RENDER_LOCK = threading.Lock()


def _line_label(row: ReportRow, report: Report) -> str:
    """The method, plus the variant axes (layer, seed) that the sweep varies."""
    extras = [f"{column} {row.variant[column]}" for column in report.variant_columns
              if row.variant.get(column) is not None]  # fmt: skip
    return row.method + (f" ({', '.join(extras)})" if extras else "")


def _method_and_variant(row: ReportRow, report: Report) -> tuple[str, str]:
    """The method's name alone, and what tells this row's variant apart: the hyperparameters
    the report shows after the name (``fastv (q=a)``), then the variant axes."""
    method, _, hparams = row.method.partition(" (")
    parts = [hparams.removesuffix(")")] if hparams else []
    parts += [f"{column} {row.variant[column]}" for column in report.variant_columns
              if row.variant.get(column) is not None]  # fmt: skip
    return method, ", ".join(parts)


def pareto_points(
    report: Report, model: str
) -> tuple[tuple[float, float] | None, dict[str, list[tuple[float, float]]]]:
    """The unpruned point and one line per method of ``model``: (TFLOPs, score ratio in %).

    A row contributes a point when its mean score ratio and TFLOPs are known; each line's
    points are sorted by TFLOPs.
    """
    baseline: tuple[float, float] | None = None
    lines: dict[str, list[tuple[float, float]]] = {}
    for row in report.rows:
        y = _y(row, report)
        if row.model != model or y is None or row.mean_tflops is None:
            continue
        point = (row.mean_tflops, y)
        if row.is_baseline:
            baseline = point
        else:
            lines.setdefault(_line_label(row, report), []).append(point)
    return baseline, {label: sorted(points) for label, points in lines.items()}


def _y(row: ReportRow, report: Report) -> float | None:
    """A row's height in %: its mean score ratio, or for a random-weight model (whose scores
    mean nothing) its mean top-1 agreement with the unpruned model."""
    if row.model in report.random_models:
        agree = 1.0 if row.is_baseline else row.extras.get(FIDELITY)
        return None if agree is None else 100.0 * agree
    return None if row.mean_ratio is None else 100.0 * row.mean_ratio


def pareto_intervals(
    report: Report, model: str
) -> dict[str, list[tuple[float, float, float, float]]]:
    """Per method line of ``model`` (labels as :func:`pareto_points`), its points with an
    interval: (TFLOPs, mean score ratio, low, high), all in % but TFLOPs; sorted by TFLOPs."""
    lines: dict[str, list[tuple[float, float, float, float]]] = {}
    for row in report.rows:
        if row.model != model or row.is_baseline or row.mean_tflops is None:
            continue
        if model in report.random_models:  # fidelity is plotted, without an interval
            continue
        if row.mean_ratio is None or row.mean_interval is None:
            continue
        low, high = row.mean_interval
        point = (row.mean_tflops, 100.0 * row.mean_ratio, 100.0 * low, 100.0 * high)
        lines.setdefault(_line_label(row, report), []).append(point)
    return {label: sorted(points) for label, points in lines.items()}


def _budget_labels(report: Report, model: str) -> dict[str, dict[tuple[float, float], str]]:
    """Per line of ``model`` (labels as :func:`pareto_points`), each point's budget as the
    report prints it, without `` tokens``: ``64``, ``22.2%``."""
    labels: dict[str, dict[tuple[float, float], str]] = {}
    for row in report.rows:
        y = _y(row, report)
        if row.model != model or row.is_baseline or y is None or row.mean_tflops is None:
            continue
        point = (row.mean_tflops, y)
        budget = row.budget.removesuffix(" tokens")
        labels.setdefault(_line_label(row, report), {})[point] = budget
    return labels


@dataclass(frozen=True)
class SeriesStyle:
    """How one line of the plot is drawn: its method's colour, its variant's marker and line
    style."""

    method: str
    variant: str  # "" for a method without variants
    color: str
    marker: str
    linestyle: str


def series_styles(report: Report) -> dict[str, SeriesStyle]:
    """Per line label (as :func:`pareto_points`, over every model of the report), how it is
    drawn, in legend order (methods, then variants, in the report's order of first
    appearance).

    One colour per method (matplotlib's ``tab10``, ``tab20`` past ten methods, repeating past
    twenty); one marker and line style per variant, shared by the methods that have it.
    """
    series: dict[str, tuple[str, str]] = {}
    for row in report.rows:
        if not row.is_baseline:
            series.setdefault(_line_label(row, report), _method_and_variant(row, report))
    methods = list(dict.fromkeys(method for method, _ in series.values()))
    variants = list(dict.fromkeys(variant for _, variant in series.values()))
    palette = matplotlib.colormaps["tab10" if len(methods) <= 10 else "tab20"]
    colors = {m: matplotlib.colors.to_hex(palette(i % palette.N)) for i, m in enumerate(methods)}
    ordered = sorted(series.items(), key=lambda item: (methods.index(item[1][0]),
                                                       variants.index(item[1][1])))  # fmt: skip
    styles = {}
    for label, (method, variant) in ordered:
        index = variants.index(variant)
        styles[label] = SeriesStyle(
            method=method,
            variant=variant,
            color=colors[method],
            marker=_MARKERS[index % len(_MARKERS)],
            linestyle=_LINESTYLES[index % len(_LINESTYLES)],
        )
    return styles


def figure_format(path: str | os.PathLike[str]) -> str:
    """The format of a figure file from its extension (any case): one of
    :data:`FIGURE_FORMATS`. Any other extension (or none) is a ValueError naming it."""
    suffix = PurePath(path).suffix
    if suffix.lower().removeprefix(".") in FIGURE_FORMATS:
        return suffix.lower().removeprefix(".")
    found = f"extension {suffix!r}" if suffix else "no extension"
    raise _format_error(f"{os.fspath(path)}: {found}")


def _format_error(what: str) -> ValueError:
    expected = ", ".join(f".{name}" for name in FIGURE_FORMATS)
    return ValueError(f"{what}: not a figure format (expected {expected})")


def _error_bars(ax, points: list[tuple[float, float, float, float]], color: str) -> None:
    """Vertical bars from each point's interval low to high bound."""
    xs, ys, lows, highs = zip(*points, strict=True)
    below = [max(y - low, 0.0) for y, low in zip(ys, lows, strict=True)]
    above = [max(high - y, 0.0) for y, high in zip(ys, highs, strict=True)]
    ax.errorbar(xs, ys, yerr=[below, above], fmt="none", ecolor=color, elinewidth=0.6,
                capsize=1.5, capthick=0.6)  # fmt: skip


def _panel_grid(panels: int, width: float) -> tuple[int, int, float]:
    """(rows, columns, panel height in inches) for ``panels`` panels in ``width`` inches: as
    many panels per row as are at least :data:`_MIN_PANEL_INCHES` wide, rows balanced."""
    most = max(1, int(width // _MIN_PANEL_INCHES))
    rows = math.ceil(panels / most)
    columns = math.ceil(panels / rows)
    low, high = _PANEL_HEIGHT_INCHES
    return rows, columns, min(high, max(low, _PANEL_ASPECT * width / columns))


def _legend_shape(labels: list[str], width: float) -> tuple[int, float]:
    """(columns, height in inches) of a legend of ``labels`` spanning ``width`` inches."""
    if not labels:
        return 1, 0.0
    char = 0.55 * (_FONT_POINTS - 1) / 72  # a character's mean width, in inches
    entry = 0.45 + char * max(len(label) for label in labels)  # handle, padding and text
    columns = max(1, min(len(labels), int(width // entry)))
    rows = math.ceil(len(labels) / columns)
    return columns, 0.1 + rows * 1.45 * (_FONT_POINTS - 1) / 72


def _draw_panel(ax, report: Report, model: str, styles: Mapping[str, SeriesStyle]) -> None:
    """One model's panel."""
    baseline, lines = pareto_points(report, model)
    bars = pareto_intervals(report, model)
    budgets = _budget_labels(report, model)
    for label in (label for label in styles if label in lines):
        style = styles[label]
        xs, ys = zip(*lines[label], strict=True)
        ax.plot(xs, ys, color=style.color, marker=style.marker, linestyle=style.linestyle,
                markersize=3.5, linewidth=1.0, label=label, zorder=3)  # fmt: skip
        if bars.get(label):
            _error_bars(ax, bars[label], style.color)
        for point in lines[label]:
            ax.annotate(budgets[label][point], point, xytext=(2.5, 2.5), fontsize=_BUDGET_POINTS,
                        textcoords="offset points", color=style.color, zorder=4)  # fmt: skip
    if baseline is not None:
        ax.plot(*baseline, marker="*", markersize=8, color="black", linestyle="none",
                label=_BASELINE_LABEL, zorder=4)  # fmt: skip
        ax.axhline(100.0, color="grey", linewidth=0.6, linestyle="--", zorder=1)
    if not lines and baseline is None:
        ax.text(0.5, 0.5, "no score ratios to plot", ha="center", va="center",
                transform=ax.transAxes)  # fmt: skip
    random = model in report.random_models
    ax.set_title(f"{model} (random weights)" if random else model)
    ax.set_xlabel("TFLOPs per sample")
    ax.set_ylabel("top-1 agreement with unpruned (%)" if random else "mean score ratio (%)")
    ax.grid(True, linewidth=0.3, alpha=0.5)
    ax.margins(x=0.08, y=0.08)


def pareto_figure(
    report: Report, fmt: str = "png", *, width: float | None = None, dpi: int = PNG_DPI
) -> bytes:
    """The Pareto plot of ``report`` as the bytes of a ``fmt`` file (one of
    :data:`FIGURE_FORMATS`; :func:`figure_format` reads it from a file name).

    ``width``: the figure's width in inches, kept exactly (a PNG is ``width * dpi`` pixels
    wide). By default :data:`SINGLE_COLUMN` (3.5 in) for a report of one model and
    :data:`DOUBLE_COLUMN` (7.0 in) for more; pass either to place the figure in one column or
    across both. Panels are at least 2.3 in wide, so a single-column figure stacks its panels
    and a double-column one puts up to three side by side. The height follows from the panels
    and the legend below them. ``dpi``: the PNG's resolution (no less than 300 is print
    quality); PDF and SVG are vector graphics and ignore it.

    An unknown ``fmt`` or a ``width`` that is not a positive number is a ValueError.
    """
    if fmt not in FIGURE_FORMATS:
        raise _format_error(f"format {fmt!r}")
    models = report.models or ["(no trials)"]
    if width is None:
        width = SINGLE_COLUMN if len(models) == 1 else DOUBLE_COLUMN
    if not (isinstance(width, int | float) and math.isfinite(width) and width > 0):
        raise ValueError(f"width {width!r}: not a positive number of inches")
    styles = series_styles(report)
    with _RENDER_LOCK, matplotlib.rc_context(_STYLE):
        rows, columns, panel_height = _panel_grid(len(models), width)
        drawn = {label for model in models for label in pareto_points(report, model)[1]}
        labels = [label for label in styles if label in drawn]
        if any(pareto_points(report, model)[0] is not None for model in models):
            labels.append(_BASELINE_LABEL)
        legend_columns, legend_height = _legend_shape(labels, width)
        figure = Figure(figsize=(width, rows * panel_height + legend_height), dpi=dpi,
                        layout="constrained")  # fmt: skip
        FigureCanvasAgg(figure)
        axes = figure.subplots(rows, columns, squeeze=False)
        for index, model in enumerate(models):
            _draw_panel(axes[index // columns][index % columns], report, model, styles)
        for index in range(len(models), rows * columns):
            axes[index // columns][index % columns].set_visible(False)
        if labels:
            figure.legend(handles=[_legend_handle(label, styles) for label in labels],
                          loc="outside lower center", ncols=legend_columns, frameon=False,
                          handlelength=2.2, columnspacing=1.0)  # fmt: skip
        buffer = io.BytesIO()
        metadata = {"png": None, "pdf": {"CreationDate": None}, "svg": {"Date": None}}[fmt]
        figure.savefig(buffer, format=fmt, dpi=dpi, metadata=metadata)
    return buffer.getvalue()


def _legend_handle(label: str, styles: Mapping[str, SeriesStyle]) -> Line2D:
    """The legend's entry for a line label (or the unpruned star)."""
    if label == _BASELINE_LABEL:
        return Line2D([], [], marker="*", markersize=8, color="black", linestyle="none",
                      label=label)  # fmt: skip
    style = styles[label]
    return Line2D([], [], color=style.color, marker=style.marker, linestyle=style.linestyle,
                  markersize=3.5, linewidth=1.0, label=label)  # fmt: skip


def pareto_png(report: Report, dpi: int = PNG_DPI, *, width: float | None = None) -> bytes:
    """PNG bytes of :func:`pareto_figure` (the sweep's ``pareto.png``)."""
    return pareto_figure(report, "png", width=width, dpi=dpi)
