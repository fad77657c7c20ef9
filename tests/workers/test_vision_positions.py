"""``vision_positions``: how the LLM numbers a vision stage's kept tokens, ``packed``
(consecutive, official VisionZip) or ``original`` (each at its place in the unpruned sequence)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import load_tiny, tiny_trial

from prunelab.orchestrator.spec import SpecError, load_sweep
from prunelab.workers.benchmarks.shapes import ShapesBenchmark
from prunelab.workers.heatmaps import Caption
from prunelab.workers.runner import run_trial

ONE_D_FAMILIES = ["tiny-llava", "tiny-llava-next", "tiny-internvl"]


def _clock() -> float:
    return 0.0


@pytest.fixture(scope="module", params=ONE_D_FAMILIES)
def family(request):
    _loaded, adapter = load_tiny(request.param)
    prepared = adapter.prepare(ShapesBenchmark().sample(3))
    tokens = adapter.vision_signals(prepared, frozenset()).tokens
    return request.param, adapter, prepared, tokens


def test_original_positions_are_those_of_the_unpruned_sequence(family) -> None:
    _, adapter, prepared, tokens = family
    kept = torch.arange(1, tokens.shape[0], 4)
    packed = adapter.llm_input(prepared, tokens[kept], kept, "packed")
    original = adapter.llm_input(prepared, tokens[kept], kept, "original")
    assert packed.position_ids is None  # consecutive: the model counts
    assert torch.equal(packed.inputs_embeds, original.inputs_embeds)  # same layout
    ids = original.position_ids[0]
    placeholders = prepared.visual_positions
    assert ids[original.visual_positions].tolist() == placeholders[kept].tolist()
    # every other token (text, LLaVA-NeXT's newlines) keeps its own index, in order
    others = torch.ones(ids.numel(), dtype=torch.bool)
    others[original.visual_positions] = False
    unpruned = torch.ones(prepared.input_ids.shape[1], dtype=torch.bool)
    unpruned[placeholders] = False
    assert ids[others].tolist() == unpruned.nonzero().squeeze(-1).tolist()
    length = prepared.input_ids.shape[1]
    assert original.next_position_ids(1).item() == length
    assert original.next_position_ids(3).item() == length + 2


def test_original_positions_change_what_the_llm_computes(family) -> None:
    name, adapter, prepared, tokens = family
    kept = torch.arange(0, tokens.shape[0], 3)
    logprobs = {}
    for positions in ("packed", "original"):
        llm_input = adapter.llm_input(prepared, tokens[kept], kept, positions)
        generation, _ = adapter.generate(prepared, llm_input, 2, _clock)
        logprobs[positions] = generation.first_logprobs
    assert not torch.allclose(logprobs["packed"], logprobs["original"]), name


def test_with_every_token_kept_original_is_the_unpruned_input(family) -> None:
    _, adapter, prepared, tokens = family
    every = torch.arange(tokens.shape[0])
    plain = adapter.generate(prepared, adapter.llm_input(prepared, tokens), 2, _clock)[0]
    original = adapter.generate(
        prepared, adapter.llm_input(prepared, tokens, every, "original"), 2, _clock
    )[0]
    assert torch.allclose(plain.first_logprobs, original.first_logprobs, atol=1e-5)
    assert plain.token_ids == original.token_ids


def test_qwen2_vl_keeps_its_m_rope_positions_and_refuses_packed() -> None:
    _, adapter = load_tiny("tiny-qwen2-vl")
    prepared = adapter.prepare(ShapesBenchmark().sample(0))
    tokens = adapter.vision_signals(prepared, frozenset()).tokens
    kept = torch.arange(0, tokens.shape[0], 2)
    with pytest.raises(ValueError, match="numbers a vision stage's tokens original"):
        adapter.llm_input(prepared, tokens[kept], kept, "packed")
    assert adapter.llm_input(prepared, tokens[kept], kept, "original").position_ids is not None


def test_trials_carry_the_axis_to_the_worker() -> None:
    loaded, adapter = load_tiny("tiny-llava")
    scores = {}
    for positions in (None, "original"):
        trial = tiny_trial(
            "tiny-llava", "random", 3, keep_ratio=0.25, prune_layer=0, vision_positions=positions
        )
        scores[positions] = run_trial(loaded, adapter, trial).metrics["fidelity_kl"]
    assert scores[None] != scores["original"]


def _spec(tmp_path: Path, grid: str) -> Path:
    path = tmp_path / "spec.yaml"
    body = textwrap.indent(textwrap.dedent(grid).strip(), "  ")
    path.write_text(f"defaults: [base, _self_]\nname: mine\ngrid:\n{body}\n")
    return path


def test_the_axis_is_in_the_key_only_for_a_vision_stage_off_the_default(tmp_path) -> None:
    spec = _spec(tmp_path, "model: tiny-llava\nbenchmark: shapes\nmethod: visionzip,fastv\n"
                 "keep_ratio: 0.25\nvision_positions: packed,original")  # fmt: skip
    trials = {(t.method, t.vision_positions) for t in load_sweep(str(spec)).trials}
    assert trials == {("none", None), ("fastv", None), ("visionzip", None),
                      ("visionzip", "original")}  # fmt: skip
    plain = _spec(tmp_path, "model: tiny-llava\nbenchmark: shapes\nmethod: visionzip\n"
                  "keep_ratio: 0.25")  # fmt: skip
    packed_key = next(
        t.key for t in load_sweep(str(spec)).trials
        if t.method == "visionzip" and t.vision_positions is None
    )  # fmt: skip
    assert packed_key in {t.key for t in load_sweep(str(plain)).trials}


def test_packed_on_qwen2_vl_is_a_grid_problem(tmp_path) -> None:
    spec = _spec(tmp_path, "model: tiny-qwen2-vl\nbenchmark: shapes\nmethod: visionzip\n"
                 "keep_ratio: 0.25\nvision_positions: packed")  # fmt: skip
    with pytest.raises(SpecError) as caught:
        load_sweep(str(spec))
    (line,) = caught.value.problems
    assert "vision_positions=packed" in line and "M-RoPE" in line
    original = load_sweep(str(spec), ["vision_positions=original"]).trials
    assert [t.vision_positions for t in original] == [None, None]  # qwen's own way


def test_heatmap_title_names_the_positions() -> None:
    caption = Caption(method="visionzip", budget="keep 25%", positions="original")
    assert caption.headline() == "visionzip · keep 25% · original positions"
    assert Caption(method="visionzip").headline() == "visionzip"
