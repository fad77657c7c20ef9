"""The validation report: every problem of a spec, one line each, naming the value and where it
came from (``keep_ratio=2 in sweeps/x.yaml grid: must be in (0, 1]``).

The spec modules only gather problems; the rules live with the objects they describe
(``Budget``, a method's ``from_hparams`` / ``plan_problem``, the config schema's
``range_problems``, a model or benchmark config's own checks).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn

__all__ = [
    "COMMAND_LINE",
    "Problems",
    "SpecError",
    "did_you_mean",
    "first_line",
    "one_line",
    "show",
]

COMMAND_LINE = "from the command line"


class SpecError(ValueError):
    """A sweep spec or its overrides are invalid; ``problems`` holds one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class Problems:
    """Problem lines in the order found, each once."""

    def __init__(self) -> None:
        self._lines: dict[str, None] = {}

    def add(self, line: str) -> None:
        self._lines[line] = None

    def __bool__(self) -> bool:
        return bool(self._lines)

    def lines(self) -> list[str]:
        return list(self._lines)

    def raise_if_any(self) -> None:
        if self._lines:
            raise SpecError(self.lines())

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
    return json.dumps(value, default=str)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def one_line(exc: BaseException, limit: int = 300) -> str:
    """All of an exception's message on one line (shortened past ``limit`` characters)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = text or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
