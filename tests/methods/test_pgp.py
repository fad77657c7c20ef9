"""PGP: the VIB math (eq. 2-4), the β schedule, the head, planning and selection; training a
head on the tiny guide lowers its loss; scoring through the guide's hidden states."""

from __future__ import annotations

import math

import pytest
import torch

import prunelab.methods as M
from prunelab.methods.pgp import (
    VIBHead,
    gaussian_kl,
    kl_weight,
    posterior_mean,
    reparameterize,
    token_kl,
)


def test_kl_is_zero_when_the_posterior_equals_the_prior() -> None:
    prior_mean = torch.tensor([0.5, -1.0, 2.0])
    prior_logvar = torch.tensor([0.0, math.log(4.0), math.log(0.25)])
    mean = prior_mean.expand(5, 3)
    logvar = prior_logvar.expand(5, 3)
    assert torch.allclose(token_kl(mean, logvar, prior_mean, prior_logvar), torch.zeros(5))


def test_kl_by_hand() -> None:
    # channel 1: N(1, 1) || N(0, 1) = ½ (0 - 0 + 1 + 1 - 1) = 0.5
    # channel 2: N(0, 4) || N(0, 1) = ½ (0 - ln 4 + 4 + 0 - 1) = 1.5 - ln 2
    # channel 3: N(2, 1) || N(0, 4) = ½ (ln 4 - 0 + 1/4 + 4/4 - 1) = ln 2 + 1/8
    mean = torch.tensor([[1.0, 0.0, 2.0]])
    logvar = torch.tensor([[0.0, math.log(4.0), 0.0]])
    prior_mean = torch.zeros(3)
    prior_logvar = torch.tensor([0.0, 0.0, math.log(4.0)])
    per_channel = gaussian_kl(mean, logvar, prior_mean, prior_logvar)[0]
    expected = torch.tensor([0.5, 1.5 - math.log(2.0), math.log(2.0) + 0.125])
    assert torch.allclose(per_channel, expected, atol=1e-6)
    # eq. 2: the channel average
    score = token_kl(mean, logvar, prior_mean, prior_logvar)
    assert score.item() == pytest.approx(float(expected.mean()), abs=1e-6)


def test_sigmoid_gate_bounds_the_mean_between_prior_and_input() -> None:
    torch.manual_seed(0)
    v = torch.randn(50, 8) * 10
    logits = torch.randn(50, 8) * 20  # saturating gates included
    prior = torch.randn(8)
    mean = posterior_mean(v, logits, prior, "sigmoid")
    tol = 1e-5  # a saturated gate (sigmoid = 1.0 in float32) gives V' up to rounding
    assert torch.all((mean - prior).abs() <= (v - prior).abs() + tol)
    lo, hi = torch.minimum(v, prior.expand_as(v)), torch.maximum(v, prior.expand_as(v))
    assert torch.all(mean >= lo - tol) and torch.all(mean <= hi + tol)
    # hand value: sigmoid(0) = ½ -> halfway between prior 1 and input 3
    assert (
        posterior_mean(torch.tensor([3.0]), torch.tensor([0.0]), torch.tensor([1.0])).item() == 2.0
    )
    # the exp gate (the paper's ablation) is not bounded: e^1 (3 - 1) + 1 > 3
    assert (
        posterior_mean(torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([1.0]), "exp") > 3.0
    )


def test_reparameterization_is_mean_plus_sigma_eps() -> None:
    mean, logvar = torch.tensor([1.0, -2.0]), torch.tensor([0.0, math.log(9.0)])
    eps = torch.randn(2, generator=torch.Generator().manual_seed(3))
    z = reparameterize(mean, logvar, torch.Generator().manual_seed(3))
    assert torch.allclose(z, mean + torch.tensor([1.0, 3.0]) * eps)
    mean.requires_grad_(True)
    reparameterize(mean, logvar).sum().backward()
    assert torch.equal(mean.grad, torch.ones(2))


def test_kl_weight_schedules() -> None:
    # warm-up (the text): 0.2 -> 0.5 linearly over γ = 10 steps, then flat
    assert kl_weight(0, 0.2, 0.5, 10) == pytest.approx(0.2)
    assert kl_weight(5, 0.2, 0.5, 10) == pytest.approx(0.35)
    assert kl_weight(10, 0.2, 0.5, 10) == kl_weight(99, 0.2, 0.5, 10) == pytest.approx(0.5)
    # anneal (the formula as printed): β(s) = τmax − (τmax − τmin) min(1, s/γ)
    assert kl_weight(0, 0.2, 0.5, 10, "anneal") == pytest.approx(0.5)
    assert kl_weight(5, 0.2, 0.5, 10, "anneal") == pytest.approx(0.35)
    assert kl_weight(20, 0.2, 0.5, 10, "anneal") == pytest.approx(0.2)
    assert kl_weight(3, 0.2, 0.5, 10, "constant") == 0.5


def test_head_scores_are_kl_of_its_posterior() -> None:
    torch.manual_seed(0)
    head = VIBHead(6, hidden=4)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn_like(p))
    v = torch.randn(3, 6)
    gate_logits, logvar = head.mlp(v).chunk(2, dim=-1)
    mean = torch.sigmoid(gate_logits) * (v - head.prior_mean) + head.prior_mean
    expected = gaussian_kl(mean, logvar, head.prior_mean, head.prior_logvar).mean(-1)
    assert torch.allclose(head.scores(v), expected.detach(), atol=1e-6)
    # a fresh head: unit posterior variance, mean = sigmoid(2) V' (prior at N(0, 1)), so
    # KL_i = ½ mean_j (sigmoid(2) v_ij)²
    fresh = VIBHead(6)
    s = torch.sigmoid(torch.tensor(2.0))
    assert torch.allclose(fresh.scores(v), 0.5 * ((s * v) ** 2).mean(-1), atol=1e-6)


def test_plan_select_and_validation() -> None:
    method = M.get("pgp")()
    assert (
        method.needs_guidance
        and method.guidance_signal == "hidden"
        and isinstance(method, M.TrainedHeadMethod)
    )
    plan0 = method.plan(M.PlanContext(576, 32, M.Budget(keep_ratio=0.05), None, 0))
    assert plan0.vision_keep == 29 and plan0.layers == ()  # L = 0: before the LLM
    plan9 = method.plan(M.PlanContext(576, 32, M.Budget(keep_tokens=64), 9, 0))
    assert plan9.layers == (M.LayerStep(layer=9, keep=64, queries=None),)
    with pytest.raises(ValueError, match="prune_layer=32"):
        method.plan(M.PlanContext(576, 32, M.Budget(keep_tokens=64), 32, 0))
    signals = M.VisionSignals(
        tokens=torch.arange(8.0).reshape(4, 2),
        coords=torch.zeros(4, 3, dtype=torch.long),
        guidance=torch.tensor([0.3, 0.1, 0.9, 0.5]),
    )
    selection = method.select_vision(signals, 2)
    assert selection.kept.tolist() == [2, 3]
    assert torch.equal(selection.tokens, torch.tensor([[4.0, 5.0], [6.0, 7.0]]))
    layer = M.LayerSignals(
        visual=torch.tensor([3, 4, 5]),
        text=torch.tensor([0]),
        guidance=torch.tensor([1.0, 3.0, 2.0]),
    )
    assert method.select_layer(M.LayerStep(2, 2, None), layer).tolist() == [1, 2]
    with pytest.raises(RuntimeError, match="trained VIB head"):
        method.score_hidden(torch.zeros(3, 4))
    for bad in ({"gate": "relu"}, {"tau_min": 0.6}, {"lora_rank": -1}, {"kl_schedule": "cos"}):
        with pytest.raises((M.HyperparameterError, ValueError)):
            M.get("pgp").from_hparams(bad)


# -- training on the tiny guide ---------------------------------------------------------------
def _train_config(**head) -> dict:
    from tiny_models import model_config

    hparams = M.get("pgp")(**head).head_hparams()
    return {
        "key": "test",
        "guide": model_config("tiny-llava-small"),
        "benchmark": {"name": "shapes", "kind": "shapes", "split": "train"},
        "head": hparams,
        "steps": 12,
        "batch_size": 2,
        "lr": 3e-3,
        "limit": 4,
        "eval_samples": 4,
    }


@pytest.mark.parametrize("head", [{}, {"gate": "exp", "lora_rank": 0, "guide_layer": 1}])
def test_training_lowers_the_loss_and_the_head_scores_through_the_guide(head: dict) -> None:
    from tiny_models import load_tiny

    from prunelab.trial import Trial
    from prunelab.workers.benchmarks.shapes import ShapesBenchmark
    from prunelab.workers.guidance import run_guidance
    from prunelab.workers.vib import decode_head, train_vib, trial_assets

    guide = load_tiny("tiny-llava-small")
    before = {k: v.clone() for k, v in guide[0].model.state_dict().items()}
    result = train_vib(_train_config(**head), loaded=guide)
    assert len(result.losses) == 12
    assert result.eval_after < result.eval_before  # same samples, same noise, β = τ_max
    for k, v in guide[0].model.state_dict().items():  # the guide itself is untouched
        assert torch.equal(v, before[k])
    tensors, meta = decode_head(result.blob)
    assert meta["gate"] == head.get("gate", "sigmoid")
    assert any(k.startswith("lora.") for k in tensors) == (head.get("lora_rank", 8) > 0)

    trial = Trial("tiny-llava", "shapes", "pgp", head, vib_head={"state": result.blob})
    method = M.get("pgp")(**head).bind(trial_assets(trial))
    sample = ShapesBenchmark().sample(0)
    with torch.inference_mode():
        guidance = run_guidance(guide[1], method, sample, 4, lambda: 0.0)
    n = guide[0].info.n_visual
    assert guidance.scores.shape == (n,) and torch.all(guidance.scores >= 0)
    assert len(guidance.generation.token_ids) == 1  # one prefill, no generation
    # the scores are the head's KL of the guide's hidden states (recomputed by hand)
    prepared = guide[1].prepare(sample)
    with torch.no_grad():
        tokens = guide[1].vision_signals(prepared, frozenset()).tokens
        from prunelab.workers.vib import capture_hidden, lora_applied

        lora, scale = method.guidance_lora
        with (
            lora_applied(guide[1], lora, scale),
            capture_hidden(guide[1], method.guidance_layer) as c,
        ):
            guide[0].model(inputs_embeds=guide[1]._sequence(prepared, tokens, None).inputs_embeds)
        hidden = c.value[0, prepared.visual_positions]
        expected = method.head.scores(hidden)
    assert torch.allclose(guidance.scores, expected, atol=1e-5)
