"""Accuracy of every pruning method on the shipped, trained ``toy-llava`` at three keep ratios.

    python bench/toy_accuracy.py [--limit N] [--ratios 0.5,0.222,0.111] [--methods a,b]
                                 [--model toy-llava] [--by-category]

Loads ``toy-llava`` (and its guidance model ``toy-llava-small`` for guidance methods) through
``load_model`` — the same ``from_pretrained`` path as real models — and runs each registered
method that supports the ``llava`` family through ``runner.run_trial`` on ``limit`` samples of
the ``shapes`` test split (the same samples for every trial: ``sample_seed`` 0), at each keep
ratio, with the method's default pruning layer and seed 0. Prints a markdown table of the
exact-match score (%) per method and ratio (with the average visual tokens over the LLM
layers), and the unpruned score; with ``--by-category`` one table per ratio by question
category too. A budget a method cannot reach on the model (multi-stage methods whose first stage
follows an unpruned layer) prints ``n/a``, any other failure ``error``, each with the reason.
Measured, never asserted.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import prunelab.methods as methods
from prunelab.sweeps import group_config
from prunelab.workers.adapters import adapter_for
from prunelab.workers.models import load_model
from prunelab.workers.runner import ReferenceCache, run_trial

RATIOS = (0.5, 0.222, 0.111)
CATEGORIES = ("color", "shape", "count", "exist")


def trial(model: str, method: str, limit: int, ratio: float | None) -> dict[str, Any]:
    """A trial config as the orchestrator sends it, on the shapes test split."""
    cls = methods.get(method)
    config: dict[str, Any] = {
        "model": model,
        "model_config": group_config("model", model),
        "benchmark": "shapes",
        "benchmark_config": {"name": "shapes", "kind": "shapes", "split": "test"},
        "method": method,
        "hparams": {},
        "eval": {
            "limit": limit,
            "sample_seed": 0,
            "max_new_tokens": 3,
            "warmup": 0,
            "fidelity": True,
            "flops_convention": "pdrop",
        },
    }
    if cls.uses_budget and ratio is not None:
        config["keep_ratio"] = ratio
    if cls.uses_layer:
        config["prune_layer"] = cls.default_prune_layer
    if cls.uses_seed:
        config["seed"] = 0
    return config


def _by_category(predictions: list[dict[str, Any]]) -> dict[str, float]:
    result = {}
    for category in CATEGORIES:
        scores = [p["score"] for p in predictions if p["category"] == category]
        result[category] = 100 * sum(scores) / len(scores) if scores else float("nan")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy-llava")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--ratios", default=",".join(str(r) for r in RATIOS))
    parser.add_argument("--methods", default="", help="comma-separated (default: all)")
    parser.add_argument("--by-category", action="store_true")
    args = parser.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]

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
    base = run_trial(loaded, adapter, trial(args.model, "none", args.limit, None), references)
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
            config = trial(args.model, name, args.limit, ratio)
            try:
                out = run_trial(
                    loaded,
                    adapter,
                    config,
                    references,
                    guide=guide if cls.needs_guidance else None,
                )
            except Exception as exc:  # report and go on: a bench, not a test
                # e.g. a multi-stage budget out of reach of a 4-layer LLM, or pgp without a
                # trained VIB head
                cells.append("n/a" if "out of reach" in str(exc) else "error")
                cats.append({})
                print(f"{name} @ {ratio}: {type(exc).__name__}: {exc}")
                continue
            score = out.metrics["score"]  # already in % (runner.aggregate)
            kept = out.metrics.get("avg_visual_tokens", float("nan"))
            cells.append(f"{score:.1f} ({kept:.1f})")
            cats.append(_by_category(out.predictions))
        rows.append((name, cells, cats))
        print(f"{name}: {' | '.join(cells)}  [{time.perf_counter() - start:.0f} s]", flush=True)

    n_visual = loaded.info.n_visual
    print()
    print(
        f"{args.model} on shapes (test split, {args.limit} samples); exact match % "
        f"(average visual tokens over LLM layers, of {n_visual}); "
        f"unpruned: {base.metrics['score']:.1f}"
    )
    print()
    header = " | ".join(f"keep {r:g}" for r in ratios)
    print(f"| method | {header} |")
    print("|---|" + "---|" * len(ratios))
    unpruned = f"{base.metrics['score']:.1f} ({n_visual})"
    print(f"| none | {' | '.join(unpruned for _ in ratios)} |")
    for name, cells, _ in rows:
        print(f"| {name} | {' | '.join(cells)} |")
    if args.by_category:
        base_cat = _by_category(base.predictions)
        print()
        print("unpruned by category: " + ", ".join(f"{k} {v:.1f}" for k, v in base_cat.items()))
        for ratio_index, ratio in enumerate(ratios):
            print()
            print(f"keep {ratio:g}: | method | " + " | ".join(CATEGORIES) + " |")
            for name, _, cats in rows:
                cat = cats[ratio_index]
                values = " | ".join(f"{cat.get(c, float('nan')):.1f}" for c in CATEGORIES)
                print(f"| {name} | {values} |")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
