"""Autointerp in the eval's outputs: report.md's lines and the feature browser's note per latent."""

from __future__ import annotations

from typing import Any


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown_lines(report: dict[str, Any]) -> list[str]:
    """One line per SAE with autointerp: F1 (mean, median, 10-90% quantiles) beside the floor's; [] without."""
    lines = []
    for path, r in report["saes"].items():
        if "autointerp" not in r:
            continue
        s = r["autointerp"]["summary"]
        f1, floor = s["f1"], s["floor_f1"]
        lines.append(
            f"- {path}: {s['scored']} of {s['explained']} explained latents scored ({s['requested']} asked, "
            f"{s['firing']} fire): detection F1 mean {_num(f1['mean'])}, median {_num(f1['median'])}, "
            f"10-90% {_num(f1['quantiles']['0.1'])}-{_num(f1['quantiles']['0.9'])}; random-explanation floor "
            f"mean {_num(floor['mean'])}, median {_num(floor['median'])}; accuracy mean "
            f"{_num(s['accuracy']['mean'])} (floor {_num(s['floor_accuracy']['mean'])}); "
            f"{s['malformed_answers'] + s['floor_malformed_answers']} malformed answers (scored wrong)"
        )
    return lines


def browser_notes(result: dict[str, Any] | None) -> dict[int, str]:
    """latent -> "explanation: ...; detection F1 ... (floor ...)" for the feature browser; {} without a result."""
    notes = {}
    for record in (result or {}).get("latents", []):
        if record["explanation"] is None:
            continue
        d, floor = record["detection"], record["floor"]
        score = (
            f"detection F1 {d['f1']:.2f}, accuracy {d['accuracy']:.2f} on {d['n']} held-out contexts"
            if d
            else record.get("skipped", "not scored")
        )
        if floor:
            score += f" (random-explanation floor F1 {floor['f1']:.2f})"
        notes[record["latent"]] = f"explanation: {record['explanation'] or '(none given)'} \u2014 {score}"
    return notes
