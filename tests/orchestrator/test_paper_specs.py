"""The paper sweep specs (paper_*.yaml) validate on their papers' 7B-shaped models and expand to
the grids of the papers' main tables (the seed papers, cited in the README).

As in ``test_baselines_spec.py``, each spec is validated as a copy in a temporary directory next
to copies of its model configs whose ``path`` is a local ``config.json`` with the checkpoint's
shapes (``checkpoint_configs``; no weights). ``$PRUNELAB_DATA`` points at parquet files in the
lmms-eval layout with the columns each shipped benchmark needs (validation reads the schemas
only). Every trial's plan is then made again on its model's shape and checked: vision-stage and
layer-step counts inside the model, layers inside its depth, the average over the decoder
layers on the budget. The numbers asserted are the papers' and can be checked by hand:

- Polymorphic (Section 4.1): stage 1 keeps K = 2 x the budget; first pruned layers 3, 7, 16 on
  LLaVA-1.5 (32 layers, and the 40-layer 13B), 3, 7, 13 on Qwen2-VL (28 layers); Tables 1-3 at
  192 / 128 / 64 tokens, Appendix A (LLaVA-NeXT, 2880 tokens) at 640 / 320 / 160.
- InfoPrune (Appendix B): stage 2 ranks at layer K = 15 (32 layers) / 13 (28 layers), layer
  K + 1 is the first with T_2 = round(0.33 T_1); alpha = 2 (LLaVA) / 3 (Qwen2.5-VL); Table 1 at
  192 / 128 / 64 of 576 tokens, Tables 2-3 at 22.2% / 11.1%; nine benchmarks with MMBench-CN.
- PREP (Section 4.1, Table 1): candidate layers 6-15 on every model, groups of 64 tokens,
  192 / 128 / 64 / 16 tokens of LLaVA-1.5-7B; Table 2 at 50% / 25% on InternVL3 / Qwen2.5-VL.
- PGP (Table 1): 20% at L = 9 and 0, 5% at L = 2 and 0, on a large model guided by a small one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from checkpoint_configs import SHAPES, local_spec_dir
from omegaconf import OmegaConf

import prunelab.methods as M
from prunelab.methods.base import Plan
from prunelab.methods.pdrop import average_target, plan_average
from prunelab.orchestrator.spec import SWEEPS_DIR, SweepPlan, load_sweep
from prunelab.trial import Trial
from prunelab.workers.benchmarks import build_benchmark

POLYMORPHIC_BENCHMARKS = ("vizwiz", "scienceqa_img", "gqa", "textvqa", "mme", "pope")
INFOPRUNE_BENCHMARKS = ("gqa", "mmbench", "mmbench_cn", "mme", "pope", "scienceqa_img", "vizwiz",
                        "textvqa", "vqav2")  # fmt: skip
PREP_BENCHMARKS = ("mmbench", "mme", "pope", "vizwiz", "textvqa", "realworldqa", "ai2d",
                   "mmstar", "seedbench2_plus")  # fmt: skip
PREP_TABLE2_BENCHMARKS = ("mmbench", "mme", "pope", "textvqa", "ocrbench", "ai2d", "mmstar",
                          "seedbench2_plus")  # fmt: skip
INFOPRUNE_RATIOS = (0.33333333, 0.22222222, 0.11111111)  # 1/3, 2/9, 1/9 to 8 digits


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spec_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The paper specs and their model configs, each model's `path` a local config dir."""
    return local_spec_dir(tmp_path_factory.mktemp("paper-specs"), "paper_*.yaml")


def _write_columns(path: Path, columns: list[str]) -> None:
    """A one-row parquet file with ``columns`` (``image`` as encoded bytes, the others text)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {c: [b"not-decoded"] if c == "image" else ["x"] for c in columns}
    pq.write_table(pa.table(data), path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """$PRUNELAB_DATA with a file of every shipped lmms-eval benchmark where its config says."""
    root = tmp_path_factory.mktemp("lmms-data")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PRUNELAB_DATA", str(root))
        for config in sorted((SWEEPS_DIR / "benchmark").glob("*.yaml")):
            data = OmegaConf.to_container(OmegaConf.load(config), resolve=True)
            assert isinstance(data, dict)
            if data["kind"] in ("shapes", "scenes"):  # generated in code, no files
                continue
            bench = build_benchmark(data)
            columns = [*type(bench).required, *(["image"] if bench.has_image else [])]
            _write_columns(Path(bench.path) / f"{bench.split}.parquet", columns)
            images = getattr(bench, "images_path", None)  # GQA: images in a sibling dataset
            if images:
                _write_columns(Path(images) / f"{bench.split}.parquet", ["id", "image"])
    return root


@pytest.fixture(autouse=True)
def _data_env(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRUNELAB_DATA", str(data_dir))


# -- helpers ---------------------------------------------------------------------------------
def _load(spec_dir: Path, spec: str, overrides: tuple[str, ...] = ()) -> SweepPlan:
    return load_sweep(str(spec_dir / f"{spec}.yaml"), list(overrides))


def _method(trial: Trial) -> M.PruningMethod:
    return M.get(trial.method).from_hparams(trial.hparams)


def _plan(plan: SweepPlan, trial: Trial) -> Plan:
    """The trial's plan on its model's shape, as the worker makes it."""
    info = plan.model_infos[trial.model]
    budget = M.Budget(keep_ratio=trial.keep_ratio, keep_tokens=trial.keep_tokens)
    context = M.PlanContext(
        info.n_visual, info.n_layers, budget, trial.prune_layer, trial.seed or 0, info.family
    )
    return _method(trial).plan(context)


def _tokens(plan: SweepPlan, trial: Trial) -> float:
    """The trial's budget in visual tokens of its model (unrounded for a ratio)."""
    budget = M.Budget(keep_ratio=trial.keep_ratio, keep_tokens=trial.keep_tokens)
    return average_target(budget, plan.model_infos[trial.model].n_visual)


def _check_grid(
    plan: SweepPlan,
    models: tuple[str, ...],
    benchmarks: tuple[str, ...],
    methods: tuple[str, ...],
    axis: str,
    budgets: tuple[Any, ...],
) -> None:
    """Exactly models x benchmarks x (the unpruned reference first, then every method at every
    budget of ``axis`` in order), the other budget axis unset, on the models' real shapes."""
    assert {t.model for t in plan.trials} == set(models)
    assert {t.benchmark for t in plan.trials} == set(benchmarks)
    assert {t.method for t in plan.trials} == {"none", *methods}
    assert len({t.key for t in plan.trials}) == len(plan.trials)
    assert len(plan.trials) == len(models) * len(benchmarks) * (1 + len(methods) * len(budgets))
    other = "keep_tokens" if axis == "keep_ratio" else "keep_ratio"
    for model in models:
        assert (plan.model_infos[model].n_layers, plan.model_infos[model].n_visual) == SHAPES[model]
        assert plan.models[model]["source"] == "pretrained"
        for benchmark in benchmarks:
            group = [t for t in plan.trials if (t.model, t.benchmark) == (model, benchmark)]
            assert group[0].is_baseline and sum(t.is_baseline for t in group) == 1
            for method in methods:
                trials = [t for t in group if t.method == method]
                assert [getattr(t, axis) for t in trials] == list(budgets)
                assert all(getattr(t, other) is None for t in trials)
    assert plan.workers.gpus_per_worker >= 1  # 7B models: a GPU per worker


def _check_shapes(plan: SweepPlan) -> None:
    """Every pruning trial's plan fits its model: a vision stage keeps fewer tokens than the
    model has, layer steps prune inside the depth and keep ever fewer, pre-inference candidates
    and FastV-style layers are decoder layers, and a method that reports the average over the
    decoder layers reaches its budget within one token."""
    for trial in plan.trials:
        if trial.is_baseline:
            continue
        info = plan.model_infos[trial.model]
        made = _plan(plan, trial)
        assert made.prunes, trial
        first = info.n_visual if made.vision_keep is None else made.vision_keep
        assert 1 <= first <= info.n_visual
        keeps = [first, *(s.keep for s in made.layers)]
        assert keeps == sorted(keeps, reverse=True) and len(set(keeps)) == len(keeps), trial
        assert all(1 <= s.layer <= info.n_layers - 1 for s in made.layers), trial
        if made.pre_inference is not None:
            assert all(1 <= k <= info.n_layers - 1 for k in made.pre_inference.candidates)
        if trial.prune_layer is not None:
            assert 0 <= trial.prune_layer <= info.n_layers - 1
        if getattr(M.get(trial.method), "budget_is_average", False):
            average = plan_average(made, info.n_visual, info.n_layers)
            assert abs(average - _tokens(plan, trial)) <= 1.0, (trial, average)


def _trial(plan: SweepPlan, model: str, method: str, **budget: Any) -> Trial:
    """The one trial of ``method`` on ``model`` at ``budget`` (on the first benchmark)."""
    found = [
        t
        for t in plan.trials
        if t.model == model
        and t.method == method
        and all(getattr(t, k) == v for k, v in budget.items())
    ]
    assert found, (model, method, budget)
    return found[0]


def _schedule(made: Plan) -> tuple[int | None, list[tuple[int, int]]]:
    """(vision-stage keep, [(first layer with fewer tokens, keep), ...])."""
    return made.vision_keep, [(s.layer, s.keep) for s in made.layers]


# -- Polymorphic -----------------------------------------------------------------------------
def test_polymorphic_llava_7b_and_qwen2_vl(spec_dir: Path) -> None:
    """Tables 1 and 3: layers 3, 7, 16 of LLaVA's 32 and 3, 7, 13 of Qwen2-VL's 28."""
    plan = _load(spec_dir, "paper_polymorphic")
    assert plan.name == "paper_polymorphic"
    models = ("llava-1.5-7b", "qwen2-vl-7b")
    methods = ("fastv", "sparsevlm", "visionzip", "polymorphic")
    _check_grid(plan, models, POLYMORPHIC_BENCHMARKS, methods, "keep_tokens", (192, 128, 64))
    assert len(plan.trials) == 2 * 6 * (1 + 4 * 3)  # 156
    _check_shapes(plan)
    for model, layers in (("llava-1.5-7b", (3, 7, 16)), ("qwen2-vl-7b", (3, 7, 13))):
        info = plan.model_infos[model]
        for budget in (192, 128, 64):
            trial = _trial(plan, model, "polymorphic", keep_tokens=budget)
            method = _method(trial)
            assert method.redundancy == 2.0 and method.layers is None  # the paper's defaults
            assert method.pruning_layers(info.n_layers, info.family) == layers
            made = _plan(plan, trial)
            assert [s.layer for s in made.layers] == list(layers)
            # stage 1 keeps K x budget = 2 x budget (all of Qwen2-VL's 256 when that is more)
            assert (made.vision_keep or info.n_visual) == min(2 * budget, info.n_visual)
    # LLaVA-1.5-7B at 64: 128 after stage 1, then 91 / 64 / 45 from layers 3 / 7 / 16:
    # (3 x 128 + 4 x 91 + 9 x 64 + 16 x 45) / 32 = 2044 / 32 = 63.875 tokens on average
    made = _plan(plan, _trial(plan, "llava-1.5-7b", "polymorphic", keep_tokens=64))
    assert _schedule(made) == (128, [(3, 91), (7, 64), (16, 45)])
    assert plan_average(made, 576, 32) == 63.875
    # Qwen2-VL at 64: 128 of 256, then 90 / 63 / 45 from layers 3 / 7 / 13 of 28
    made = _plan(plan, _trial(plan, "qwen2-vl-7b", "polymorphic", keep_tokens=64))
    assert _schedule(made) == (128, [(3, 90), (7, 63), (13, 45)])


def test_polymorphic_13b_prunes_at_layers_3_7_16_of_40(spec_dir: Path) -> None:
    """Table 2: the paper keeps layers 3, 7, 16 on the 40-layer 13B (the method's default would
    scale them to 4, 9, 20); the preset changes Polymorphic's layers only."""
    plan = _load(spec_dir, "paper_polymorphic_13b")
    methods = ("fastv", "sparsevlm", "visionzip", "polymorphic")
    _check_grid(
        plan, ("llava-1.5-13b",), POLYMORPHIC_BENCHMARKS, methods, "keep_tokens", (192, 128, 64)
    )
    assert len(plan.trials) == 6 * (1 + 4 * 3)  # 78
    _check_shapes(plan)
    assert M.get("polymorphic")().pruning_layers(40, "llava") == (4, 9, 20)  # why the preset
    for trial in plan.trials:
        if trial.method == "polymorphic":
            assert trial.preset == "polymorphic_3_7_16"
            assert trial.hparams["layers"] == [3, 7, 16] and trial.hparams["redundancy"] == 2.0
            assert [s.layer for s in _plan(plan, trial).layers] == [3, 7, 16]
        if trial.method == "sparsevlm":
            assert trial.hparams["layers"] is None  # its own default schedule
    # 64 tokens: 128 after stage 1, then 93 / 68 / 50 from layers 3 / 7 / 16 of 40:
    # (3 x 128 + 4 x 93 + 9 x 68 + 24 x 50) / 40 = 2568 / 40 = 64.2
    made = _plan(plan, _trial(plan, "llava-1.5-13b", "polymorphic", keep_tokens=64))
    assert _schedule(made) == (128, [(3, 93), (7, 68), (16, 50)])
    assert plan_average(made, 576, 40) == pytest.approx(64.2)


def test_polymorphic_llava_next_keeps_640_320_160_of_2880(spec_dir: Path) -> None:
    """Appendix A, Table 7: LLaVA-NeXT-7B (2880 tokens) at 640 / 320 / 160, FastV and
    VisionZip beside Polymorphic; layers 3, 7, 16 of 32."""
    plan = _load(spec_dir, "paper_polymorphic_next")
    assert plan.name == "paper_polymorphic_next"
    methods = ("fastv", "visionzip", "polymorphic")
    _check_grid(
        plan, ("llava-next-7b",), POLYMORPHIC_BENCHMARKS, methods, "keep_tokens", (640, 320, 160)
    )
    assert len(plan.trials) == 6 * (1 + 3 * 3)  # 60
    _check_shapes(plan)
    for budget in (640, 320, 160):
        made = _plan(plan, _trial(plan, "llava-next-7b", "polymorphic", keep_tokens=budget))
        assert made.vision_keep == 2 * budget
        assert [s.layer for s in made.layers] == [3, 7, 16]
    made = _plan(plan, _trial(plan, "llava-next-7b", "polymorphic", keep_tokens=160))
    assert _schedule(made) == (320, [(3, 226), (7, 160), (16, 113)])


def test_polymorphic_k_ablation_and_k_1_is_stage_1_alone(spec_dir: Path) -> None:
    """Table 5's command (in the spec's comment) validates; with K = 1 stage 1 already keeps
    the budget, so no layer step is planned."""
    plan = _load(
        spec_dir,
        "paper_polymorphic",
        ("model=llava-1.5-7b", "method=polymorphic", "method.redundancy=1,1.5,2,2.5,3",
         "keep_tokens=128,64", "benchmark=gqa,textvqa,mme,pope"),
    )  # fmt: skip
    assert len(plan.trials) == 4 * (1 + 5 * 2)  # 44
    _check_shapes(plan)
    for trial in plan.trials:
        if trial.method != "polymorphic":
            continue
        made = _plan(plan, trial)
        k, budget = trial.hparams["redundancy"], trial.keep_tokens
        assert made.vision_keep == round(k * budget)
        assert (made.layers == ()) == (k == 1.0)


# -- InfoPrune -------------------------------------------------------------------------------
def test_infoprune_tables_1_to_3(spec_dir: Path) -> None:
    plan = _load(spec_dir, "paper_infoprune")
    models = ("llava-1.5-7b", "llava-next-7b", "qwen2.5-vl-7b")
    methods = ("fastv", "pdrop", "visionzip", "sparsevlm", "infoprune")
    _check_grid(plan, models, INFOPRUNE_BENCHMARKS, methods, "keep_ratio", INFOPRUNE_RATIOS)
    assert len(plan.trials) == 3 * 9 * (1 + 5 * 3)  # 432
    _check_shapes(plan)
    # Table 1: 192 / 128 / 64 of LLaVA-1.5's 576; Tables 2-3: 22.2% / 11.1% (640 / 320 of 2880)
    assert [round(r * 576) for r in INFOPRUNE_RATIOS] == [192, 128, 64]
    assert [round(r * 2880) for r in INFOPRUNE_RATIOS[1:]] == [640, 320]
    # the Table 3 benchmarks are among the nine, MMBench-CN from its own config
    assert {"mmbench", "mmbench_cn", "mme", "pope", "gqa", "vqav2"} <= set(INFOPRUNE_BENCHMARKS)
    cn = plan.benchmarks["mmbench_cn"]
    assert (cn["kind"], cn["split"]) == ("mmbench", "dev")
    assert Path(cn["path"]).parts[-2:] == ("MMBench", "cn")
    # K = 15 on the 32-layer LLaVAs, 13 on 28-layer Qwen2.5-VL; alpha 2 / 3; R2 = 0.33
    expected = {"llava-1.5-7b": (15, 2.0), "llava-next-7b": (15, 2.0), "qwen2.5-vl-7b": (13, 3.0)}
    for model, (k, alpha) in expected.items():
        info = plan.model_infos[model]
        for ratio in INFOPRUNE_RATIOS:
            trial = _trial(plan, model, "infoprune", keep_ratio=ratio)
            method = _method(trial)
            assert method.rank_layer(info.n_layers) == k
            assert method.pool_factor(info.family) == alpha and method.r2 == 0.33
            made = _plan(plan, trial)
            t1 = made.vision_keep
            assert t1 is not None and [s.layer for s in made.layers] == [k + 1]
            assert made.layers[0].keep == round(0.33 * t1)  # T_2 = R_2 T_1
            # eq. (10): ((K + 1) T_1 + (L - K - 1) T_2) / L within half a token of the budget
            average = plan_average(made, info.n_visual, info.n_layers)
            assert abs(average - ratio * info.n_visual) <= 0.5
    # Table 4 (11.1% = 64 of 576): R_1 = 16.7% (96), R_2 = 33.3% (32): (16 x 96 + 16 x 32) / 32
    made = _plan(plan, _trial(plan, "llava-1.5-7b", "infoprune", keep_ratio=0.11111111))
    assert _schedule(made) == (96, [(16, 32)])
    assert plan_average(made, 576, 32) == 64.0
    # Qwen2.5-VL at 11.1% of 256 (28.4): 43, then 14 from layer 14: (14 x 43 + 14 x 14) / 28
    made = _plan(plan, _trial(plan, "qwen2.5-vl-7b", "infoprune", keep_ratio=0.11111111))
    assert _schedule(made) == (43, [(14, 14)])


# -- PREP ------------------------------------------------------------------------------------
def test_prep_table_1_on_llava_7b(spec_dir: Path) -> None:
    plan = _load(spec_dir, "paper_prep")
    _check_grid(
        plan, ("llava-1.5-7b",), PREP_BENCHMARKS, ("prep",), "keep_tokens", (192, 128, 64, 16)
    )
    assert len(plan.trials) == 9 * (1 + 4)  # 45
    _check_shapes(plan)
    for trial in plan.trials:
        if trial.method != "prep":
            continue
        hp = trial.hparams
        assert (hp["first_layer"], hp["last_layer"], hp["group_size"]) == (6, 15, 64)
        made = _plan(plan, trial)
        assert made.pre_inference is not None
        assert made.pre_inference.candidates == tuple(range(6, 16))  # layers 6-15
        assert made.pre_inference.layers == tuple(range(5, 16))  # Q^{k-1} of the first too
        assert [s.keep for s in made.layers] == [trial.keep_tokens]  # one step: keep m of N


def test_prep_table_2_and_the_baselines_commands(spec_dir: Path) -> None:
    """The spec comment's runs: Table 2 (InternVL3-8B, Qwen2.5-VL-7B at 50% / 25%, layers 6-15
    of 28) and Table 1's baselines (ToMe, FastV, SparseVLM, PDrop at 192 / 128 / 64)."""
    plan = _load(
        spec_dir,
        "paper_prep",
        ("model=internvl3-8b,qwen2.5-vl-7b", "~keep_tokens", "keep_ratio=0.5,0.25",
         "benchmark=" + ",".join(PREP_TABLE2_BENCHMARKS)),
    )  # fmt: skip
    models = ("internvl3-8b", "qwen2.5-vl-7b")
    _check_grid(plan, models, PREP_TABLE2_BENCHMARKS, ("prep",), "keep_ratio", (0.5, 0.25))
    _check_shapes(plan)
    kept = {}
    for trial in plan.trials:
        if trial.method == "prep":
            made = _plan(plan, trial)
            assert made.pre_inference is not None
            assert made.pre_inference.candidates == tuple(range(6, 16))
            kept[trial.model, trial.keep_ratio] = made.layers[0].keep
    # of InternVL3's 1280 (4 tiles + thumbnail) and Qwen2.5-VL's 256 nominal tokens
    assert kept == {
        ("internvl3-8b", 0.5): 640, ("internvl3-8b", 0.25): 320,
        ("qwen2.5-vl-7b", 0.5): 128, ("qwen2.5-vl-7b", 0.25): 64,
    }  # fmt: skip
    baselines = _load(
        spec_dir,
        "paper_prep",
        ("method=none,prep,tome,fastv,sparsevlm,pdrop", "keep_tokens=192,128,64"),
    )
    methods = ("prep", "tome", "fastv", "sparsevlm", "pdrop")
    _check_grid(
        baselines, ("llava-1.5-7b",), PREP_BENCHMARKS, methods, "keep_tokens", (192, 128, 64)
    )
    # PREP's trials at 192 / 128 / 64 are those of the spec's own grid (same keys)
    shipped = {t.key for t in _load(spec_dir, "paper_prep").trials}
    assert {t.key for t in baselines.trials if t.method in ("none", "prep")} <= shipped
    _check_shapes(baselines)


# -- PGP -------------------------------------------------------------------------------------
def test_pgp_on_a_guided_large_model(spec_dir: Path) -> None:
    """The spec's command for a large model guided by its small sibling (here LLaVA-1.5-13B
    guided by LLaVA-1.5-7B; the paper's InternVL2-26B / InternVL2.5-1B are not shipped): the
    paper's Table 1 (keep ratio, L) pairs are among the trials, every L inside the 40 layers."""
    plan = _load(
        spec_dir,
        "paper_pgp",
        ("model=llava-1.5-13b", "prune_layer=0,2,9", "stages.vib.steps=0",
         "stages.vib.limit=null"),
    )  # fmt: skip
    assert {t.model for t in plan.trials} == {"llava-1.5-13b"}
    assert plan.model_infos["llava-1.5-13b"].n_layers == 40
    pgp = [t for t in plan.trials if t.method == "pgp"]
    assert len(plan.trials) == 1 + len(pgp) and len(pgp) == 2 * 3 * 2  # ratios x L x gates
    assert {(t.keep_ratio, t.prune_layer) for t in pgp} >= {(0.2, 9), (0.2, 0), (0.05, 2),
                                                           (0.05, 0)}  # fmt: skip
    assert {t.hparams["gate"] for t in pgp} == {"sigmoid", "exp"}  # Table 4 ablation
    _check_shapes(plan)
    for trial in pgp:
        assert trial.guidance_config is not None
        assert trial.guidance_config["name"] == "llava-1.5-7b"
        assert trial.guidance_config["path"] == str(spec_dir / "checkpoints/llava-1.5-7b")
        assert trial.vib_head is not None
    # one trained head per gate, shared by every budget and layer
    assert len({t.vib_head["key"] for t in pgp if t.vib_head}) == 2


def test_pgp_shipped_grid_keeps_20_and_5_percent() -> None:
    """The shipped file itself (tiny pair, no download): 20% / 5% at L = 0, 2 (layer 9 of the
    paper needs a deeper model, see the command above)."""
    plan = load_sweep("paper_pgp", [])
    pgp = [t for t in plan.trials if t.method == "pgp"]
    assert {t.keep_ratio for t in pgp} == {0.2, 0.05}
    assert {t.prune_layer for t in pgp} == {0, 2}
    assert all(t.prune_layer < plan.model_infos[t.model].n_layers for t in pgp)
    assert {t.guidance_config["name"] for t in pgp if t.guidance_config} == {"tiny-llava-small"}
