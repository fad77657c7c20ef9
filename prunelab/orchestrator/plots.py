"""Plots of a sweep's report for its parent run: the Pareto plot of score ratio vs compute.

Each pruned point with a 95% interval of its mean score ratio (``ReportRow.mean_interval``, the
paired bootstrap interval of :mod:`prunelab.intervals`) gets a vertical error bar from the
interval's low to its high bound (asymmetric where the interval is).

Rendered with matplotlib's Agg backend (no display needed) through an explicit ``Figure``, so
nothing touches pyplot's global state and plots can be made from any thread.
"""

from __future__ import annotations

import io
import math

from matplotlib.figure import Figure

from prunelab.orchestrator.results import Report, ReportRow

__all__ = ["pareto_intervals", "pareto_png", "pareto_points"]

_PANEL_INCHES = (5.0, 3.8)


def _line_label(row: ReportRow, report: Report) -> str:
    """The method, plus the variant axes (layer, seed) that the sweep varies."""
    extras = [f"{column} {row.variant[column]}" for column in report.variant_columns
              if row.variant.get(column) is not None]  # fmt: skip
    return row.method + (f" ({', '.join(extras)})" if extras else "")


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
        if row.model != model or row.mean_ratio is None or row.mean_tflops is None:
            continue
        point = (row.mean_tflops, 100.0 * row.mean_ratio)
        if row.is_baseline:
            baseline = point
        else:
            lines.setdefault(_line_label(row, report), []).append(point)
    return baseline, {label: sorted(points) for label, points in lines.items()}


def pareto_intervals(
    report: Report, model: str
) -> dict[str, list[tuple[float, float, float, float]]]:
    """Per method line of ``model`` (labels as :func:`pareto_points`), its points with an
    interval: (TFLOPs, mean score ratio, low, high), all in % but TFLOPs; sorted by TFLOPs."""
    lines: dict[str, list[tuple[float, float, float, float]]] = {}
    for row in report.rows:
        if row.model != model or row.is_baseline or row.mean_tflops is None:
            continue
        if row.mean_ratio is None or row.mean_interval is None:
            continue
        low, high = row.mean_interval
        point = (row.mean_tflops, 100.0 * row.mean_ratio, 100.0 * low, 100.0 * high)
        lines.setdefault(_line_label(row, report), []).append(point)
    return {label: sorted(points) for label, points in lines.items()}


def _error_bars(ax, points: list[tuple[float, float, float, float]], color: str) -> None:
    """Vertical bars from each point's interval low to high bound."""
    xs, ys, lows, highs = zip(*points, strict=True)
    below = [max(y - low, 0.0) for y, low in zip(ys, lows, strict=True)]
    above = [max(high - y, 0.0) for y, high in zip(ys, highs, strict=True)]
    ax.errorbar(xs, ys, yerr=[below, above], fmt="none", ecolor=color, elinewidth=0.9,
                capsize=3)  # fmt: skip


def pareto_png(report: Report, dpi: int = 110) -> bytes:
    """PNG bytes: per model a panel of mean score ratio (%) against TFLOPs per sample, one
    line per method (with the 95% intervals as vertical error bars) and a star for the
    unpruned model."""
    models = report.models or ["(no trials)"]
    columns = min(3, len(models))
    rows = math.ceil(len(models) / columns)
    figure = Figure(figsize=(_PANEL_INCHES[0] * columns, _PANEL_INCHES[1] * rows), dpi=dpi)
    axes = figure.subplots(rows, columns, squeeze=False)
    for index, model in enumerate(models):
        ax = axes[index // columns][index % columns]
        baseline, lines = pareto_points(report, model)
        bars = pareto_intervals(report, model)
        for label, points in sorted(lines.items()):
            xs, ys = zip(*points, strict=True)
            (line,) = ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.4, label=label)
            if bars.get(label):
                _error_bars(ax, bars[label], line.get_color())
        if baseline is not None:
            ax.plot(*baseline, marker="*", markersize=12, color="black", linestyle="none",
                    label="none (unpruned)")  # fmt: skip
            ax.axhline(100.0, color="grey", linewidth=0.8, linestyle="--")
        if not lines and baseline is None:
            ax.text(0.5, 0.5, "no score ratios to plot", ha="center", va="center",
                    transform=ax.transAxes)  # fmt: skip
        ax.set_title(model)
        ax.set_xlabel("TFLOPs per sample")
        ax.set_ylabel("mean score ratio (%)")
        ax.grid(True, linewidth=0.4, alpha=0.5)
        if lines or baseline is not None:
            ax.legend(fontsize="small")
    for index in range(len(models), rows * columns):
        axes[index // columns][index % columns].set_visible(False)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
