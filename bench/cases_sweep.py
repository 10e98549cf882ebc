"""Sweep cases: `sae.sweep.Sweep` training a grid of SAEs from one harvest, every member one step per batch;
"x ref" is tokens/s over the bare truncated forward's (the `bare` case of this family is the harvest family's
own, `harvest/<size>/bare`, under this op, so that the speed-up is computed within one run).

Sizes, each on the language model of the harvest size of the same name (bench/cases_harvest.py, shared with
it: built once): "gemma2-2b" (CUDA): the Salmon grid (RECIPES 4: d_sae 16384 and 65536 x target L0 20, 40,
80, 160, 320 and 640: 12 SAEs) at layer 20, context 1024, batch 2048, on Gemma-2-2B-shaped random weights in
bf16; "tiny" (--quick, cpu): 2 widths x 2 targets on the 3-layer random Gemma-2 of width 64, batch 256. The
rows are random token ids (RandomTokenRows: full rows, no text, no `datasets`), as the bare forward's are. The
buffer holds 16 batches; one timed repetition is one segment (half the buffer: 8 batches, each trained on by
every member). Reported besides tokens/s (of the whole sweep: each token trains every member): the member
count, SAE-tokens/s (tokens/s x members) and the projected hours of the paper's run, 49M tokens through every
member (the project's goal: one GPU-hour for the whole sweep).

Check, before timing: CHECK_STEPS steps of the same sweep. Every member trains every step and its first has
finite statistics; its first sparsity term is that of its own target; the members of one width, which start
from the same parameters, report the same first-step L0 and MSE (the fan-out gave each the same batch); and
after the steps, each width's member with the lowest target has a higher mean threshold than the one with the
highest (each is pulled toward its own target: at the recipe's learning rate, 3e-4, L0 itself moves less in a
few steps than it varies from batch to batch).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

from bench import counts
from bench import harvest_api as api
from bench.cases_harvest import LMSetup, lm_setup, step_counts
from bench.cases_harvest import cases as harvest_cases
from bench.checks import Check, Comparison
from bench.env import Env, Workload
from bench.registry import Case

PAPER_TOKENS = 49_000_000  # tokens through every SAE of the Salmon sweep (RECIPES 4: ~49M tokens of medical QA)
CHECK_STEPS = 8  # steps the check runs


class SweepSize(NamedTuple):
    grid: dict[str, list]
    batch: int
    init_l0: float  # between the targets, so that every member has somewhere to go
    profiles: frozenset[str]


SIZES = {
    "tiny": SweepSize({"d_sae": [128, 256], "target_l0": [4.0, 32.0]}, 256, 11.0, frozenset({"quick", "cpu"})),
    "gemma2-2b": SweepSize(
        {"d_sae": [16384, 65536], "target_l0": [20.0, 40.0, 80.0, 160.0, 320.0, 640.0]},
        2048,
        113.0,  # the geometric mean of 80 and 160
        frozenset({"cuda"}),
    ),
}
BUFFERED = 16  # batches the ring buffer holds: two segments of 8


def _members(size: str) -> int:
    return math.prod(len(v) for v in SIZES[size].grid.values())


def _feed(env: Env, s: LMSetup, size: str) -> api.SweepFeed:
    spec = SIZES[size]
    buffer_cfg = dataclasses.replace(s.buffer_cfg, buffer_tokens=BUFFERED * spec.batch)
    backend = "triton" if env.kernels == "compiled" else "reference"
    return api.SweepFeed(
        s.model,
        s.tokenizer,
        s.model_cfg,
        s.data_cfg,
        buffer_cfg,
        spec.batch,
        spec.grid,
        spec.init_l0,
        env.device,
        backend,
    )


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def _check(size: str) -> Callable[[Env], Check]:
    def check(env: Env) -> Check:
        feed = _feed(env, lm_setup(env, size), size)
        try:
            history = [feed.step() for _ in range(CHECK_STEPS)]
        finally:
            feed.close()
        cmp = Comparison(f"{len(feed.members)} members, {CHECK_STEPS} steps of {SIZES[size].batch} tokens")
        by_width: dict[int, list[int]] = {}
        for k, (name, cfg) in enumerate(feed.members):
            trained = sum(h.get(k) is not None for h in history)
            first = history[0].get(k)
            if trained < CHECK_STEPS or first is None:
                cmp.fail(f"{name}: {trained} of {CHECK_STEPS} steps trained")
                continue
            if not all(math.isfinite(v) for v in first):
                cmp.fail(f"{name}: first step not finite: {first}")
            own = first.sparsity_coefficient * (first.l0 / cfg.objective.target_l0 - 1) ** 2
            cmp.within(f"{name}: first sparsity term vs its own target's", _rel(first.sparsity, own), 1e-4)
            by_width.setdefault(cfg.sae.d_sae, []).append(k)
        for width, ks in by_width.items():
            lead = history[0][ks[0]]
            for k in ks[1:]:  # one batch fanned out to identical starts: the first step's forward is the same
                name, stats = feed.members[k][0], history[0][k]
                cmp.within(f"{name}: first L0 vs {feed.members[ks[0]][0]}'s", _rel(stats.l0, lead.l0), 1e-5)
                cmp.within(f"{name}: first MSE vs {feed.members[ks[0]][0]}'s", _rel(stats.mse, lead.mse), 1e-5)
            low, high = (min(ks, key=lambda k: feed.members[k][1].objective.target_l0),
                         max(ks, key=lambda k: feed.members[k][1].objective.target_l0))  # fmt: skip
            theta_low, theta_high = (feed.trainers[k].model.threshold.float().mean().item() for k in (low, high))
            if low != high and not theta_low > theta_high:
                cmp.fail(
                    f"d_sae {width}: after {CHECK_STEPS} steps the mean threshold of the lowest target "
                    f"({theta_low:.6g}) is not above the highest target's ({theta_high:.6g})"
                )
        return cmp.result()

    return check


def _prepare(size: str) -> Callable[[Env], Workload]:
    def prepare(env: Env) -> Workload:
        s = lm_setup(env, size)
        spec = SIZES[size]
        feed = _feed(env, s, size)
        feed.step()  # every member's initialisation and first step, before the timed segments
        n = BUFFERED // 2  # batches per segment
        tokens = n * spec.batch
        config = s.model.config
        rows = s.buffer_cfg.forward_batch_rows
        forwards = math.ceil(tokens / (rows * (s.context - 1)))  # the BOS of every row is dropped
        flops, nbytes = counts.lm_forward(config, s.layer, tokens, forwards, s.context, s.elt)
        D = config.get_text_config().hidden_size
        for trainer, (_, cfg) in zip(feed.trainers, feed.members):
            f, b = step_counts(trainer.sparse_step, spec.batch, D, cfg.sae.d_sae, cfg.objective.target_l0)
            flops, nbytes = flops + n * f, nbytes + n * b
        members = len(feed.members)

        def derived(record: dict) -> dict:
            rate = record["tokens_per_s"]
            return {
                "members": members,
                "sae_tokens_per_s": rate * members,
                "paper_tokens_per_sae": PAPER_TOKENS,
                "projected_hours_paper": PAPER_TOKENS / rate / 3600,
            }

        kinds = {"sparse" if t.sparse_step else "dense" for t in feed.trainers}
        return Workload(
            lambda: [feed.step() for _ in range(n)],
            flops,
            nbytes,
            tokens,
            s.dtype,
            note=f"one segment: {n} batches of {spec.batch} x {members} {'/'.join(sorted(kinds))} SAE steps",
            wall_clock=True,
            cleanup=feed.close,
            derived=derived,
        )

    return prepare


def cases() -> list[Case]:
    bare = [
        dataclasses.replace(c, op="sweep", profiles=SIZES[c.size].profiles)
        for c in harvest_cases()
        if c.impl == "bare" and c.size in SIZES
    ]
    return bare + [
        Case(
            "sweep",
            size,
            f"harvester+{_members(size)}saes",
            _check(size),
            _prepare(size),
            spec.profiles,
            "torch",
            ("bare", None),
        )
        for size, spec in SIZES.items()
    ]
