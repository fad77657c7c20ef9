"""Importance heatmaps: the method's token scores and which visual tokens it kept, merged or
dropped, over the image, as a figure a paper can use.

For the first few samples of a trial (``eval.heatmaps``) the runner runs the sample once more
(same plan, same seeded generator, so the same selection); its ``SampleRun`` holds what the
method chose: the vision stage's :class:`~prunelab.methods.base.VisionSelection` (with the
``scores`` it ranked the tokens by, where it has any) and, from the layer-stage pruner
(:class:`~prunelab.workers.pruning.LayerPruner`) of the generation, where the visual tokens sat
in the LLM sequence, which of them each layer step kept (``kept_at``) and the scores each step
ranked them by (``scores_at``, from ``PruningMethod.score_layer``). :func:`token_fate` turns
that into one state, and one score, per visual token entering the vision stage, and
:func:`render_token_fate` draws it (:func:`heatmap_figure` builds the matplotlib figure):

- the scores as a colour map over the image (viridis, with a colour bar; a log scale when they
  span two decades or more): the vision stage's scores, else those of the first layer step
  (e.g. visionzip's CLS attention, FastV's layer-K attention, SGP's / PGP's guidance scores);
  unscored tokens stay clear;
- the fate of each token as an outline over it: kept (present at the end of the prefill: white),
  merged by the vision stage into a token that stays (magenta), pruned in the LLM by a layer
  stage (red, dashed; the layers are in the legend), dropped before the LLM (no outline; a grey
  veil when there are no scores);
- the method, budget and layer(s) in the title, the question, accepted answer(s) and the
  prediction below (:class:`Caption`).

Tokens are placed by the adapter's ``Prepared.coords`` (tile, row, col). Tile 0 is the whole
image in every family (LLaVA's single grid, LLaVA-NeXT's base crop, Qwen2-VL's merged grid,
InternVL's thumbnail) and is drawn over it; other tiles (LLaVA-NeXT's high-resolution grid,
InternVL's crops) are drawn as bare grids beside it.

Rendering: matplotlib without pyplot (one ``Figure`` per call, no global figure state, nothing
left open), DejaVu Sans (TrueType, shipped with matplotlib; embedded as TrueType in PDF, kept as
text in SVG), a paper column wide (:data:`SINGLE_COLUMN_IN` by default, :data:`DOUBLE_COLUMN_IN`),
PNG at 300 dpi, or PDF / SVG. No MLflow here: the bytes travel in ``TrialResult.artifacts``.
"""

from __future__ import annotations

import dataclasses
import io
import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from prunelab.methods.base import Budget, VisionSelection

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

__all__ = [
    "DOUBLE_COLUMN_IN",
    "DROPPED",
    "FORMATS",
    "KEPT",
    "MERGED",
    "PRUNED_IN_LLM",
    "RC_PARAMS",
    "SINGLE_COLUMN_IN",
    "Caption",
    "TokenFate",
    "heatmap_figure",
    "render_token_fate",
    "tile_pixels",
    "token_fate",
]

KEPT, MERGED, DROPPED, PRUNED_IN_LLM = 0, 1, 2, 3
STATE_NAMES = {KEPT: "kept", MERGED: "merged", DROPPED: "dropped", PRUNED_IN_LLM: "pruned in LLM"}
Format = Literal["png", "pdf", "svg"]
FORMATS: tuple[str, ...] = ("png", "pdf", "svg")
SINGLE_COLUMN_IN = 3.3  # figure widths of a two-column paper, inches
DOUBLE_COLUMN_IN = 6.9
DEFAULT_DPI = 300

# outline colours (each over a thin black halo, visible on the image and on viridis alike)
OUTLINE = {KEPT: "#ffffff", MERGED: "#ff3df5", PRUNED_IN_LLM: "#ff3b30"}
_DROPPED_VEIL = ("#303030", 0.6)  # colour, alpha over dropped tokens when there are no scores
_CMAP = "viridis"
_DASHED = (0, (2.0, 1.2))  # PRUNED_IN_LLM outlines
_SCORE_ALPHA = 0.7  # the score map over the image
_TITLE_PT, _TEXT_PT = 8.0, 6.5
_LINE = 1.3  # line height / font size
_MARGIN_IN, _GAP_IN = 0.05, 0.06
_TILE_MIN_IN = 1.0  # narrowest tile panel when tiles share a row
_LABEL_IN = 0.62  # the "Prediction" column of the caption
_COLORBAR_IN = 0.07 + 2 * _TEXT_PT * _LINE / 72 + 0.04  # bar, tick labels, label, gap
_MAX_LINES = {"Question": 6, "Answer": 2, "Answers": 2, "Prediction": 4}
RC_PARAMS = {
    "font.family": "DejaVu Sans",
    "pdf.fonttype": 42,  # TrueType in PDF (no Type 3 fonts)
    "svg.fonttype": "none",  # text stays text in SVG
    "svg.hashsalt": "prunelab",  # stable element ids
}
_METADATA: dict[str, dict[str, Any]] = {
    "png": {},
    "pdf": {"CreationDate": None},
    "svg": {"Date": None},
}
# zlib level 1 for PNG: about a third of the default level's time, a slightly larger file
_SAVE: dict[str, dict[str, Any]] = {
    "png": {"pil_kwargs": {"compress_level": 1}},
    "pdf": {},
    "svg": {},
}


@dataclass
class TokenFate:
    """What happened to each of the N visual tokens entering the vision stage.

    coords: (N, 3) int (tile, row, col); state: (N,) one of KEPT, MERGED, DROPPED,
    PRUNED_IN_LLM; layer: (N,) the decoder layer at whose input a PRUNED_IN_LLM token left the
    sequence, -1 for the others; score: (N,) float32 the score the method ranked each token by
    (NaN: not scored), None when it ranks by none; score_source: where the scores come from
    (``"vision stage"`` or ``"layer K"``).
    """

    coords: np.ndarray
    state: np.ndarray
    layer: np.ndarray
    score: np.ndarray | None = None
    score_source: str | None = None

    def counts(self) -> dict[str, int]:
        """Tokens per state name (every state present, zero included)."""
        return {name: int((self.state == code).sum()) for code, name in STATE_NAMES.items()}

    def pruned_layers(self) -> list[int]:
        """The decoder layers at which PRUNED_IN_LLM tokens left, in increasing order."""
        return sorted({int(x) for x in self.layer[self.state == PRUNED_IN_LLM]})


@dataclass(frozen=True)
class Caption:
    """What a heatmap says about its trial (title) and its sample (text below the image).

    method: the method's name; budget: the trial's :class:`Budget` (or its text); layers: the
    layer(s) the method acts at (``trial.prune_layer``, or the plan's layer steps); title: a
    second title line (e.g. the sample id); question, answers (accepted), prediction and its
    benchmark ``score``; positions: how the LLM numbered a vision stage's kept tokens
    (``packed`` / ``original``; None: the model family's default, not shown).
    """

    method: str | None = None
    budget: Budget | str | None = None
    layers: int | Sequence[int] | None = None
    title: str = ""
    question: str | None = None
    answers: Sequence[str] = field(default_factory=tuple)
    prediction: str | None = None
    score: float | None = None
    positions: str | None = None

    def headline(self) -> str:
        """``method · budget · layer(s) · positions``, the parts that are given."""
        shown = f"{self.positions} positions" if self.positions else None
        parts = [self.method, _budget_text(self.budget), _layers_text(self.layers), shown]
        return " · ".join(p for p in parts if p)

    def fields(self) -> list[tuple[str, str]]:
        """(label, text) of the sample's lines: question, answer(s), prediction (those given)."""
        lines: list[tuple[str, str]] = []
        if self.question:
            lines.append(("Question", self.question))
        answers = list(dict.fromkeys(a for a in self.answers if a))  # distinct, in order
        if answers:
            lines.append(("Answers" if len(answers) > 1 else "Answer", " | ".join(answers)))
        if self.prediction is not None:
            scored = "" if self.score is None else f"  (score {self.score:.3g})"
            lines.append(("Prediction", (self.prediction or "(empty)") + scored))
        return lines


def _budget_text(budget: Budget | str | None) -> str | None:
    """``keep 25%`` / ``keep 64 tokens`` for a budget; a string as given."""
    if budget is None or isinstance(budget, str):
        return budget
    if budget.keep_ratio is not None:
        percent = budget.keep_ratio * 100
        shown = f"{round(percent)}" if abs(percent - round(percent)) < 1e-9 else f"{percent:.3g}"
        return f"keep {shown}%"
    return f"keep {budget.keep_tokens} tokens"


def _layers_text(layers: int | Sequence[int] | None) -> str | None:
    """``layer 2`` / ``layers 8, 16, 24`` (None for none)."""
    if layers is None:
        return None
    values = [layers] if isinstance(layers, int) else list(layers)
    if not values:
        return None
    word = "layer" if len(values) == 1 else "layers"
    return f"{word} {', '.join(str(v) for v in values)}"


# -- token fates --------------------------------------------------------------------------------
def token_fate(
    coords: torch.Tensor,
    vision: VisionSelection | None,
    visual_positions: torch.Tensor | None = None,
    kept_at: Mapping[int, torch.Tensor] | None = None,
    scores_at: Mapping[int, torch.Tensor] | None = None,
) -> TokenFate:
    """Per-token states (and scores) from a vision-stage selection and the layer stages of the
    prefill.

    coords: (N, 3) of the tokens entering the vision stage. vision: its selection (``kept``
    (M,) anchors into N, ``assignment`` (N,) output each input merged into, -1 dropped,
    ``scores`` (N,) or None), None when the method has no vision stage (M = N).
    visual_positions: (M,) positions of the M tokens in the LLM's prefill sequence; kept_at:
    per layer step (its decoder layer), the positions of the visual tokens it kept
    (``LayerPruner.kept_at``). None / empty: no layer stage ran. scores_at: per layer step,
    (M,) scores aligned with ``visual_positions``, NaN for tokens already gone
    (``LayerPruner.scores_at``).

    The fate's scores are the vision stage's if it has any, else the first scored layer
    step's (on the anchors of the tokens it scored; merged and dropped inputs unscored).
    """
    n = int(coords.shape[0])
    if vision is None:
        anchors = torch.arange(n)
        assignment = None
    else:
        anchors = vision.kept.detach().cpu().long()
        assignment = None if vision.assignment is None else vision.assignment.detach().cpu()
        if assignment is not None and assignment.shape != (n,):
            raise ValueError(f"vision assignment has shape {tuple(assignment.shape)}, need ({n},)")
    m = int(anchors.numel())
    # per output token: the layer at whose input it left the LLM (-1: still there at the end)
    left_at = torch.full((m,), -1, dtype=torch.long)
    if visual_positions is not None:
        positions = visual_positions.detach().cpu()
        if positions.numel() != m:
            raise ValueError(f"the LLM saw {positions.numel()} visual tokens, the vision stage {m}")
        for layer, kept in sorted((kept_at or {}).items()):
            alive = torch.isin(positions, kept.detach().cpu())
            left_at[(~alive) & (left_at < 0)] = layer

    state = torch.full((n,), DROPPED, dtype=torch.long)
    layer = torch.full((n,), -1, dtype=torch.long)
    # merged tokens first, so that an anchor (also "assigned" to its own output) overrides them
    if assignment is not None:
        merged = assignment >= 0
        target = assignment.clamp_min(0).long()
        state[merged] = MERGED
        gone = merged & (left_at[target] >= 0)
        state[gone] = PRUNED_IN_LLM
        layer[gone] = left_at[target][gone]
    state[anchors] = torch.where(left_at >= 0, PRUNED_IN_LLM, KEPT)
    layer[anchors] = left_at
    score, source = _fate_scores(n, anchors, vision, scores_at)
    return TokenFate(
        coords=coords.detach().cpu().long().numpy(),
        state=state.numpy().astype(np.int8),
        layer=layer.numpy(),
        score=score,
        score_source=source,
    )


def _fate_scores(
    n: int,
    anchors: torch.Tensor,
    vision: VisionSelection | None,
    scores_at: Mapping[int, torch.Tensor] | None,
) -> tuple[np.ndarray | None, str | None]:
    """(N,) float32 scores of the inputs and their source (see :func:`token_fate`)."""
    if vision is not None and vision.scores is not None:
        scores = vision.scores.detach().float().cpu().reshape(-1)
        if scores.numel() != n:
            raise ValueError(f"vision scores for {scores.numel()} tokens, the stage had {n}")
        return scores.numpy(), "vision stage"
    if not scores_at:
        return None, None
    first = min(scores_at)
    scores = scores_at[first].detach().float().cpu().reshape(-1)
    if scores.numel() != anchors.numel():
        raise ValueError(
            f"layer {first} scored {scores.numel()} visual tokens, the LLM saw {anchors.numel()}"
        )
    placed = torch.full((n,), float("nan"))
    placed[anchors] = scores
    return placed.numpy(), f"layer {first}"


# -- rendering ----------------------------------------------------------------------------------
def render_token_fate(
    image: np.ndarray | None,
    fate: TokenFate,
    title: str = "",
    *,
    caption: Caption | None = None,
    fmt: Format = "png",
    width_in: float = SINGLE_COLUMN_IN,
    dpi: int = DEFAULT_DPI,
    score_label: str | None = None,
    score_scale: Literal["auto", "linear", "log"] = "auto",
) -> bytes:
    """The heatmap of :func:`heatmap_figure` as PNG (at ``dpi``), PDF or SVG bytes (``fmt``).

    ``title``: a second title line when ``caption`` has none (e.g. the sample id).
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r}: expected one of {', '.join(FORMATS)}")
    import matplotlib

    if caption is None:
        caption = Caption(title=title)
    elif title and not caption.title:
        caption = dataclasses.replace(caption, title=title)
    with matplotlib.rc_context(RC_PARAMS):
        figure = heatmap_figure(
            image,
            fate,
            caption,
            width_in=width_in,
            dpi=dpi,
            score_label=score_label,
            score_scale=score_scale,
        )
        buffer = io.BytesIO()
        figure.savefig(buffer, format=fmt, dpi=dpi, metadata=_METADATA[fmt], **_SAVE[fmt])
    return buffer.getvalue()


def heatmap_figure(
    image: np.ndarray | None,
    fate: TokenFate,
    caption: Caption | None = None,
    *,
    width_in: float = SINGLE_COLUMN_IN,
    dpi: int = DEFAULT_DPI,
    score_label: str | None = None,
    score_scale: Literal["auto", "linear", "log"] = "auto",
) -> Figure:
    """The heatmap as a matplotlib ``Figure`` ``width_in`` inches wide (height to fit), not
    registered with pyplot: save it with ``savefig`` (under :data:`RC_PARAMS` for the fonts).

    image: (H, W, 3) uint8 RGB of the sample (drawn under tile 0), or None for bare grids.
    score_scale: the colour map's scale; ``"auto"``: log when the scores are all positive and
    span two decades or more. score_label: the colour bar's label (default: the scores'
    source).
    """
    from matplotlib.figure import Figure

    if fate.coords.shape[0] == 0:
        raise ValueError("no visual tokens to draw")
    caption = caption or Caption()
    layout = _Layout.plan(fate, caption, width_in)
    figure = Figure(figsize=(width_in, layout.height_in), dpi=dpi)
    norm = _score_norm(fate.score, score_scale) if fate.score is not None else None
    y = _draw_title(figure, layout, _MARGIN_IN)
    for tile, box in zip(layout.tiles, layout.boxes, strict=True):
        axes = figure.add_axes(layout.fraction(box[0], y + box[1], box[2], box[3]))
        _draw_tile(axes, fate, tile, image if tile == 0 else None, norm, len(layout.tiles) > 1)
    y += layout.panels_in + _GAP_IN
    if norm is not None:
        label = score_label or f"token score ({fate.score_source or 'method'})"
        y = _draw_colorbar(figure, layout, norm, label, y)
    y = _draw_legend(figure, layout, fate, norm is not None, y)
    _draw_caption(figure, layout, y)
    return figure


@dataclass
class _Layout:
    """Where everything goes, in inches from the top-left corner of the figure."""

    width_in: float
    height_in: float
    title_lines: list[tuple[str, float, str]]  # (text, font size, weight)
    tiles: list[int]
    boxes: list[tuple[float, float, float, float]]  # per tile: left, top (in the panels), w, h
    panels_in: float
    legend_rows: int
    legend_cols: int
    caption_lines: list[tuple[str, list[str]]]  # (label, wrapped lines)
    has_scores: bool

    @classmethod
    def plan(cls, fate: TokenFate, caption: Caption, width_in: float) -> _Layout:
        inner = width_in - 2 * _MARGIN_IN
        titles = [(caption.headline(), _TITLE_PT, "bold"), (caption.title, _TEXT_PT, "normal")]
        titles = [t for t in titles if t[0]]
        tiles = sorted({int(t) for t in fate.coords[:, 0]})
        boxes, panels = _tile_boxes(fate, tiles, inner)
        legend_cols = 2 if width_in < 5 else 4
        entries = len(_legend_entries(fate, fate.score is not None))
        chars = max(10, int((inner - _LABEL_IN) * 72 / (_TEXT_PT * 0.55)))
        lines = [(label, _wrap(text, chars, _MAX_LINES[label])) for label, text in caption.fields()]
        layout = cls(
            width_in=width_in,
            height_in=0.0,
            title_lines=titles,
            tiles=tiles,
            boxes=boxes,
            panels_in=panels,
            legend_rows=math.ceil(entries / legend_cols),
            legend_cols=legend_cols,
            caption_lines=lines,
            has_scores=fate.score is not None,
        )
        layout.height_in = layout.total_height()
        return layout

    def total_height(self) -> float:
        """The figure's height: title, panels, colour bar, legend and caption, with margins."""
        height = 2 * _MARGIN_IN + sum(_pt_in(size) for _, size, _ in self.title_lines)
        height += self.panels_in + _GAP_IN
        if self.has_scores:
            height += _COLORBAR_IN
        height += self.legend_rows * _pt_in(_TEXT_PT)
        n_lines = sum(len(lines) for _, lines in self.caption_lines)
        if n_lines:
            height += _GAP_IN + n_lines * _pt_in(_TEXT_PT)
        return height

    def fraction(self, left: float, top: float, width: float, height: float) -> list[float]:
        """A box in inches from the top-left as matplotlib's [left, bottom, width, height]."""
        w, h = self.width_in, self.height_in
        return [left / w, 1 - (top + height) / h, width / w, height / h]


def _pt_in(size: float) -> float:
    """The height of a text line of ``size`` points, in inches."""
    return size * _LINE / 72


def _tile_boxes(
    fate: TokenFate, tiles: list[int], inner: float
) -> tuple[list[tuple[float, float, float, float]], float]:
    """Each tile's panel (left, top within the panels, width, height) in inches, laid out in
    rows of equal cells with each grid's aspect kept, and the panels' total height."""
    columns = max(1, min(len(tiles), int((inner + _GAP_IN) // (_TILE_MIN_IN + _GAP_IN))))
    cell = (inner - (columns - 1) * _GAP_IN) / columns
    aspects = [_grid_shape(fate, t)[0] / _grid_shape(fate, t)[1] for t in tiles]
    label = _pt_in(_TEXT_PT) if len(tiles) > 1 else 0.0  # "tile k" above each panel
    boxes: list[tuple[float, float, float, float]] = []
    top = 0.0
    for start in range(0, len(tiles), columns):
        row = aspects[start : start + columns]
        height = cell * min(1.5, max(row))
        for i, aspect in enumerate(row):
            w = min(cell, height / aspect)
            h = w * aspect
            left = _MARGIN_IN + i * (cell + _GAP_IN) + (cell - w) / 2
            boxes.append((left, top + label + (height - h) / 2, w, h))
        top += label + height + _GAP_IN
    return boxes, top - _GAP_IN


def _grid_shape(fate: TokenFate, tile: int) -> tuple[int, int]:
    """(rows, cols) of a tile's token grid."""
    coords = fate.coords[fate.coords[:, 0] == tile]
    return int(coords[:, 1].max()) + 1, int(coords[:, 2].max()) + 1


def _wrap(text: str, width: int, max_lines: int) -> list[str]:
    """``text`` wrapped at ``width`` characters (its own line breaks kept), at most
    ``max_lines`` lines, the last ending in an ellipsis when cut."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        lines.extend(textwrap.wrap(paragraph, width) or [""])
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(0, width - 1)].rstrip() + "…"
    return lines


def _score_norm(scores: np.ndarray, scale: Literal["auto", "linear", "log"]) -> Normalize:
    """The colour map's normalisation over the finite scores (see :func:`heatmap_figure`)."""
    from matplotlib.colors import LogNorm, Normalize

    finite = scores[np.isfinite(scores)]
    if finite.size == 0:
        return Normalize(0.0, 1.0)
    low, high = float(finite.min()), float(finite.max())
    positive = finite[finite > 0]
    if scale == "auto":
        scale = "log" if low > 0 and high / low >= 100 else "linear"
    if scale == "log" and positive.size:
        low = float(positive.min())
        return LogNorm(low, high if high > low else low * 10)
    return Normalize(low, high if high > low else low + max(abs(low), 1.0) * 1e-6)


def _draw_title(figure: Figure, layout: _Layout, y: float) -> float:
    """The title lines from ``y`` inches down; returns the y below them."""
    for text, size, weight in layout.title_lines:
        figure.text(
            _MARGIN_IN / layout.width_in,
            1 - y / layout.height_in,
            text,
            fontsize=size,
            fontweight=weight,
            va="top",
            parse_math=False,
        )
        y += _pt_in(size)
    return y


def _draw_tile(
    axes: Axes,
    fate: TokenFate,
    tile: int,
    image: np.ndarray | None,
    norm: Normalize | None,
    label: bool,
) -> None:
    """One tile: its pixels (:func:`tile_pixels`, composed at the panel's resolution and
    placed 1:1 in the figure) and the fate outlines over them."""
    chosen = fate.coords[:, 0] == tile
    coords, states = fate.coords[chosen], fate.state[chosen]
    rows, cols = _grid_shape(fate, tile)
    axes.set_axis_off()
    axes.set_xlim(0, cols)
    axes.set_ylim(rows, 0)
    figure = axes.get_figure(root=True)
    assert figure is not None
    box = axes.get_position()
    width_px, height_px = figure.get_figwidth() * figure.dpi, figure.get_figheight() * figure.dpi
    size = (max(1, round(box.width * width_px)), max(1, round(box.height * height_px)))
    pixels = tile_pixels(fate, tile, image, norm, size)
    placed = figure.figimage(
        pixels, xo=round(box.x0 * width_px), yo=round(box.y0 * height_px), origin="upper", zorder=-1
    )
    placed.set_interpolation("nearest")  # 1:1 in PNG
    for state in (KEPT, MERGED, PRUNED_IN_LLM):
        _draw_cells(axes, coords[states == state], cols, state)
    if label:
        axes.set_title(f"tile {tile}", fontsize=_TEXT_PT, pad=1.5)


def tile_pixels(
    fate: TokenFate,
    tile: int,
    image: np.ndarray | None,
    norm: Normalize | None,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """(H, W, 4) uint8 RGBA (opaque) of a tile under its outlines, ``size`` (W, H) pixels
    (default: the image's, or one pixel per token without one): ``image`` (RGB) resized or,
    without one, a light grey ground; with ``norm`` each scored
    token's colour-map colour over it (see ``_SCORE_ALPHA``), without it a dark veil over the
    dropped tokens."""
    from PIL import Image

    chosen = fate.coords[:, 0] == tile
    coords = fate.coords[chosen]
    rows, cols = _grid_shape(fate, tile)
    overlay = np.zeros((rows, cols, 4), dtype=np.float32)  # RGBA per token
    if norm is not None and fate.score is not None:
        scores = fate.score[chosen]
        scored = np.isfinite(scores)
        colours = _colormap()(norm(np.where(scored, scores, np.nan)))  # (n, 4)
        colours[:, 3] = np.where(scored, _SCORE_ALPHA if image is not None else 1.0, 0.0)
        overlay[coords[:, 1], coords[:, 2]] = colours
    else:
        dropped = coords[fate.state[chosen] == DROPPED]
        colour, alpha = _DROPPED_VEIL
        overlay[dropped[:, 1], dropped[:, 2]] = (*_rgb(colour), alpha)
    ground = (217, 217, 217, 255)
    if image is None:
        base = Image.new("RGBA", size or (cols, rows), ground)
    else:
        channels = image if image.ndim == 2 else image[..., :3]  # grey or RGB(A)
        picture = Image.fromarray(np.ascontiguousarray(channels).astype(np.uint8))
        base = picture.resize(size or picture.size, Image.Resampling.BILINEAR).convert("RGBA")
    tokens = Image.fromarray((overlay * 255 + 0.5).astype(np.uint8), "RGBA")
    over = tokens.resize(base.size, Image.Resampling.NEAREST)
    return np.asarray(Image.alpha_composite(base, over))


def _rgb(colour: str) -> tuple[float, float, float]:
    """A matplotlib colour as RGB floats in [0, 1]."""
    from matplotlib.colors import to_rgb

    return to_rgb(colour)


def _colormap() -> Any:
    """Viridis with unscored (NaN) tokens transparent."""
    import matplotlib

    return matplotlib.colormaps[_CMAP].with_extremes(bad=(0, 0, 0, 0))


def _draw_cells(axes: Axes, coords: np.ndarray, cols: int, state: int) -> None:
    """Outlines of the token cells at ``coords`` (n, 3) in ``state``'s colour (dashed for
    PRUNED_IN_LLM), over a black halo, inset so that neighbours do not overlap."""
    if coords.shape[0] == 0:
        return
    from matplotlib import patheffects
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    figure = axes.get_figure()
    assert figure is not None
    cell_pt = axes.get_position().width * figure.get_figwidth() * 72 / cols
    width = min(1.2, max(0.3, 0.08 * cell_pt))  # outline width, points
    inset = min(0.25, (width / 2 + 0.4) / cell_pt)
    side = 1 - 2 * inset
    cells = [Rectangle((c + inset, r + inset), side, side) for _, r, c in coords]
    patches = PatchCollection(
        cells,
        facecolor="none",
        edgecolor=OUTLINE[state],
        linewidth=width,
        linestyle=_DASHED if state == PRUNED_IN_LLM else "solid",
        path_effects=[patheffects.withStroke(linewidth=width + 0.8, foreground="black")],
    )
    axes.add_collection(patches)


def _draw_colorbar(figure: Figure, layout: _Layout, norm: Normalize, label: str, y: float) -> float:
    """A horizontal colour bar from ``y`` inches down; returns the y below it."""
    from matplotlib.cm import ScalarMappable

    inner = layout.width_in - 2 * _MARGIN_IN
    axes = figure.add_axes(layout.fraction(_MARGIN_IN + 0.15 * inner, y, 0.7 * inner, 0.07))
    bar = figure.colorbar(
        ScalarMappable(norm=norm, cmap=_colormap()), cax=axes, orientation="horizontal"
    )
    bar.outline.set_linewidth(0.4)
    bar.minorticks_off()  # major ticks only, plain labels: no mathtext (a third of the time)
    bar.locator, bar.formatter = _ticks(norm)
    axes.tick_params(labelsize=_TEXT_PT - 0.5, width=0.4, length=2, pad=1)
    bar.set_label(label, fontsize=_TEXT_PT, labelpad=1.5)
    return y + _COLORBAR_IN


def _ticks(norm: Normalize) -> tuple[Any, Any]:
    """Locator and formatter of the colour bar: decades as ``1e-4`` on a log scale, at most
    six ``%.3g`` values on a linear one."""
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator

    if isinstance(norm, LogNorm):
        exponent = FuncFormatter(lambda v, _: f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e"))
        return LogLocator(numticks=7), exponent
    return MaxNLocator(6), FuncFormatter(lambda v, _: f"{v:.3g}")


def _legend_entries(fate: TokenFate, has_scores: bool) -> list[tuple[int, str]]:
    """(state, label with count) of the states present (kept always)."""
    counts = fate.counts()
    layers = fate.pruned_layers()
    entries = []
    for code, name in STATE_NAMES.items():
        count = counts[name]
        if count == 0 and code != KEPT:
            continue
        label = f"{name} {count}"
        if code == PRUNED_IN_LLM and layers:
            label += f" ({_layers_text(layers)})"
        if code == DROPPED and has_scores:
            label += " (no outline)"
        entries.append((code, label))
    return entries


def _draw_legend(figure: Figure, layout: _Layout, fate: TokenFate, scores: bool, y: float) -> float:
    """A swatch and a label per state present, ``legend_cols`` to a row; returns the y below."""
    from matplotlib import patheffects
    from matplotlib.patches import Rectangle

    inner = layout.width_in - 2 * _MARGIN_IN
    column = inner / layout.legend_cols
    swatch = 0.07
    line = _pt_in(_TEXT_PT)
    for i, (code, label) in enumerate(_legend_entries(fate, scores)):
        row, col = divmod(i, layout.legend_cols)
        left, top = _MARGIN_IN + col * column, y + row * line
        box = layout.fraction(left, top + (line - swatch) / 2, swatch, swatch)
        if code == DROPPED:
            face, alpha = _DROPPED_VEIL if not scores else ("#ffffff", 1.0)
            patch = Rectangle(box[:2], box[2], box[3], facecolor=face, alpha=alpha, lw=0.4)
            patch.set_edgecolor("#808080")
        else:
            patch = Rectangle(
                box[:2],
                box[2],
                box[3],
                facecolor="#d9d9d9",
                edgecolor=OUTLINE[code],
                linewidth=1.0,
                linestyle=_DASHED if code == PRUNED_IN_LLM else "solid",
                path_effects=[patheffects.withStroke(linewidth=1.8, foreground="black")],
            )
        patch.set_transform(figure.transFigure)
        figure.add_artist(patch)
        figure.text(
            (left + swatch + 0.04) / layout.width_in,
            1 - (top + line / 2) / layout.height_in,
            label,
            fontsize=_TEXT_PT,
            va="center",
            parse_math=False,
        )
    return y + layout.legend_rows * line


def _draw_caption(figure: Figure, layout: _Layout, y: float) -> None:
    """The question, answer(s) and prediction, a bold label column and wrapped text."""
    if not layout.caption_lines:
        return
    y += _GAP_IN
    line = _pt_in(_TEXT_PT)
    for label, lines in layout.caption_lines:
        top = 1 - y / layout.height_in
        common = {"fontsize": _TEXT_PT, "va": "top", "parse_math": False}
        figure.text(_MARGIN_IN / layout.width_in, top, label, fontweight="bold", **common)
        for i, text in enumerate(lines):
            x = (_MARGIN_IN + _LABEL_IN) / layout.width_in
            figure.text(x, 1 - (y + i * line) / layout.height_in, text, **common)
        y += len(lines) * line
