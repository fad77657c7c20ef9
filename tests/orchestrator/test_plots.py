"""The Pareto plot as a paper figure: format from the file's extension (PDF and SVG with text
as text, PNG at 300 dpi), single- or double-column width, one colour per method and one
marker / line style per variant, budget labels on the points, error bars, and the legend
outside the axes.

Figures are rendered for real from reports built the way the callers build them
(:func:`prunelab.orchestrator.results.build_report` over the trials as the database holds them)
and read back: the PDF's text operators, the SVG's XML, the PNG's size and resolution.
"""

from __future__ import annotations

import io
import re
import xml.etree.ElementTree as ET
import zlib
from typing import Any

import numpy as np
import pytest
from PIL import Image

from prunelab.db import init_db, repo, session_factory
from prunelab.orchestrator.cli import main
from prunelab.orchestrator.plots import (
    DOUBLE_COLUMN,
    SINGLE_COLUMN,
    figure_format,
    pareto_figure,
    pareto_png,
    series_styles,
)
from prunelab.orchestrator.results import build_report

SVG = "{http://www.w3.org/2000/svg}"
METHODS = ("fastv", "sparsevlm", "random")
LAYERS = (2, 3, 8)  # three methods at three layers: nine series
TOKENS = (64, 192)
Z = np.linspace(-1.0, 1.0, 101)  # replicates a + b * Z: exact, evenly spread percentiles


def entry(model: str, method: str, score: float, tflops: float, **axes: Any) -> tuple:
    """(config, status, metrics, replicates) as the database holds them."""
    config = {"model": model, "benchmark": "gqa", "method": method, "hparams": {},
              "eval": {"limit": 64}, **axes}  # fmt: skip
    spread = 0.0 if method == "none" else 2.0
    metrics = {"score": score, "tflops": tflops, "score_ci_low": score - 0.95 * spread,
               "score_ci_high": score + 0.95 * spread}  # fmt: skip
    return config, "finished", metrics, list(score + spread * Z)


def sweep(models: tuple[str, ...] = ("llava-1.5-7b",)) -> list[tuple]:
    """Per model the unpruned model, then each method at each layer and budget, and
    ``random`` also at a ratio budget (22.2%)."""
    trials = []
    for model in models:
        trials.append(entry(model, "none", 80.0, 4.0))
        for m, method in enumerate(METHODS):
            for k, layer in enumerate(LAYERS):
                for tokens in TOKENS:
                    score = 76.0 - 3.0 * m - k - 20.0 * 64 / tokens
                    tflops = 4.0 * tokens / 576 + 0.1 * k
                    trials.append(entry(model, method, score, tflops, keep_tokens=tokens,
                                        prune_layer=layer))  # fmt: skip
        trials.append(entry(model, "random", 60.0, 1.2, keep_ratio=0.222, prune_layer=2))
    return trials


@pytest.fixture(scope="module")
def report():
    return build_report(sweep())


@pytest.fixture(scope="module")
def svg_root(report) -> ET.Element:
    return ET.fromstring(pareto_figure(report, "svg"))


# -- the PDF ------------------------------------------------------------------------------------
def _unescape_pdf_string(literal: bytes) -> bytes:
    """The bytes of a PDF literal string's body (escapes resolved)."""
    escapes = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"b": b"\b", b"f": b"\f"}

    def resolve(match: re.Match[bytes]) -> bytes:
        code = match.group(1)
        if code[:1].isdigit():
            return bytes([int(code, 8) & 0xFF])
        return escapes.get(code, code)

    return re.sub(rb"\\([0-7]{1,3}|.)", resolve, literal, flags=re.S)


def pdf_texts(pdf: bytes) -> list[str]:
    """The strings the PDF's content streams show (``TJ`` / ``Tj``), decoded as the two-byte
    codes of a TrueType (Type 42) font: a Type 3 font's one-byte codes decode to nonsense."""
    texts = []
    for stream in re.findall(rb"stream\r?\n(.*?)\r?\nendstream", pdf, flags=re.S):
        try:
            content = zlib.decompress(stream)
        except zlib.error:
            continue
        for shown in re.findall(rb"\[(.*?)\]\s*TJ|(\((?:\\.|[^\\)])*\))\s*Tj", content, re.S):
            pieces = re.findall(rb"\(((?:\\.|[^\\)])*)\)", shown[0] or shown[1], flags=re.S)
            raw = b"".join(_unescape_pdf_string(piece) for piece in pieces)
            texts.append(raw.decode("utf-16-be", errors="replace"))
    return texts


def test_pdf_is_a_pdf_with_its_text_as_text(report):
    pdf = pareto_figure(report, "pdf")
    assert pdf.startswith(b"%PDF-")
    assert b"/FontFile2" in pdf and b"/Type3" not in pdf  # TrueType embedded, no Type 3
    texts = pdf_texts(pdf)
    legend = [f"{method} (layer {layer})" for method in sorted(METHODS) for layer in LAYERS]
    assert texts[-len(legend) - 1 :] == [*legend, "none (unpruned)"]
    assert {"llava-1.5-7b", "TFLOPs per sample", "mean score ratio (%)"} <= set(texts)
    assert {"64", "192", "22.2%"} <= set(texts)  # the budget labels


# -- the SVG ------------------------------------------------------------------------------------
def svg_texts(element: ET.Element) -> list[str]:
    return ["".join(text.itertext()) for text in element.iter(f"{SVG}text")]


def group(root: ET.Element, gid: str) -> ET.Element:
    found = root.find(f".//{SVG}g[@id='{gid}']")
    assert found is not None, gid
    return found


def extent(element: ET.Element) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of every path point, marker and text anchor in ``element``
    (SVG coordinates: y grows downwards)."""
    xs: list[float] = []
    ys: list[float] = []
    for path in element.iter(f"{SVG}path"):
        numbers = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", path.get("d", ""))]
        xs += numbers[0::2]
        ys += numbers[1::2]
    for item in (*element.iter(f"{SVG}use"), *element.iter(f"{SVG}text")):
        if item.get("x") is not None:
            xs.append(float(item.get("x")))
            ys.append(float(item.get("y")))
    assert xs and ys
    return min(xs), min(ys), max(xs), max(ys)


def axes_box(root: ET.Element, index: int) -> tuple[float, float, float, float]:
    """The data area of the ``index``-th axes: its background patch, the axes' first child."""
    axes = group(root, f"axes_{index}")
    return extent(axes.find(f"{SVG}g"))


def overlaps(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_svg_has_the_names_and_budgets_as_text(svg_root):
    legend = svg_texts(group(svg_root, "legend_1"))
    # methods in the report's order (alphabetical at the largest budget), then the variants
    assert legend == [f"{method} (layer {layer})" for method in sorted(METHODS)
                      for layer in LAYERS] + ["none (unpruned)"]  # fmt: skip
    labels = svg_texts(group(svg_root, "axes_1"))
    assert labels.count("64") == 9 and labels.count("192") == 9 and labels.count("22.2%") == 1


def test_svg_legend_is_outside_every_axes(svg_root):
    legend = extent(group(svg_root, "legend_1"))
    height = float(svg_root.get("height").removesuffix("pt"))
    assert legend[3] <= height  # inside the figure
    assert not overlaps(legend, axes_box(svg_root, 1))
    two = ET.fromstring(pareto_figure(build_report(sweep(("a", "b"))), "svg"))
    legend = extent(group(two, "legend_1"))
    assert all(not overlaps(legend, axes_box(two, i)) for i in (1, 2))


def test_svg_draws_the_intervals_as_error_bars(svg_root, report):
    axes = group(svg_root, "axes_1")
    bars = [g for g in axes.iter(f"{SVG}g") if g.get("id", "").startswith("LineCollection_")]
    colours = [re.findall(r"stroke: (#[0-9a-f]{6})", ET.tostring(b, encoding="unicode"))
               for b in bars]  # fmt: skip
    # one set of bars per series (the unpruned model has no interval), in its method's colour
    expected = sorted(style.color for style in series_styles(report).values())
    assert sorted(c[0] for c in colours if c) == expected and all(len(set(c)) == 1 for c in colours)


# -- colours, markers, line styles --------------------------------------------------------------
def test_one_colour_per_method_one_marker_and_line_style_per_variant(report):
    styles = series_styles(report)
    assert list(styles) == [f"{method} (layer {layer})" for method in sorted(METHODS)
                            for layer in LAYERS]  # fmt: skip
    colours = {method: {s.color for s in styles.values() if s.method == method}
               for method in METHODS}  # fmt: skip
    assert all(len(c) == 1 for c in colours.values())
    assert len(set.union(*colours.values())) == len(METHODS)
    for method in METHODS:
        drawn = [(styles[f"{method} (layer {layer})"].marker,
                  styles[f"{method} (layer {layer})"].linestyle) for layer in LAYERS]  # fmt: skip
        assert len(set(drawn)) == len(LAYERS)  # the variants of a method differ
    # the same variant is drawn the same way for every method
    for layer in LAYERS:
        assert len({(styles[f"{m} (layer {layer})"].marker,
                     styles[f"{m} (layer {layer})"].linestyle) for m in METHODS}) == 1  # fmt: skip


def test_hyperparameter_variants_share_their_method_colour():
    trials = [entry("m", "none", 80.0, 4.0)]
    for q in ("a", "b"):
        trials.append(entry("m", "fastv", 60.0, 1.0, keep_tokens=64, hparams={"q": q}))
    trials.append(entry("m", "random", 50.0, 1.0, keep_tokens=64))
    styles = series_styles(build_report(trials))
    assert list(styles) == ["fastv (q=a)", "fastv (q=b)", "random"]
    assert styles["fastv (q=a)"].color == styles["fastv (q=b)"].color != styles["random"].color
    assert styles["fastv (q=a)"].marker != styles["fastv (q=b)"].marker


# -- the PNG and the sizes ----------------------------------------------------------------------
def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


def test_png_is_print_resolution_and_column_wide(report):
    single = png(pareto_figure(report, "png"))
    assert min(single.info["dpi"]) >= 299.5  # pHYs stores dots per metre: 299.9994
    assert single.width == round(SINGLE_COLUMN * 300) == 1050  # one model: one column
    two = build_report(sweep(("a", "b")))
    double = png(pareto_png(two))
    assert double.width == round(DOUBLE_COLUMN * 300) == 2100  # two models: both columns
    assert double.width > double.height  # side by side
    stacked = png(pareto_figure(two, "png", width=SINGLE_COLUMN))
    assert stacked.width == 1050 and stacked.height > stacked.width  # one above the other
    assert png(pareto_figure(report, "png", width=DOUBLE_COLUMN)).width == 2100
    assert png(pareto_figure(report, "png", dpi=600)).width == 2100


def test_vector_figures_have_the_column_width(report):
    svg = ET.fromstring(pareto_figure(report, "svg", width=DOUBLE_COLUMN))
    assert svg.get("width") == f"{DOUBLE_COLUMN * 72:g}pt"
    pdf = pareto_figure(report, "pdf")
    box = re.search(rb"/MediaBox \[\s*0 0 ([\d.]+) ([\d.]+)\s*\]", pdf)
    assert box is not None and float(box.group(1)) == SINGLE_COLUMN * 72


def test_an_empty_report_still_plots():
    image = png(pareto_png(build_report([])))
    assert image.width == 1050


# -- formats ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "fmt"), [("fig.pdf", "pdf"), ("out/fig.SVG", "svg"), ("a.b/fig.png", "png")]
)
def test_the_format_follows_the_extension(path, fmt):
    assert figure_format(path) == fmt


@pytest.mark.parametrize(("path", "named"), [("x.md", "'.md'"), ("fig", "no extension"),
                                             ("fig.jpg", "'.jpg'")])  # fmt: skip
def test_an_unknown_extension_is_a_value_error_naming_it(path, named):
    with pytest.raises(ValueError) as error:
        figure_format(path)
    (line,) = str(error.value).splitlines()
    assert line.startswith(f"{path}: ") and named in line and ".pdf" in line


def test_bad_formats_and_widths_are_value_errors(report):
    with pytest.raises(ValueError, match="'jpg'"):
        pareto_figure(report, "jpg")
    for width in (0, -3.5, float("nan"), "3.5"):
        with pytest.raises(ValueError, match="width"):
            pareto_figure(report, "png", width=width)


# -- the command --------------------------------------------------------------------------------
def _db(tmp_path) -> str:
    """A database with a sweep ``figs`` whose trials are those of :func:`sweep`, finished."""
    url = f"sqlite:///{tmp_path}/prunelab.db"
    with session_factory(init_db(url)).begin() as session:
        swept = repo.create_sweep(session, "figs", {}, "", "host:1:x")
        trials = sweep()
        rows, _ = repo.add_trials(session, swept.id, [
            (f"{i:064x}", config, config["method"] == "none")
            for i, (config, *_) in enumerate(trials)
        ])  # fmt: skip
        for row, (_, _, metrics, replicates) in zip(rows, trials, strict=True):
            assert repo.claim_trial(session, row.id, "host:1:x", "w0", None)
            repo.finish_trial(session, row.id, metrics, "w0", None, replicates)
    return url


def test_report_writes_the_format_its_file_names(tmp_path, capsys):
    url = _db(tmp_path)
    for name in ("fig.pdf", "fig.svg", "fig.png"):
        target = tmp_path / name
        assert main(["report", "figs", "--db-url", url, "--pareto", str(target)]) == 0
    assert (tmp_path / "fig.pdf").read_bytes().startswith(b"%PDF-")
    assert "fastv (layer 2)" in svg_texts(ET.parse(tmp_path / "fig.svg").getroot())
    assert Image.open(tmp_path / "fig.png").width == 1050
    capsys.readouterr()
    target = tmp_path / "fig.md"
    assert main(["report", "figs", "--db-url", url, "--pareto", str(target)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"prunelab: error: --pareto {target}: extension '.md': not a figure format "
        "(expected .pdf, .svg, .png)"
    ]
    assert not target.exists()
    target = tmp_path / "no" / "such" / "dir" / "fig.pdf"  # a good format, nowhere to write it
    assert main(["report", "figs", "--db-url", url, "--pareto", str(target)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"prunelab: error: --pareto {target}: cannot write: No such file or directory"
    ]


def test_a_random_weight_model_plots_fidelity_not_scores() -> None:
    """A tiny (random-weight) model's scores mean nothing: its panel shows the top-1 agreement
    with the unpruned model, titled so, and the table says it under the rows."""
    from prunelab.orchestrator.plots import pareto_points
    from prunelab.orchestrator.tables import report_markdown

    def entry(method: str, ratio: float | None, score: float, agree: float | None):
        config = {"model": "tiny", "benchmark": "b", "method": method, "hparams": {},
                  "keep_ratio": ratio, "model_config": {"source": "tiny"}}  # fmt: skip
        metrics = {"score": score, "tflops": 1.0 if ratio is None else ratio}
        if agree is not None:
            metrics["fidelity_top1"] = agree
        return config, "finished", metrics

    report = build_report([entry("none", None, 0.0, None), entry("fastv", 0.5, 0.0, 0.75)])
    assert report.random_models == ["tiny"]
    baseline, lines = pareto_points(report, "tiny")
    assert baseline == (1.0, 100.0) and lines == {"fastv": [(0.5, 75.0)]}
    svg = pareto_figure(report, "svg").decode()
    assert "tiny (random weights)" in svg and "top-1 agreement with unpruned (%)" in svg
    assert (
        report_markdown(report)
        .splitlines()[-1]
        .startswith("note: tiny has random weights (a tiny config): its scores say nothing")
    )
