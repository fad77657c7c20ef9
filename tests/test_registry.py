"""One registry type for methods, model families and benchmark kinds (``prunelab.registry``):
duplicates rejected, did-you-mean errors, every shipped config's name registered, and new
entries found by the lookups that build trials."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

import prunelab.methods as M
import prunelab.workers.adapters as adapters
from prunelab.registry import Registry, UnknownNameError
from prunelab.sweeps import group_config, group_names
from prunelab.workers.adapters import FAMILIES, FAMILY_MODULES, family_module, family_problem
from prunelab.workers.benchmarks import BENCHMARKS, build_benchmark, register_benchmark


def shipped(group: str, key: str) -> set[str]:
    """The ``key`` field of every shipped ``sweeps/<group>/*.yaml`` config."""
    return {group_config(group, name)[key] for name in group_names(group)}


# -- the registry itself --------------------------------------------------------------------
def test_duplicate_name_is_rejected_naming_both() -> None:
    things: Registry[object] = Registry("thing")
    first, second = object(), object()
    assert things.add("a", first) is first
    assert things.add("a", first) is first  # the same object again: fine
    with pytest.raises(ValueError, match="thing 'a' is already registered by") as info:
        things.register("a")(second)
    assert repr(first) in str(info.value) and repr(second) in str(info.value)
    assert things.get("a") is first
    with pytest.raises(ValueError, match="has no name"):
        things.add("", second)


def test_unknown_name_is_one_line_with_did_you_mean() -> None:
    things: Registry[int] = Registry("thing")
    for i, name in enumerate(("fastv", "tome", "divprune")):
        things.register(name)(i)
    with pytest.raises(UnknownNameError) as info:
        things.get("fastvv")
    assert isinstance(info.value, KeyError)
    assert str(info.value) == (
        "unknown thing 'fastvv'; did you mean 'fastv'? (known: divprune, fastv, tome)"
    )
    with pytest.raises(KeyError) as far:
        things.get("zzz")
    assert str(far.value) == "unknown thing 'zzz' (known: divprune, fastv, tome)"


def test_names_items_contains_and_lazy_load() -> None:
    calls: list[int] = []
    things: Registry[int] = Registry("thing", load=lambda: (calls.append(1), things.add("b", 2)))
    things.add("a", 1)
    assert calls == []  # registering does not load
    assert "b" in things and "c" not in things and ["b"] not in things
    assert things.names() == ["a", "b"] and things.items() == [("a", 1), ("b", 2)]
    assert calls == [1]  # loaded once, on the first lookup
    assert things.unregister("b") == 2 and things.names() == ["a"]


# -- methods --------------------------------------------------------------------------------
def test_every_shipped_method_is_registered() -> None:
    assert shipped("method", "name") == set(M.available())


def test_unknown_method_message_is_unchanged() -> None:
    with pytest.raises(M.UnknownMethodError) as info:
        M.get("fastvv")
    assert isinstance(info.value, UnknownNameError)
    assert str(info.value) == (
        f"unknown method 'fastvv'; did you mean 'fastv'? (known: {', '.join(M.available())})"
    )


@dataclass(frozen=True)
class Throwaway(M.PruningMethod):
    name: ClassVar[str] = "test-throwaway"

    def plan(self, ctx: M.PlanContext) -> M.Plan:
        return M.Plan()


@pytest.fixture
def throwaway_method() -> Iterator[type[M.PruningMethod]]:
    M.register(Throwaway)
    yield Throwaway
    M.METHODS.unregister(Throwaway.name)


def test_a_new_method_is_found(throwaway_method: type[M.PruningMethod]) -> None:
    assert M.get("test-throwaway") is throwaway_method
    assert "test-throwaway" in M.available()


def test_throwaway_method_is_gone_again() -> None:
    assert "test-throwaway" not in M.available()


def test_only_pgp_needs_a_trained_head() -> None:
    trained = {name for name, cls in M.METHODS.items() if isinstance(cls(), M.TrainedHeadMethod)}
    assert trained == {"pgp"}
    pgp: Any = M.get("pgp")()
    assert isinstance(pgp, M.TrainedHeadMethod)
    assert pgp.stage == "vib" and "stage" not in pgp.head_hparams()


# -- model families -------------------------------------------------------------------------
def test_every_shipped_family_is_registered() -> None:
    assert shipped("model", "family") == set(FAMILIES.names())


def test_family_modules_provide_the_family_interface() -> None:
    for family, name in FAMILIES.items():
        module = family_module(family)
        assert module.__name__ == name
        for attr in ("adapter_class", "tiny_config", "build_tiny", "from_pretrained", "model_info"):
            assert callable(getattr(module, attr)), (family, attr)
    assert family_module("qwen2_5_vl") is family_module("qwen2_vl")
    with pytest.raises(ValueError, match=r"family='lava': expected one of .*'llava'\?$"):
        family_module("lava")


def test_the_family_table_matches_the_modules() -> None:
    """Every family module of the package has its line in ``FAMILY_MODULES`` (a module added
    without one fails here), and each line names the module whose adapter is that family's."""
    modules = {m.name for m in pkgutil.iter_modules(adapters.__path__)}
    family_modules = {m for m in modules if m != "base" and not m.startswith("_")}
    assert family_modules == set(FAMILY_MODULES.values())
    assert set(FAMILY_MODULES) == set(FAMILIES.names())
    for family, module in FAMILY_MODULES.items():
        assert family_module(family).adapter_class(family).family == family, (family, module)


def test_families_are_known_without_importing_their_modules() -> None:
    """Validating and listing families imports no family module (nor torch or transformers);
    :func:`family_module` imports the module of the family it is asked for, and that module
    imports no transformers (its functions that build or load a model do)."""
    code = textwrap.dedent(
        """
        import json, sys
        from prunelab.workers.adapters import FAMILIES, family_module, family_problem

        def loaded():
            watched = ("torch", "transformers")
            return sorted(
                m for m in sys.modules if m.startswith("prunelab.workers.adapters.") or m in watched
            )

        assert family_problem("llava") is None and "qwen2_5_vl" in FAMILIES.names()
        assert "did you mean 'llava'" in family_problem("lava")
        known = loaded()
        family_module("llava")
        print(json.dumps([known, loaded()]))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    known, after_llava = json.loads(result.stdout.splitlines()[-1])
    assert known == []
    assert "transformers" not in after_llava
    assert [m for m in after_llava if m.startswith("prunelab.")] == [
        "prunelab.workers.adapters.base",
        "prunelab.workers.adapters.llava",
    ]
    assert family_problem("lava") == (
        "family='lava': expected one of internvl, llava, llava_next, qwen2_5_vl, qwen2_vl; "
        "did you mean 'llava'?"
    )


# -- benchmarks -----------------------------------------------------------------------------
def test_every_shipped_benchmark_kind_is_registered() -> None:
    assert shipped("benchmark", "kind") == set(BENCHMARKS.names())


@dataclass
class ThrowawayBenchmark:
    kind: ClassVar[str] = "test-throwaway"
    name: str = "throwaway"
    metric: str = "exact_match"


@pytest.fixture
def throwaway_benchmark() -> Iterator[type]:
    register_benchmark(ThrowawayBenchmark)
    yield ThrowawayBenchmark
    BENCHMARKS.unregister(ThrowawayBenchmark.kind)


def test_a_new_benchmark_kind_is_built(throwaway_benchmark: type) -> None:
    bench = build_benchmark({"kind": "test-throwaway", "name": "mine"})
    assert isinstance(bench, throwaway_benchmark) and bench.name == "mine"
    with pytest.raises(ValueError, match=r"benchmark 'mine': .*unexpected keyword"):
        build_benchmark({"kind": "test-throwaway", "name": "mine", "colour": "red"})


def test_unknown_benchmark_kind_suggests() -> None:
    with pytest.raises(ValueError, match=r"benchmark kind='popee': expected one of .*'pope'\?$"):
        build_benchmark({"kind": "popee"})
    assert "test-throwaway" not in BENCHMARKS
