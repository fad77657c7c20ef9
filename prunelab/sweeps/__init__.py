"""Hydra config groups (model/, method/, benchmark/) and ready sweep specs, shipped as data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

__all__ = ["SWEEPS_DIR", "group_config", "group_names"]

SWEEPS_DIR = Path(__file__).resolve().parent


def group_names(group: str) -> list[str]:
    """Names of the configs in a group (``model``, ``method``, ``benchmark``)."""
    return sorted(p.stem for p in (SWEEPS_DIR / group).glob("*.yaml"))


def group_config(group: str, name: str) -> dict[str, Any]:
    """The YAML mapping of ``<group>/<name>.yaml``; FileNotFoundError if there is none."""
    return yaml.safe_load((SWEEPS_DIR / group / f"{name}.yaml").read_text())
