"""Every benchmark case: the case families of bench/cases_*.py, and the cases tests and experiments `register`.

This module sits above the families (they import bench.registry for the case type; the registry imports none
of them), so bench/__main__.py and the tests read the full list from here.
"""

from __future__ import annotations

import importlib

from bench import registry
from bench.registry import Case

FAMILIES = ("step", "kernels", "gemm", "harvest", "sweep")
"""The case families, in the order their cases are listed: bench/cases_<family>.py, each with a function
`cases() -> list[Case]`. Adding a family is adding its name here."""

_EXTRA: dict[str, Case] = {}


def register(case: Case) -> Case:
    """Add a case (tests inject deliberately wrong implementations this way); replaces one of the same name."""
    _EXTRA[case.name] = case
    return case


def unregister(name: str) -> None:
    _EXTRA.pop(name, None)


def all_cases() -> list[Case]:
    """Every case of every family, and the registered ones, ordered by size, op, impl (the order the runner goes
    through them)."""
    found = {c.name: c for family in FAMILIES for c in importlib.import_module(f"bench.cases_{family}").cases()}
    found.update(_EXTRA)
    return sorted(found.values(), key=Case.order)


def select(patterns: list[str] | None, profile: str) -> list[Case]:
    """`registry.select` over `all_cases()`: the cases matching any glob pattern, or the profile's default."""
    return registry.select(all_cases(), patterns, profile)
