"""The registry of benchmark cases, named `<op>/<size>/<impl>` and selected by glob patterns.

A case is one implementation of one op at one size. Its `check` compares the implementation with the
PyTorch reference (bench/checks.py); its `prepare` builds what is timed. The runner (bench/runner.py) refuses
to time a case whose check fails. The case families live in bench/cases_*.py; tests and experiments add
their own through `register`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from bench.checks import Check
    from bench.runner import Env

OP_ORDER = ("harvest", "step", "encode", "threshold-grad", "decode")
IMPL_ORDER = ("triton", "reference", "compile", "triton-bf16", "reference-bf16", "compile-bf16", "bare", "harvester",
              "harvester+train")
PROFILES = ("cuda", "cpu", "quick")


class Shape(NamedTuple):
    """An SAE workload: B tokens, D d_in, F d_sae, K target L0 per row, eps the STE bandwidth."""

    B: int
    D: int
    F: int
    K: int
    eps: float

    def describe(self) -> str:
        return f"B={self.B} D={self.D} F={self.F}"


# Named SAE sizes. Gemma-2-2B's residual width at the widths Gemma Scope released; "offline" is the CPU
# default run (harvest/config.py, sae/config.py: d_in 640, expansion 4, batch 1024, target L0 32); "tiny" is
# for tests and explicit selection only.
SAE_SIZES: dict[str, Shape] = {
    "tiny": Shape(256, 64, 512, 8, 0.02),
    "offline": Shape(1024, 640, 2560, 32, 0.001),
    "16k": Shape(4096, 2304, 16384, 64, 0.001),
    "65k": Shape(4096, 2304, 65536, 64, 0.001),
    "262k": Shape(4096, 2304, 262144, 64, 0.001),
    "1m": Shape(4096, 2304, 1048576, 64, 0.001),
}
# Kernels in Triton's CPU interpreter cost ~70 us per operation per program: they are checked at this shape
# (odd sizes, a wide window so the threshold path sees pairs), whatever the case's size.
INTERPRETER_SHAPE = Shape(48, 40, 300, 6, 0.05)
HARVEST_SIZES = ("tiny", "offline", "gemma2-2b")
_DEFAULT_PROFILES = {"offline": ("cuda", "cpu", "quick"), "16k": ("cuda",), "65k": ("cuda",), "262k": ("cuda",),
                     "1m": ("cuda",)}


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
    profiles: frozenset[str] = field(default_factory=frozenset)
    """Default selections that include the case: "cuda", "cpu" (full profiles), "quick"."""
    needs: str = "torch"
    """"triton" (kernels: compiled on CUDA, interpreted and untimed on the CPU), "compile", or "torch"."""
    baselines: tuple[str, str | None] = ("reference", "compile")
    """Impls of the same op and size that speed-ups are computed against."""
    dtype: str = "fp32"
    """The products' operand dtype: "fp32", "bf16" (needs a GPU for Triton kernels) or "fp16"."""

    @property
    def name(self) -> str:
        return f"{self.op}/{self.size}/{self.impl}"

    def order(self) -> tuple[bool, int, int, int, str]:
        """The harvester first (a bounded minute on a GPU), then size by size (shared inputs are built once
        per size), so that a --max-minutes budget cuts the widest SAEs last."""

        def rank(seq: tuple[str, ...], item: str) -> int:
            return seq.index(item) if item in seq else len(seq)

        sae = self.op != "harvest"
        sizes = tuple(SAE_SIZES) if sae else HARVEST_SIZES
        return sae, rank(sizes, self.size), rank(OP_ORDER, self.op), rank(IMPL_ORDER, self.impl), self.name


class UnknownCase(ValueError):
    """A --case pattern matched nothing."""


_EXTRA: dict[str, Case] = {}


def register(case: Case) -> Case:
    """Add a case (tests inject deliberately wrong implementations this way); replaces one of the same name."""
    _EXTRA[case.name] = case
    return case


def unregister(name: str) -> None:
    _EXTRA.pop(name, None)


def all_cases() -> list[Case]:
    """Every registered case, ordered by size, op, impl (the order the runner goes through them)."""
    from bench import cases_gemm, cases_harvest, cases_kernels, cases_step

    found = {c.name: c for module in (cases_step, cases_kernels, cases_gemm, cases_harvest) for c in module.cases()}
    found.update(_EXTRA)
    return sorted(found.values(), key=Case.order)


def select(patterns: list[str] | None, profile: str) -> list[Case]:
    """Cases matching any glob pattern (all of them, in registry order), or the profile's default selection.

    Raises UnknownCase, listing the valid names, when a pattern matches nothing.
    """
    cases = all_cases()
    if not patterns:
        return [c for c in cases if profile in c.profiles]
    chosen = []
    for pattern in patterns:
        hits = [c for c in cases if fnmatch.fnmatchcase(c.name, pattern)]
        if not hits:
            names = "\n  ".join(c.name for c in cases)
            raise UnknownCase(f"--case {pattern!r} matches no case. Valid cases (globs allowed, e.g. "
                              f"'step/16k/*' or '*/offline/reference'):\n  {names}")
        chosen += [c for c in hits if c not in chosen]
    return sorted(chosen, key=Case.order)
