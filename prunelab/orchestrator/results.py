"""Trial parameters, baseline-relative metrics and the results table, from trial configs/rows."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "TABLE_COLUMNS",
    "budget_label",
    "relative_metrics",
    "results_rows",
    "table_csv",
    "table_latex",
    "table_markdown",
    "trial_params",
]

AXES = ("model", "benchmark", "method", "keep_ratio", "keep_tokens", "prune_layer", "seed")


def trial_params(config: dict[str, Any]) -> dict[str, Any]:
    """MLflow params of a trial: the axes (None when the method does not use one) and hparams."""
    params = {axis: config.get(axis) for axis in AXES}
    for name, value in sorted((config.get("hparams") or {}).items()):
        params[f"method.{name}"] = value
    return params


def budget_label(config: dict[str, Any]) -> str:
    if config.get("keep_tokens") is not None:
        return str(config["keep_tokens"])
    if config.get("keep_ratio") is not None:
        return f"{100 * config['keep_ratio']:.1f}%"
    return "all"


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


TABLE_COLUMNS = (
    ("score", "score"),
    ("score_ratio", "score ratio"),
    ("avg_visual_tokens", "avg tokens"),
    ("tflops", "TFLOPs"),
    ("flops_ratio", "FLOPs ratio"),
    ("prefill_ms", "prefill ms"),
    ("fidelity_top1", "top-1 agree"),
)


def results_rows(trials: Iterable[tuple[dict[str, Any], str, dict[str, Any] | None]]) -> list[dict]:
    """Rows (config, status, metrics) -> table rows sorted by model, benchmark, method, budget."""
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
            -(config.get("keep_tokens") or 0) - 1000 * (config.get("keep_ratio") or 0),
            config.get("prune_layer") or 0,
        )
        rows.append(row)
    rows.sort(key=lambda r: r.pop("_sort"))
    return rows


def _fmt(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key in ("score_ratio", "flops_ratio", "fidelity_top1"):
        return f"{100 * value:.1f}%"
    if key == "tflops":
        return f"{value:.3g}"
    if key in ("avg_visual_tokens", "prefill_ms", "score"):
        return f"{value:.1f}"
    return str(value)


def table_markdown(rows: Sequence[dict]) -> str:
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


def table_csv(rows: Sequence[dict]) -> str:
    buffer = io.StringIO()
    fields = ["model", "benchmark", "method", "budget", "layer", "status"] + [
        key for key, _ in TABLE_COLUMNS
    ]
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def table_latex(rows: Sequence[dict]) -> str:
    head = ["Model", "Benchmark", "Method", "Budget", "Layer"] + [t for _, t in TABLE_COLUMNS]
    lines = [
        "\\begin{tabular}{" + "l" * 5 + "r" * len(TABLE_COLUMNS) + "}",
        "\\toprule",
        " & ".join(head) + " \\\\",
        "\\midrule",
    ]
    for row in rows:
        cells = [row["model"], row["benchmark"], row["method"], row["budget"], row["layer"]]
        cells += [_fmt(key, row[key]) if row["status"] == "finished" else "-"
                  for key, _ in TABLE_COLUMNS]  # fmt: skip
        lines.append(" & ".join(c.replace("%", "\\%").replace("_", "\\_") for c in cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"
