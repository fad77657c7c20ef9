"""Importance heatmaps: token fates from hand-built selections, and from real trials."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import TINY_MODELS, load_tiny, tiny_trial

from prunelab.methods.base import PlanContext, VisionSelection
from prunelab.workers.adapters.base import grid_coords
from prunelab.workers.benchmarks import build_benchmark
from prunelab.workers.heatmaps import (
    DROPPED,
    KEPT,
    MERGED,
    PRUNED_IN_LLM,
    TokenFate,
    render_token_fate,
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


def test_render_darkens_dropped_tokens_and_keeps_kept_ones():
    # a white 2x2-token image: token (0,0) kept, (0,1) dropped, (1,0) merged, (1,1) pruned
    fate = TokenFate(
        coords=grid_coords(2, 2).numpy(),
        state=np.array([KEPT, DROPPED, MERGED, PRUNED_IN_LLM], dtype=np.int8),
        layer=np.array([-1, -1, -1, 2]),
    )
    image = np.full((64, 64, 3), 255, dtype=np.uint8)
    png = Image.open(io.BytesIO(render_token_fate(image, fate))).convert("RGB")
    pixels = np.asarray(png).astype(int)
    half = 240 // 2  # the panel is 240 px; sample the centre of each token's cell
    kept, dropped = pixels[half // 2, half // 2], pixels[half // 2, half + half // 2]
    merged, pruned = pixels[half + half // 2, half // 2], pixels[half + half // 2, half + half // 2]
    assert kept.tolist() == [255, 255, 255]  # the image, untouched
    assert dropped.max() < 200 and abs(dropped[0] - dropped[2]) < 5  # grey
    assert merged[2] > merged[0] + 60  # blue tint
    assert pruned[0] > pruned[2] + 60  # orange tint
    assert png.height > 240  # legend below the panel


def test_render_draws_every_tile():
    coords = torch.cat([grid_coords(2, 2, tile=0), grid_coords(3, 4, tile=1)]).numpy()
    fate = TokenFate(coords=coords, state=np.zeros(16, np.int8), layer=np.full(16, -1))
    png = Image.open(io.BytesIO(render_token_fate(None, fate, title="two tiles")))
    assert png.width >= 240 + 240  # a panel per tile, side by side


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
