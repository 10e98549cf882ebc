"""Benchmark cases: their type, named `<op>/<size>/<impl>`, the SAE sizes, and their selection by glob patterns.

A case is one implementation of one op at one size. Its `check` compares the implementation with the
PyTorch reference (bench/checks.py); its `prepare` builds what is timed. The runner (bench/runner.py) refuses
to time a case whose check fails. The case families live in bench/cases_*.py, below this module; the list
of them is bench/catalog.py, above them (tests and experiments add their own cases there, by `register`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

from bench.shapes import HARVEST_SIZES, SAE_SIZES, BenchDtype

if TYPE_CHECKING:
    from bench.checks import Check
    from bench.env import Env

OP_ORDER = ("harvest", "sweep", "step", "encode", "threshold-grad", "decode")
IMPL_ORDER = (
    "triton",
    "reference",
    "compile",
    "triton-bf16",
    "reference-bf16",
    "compile-bf16",
    "bare",
    "harvester",
    "harvester+train",
)
Profile = Literal["cuda", "cpu", "quick"]
PROFILES: tuple[str, ...] = get_args(Profile)
Needs = Literal["triton", "compile", "torch"]
"""What a case runs on: Triton kernels (compiled on CUDA, interpreted and untimed on the CPU), torch.compile, or
plain PyTorch."""
_DEFAULT_PROFILES = {
    "offline": ("cuda", "cpu", "quick"),
    "16k": ("cuda",),
    "65k": ("cuda",),
    "262k": ("cuda",),
    "1m": ("cuda",),
}


def profiles_for(size: str, impl: str = "") -> frozenset[str]:
    """Default selections of an SAE size: the offline size everywhere, the Gemma-2 widths on CUDA only; the 16-bit
    impls (`-bf16`, `-fp16`) on CUDA only (the performance targets' precision; Triton's interpreter cannot read
    bf16); torch.compile only up to 65536 latents (compiling costs about a minute per op and shape, and the dense
    reference it compiles does not fit in memory at 2^20 latents): select the wider ones by name."""
    if impl.startswith("compile") and size in ("262k", "1m"):
        return frozenset()
    profiles = frozenset(_DEFAULT_PROFILES.get(size, ()))
    return profiles & {"cuda"} if impl.endswith(("-bf16", "-fp16")) else profiles


@dataclass(frozen=True)
class Case:
    op: str
    size: str
    impl: str
    check: Callable[[Env], Check]
    """Run the implementation and the reference on check inputs; never raises for a mismatch."""
    prepare: Callable[[Env], Any]
    """Build the timed workload (a bench.runner.Workload) at the case's full size."""
    profiles: frozenset[Profile] = field(default_factory=frozenset)
    """Default selections that include the case: "cuda", "cpu" (full profiles), "quick"."""
    needs: Needs = "torch"
    """"triton" (kernels: compiled on CUDA, interpreted and untimed on the CPU), "compile", or "torch"."""
    baselines: tuple[str, str | None] = ("reference", "compile")
    """Impls of the same op and size that speed-ups are computed against."""
    dtype: BenchDtype = "fp32"
    """The products' operand dtype: "fp32", "bf16" (needs a GPU for Triton kernels) or "fp16"."""

    def __post_init__(self) -> None:
        if self.needs not in get_args(Needs):
            raise ValueError(f"case {self.name}: needs={self.needs!r} is not one of {get_args(Needs)}")
        if self.dtype not in get_args(BenchDtype):
            raise ValueError(f"case {self.name}: dtype={self.dtype!r} is not one of {get_args(BenchDtype)}")
        if not self.profiles <= set(PROFILES):
            raise ValueError(f"case {self.name}: profiles {sorted(self.profiles)} are not all among {PROFILES}")

    @property
    def name(self) -> str:
        return f"{self.op}/{self.size}/{self.impl}"

    def order(self) -> tuple[bool, int, int, int, str]:
        """The harvester and the sweep over it first (a bounded minute on a GPU; they share the language model
        of a size), then size by size (shared inputs are built once per size), so that a --max-minutes budget cuts
        the widest SAEs last."""

        def rank(seq: tuple[str, ...], item: str) -> int:
            return seq.index(item) if item in seq else len(seq)

        sae = self.op not in ("harvest", "sweep")
        sizes = tuple(SAE_SIZES) if sae else HARVEST_SIZES
        return sae, rank(sizes, self.size), rank(OP_ORDER, self.op), rank(IMPL_ORDER, self.impl), self.name


class UnknownCase(ValueError):
    """A --case pattern matched nothing."""


def select(cases: list[Case], patterns: list[str] | None, profile: str) -> list[Case]:
    """Those of `cases` matching any glob pattern, or without patterns the profile's default selection; in the
    order of `Case.order`.

    Raises UnknownCase, listing the valid names, when a pattern matches nothing.
    """
    cases = sorted(cases, key=Case.order)
    if not patterns:
        return [c for c in cases if profile in c.profiles]
    chosen = []
    for pattern in patterns:
        hits = [c for c in cases if fnmatch.fnmatchcase(c.name, pattern)]
        if not hits:
            names = "\n  ".join(c.name for c in cases)
            raise UnknownCase(
                f"--case {pattern!r} matches no case. Valid cases (globs allowed, e.g. "
                f"'step/16k/*' or '*/offline/reference'):\n  {names}"
            )
        chosen += [c for c in hits if c not in chosen]
    return sorted(chosen, key=Case.order)
