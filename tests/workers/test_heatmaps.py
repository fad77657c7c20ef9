"""Importance heatmaps: token fates from hand-built selections, and from real trials."""

from __future__ import annotations

import dataclasses
import io

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import TINY_MODELS, guide_for, load_tiny, tiny_trial

import prunelab.methods as M
from prunelab.methods.base import PlanContext, VisionSelection
from prunelab.methods.sparsevlm import recycle_split
from prunelab.workers.adapters.base import grid_coords
from prunelab.workers.benchmarks import build_benchmark
from prunelab.workers.heatmaps import (
    DOUBLE_COLUMN_IN,
    DROPPED,
    KEPT,
    MERGED,
    OUTLINE,
    PRUNED_IN_LLM,
    SINGLE_COLUMN_IN,
    Caption,
    TokenFate,
    _wrap,
    heatmap_figure,
    render_token_fate,
    tile_pixels,
    token_fate,
)
from prunelab.workers.runner import _sample_generator, build_method, run_sample, run_trial
from prunelab.workers.timing import Timer


def _llm(visual_positions, kept_at):
    """What token_fate reads of the layer stages: the visual tokens' positions in the LLM
    sequence and, per layer step, the positions it kept (``LayerPruner.kept_at``)."""
    return torch.tensor(visual_positions), {k: torch.tensor(v) for k, v in kept_at.items()}


def test_fate_of_vision_and_layer_stages():
    # 6 inputs -> 3 outputs anchored on inputs 0, 2, 5; input 1 merged into output 0, input 3
    # into output 2, input 4 dropped. In the LLM the outputs sit at positions 10, 11, 12 of a
    # sequence of 3 text + 3 visual tokens; layer 2 drops position 11 (output 1 = input 2).
    vision = VisionSelection(
        tokens=torch.zeros(3, 4),
        kept=torch.tensor([0, 2, 5]),
        assignment=torch.tensor([0, 0, 1, 2, -1, 2]),
    )
    fate = token_fate(grid_coords(2, 3), vision, *_llm([10, 11, 12], {2: [10, 12]}))
    assert fate.state.tolist() == [KEPT, MERGED, PRUNED_IN_LLM, MERGED, DROPPED, KEPT]
    assert fate.layer.tolist() == [-1, -1, 2, -1, -1, -1]
    assert fate.counts() == {"kept": 2, "merged": 2, "dropped": 1, "pruned in LLM": 1}
    assert fate.coords.tolist() == grid_coords(2, 3).tolist()


def test_fate_follows_merged_tokens_into_the_llm():
    # input 1 merged into output 1 (anchored on input 2), which layer 1 drops: it left the LLM
    vision = VisionSelection(
        tokens=torch.zeros(2, 4), kept=torch.tensor([0, 2]), assignment=torch.tensor([0, 1, 1])
    )
    fate = token_fate(grid_coords(1, 3), vision, *_llm([5, 6], {1: [5]}))
    assert fate.state.tolist() == [KEPT, PRUNED_IN_LLM, PRUNED_IN_LLM]
    assert fate.layer.tolist() == [-1, 1, 1]


def test_fate_layer_stages_only_and_unpruned():
    # no vision stage: the 4 visual tokens enter the LLM; layer 1 keeps 2, layer 3 keeps 1
    fate = token_fate(grid_coords(2, 2), None, *_llm([2, 3, 4, 5], {1: [3, 5], 3: [5]}))
    assert fate.state.tolist() == [PRUNED_IN_LLM, PRUNED_IN_LLM, PRUNED_IN_LLM, KEPT]
    assert fate.layer.tolist() == [1, 3, 1, -1]
    unpruned = token_fate(grid_coords(2, 2), None, *_llm([2, 3, 4, 5], {}))
    assert unpruned.state.tolist() == [KEPT] * 4
    assert token_fate(grid_coords(2, 2), None).state.tolist() == [KEPT] * 4


def test_fate_rejects_mismatched_counts():
    vision = VisionSelection(tokens=torch.zeros(2, 4), kept=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="the LLM saw 3 visual tokens, the vision stage 2"):
        token_fate(grid_coords(1, 4), vision, *_llm([1, 2, 3], {}))


def test_fate_scores_of_the_vision_stage():
    # the vision stage's (N,) scores are the fate's, whatever the layer stages scored
    vision = VisionSelection(
        tokens=torch.zeros(2, 4),
        kept=torch.tensor([0, 2]),
        assignment=torch.tensor([0, 0, 1, -1]),
        scores=torch.tensor([0.4, 0.1, 0.3, 0.2]),
    )
    scores_at = {1: torch.tensor([5.0, 6.0])}
    fate = token_fate(grid_coords(2, 2), vision, *_llm([7, 8], {}), scores_at=scores_at)
    assert fate.score_source == "vision stage"
    assert fate.score.tolist() == pytest.approx([0.4, 0.1, 0.3, 0.2])
    assert token_fate(grid_coords(2, 2), dataclasses.replace(vision, scores=None)).score is None
    with pytest.raises(ValueError, match="vision scores for 3 tokens, the stage had 4"):
        token_fate(grid_coords(2, 2), dataclasses.replace(vision, scores=torch.ones(3)))


def test_fate_scores_of_the_first_layer_step_on_the_anchors():
    # inputs 0 and 2 anchor the LLM's 2 visual tokens, input 1 merged, input 3 dropped; layer
    # 1 scored both (NaN: none gone yet), layer 3 only the one left
    vision = VisionSelection(
        tokens=torch.zeros(2, 4), kept=torch.tensor([0, 2]), assignment=torch.tensor([0, 0, 1, -1])
    )
    nan = float("nan")
    scores_at = {3: torch.tensor([nan, 9.0]), 1: torch.tensor([0.25, 0.75])}
    fate = token_fate(grid_coords(1, 4), vision, *_llm([4, 5], {1: [4, 5]}), scores_at=scores_at)
    assert fate.score_source == "layer 1"
    assert fate.score[[0, 2]].tolist() == [0.25, 0.75]
    assert np.isnan(fate.score[[1, 3]]).all()  # merged and dropped inputs: not scored
    unscored = token_fate(grid_coords(1, 4), vision, *_llm([4, 5], {1: [4, 5]}))
    assert unscored.score is None and unscored.score_source is None
    with pytest.raises(ValueError, match="layer 1 scored 3 visual tokens, the LLM saw 2"):
        token_fate(grid_coords(1, 4), vision, *_llm([4, 5], {}), scores_at={1: torch.ones(3)})


def _fate(states, rows, cols, scores=None, layer=2):
    """A one-tile fate on a rows x cols grid, PRUNED_IN_LLM tokens gone at ``layer``."""
    state = np.array(states, dtype=np.int8)
    return TokenFate(
        coords=grid_coords(rows, cols).numpy(),
        state=state,
        layer=np.where(state == PRUNED_IN_LLM, layer, -1),
        score=None if scores is None else np.array(scores, dtype=np.float32),
        score_source=None if scores is None else f"layer {layer}",
    )


CAPTION = Caption(
    method="fastv",
    budget=M.Budget(keep_ratio=0.25),
    layers=2,
    title="shapes_0003",
    question="Which shape is left of the green circle",
    answers=["square", "a square", "square"],
    prediction="triangle",
    score=0.0,
)


def test_render_is_a_paper_column_wide_in_every_format():
    fate = _fate([KEPT, DROPPED, MERGED, PRUNED_IN_LLM], 2, 2, scores=[4.0, 1.0, 2.0, 3.0])
    image = np.full((64, 64, 3), 200, dtype=np.uint8)
    png = render_token_fate(image, fate, caption=CAPTION)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    decoded = Image.open(io.BytesIO(png))
    assert decoded.width == round(SINGLE_COLUMN_IN * 300) >= 990  # 3.3 in at 300 dpi
    assert decoded.info["dpi"] == pytest.approx((300, 300), abs=0.1)
    assert decoded.height > decoded.width  # the image, colour bar, legend and text below
    wide = Image.open(io.BytesIO(render_token_fate(image, fate, width_in=DOUBLE_COLUMN_IN)))
    assert wide.width == round(DOUBLE_COLUMN_IN * 300)
    assert render_token_fate(image, fate, caption=CAPTION, fmt="pdf").startswith(b"%PDF-")
    svg = render_token_fate(image, fate, caption=CAPTION, fmt="svg")
    assert svg.startswith(b"<?xml") and b"<svg" in svg[:1000]
    with pytest.raises(ValueError, match="fmt='jpg'"):
        render_token_fate(image, fate, fmt="jpg")  # type: ignore[arg-type]


def test_render_keeps_the_text_as_text():
    """SVG text stays text (``svg.fonttype: none``): the caption is searchable in the file."""
    fate = _fate([KEPT, DROPPED, PRUNED_IN_LLM, KEPT], 2, 2, scores=[4.0, 1.0, 2.0, 3.0])
    svg = render_token_fate(None, fate, caption=CAPTION, fmt="svg").decode()
    assert "font-family: &apos;DejaVu Sans&apos;" in svg or "'DejaVu Sans'" in svg
    for text in (
        "fastv · keep 25% · layer 2",  # method, budget, layer in the title
        "shapes_0003",
        "Which shape is left of the green circle",
        "square | a square",  # accepted answers, each once
        "triangle  (score 0)",  # the prediction and its score
        "token score (layer 2)",  # the colour bar
        "kept 2",
        "pruned in LLM 1 (layer 2)",
    ):
        assert f">{text}<" in svg, text
    assert "merged" not in svg  # states absent from the fate are left out of the legend
    pdf = render_token_fate(None, fate, caption=CAPTION, fmt="pdf")
    assert b"/FontFile2" in pdf and b"DejaVuSans" in pdf  # TrueType embedded, no Type 3


def test_caption_parts():
    assert Caption(budget=M.Budget(keep_tokens=64), layers=(8, 16, 24)).headline() == (
        "keep 64 tokens · layers 8, 16, 24"
    )
    assert Caption(method="visionzip", budget=M.Budget(keep_ratio=0.125)).headline() == (
        "visionzip · keep 12.5%"
    )
    assert Caption(method="x", budget="avg 96 tokens", layers=()).headline() == "x · avg 96 tokens"
    assert Caption(prediction="").fields() == [("Prediction", "(empty)")]
    lines = _wrap("word " * 200, 40, 3)
    assert len(lines) == 3 and lines[-1].endswith("…") and all(len(x) <= 40 for x in lines)
    assert _wrap("A. red\nB. blue", 40, 6) == ["A. red", "B. blue"]


def test_long_captions_grow_the_figure_not_its_width():
    fate = _fate([KEPT, DROPPED], 1, 2)
    short = Image.open(io.BytesIO(render_token_fate(None, fate, caption=Caption(question="Why?"))))
    long = Caption(question="Why is the sky blue on a clear day? " * 6)
    tall = Image.open(io.BytesIO(render_token_fate(None, fate, caption=long)))
    assert tall.width == short.width and tall.height > short.height


def _cell_pixel(png: np.ndarray, axes, row: int, col: int, rows: int, cols: int) -> np.ndarray:
    """The RGB of a token cell's centre in the rendered PNG of ``axes``' figure."""
    box = axes.get_position()
    height, width = png.shape[:2]
    x = (box.x0 + (col + 0.5) / cols * box.width) * width
    y = (1 - (box.y1 - (row + 0.5) / rows * box.height)) * height
    return png[int(y), int(x)].astype(int)


def _near(png: np.ndarray, colour: str, tolerance: int = 40) -> int:
    """Pixels of ``png`` within ``tolerance`` (per channel) of ``colour``."""
    target = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(png.astype(int) - target).max(axis=-1) <= tolerance).sum())


def test_render_draws_the_scores_over_the_image_and_the_fates_as_outlines():
    # a white image under a 2x2 grid: scores 0..3 (linear), one token in each state
    fate = _fate([KEPT, DROPPED, MERGED, PRUNED_IN_LLM], 2, 2, scores=[3.0, 0.0, 1.0, 2.0])
    image = np.full((64, 64, 3), 255, dtype=np.uint8)
    png = np.asarray(Image.open(io.BytesIO(render_token_fate(image, fate))).convert("RGB"))
    axes = heatmap_figure(image, fate).axes[0]  # the same layout, for the cells' positions
    colormap = matplotlib.colormaps["viridis"]
    for (row, col), score in zip([(0, 0), (0, 1), (1, 0), (1, 1)], [3, 0, 1, 2], strict=True):
        expected = 255 * (0.3 + 0.7 * np.array(colormap(score / 3)[:3]))  # over white
        assert np.abs(_cell_pixel(png, axes, row, col, 2, 2) - expected).max() <= 3, (row, col)
    assert _near(png, OUTLINE[KEPT], 10) > 100  # white outline (the legend swatch: grey inside)
    assert _near(png, OUTLINE[MERGED]) > 100
    assert _near(png, OUTLINE[PRUNED_IN_LLM]) > 50
    only_kept = _fate([KEPT, DROPPED, DROPPED, DROPPED], 2, 2, scores=[3.0, 0.0, 1.0, 2.0])
    plain = np.asarray(Image.open(io.BytesIO(render_token_fate(image, only_kept))).convert("RGB"))
    assert _near(plain, OUTLINE[MERGED]) == 0 and _near(plain, OUTLINE[PRUNED_IN_LLM]) == 0


def test_render_without_scores_veils_the_dropped_tokens():
    fate = _fate([KEPT, DROPPED], 1, 2)
    image = np.full((32, 64, 3), 255, dtype=np.uint8)
    png = np.asarray(Image.open(io.BytesIO(render_token_fate(image, fate))).convert("RGB"))
    figure = heatmap_figure(image, fate)
    assert len(figure.axes) == 1  # no colour bar without scores
    kept, dropped = (_cell_pixel(png, figure.axes[0], 0, col, 1, 2) for col in (0, 1))
    assert kept.tolist() == [255, 255, 255]  # the image, untouched
    assert dropped.max() < 140 and np.ptp(dropped) < 5  # dark grey veil


def test_tile_pixels_blend_the_colour_map_and_keep_unscored_tokens_clear():
    fate = _fate([KEPT, DROPPED, DROPPED], 1, 3, scores=[1.0, 0.0, float("nan")])
    image = np.zeros((10, 30, 3), dtype=np.uint8)
    norm = matplotlib.colors.Normalize(0.0, 1.0)
    pixels = tile_pixels(fate, 0, image, norm, (30, 10))
    assert pixels.shape == (10, 30, 4) and (pixels[..., 3] == 255).all()
    viridis = matplotlib.colormaps["viridis"]
    for col, value in ((0, 1.0), (1, 0.0)):
        expected = 255 * 0.7 * np.array(viridis(value)[:3])  # over black
        assert np.abs(pixels[5, col * 10 + 5, :3].astype(int) - expected).max() <= 2
    assert pixels[5, 25, :3].tolist() == [0, 0, 0]  # not scored: the image
    bare = tile_pixels(fate, 0, None, norm)  # no image: one opaque pixel per token
    assert bare.shape == (1, 3, 4)
    assert np.abs(bare[0, 0, :3].astype(int) - 255 * np.array(viridis(1.0)[:3])).max() <= 1
    assert bare[0, 2, :3].tolist() == [217, 217, 217]


def test_score_scale_is_log_for_scores_spanning_decades():
    from prunelab.workers.heatmaps import _score_norm

    attention = np.array([1e-5, 1e-3, 0.2], dtype=np.float32)
    assert isinstance(_score_norm(attention, "auto"), matplotlib.colors.LogNorm)
    assert not isinstance(_score_norm(attention, "linear"), matplotlib.colors.LogNorm)
    assert not isinstance(_score_norm(np.array([0.0, 1.0, 2.0]), "auto"), matplotlib.colors.LogNorm)
    flat = _score_norm(np.array([2.0, 2.0, np.nan]), "auto")
    assert flat.vmax > flat.vmin == 2.0


def test_render_draws_every_tile():
    coords = torch.cat([grid_coords(2, 2, tile=0), grid_coords(3, 4, tile=1)]).numpy()
    fate = TokenFate(coords=coords, state=np.zeros(16, np.int8), layer=np.full(16, -1))
    figure = heatmap_figure(None, fate, Caption(title="two tiles"))
    first, second = (axes.get_position() for axes in figure.axes)
    assert first.x1 <= second.x0  # a panel per tile, side by side
    assert second.width / second.height == pytest.approx(
        4 / 3 * figure.get_figheight() / figure.get_figwidth(), rel=1e-6
    )  # each grid keeps its aspect
    assert [axes.get_title() for axes in figure.axes] == ["tile 0", "tile 1"]
    png = Image.open(io.BytesIO(render_token_fate(None, fate, title="two tiles")))
    assert png.width == 990


def _with_heatmaps(trial, heatmaps: int):
    """``trial`` with ``heatmaps`` importance heatmaps (its first samples)."""
    return dataclasses.replace(trial, eval=dataclasses.replace(trial.eval, heatmaps=heatmaps))


@pytest.mark.parametrize(
    ("method", "axes", "states"),
    [
        ("fastv", {"keep_ratio": 0.25, "prune_layer": 1}, {"kept", "pruned in LLM"}),
        ("visionzip", {"keep_ratio": 0.25}, {"kept", "merged"}),
        ("divprune", {"keep_ratio": 0.25}, {"kept", "dropped"}),
    ],
)
def test_trial_heatmaps_match_what_the_trial_kept(method, axes, states):
    loaded, adapter = load_tiny("tiny-llava")
    trial = tiny_trial("tiny-llava", method, limit=3, **axes)
    with_maps = run_trial(loaded, adapter, _with_heatmaps(trial, 2))
    without = run_trial(loaded, adapter, _with_heatmaps(trial, 0))
    assert without.artifacts == {}
    # tracing re-runs samples but changes nothing the trial measures
    for key in ("score", "visual_tokens_kept", "avg_visual_tokens", "tflops", "fidelity_kl"):
        assert with_maps.metrics[key] == without.metrics[key], key
    names = [f"importance/{p['id']}.png" for p in with_maps.predictions[:2]]
    assert sorted(with_maps.artifacts) == sorted(names)
    for name in names:
        png = Image.open(io.BytesIO(with_maps.artifacts[name]))
        png.verify()
        assert png.format == "PNG"


CASES = [
    *[
        (model, method, axes)
        for model in TINY_MODELS
        for method, axes in (
            ("fastv", {"keep_ratio": 0.25, "prune_layer": 1}),
            ("divprune", {"keep_ratio": 0.25}),
        )
    ],
    ("tiny-llava", "visionzip", {"keep_ratio": 0.25}),
    ("tiny-llava", "random", {"keep_ratio": 0.3, "seed": 1}),
]


@pytest.mark.parametrize(("model", "method_name", "axes"), CASES)
def test_traced_fate_is_what_the_trial_kept(model, method_name, axes):
    """On every family: the drawn fate is the trial's selection (kept = the sample's
    visual_kept) and the heatmap of the first sample decodes."""
    loaded, adapter = load_tiny(model)
    trial = _with_heatmaps(tiny_trial(model, method_name, limit=1, **axes), 1)
    output = run_trial(loaded, adapter, trial)
    (name,) = output.artifacts
    assert name == f"importance/{output.predictions[0]['id']}.png"
    png = Image.open(io.BytesIO(output.artifacts[name]))
    assert png.format == "PNG" and png.width >= 240

    method, budget = build_method(trial)
    sample = build_benchmark(trial.benchmark_config).samples(1, 0)[0]
    prepared = adapter.prepare(sample)
    plan = method.plan(
        PlanContext(
            n_visual=prepared.n_visual,
            n_layers=loaded.info.n_layers,
            budget=budget,
            prune_layer=trial.prune_layer,
            seed=trial.seed or 0,
            family=adapter.family,
        )
    )
    generator = _sample_generator(trial.seed, sample.id)
    with torch.inference_mode():
        run = run_sample(adapter, prepared, method, plan, generator, 3, Timer(loaded.device))
    pruner = run.pruner
    if plan.vision_keep is not None:
        assert run.vision is not None and run.kept is not None
        assert run.kept.numel() == plan.vision_keep == pruner.visual_positions.numel()
    assert sorted(pruner.kept_at) == sorted(step.layer for step in plan.layers)
    for step in plan.layers:
        assert pruner.kept_at[step.layer].numel() == step.keep
    fate = token_fate(prepared.coords, run.vision, pruner.visual_positions, pruner.kept_at)
    assert fate.state.shape == (prepared.n_visual,)
    assert fate.counts()["kept"] == output.predictions[0]["visual_kept"]
    assert fate.counts()["kept"] == run.generation.lengths.visual[-1]


def test_unpruned_trial_has_no_heatmaps():
    loaded, adapter = load_tiny("tiny-llava")
    trial = _with_heatmaps(tiny_trial("tiny-llava", "none", limit=2), 2)
    assert run_trial(loaded, adapter, trial).artifacts == {}


SCORED = [
    ("fastv", {"keep_ratio": 0.25, "prune_layer": 1}),
    ("pdrop", {"keep_ratio": 0.5}),
    ("sparsevlm", {"keep_ratio": 0.5}),
    ("sgp", {"keep_ratio": 0.25, "prune_layer": 2}),
    ("visionzip", {"keep_ratio": 0.25}),
    ("divprune", {"keep_ratio": 0.25}),
    ("random", {"keep_ratio": 0.3, "prune_layer": 2, "seed": 1}),
]


@pytest.mark.parametrize(("method_name", "axes"), SCORED)
def test_recorded_scores_are_what_the_method_ranked_by(method_name, axes):
    """The scores a trial's heatmap draws: the vision stage's (visionzip: the CLS attention)
    or those the first layer step ranked by (its top-k stayed); none for methods without."""
    loaded, adapter = load_tiny("tiny-llava")
    trial = tiny_trial("tiny-llava", method_name, limit=1, **axes)
    method, budget = build_method(trial)
    sample = build_benchmark(trial.benchmark_config).samples(1, 0)[0]
    prepared = adapter.prepare(sample)
    context = PlanContext(prepared.n_visual, loaded.info.n_layers, budget, trial.prune_layer, 1)
    plan = method.plan(context)
    guide = guide_for("tiny-llava") if method.needs_guidance else None
    guided = (guide[1], sample) if guide is not None else None
    generator = _sample_generator(trial.seed, sample.id)
    with torch.inference_mode():
        run = run_sample(
            adapter, prepared, method, plan, generator, 3, Timer(loaded.device), guided
        )
    pruner = run.pruner
    fate = token_fate(
        prepared.coords, run.vision, pruner.visual_positions, pruner.kept_at, pruner.scores_at
    )
    if method_name in ("divprune", "random"):
        assert fate.score is None and pruner.scores_at == {}
    elif method_name == "visionzip":
        signals = adapter.vision_signals(prepared, frozenset({"cls_attention"}))
        assert fate.score_source == "vision stage"
        assert torch.equal(torch.from_numpy(fate.score), signals.cls_attention.float().cpu())
    else:
        first = plan.layers[0]
        assert fate.score_source == f"layer {first.layer}"
        assert sorted(pruner.scores_at) == [step.layer for step in plan.layers]
        scores = pruner.scores_at[first.layer].cpu()
        assert torch.isfinite(scores).all()  # every visual token is present at the first step
        stayed = torch.isin(pruner.visual_positions, pruner.kept_at[first.layer]).cpu()
        if method_name == "sparsevlm":  # the top m by score stay, c recycled slots besides
            m, _ = recycle_split(
                scores.numel(), first.keep, method.recycle_ratio, method.cluster_ratio
            )
            stayed = torch.zeros_like(stayed)
            stayed[torch.topk(scores, m).indices] = True
            assert torch.isin(pruner.visual_positions[stayed], pruner.kept_at[first.layer]).all()
        else:  # top-k: every token that stayed outranks every token dropped
            assert scores[stayed].min() > scores[~stayed].max()
        if method_name == "sgp":
            assert torch.equal(scores, run.guidance.scores.float().cpu())
        later = plan.layers[1:]
        for previous, step in zip(plan.layers, later, strict=False):  # NaN: gone before
            present = torch.isin(pruner.visual_positions, pruner.kept_at[previous.layer])
            assert torch.isfinite(pruner.scores_at[step.layer]).cpu().tolist() == (
                present.cpu().tolist()
            )
    caption = Caption(
        method=method_name, budget=budget, layers=[s.layer for s in plan.layers], title=sample.id
    )
    svg = render_token_fate(sample.image, fate, caption=caption, fmt="svg").decode()
    assert f">{caption.headline()}<" in svg and f">{sample.id}<" in svg
