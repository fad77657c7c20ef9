"""Time validating a large grid: ``load_sweep`` (compose, expand, dedupe, check and plan every
trial, each with its trial key) on the quickstart spec with one 10,000-value axis.

    python bench/validate_grid.py [--values N] [--repeats N] [--choice-list]

The grid is ``method=random keep_ratio=0.5 seed=range(0,N)``: N random-pruning trials plus
the unpruned baseline, every one a distinct trial key. ``--choice-list`` writes the seeds as a
choice list (``seed=0,1,2,...``) instead of ``range()``, which goes through Hydra's parser
value by value. Nothing is written anywhere: validation only reads the spec and its configs.
Prints the time of each repeat (after one untimed warm-up that loads the model and benchmark
configs once, as a fresh process would) and the best; the goal is under 10 s for N = 10,000.
The numbers are measured, never asserted on.
"""

from __future__ import annotations

import argparse
import time

from prunelab.orchestrator.spec import load_sweep


def overrides(values: int, choice_list: bool) -> list[str]:
    seeds = ",".join(str(i) for i in range(values)) if choice_list else f"range(0,{values})"
    return ["method=random", "keep_ratio=0.5", f"seed={seeds}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", type=int, default=10_000, help="values of the seed axis")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--choice-list", action="store_true", help="seed=0,1,... not range()")
    args = parser.parse_args()

    start = time.perf_counter()
    load_sweep("quickstart", ["eval.limit=4"])  # imports, Hydra, the group configs
    print(f"warm-up (a 7-trial grid, first load): {time.perf_counter() - start:.2f} s")
    grid = overrides(args.values, args.choice_list)
    form = "choice list" if args.choice_list else "range()"
    times = []
    for repeat in range(args.repeats):
        start = time.perf_counter()
        plan = load_sweep("quickstart", grid)
        times.append(time.perf_counter() - start)
        print(f"repeat {repeat + 1}: {len(plan.trials):,} trials validated in {times[-1]:.2f} s")
    print(
        f"seed axis of {args.values:,} values ({form}): best {min(times):.2f} s, "
        f"{min(times) / len(plan.trials) * 1e6:.0f} us per trial (goal: under 10 s)"
    )


if __name__ == "__main__":
    main()
