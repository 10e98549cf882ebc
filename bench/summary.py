"""`python -m bench.summary [--merge OUT.json [--remove-parts]] BENCH.json ...`: one table from several bench JSON
files (the stages of bench/gpu_first_call.sh, each its own `python -m bench` process), and issue 12's targets as
ratios measured in the same run:

    step speed-up        tokens/s of step/<size>/triton-bf16 over step/<size>/reference-bf16: >= 3x at 65k, >= 5x
                         at 2^20; where the dense reference did not run at 2^20 (it does not fit), over the widest
                         size where it did, its time scaled by the ratio of d_sae (every term of the dense step but
                         the [B, D] ones grows linearly in F): said so in the line
    encode vs GEMM       tokens/s of encode/<size>/triton-bf16 over encode/<size>/gemm-bf16: >= 75%
    step memory          peak of step/<size>/triton-bf16 over reference-bf16's (beyond the shared inputs): <= 0.5
    2^20 on 80 GB        peak of step/1m/triton-bf16 beyond the shared inputs (the trainer holds no second copy of
                         the parameters, as the bench's inputs are): <= 80 GB
    checks               every case checked against the reference before timing: MISMATCH and error counted

Reads JSON only (no torch): runs anywhere, e.g. on files fetched from the GPU machine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, NamedTuple

from bench.shapes import SAE_SIZES

CARD_BYTES = 80e9


class Target(NamedTuple):
    name: str
    value: float | None  # None: not measured
    need: str  # e.g. ">= 3"
    ok: bool | None
    detail: str


def load(paths: list[str | Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the documents, every case record in file order; a case recorded twice keeps its last record)."""
    docs, records = [], {}
    for path in paths:
        doc = json.loads(Path(path).read_text())
        docs.append(doc)
        for rec in doc.get("cases", []):
            records[rec["case"]] = rec
    return docs, list(records.values())


def merge(paths: list[str | Path], out: str | Path) -> None:
    """One document: each part's meta and roofline in order, the union of the cases."""
    docs, records = load(paths)
    merged = {
        "meta": [d.get("meta") for d in docs],
        "roofline": [d.get("roofline") for d in docs],
        "notes": docs[0].get("notes", []) if docs else [],
        "parts": [str(p) for p in paths],
        "cases": records,
    }
    tmp = Path(str(out) + ".tmp")
    tmp.write_text(json.dumps(merged, indent=2, default=str))
    tmp.replace(out)


def _ok(records: dict[str, dict[str, Any]], name: str) -> dict[str, Any] | None:
    rec = records.get(name)
    return rec if rec is not None and rec.get("status") == "ok" else None


def _why(records: dict[str, dict[str, Any]], name: str) -> str:
    rec = records.get(name)
    return f"{name} not in the run" if rec is None else f"{name}: {rec.get('status')} {rec.get('reason', '')}".strip()


def _at_least(name: str, value: float | None, need: float, detail: str) -> Target:
    return Target(name, value, f">= {need:g}", None if value is None else value >= need, detail)


def targets(recs: list[dict[str, Any]]) -> list[Target]:
    by = {r["case"]: r for r in recs}
    out = []
    for size, need in (("65k", 3.0), ("1m", 5.0)):
        fast, ref = f"step/{size}/triton-bf16", f"step/{size}/reference-bf16"
        if not _ok(by, fast):
            out.append(_at_least(f"step speed-up at {size}", None, need, _why(by, fast)))
            continue
        if _ok(by, ref):
            value = by[fast]["tokens_per_s"] / by[ref]["tokens_per_s"]
            out.append(_at_least(f"step speed-up at {size}", value, need, f"{fast} over {ref}, same run"))
            continue
        widest = max(
            (s for s in SAE_SIZES if _ok(by, f"step/{s}/reference-bf16")), key=lambda s: SAE_SIZES[s].F, default=None
        )
        if widest is None:
            out.append(_at_least(f"step speed-up at {size}", None, need, f"no dense reference ran ({_why(by, ref)})"))
            continue
        scale = SAE_SIZES[size].F / SAE_SIZES[widest].F
        value = by[fast]["tokens_per_s"] * scale / by[f"step/{widest}/reference-bf16"]["tokens_per_s"]
        out.append(
            _at_least(
                f"step speed-up at {size}",
                value,
                need,
                f"against step/{widest}/reference-bf16 with its time x {scale:g} (F ratio): {_why(by, ref)}",
            )
        )
    for size in SAE_SIZES:
        fused, gemm = f"encode/{size}/triton-bf16", f"encode/{size}/gemm-bf16"
        if fused in by or gemm in by:
            value = by[fused]["tokens_per_s"] / by[gemm]["tokens_per_s"] if _ok(by, fused) and _ok(by, gemm) else None
            detail = (
                "tokens/s of the fused encode over the plain GEMM's"
                if value is not None
                else (_why(by, fused) if not _ok(by, fused) else _why(by, gemm))
            )
            out.append(_at_least(f"encode / GEMM at {size}", value, 0.75, detail))
    for size in SAE_SIZES:
        fast, ref = f"step/{size}/triton-bf16", f"step/{size}/reference-bf16"
        if fast in by and ref in by:
            a, b = _ok(by, fast), _ok(by, ref)
            value = a["peak_memory_bytes"] / b["peak_memory_bytes"] if a and b and b.get("peak_memory_bytes") else None
            detail = (
                f"{a['peak_memory_bytes'] / 1e9:.3g} / {b['peak_memory_bytes'] / 1e9:.3g} GB"
                if value is not None
                else _why(by, fast if not a else ref)
            )
            out.append(
                Target(f"step memory ratio at {size}", value, "<= 0.5", None if value is None else value <= 0.5, detail)
            )
    wide = _ok(by, "step/1m/triton-bf16")
    peak = wide.get("peak_memory_bytes") if wide else None
    out.append(
        Target(
            "2^20 step within 80 GB",
            None if peak is None else peak / 1e9,
            "<= 80 (GB)",
            None if peak is None else peak <= CARD_BYTES,
            "peak beyond the shared inputs" if peak is not None else _why(by, "step/1m/triton-bf16"),
        )
    )
    bad = [r["case"] for r in recs if r.get("status") in ("MISMATCH", "error")]
    out.append(
        Target("cases that failed their check or raised", float(len(bad)), "== 0", not bad, ", ".join(bad) or "none")
    )
    return out


def table(recs: list[dict[str, Any]]) -> str:
    lines = [
        (
            f"{'case':34} {'status':10} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>8} {'%roof':>6} {'x base':>7} "
            f"{'peak GB':>8}  reason"
        )
    ]
    for r in recs:
        med = (r.get("timing") or {}).get("median_s")

        def num(value: float | None, spec: str) -> str:
            return "-" if value is None else format(value, spec)

        frac = r.get("roofline_fraction")
        peak = r.get("peak_memory_bytes")
        lines.append(
            f"{r['case']:34} {r.get('status') or '-':10} {num(med and med * 1e3, '9.3f')} "
            f"{num(r.get('tflops'), '8.1f')} {num(r.get('gbs'), '8.0f')} {num(frac and 100 * frac, '6.1f')} "
            f"{num(r.get('speedup_vs_reference'), '7.2f')} {num(peak and peak / 1e9, '8.2f')}  "
            f"{'' if r.get('status') == 'ok' else (r.get('reason') or '')[:100]}"
        )
    return "\n".join(lines)


def report(recs: list[dict[str, Any]]) -> str:
    verdict = {True: "MET", False: "MISSED", None: "not measured"}
    rows = [
        f"  {t.name:38} {('-' if t.value is None else f'{t.value:.3g}'):>8} (need {t.need}): "
        f"{verdict[t.ok]}; {t.detail}"
        for t in targets(recs)
    ]
    return table(recs) + "\n\nTargets (issue 12), measured in this run:\n" + "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.summary", description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="bench JSON files, in stage order")
    p.add_argument("--merge", metavar="OUT", help="also write them merged into one JSON document here")
    p.add_argument("--remove-parts", action="store_true", help="delete the parts once --merge has written OUT")
    args = p.parse_args(argv)
    paths = [q for q in args.paths if Path(q).exists()]
    if not paths:
        print("no bench JSON to summarise (no bench stage wrote one)")
        return 1
    _, recs = load(paths)
    print(report(recs))
    if args.merge:
        merge(paths, args.merge)
        print(f"wrote {args.merge} (from {', '.join(paths)})")
        if args.remove_parts:
            for q in paths:
                if Path(q).resolve() != Path(args.merge).resolve():
                    Path(q).unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
