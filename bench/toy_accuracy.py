"""Accuracy of every pruning method on the shipped, trained ``toy-llava`` at three keep ratios.

    python bench/toy_accuracy.py [--limit N] [--ratios 0.5,0.222,0.111] [--methods a,b]
                                 [--model toy-llava] [--benchmark scenes|shapes]
                                 [--budget-mode own|kept|average] [--prune-layer K]
                                 [--vision-positions packed|original] [--by-category]
                                 [--compare fastv@0.5] [--vib-steps N] [--vib-limit N]

Loads ``toy-llava`` (and its guidance model ``toy-llava-small`` for guidance methods) through
``load_model`` — the same ``from_pretrained`` path as real models — and runs each registered
method that supports the ``llava`` family through ``runner.run_trial`` on ``limit`` samples of
the test split of the benchmark the model was trained on (its ``training.json``; the same
samples for every trial: ``sample_seed`` 0), at each keep ratio, with the method's default
pruning layer (or ``--prune-layer``) and seed 0. ``--budget-mode`` counts the budget as each
method's own way (default), as tokens kept, or as the average over the LLM's layers (single-stage
methods solve their kept count; a budget out of reach at their layer prints ``n/a``).

Prints a markdown table of the exact-match score (%) with its 95% bootstrap interval and the
average visual tokens over the LLM layers per method and ratio, and the unpruned score; with
``--by-category`` one table per ratio by question category too. ``--compare M@R`` prints, per
category, method M at keep ratio R (budget averaged over the layers) next to the query-agnostic
methods (random, divprune, visionzip, ...) at the same average. A budget a method cannot reach
on the model prints ``n/a``, any other failure ``error``, each with the reason. Measured, never
asserted.

``pgp`` needs a trained VIB head: before the trials the bench trains one, once, in this process
on the guidance model (``toy-llava-small``) with ``prunelab.workers.vib.train_vib`` and the
training config a sweep's ``vib`` stage would build (``head_spec``: pgp's default head
hyperparameters, the stage defaults but ``limit``), on the ``shapes`` *train* split only, and
binds it to every pgp trial as ``vib_head.state``. The default is the paper's recipe, one epoch
over the training data (LoRA on the small VLM's q/v, two-layer MLP head, learnable prior, β
warm-up 0.2 -> 0.5 over γ = 100 steps; batch 4 and lr 1e-4 are the stage defaults, the paper's
values being in its unavailable supplementary): here the whole 1000-sample train split, 250
steps, measured 12 s on the shared 2-core machine lightly loaded and 83 s with other jobs
running. ``--vib-steps N`` stops after N steps, ``--vib-limit N`` trains on a seeded subset of
the train split. The head's training time, steps and final loss are printed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import prunelab.methods as methods
from prunelab.orchestrator.config import EvalConfig
from prunelab.orchestrator.vib_stage import head_spec
from prunelab.sweeps import group_config
from prunelab.trial import Trial
from prunelab.workers.adapters import adapter_for
from prunelab.workers.models import load_model
from prunelab.workers.runner import ReferenceCache, run_trial
from prunelab.workers.vib import train_vib

RATIOS = (0.5, 0.222, 0.111)
VIB_STEPS = 0  # pgp head training steps; 0: one epoch (the paper), 250 steps on the train split
QUERY_AGNOSTIC = ("random", "visionzip", "divprune", "prumerge_plus", "tome", "dpc")
"""Methods whose selection does not read the question (compared with ``--compare``)."""


def trained_on(model: str) -> str:
    """The benchmark a shipped toy model was trained on (its ``training.json``), else shapes."""
    from prunelab.workers.models import resolve_builtin

    path = group_config("model", model).get("path") or ""
    record = Path(resolve_builtin(path)) / "training.json" if path.startswith("builtin:") else None
    if record is None or not record.is_file():
        return "shapes"
    return json.loads(record.read_text())["config"].get("benchmark", "shapes")


def trial(
    model: str,
    method: str,
    limit: int,
    ratio: float | None,
    benchmark: str = "shapes",
    budget_mode: str | None = None,
    prune_layer: int | None = None,
    vision_positions: str | None = None,
) -> Trial:
    """A trial on the benchmark's test split (the method's default layer unless
    ``prune_layer``, seed 0, no heatmaps; batches of 8 where the method batches, which gives
    the outputs of batch 1: ``tests/workers/test_batched_eval.py``)."""
    cls = methods.get(method)
    layer = None
    if cls.uses_layer:
        layer = cls.default_prune_layer if prune_layer is None else prune_layer
    return Trial(
        model=model,
        benchmark=benchmark,
        method=method,
        hparams={},
        keep_ratio=ratio if cls.uses_budget else None,
        prune_layer=layer,
        seed=0 if cls.uses_seed else None,
        budget_mode=budget_mode if cls.uses_budget else None,
        vision_positions=vision_positions if cls.uses_budget else None,
        model_config=group_config("model", model),
        benchmark_config={"name": benchmark, "kind": benchmark, "split": "test"},
        eval=EvalConfig(
            limit=limit, sample_seed=0, max_new_tokens=3, warmup=0, heatmaps=0, batch_size=8
        ),
    )


def train_head(
    guide: tuple[Any, Any], guide_name: str, steps: int, limit: int | None, benchmark: str
) -> dict:
    """Train pgp's VIB head once on the guide (the benchmark's train split) and print what it
    cost; the ``vib_head`` entry to put in pgp trial configs."""
    method = methods.get("pgp")()
    settings = {"split": "train", "steps": steps, "limit": limit}
    spec = head_spec(
        "vib",
        settings,
        group_config("model", guide_name),
        guide[0].info.revision,
        group_config("benchmark", benchmark),
        method.head_hparams(),  # type: ignore[attr-defined]
    )
    train = spec["train"]
    assert train["benchmark"]["split"] == "train"  # never the test split
    pool = "all" if train["limit"] is None else train["limit"]
    length = f"{train['steps']} steps" if train["steps"] else "one epoch"
    print(
        f"pgp: training the VIB head on {guide_name} ({benchmark} "
        f"{train['benchmark']['split']} split, "
        f"{pool} samples, {length}, "
        f"batch {train['batch_size']}, lr {train['lr']:g}, LoRA rank {method.lora_rank} "
        f"alpha {train['lora_alpha']:g}, beta {method.tau_min:g}->{method.tau_max:g} over "
        f"{method.warmup_steps} steps) ...",
        flush=True,
    )
    result = train_vib(train, loaded=guide)
    last = result.losses[-1]
    tail = result.losses[-10:]
    print(
        f"pgp: VIB head trained in {result.seconds:.1f} s, {len(result.losses)} steps "
        f"({len(result.losses) * train['batch_size']} samples); final step loss "
        f"{last['loss']:.4f} (ce {last['ce']:.4f}, kl {last['kl']:.4f}, beta {last['beta']:.3f}); "
        f"mean of the last {len(tail)} steps {sum(r['loss'] for r in tail) / len(tail):.4f}; "
        f"eval loss ({train['eval_samples']} train samples, beta {method.tau_max:g}) "
        f"{result.eval_before:.4f} -> {result.eval_after:.4f}",
        flush=True,
    )
    return {"key": spec["key"], "state": result.blob}


def _by_category(predictions: list[dict[str, Any]], categories: list[str]) -> dict[str, float]:
    result = {}
    for category in categories:
        scores = [p["score"] for p in predictions if p["category"] == category]
        result[category] = 100 * sum(scores) / len(scores) if scores else float("nan")
    return result


def _cell(metrics: dict[str, float]) -> str:
    """``score [low, high] (average tokens)``."""
    low, high = metrics.get("score_ci_low"), metrics.get("score_ci_high")
    interval = "" if low is None or high is None else f" [{low:.1f}, {high:.1f}]"
    kept = metrics.get("avg_visual_tokens", float("nan"))
    return f"{metrics['score']:.1f}{interval} ({kept:.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy-llava")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--ratios", default=",".join(str(r) for r in RATIOS))
    parser.add_argument("--methods", default="", help="comma-separated (default: all)")
    parser.add_argument("--benchmark", default=None, help="default: what the model learned")
    parser.add_argument("--budget-mode", choices=("own", "kept", "average"), default="own")
    parser.add_argument("--prune-layer", type=int, default=None, help="layer methods' layer")
    parser.add_argument("--vision-positions", choices=("packed", "original"), default=None)
    parser.add_argument("--by-category", action="store_true")
    parser.add_argument(
        "--compare",
        default="",
        help="M@R: method M at keep ratio R against the query-agnostic methods, per category, "
        "every budget averaged over the LLM's layers",
    )
    parser.add_argument(
        "--vib-steps",
        type=int,
        default=VIB_STEPS,
        help=f"pgp head training steps (default {VIB_STEPS}; 0: one epoch over --vib-limit)",
    )
    parser.add_argument(
        "--vib-limit",
        type=int,
        default=None,
        help="pgp head training samples, a seeded subset of the train split (default: all)",
    )
    args = parser.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    benchmark = args.benchmark or trained_on(args.model)
    mode = None if args.budget_mode == "own" else args.budget_mode
    categories = sorted(
        {s.category for s in _bench_samples(benchmark, args.limit)}, key=_category_order
    )

    def make(name: str, ratio: float | None, **extra: Any) -> Trial:
        axes = {"budget_mode": mode, "prune_layer": args.prune_layer}
        axes.update(extra)
        return trial(
            args.model, name, args.limit, ratio, benchmark,
            vision_positions=args.vision_positions, **axes,
        )  # fmt: skip

    model_cfg = group_config("model", args.model)
    loaded = load_model(model_cfg)
    adapter = adapter_for(loaded)
    guide = None
    if model_cfg.get("guidance"):
        guide_loaded = load_model(group_config("model", model_cfg["guidance"]))
        guide = (guide_loaded, adapter_for(guide_loaded))
    names = args.methods.split(",") if args.methods else methods.available()
    references = ReferenceCache()

    start = time.perf_counter()
    vib_head = None
    if "pgp" in names and guide is not None:
        vib_head = train_head(
            guide, model_cfg["guidance"], args.vib_steps, args.vib_limit, benchmark
        )

    base = run_trial(loaded, adapter, make("none", None), references)
    rows: list[tuple[str, list[str], list[dict[str, float]]]] = []
    for name in names:
        cls = methods.get(name)
        reason = cls().unsupported(loaded.spec.family)
        if name == "none" or reason is not None:
            if reason is not None:
                print(f"skip {name}: {reason}")
            continue
        cells, cats = [], []
        for ratio in ratios:
            planned = make(name, ratio)
            if name == "pgp" and vib_head is not None:
                planned = planned.with_head(vib_head)  # as the orchestrator attaches it
            try:
                out = run_trial(
                    loaded,
                    adapter,
                    planned,
                    references,
                    guide=guide if cls.needs_guidance else None,
                )
            except Exception as exc:  # report and go on: a bench, not a test
                # e.g. a multi-stage budget out of reach of a 4-layer LLM, or pgp on a model
                # without a guidance model
                cells.append("n/a" if "out of reach" in str(exc) else "error")
                cats.append({})
                print(f"{name} @ {ratio}: {type(exc).__name__}: {exc}")
                continue
            cells.append(_cell(out.metrics))  # score already in % (runner.aggregate)
            cats.append(_by_category(out.predictions, categories))
        rows.append((name, cells, cats))
        print(f"{name}: {' | '.join(cells)}  [{time.perf_counter() - start:.0f} s]", flush=True)

    n_visual = loaded.info.n_visual
    print()
    print(
        f"{args.model} on {benchmark} (test split, {args.limit} samples); exact match % "
        f"[95% bootstrap interval] (average visual tokens over LLM layers, of {n_visual}); "
        f"budget counted: {args.budget_mode}; unpruned: {_cell(base.metrics)}"
    )
    print()
    header = " | ".join(f"keep {r:g}" for r in ratios)
    print(f"| method | {header} |")
    print("|---|" + "---|" * len(ratios))
    unpruned = _cell(base.metrics)
    print(f"| none | {' | '.join(unpruned for _ in ratios)} |")
    for name, cells, _ in rows:
        print(f"| {name} | {' | '.join(cells)} |")
    if args.by_category:
        base_cat = _by_category(base.predictions, categories)
        print()
        print("unpruned by category: " + ", ".join(f"{k} {v:.1f}" for k, v in base_cat.items()))
        for ratio_index, ratio in enumerate(ratios):
            print()
            print(f"keep {ratio:g}: | method | " + " | ".join(categories) + " |")
            for name, _, cats in rows:
                cat = cats[ratio_index]
                values = " | ".join(f"{cat.get(c, float('nan')):.1f}" for c in categories)
                print(f"| {name} | {values} |")
    if args.compare:
        compare(args.compare, make, loaded, adapter, references, guide, categories, names)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


def compare(
    spec: str,
    make: Any,
    loaded: Any,
    adapter: Any,
    references: ReferenceCache,
    guide: Any,
    categories: list[str],
    names: list[str],
) -> None:
    """``M@R``: method M and the query-agnostic methods at keep ratio R, every budget averaged
    over the LLM's layers (equal average visual tokens), per category."""
    method, _, ratio_text = spec.partition("@")
    ratio = float(ratio_text)
    others = [m for m in QUERY_AGNOSTIC if m in names and m in methods.available()]
    print()
    print(f"{method} vs query-agnostic methods at an average of {ratio:g} of the visual tokens")
    print("| method | avg tokens | " + " | ".join(categories) + " | all |")
    print("|---|---:|" + "---:|" * (len(categories) + 1))
    for name in [method, *others]:
        cls = methods.get(name)
        planned = make(name, ratio, budget_mode="average")
        try:
            out = run_trial(
                loaded, adapter, planned, references,
                guide=guide if cls.needs_guidance else None,
            )  # fmt: skip
        except Exception as exc:  # a bench, not a test
            print(f"| {name} | n/a: {exc} |")
            continue
        cats = _by_category(out.predictions, categories)
        values = " | ".join(f"{cats[c]:.1f}" for c in categories)
        print(
            f"| {name} | {out.metrics['avg_visual_tokens']:.1f} | {values} | {_cell(out.metrics)} |"
        )


def _bench_samples(benchmark: str, limit: int) -> list[Any]:
    from prunelab.workers.benchmarks import build_benchmark

    bench = build_benchmark({"name": benchmark, "kind": benchmark, "split": "test"})
    return bench.samples(min(limit, 60), 0)


def _category_order(category: str) -> int:
    order = ("color", "shape", "position", "relation", "count", "exist")
    return order.index(category) if category in order else len(order)


if __name__ == "__main__":
    main()
