"""The validation report: every problem of a spec, one line each, naming the value and where it
came from (``keep_ratio=2 in sweeps/x.yaml grid: must be in (0, 1]``).

The spec modules only gather problems; the rules live with the objects they describe
(``Budget``, a method's ``from_hparams`` / ``plan_problem``, the config schema's
``range_problems``, a model or benchmark config's own checks).
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NoReturn

__all__ = [
    "COMMAND_LINE",
    "NOT_FINITE",
    "Problems",
    "SpecError",
    "did_you_mean",
    "first_line",
    "is_finite",
    "non_finite",
    "one_line",
    "shorten",
    "show",
]

COMMAND_LINE = "from the command line"
NOT_FINITE = "must be a finite number"
"""The problem of a NaN or infinity anywhere in a spec: no trial key (JSON) can hold one."""


class SpecError(ValueError):
    """A sweep spec or its overrides are invalid; ``problems`` holds one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class Problems:
    """Problem lines in the order found, each once.

    A ``skippable`` problem rejects one grid point alone (a layer or budget a method cannot
    reach on a model, a hyperparameter combination): ``--skip-invalid`` drops that point and
    runs the rest. Every other problem (a bad value, an unknown name, a missing axis) stops
    the sweep.
    """

    def __init__(self) -> None:
        self._lines: dict[str, bool] = {}  # line -> skippable

    def add(self, line: str, *, skippable: bool = False) -> None:
        self._lines[line] = self._lines.get(line, True) and skippable

    def __bool__(self) -> bool:
        return bool(self._lines)

    def lines(self) -> list[str]:
        return list(self._lines)

    def skippable(self) -> list[str]:
        """The problems that reject one grid point each."""
        return [line for line, skip in self._lines.items() if skip]

    def raise_if_any(self, skip_invalid: bool = False) -> list[str]:
        """Raise :class:`SpecError` with every problem; with ``skip_invalid``, only when some
        problem is not skippable, else return the skipped points' problems."""
        if skip_invalid and all(self._lines.values()):
            return self.lines()
        if self._lines:
            raise SpecError(self.lines())
        return []

    def fatal(self, line: str) -> NoReturn:
        """Record a problem that stops planning and raise everything found so far."""
        self.add(line)
        raise SpecError(self.lines())


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, sorted(set(candidates)), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def show(value: Any) -> str:
    """A value as a user would write it in an override."""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # nan, inf, -inf: as written in an override
    return json.dumps(value, default=str)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def one_line(exc: BaseException, limit: int = 300) -> str:
    """All of an exception's message on one line (shortened past ``limit`` characters)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = text or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shorten(text: str, limit: int = 60) -> str:
    """``text``, or its start and its length when longer than ``limit`` characters."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def is_finite(value: Any) -> bool:
    """False for a float NaN or infinity, recursively inside lists and mappings."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(is_finite(v) for v in value)
    if isinstance(value, dict):
        return all(is_finite(v) for v in value.values())
    return True


def non_finite(tree: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """The dotted paths (``grid.keep_ratio``, ``stages.vib.lr``, ``a.0``) and values of the NaNs
    and infinities in a tree of plain containers."""
    if isinstance(tree, float) and not math.isfinite(tree):
        yield prefix, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from non_finite(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            yield from non_finite(value, f"{prefix}.{index}" if prefix else str(index))
