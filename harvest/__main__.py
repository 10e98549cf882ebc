"""`python -m harvest`: the harvesting side's command line.

    python -m harvest select --seeds seeds.txt --pool icd10-cm --out runs/sel --token-budget 200000
    python -m harvest select ...same flags...   # after an interruption: continues from runs/sel/state.npz
    python -m harvest select --help             # every setting, with its default

Then train on the selection: python -m sae train --dataset runs/sel/selection.jsonl --text-field text
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
import typing

from sae.config_cli import field_docs, flag

_EPILOG = """\
example (offline, seeds one per line in a text file):
  python -m harvest select --seeds seeds.txt --pool icd10-cm --out runs/cardio --token-budget 200000
then train on the selection:
  python -m sae train --dataset runs/cardio/selection.jsonl --text-field text

An interrupted run continues where it stopped when the same command is run again; a finished one
only prints its summary. Results: OUT/selection.jsonl (text, score, source_index, tokens) and OUT/summary.json.
"""


def _parser() -> argparse.ArgumentParser:
    from harvest.select import SelectConfig

    parser = argparse.ArgumentParser(prog="python -m harvest", description="saekit: prepare training text.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    select = commands.add_parser(
        "select",
        help="select the pool texts nearest to a few in-domain seed texts, up to a token budget",
        description=textwrap.fill(
            "Dense-retrieval data selection (as in the Specialized SAEs paper): embed the seed texts and every "
            "pool text with a sentence encoder, score each pool text by its cosine similarity to the seeds, and "
            "keep the best-scoring ones until the token budget is full. The pool is read in chunks and only the "
            "running selection is held in memory, so the pool may be larger than RAM.", width=100,
        ),
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    hints, docs = typing.get_type_hints(SelectConfig), field_docs(SelectConfig)
    required = select.add_argument_group("required")
    for f in dataclasses.fields(SelectConfig):
        kind = next((a for a in typing.get_args(hints[f.name]) if a is not type(None)), hints[f.name])  # X | None
        needed = f.default is dataclasses.MISSING
        group = required if needed else select
        group.add_argument(
            flag(f.name), dest=f.name, type=kind, required=needed, default=None if needed else f.default,
            metavar=kind.__name__.upper(), help=docs[f.name] + ("" if needed else " (default: %(default)s)"),
        )
    select.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_select(args: argparse.Namespace) -> int:
    from harvest.select import SelectConfig, select

    cfg = SelectConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SelectConfig)})
    print(f"saekit select: seeds {cfg.seeds}, pool {cfg.pool}, encoder {cfg.encoder}, budget {cfg.token_budget:,} "
          f"tokens of {cfg.tokenizer_model} -> {cfg.out}", file=sys.stderr)
    try:
        s = select(cfg, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"\ninterrupted: run the same command again to continue from {cfg.out}", file=sys.stderr)
        return 130
    if s.selected == 0:
        print("warning: nothing was selected: the best-scoring text alone has more tokens than --token-budget; "
              "raise it, or cap each text's count with --context-size", file=sys.stderr)
    print(
        f"selected {s.selected:,} of {s.pool_size:,} pool texts ({s.skipped_empty:,} empty), "
        f"{s.tokens:,} of {s.token_budget:,} tokens, from {s.seeds} seeds\n"
        f"  score     {s.score_min:.3f} .. {s.score_max:.3f} (mean {s.score_mean:.3f}; pool mean "
        f"{s.pool_score_mean:.3f})\n"
        f"  scan      {s.seconds:.1f} s, {s.scanned / max(s.seconds, 1e-9):.1f} texts/s\n"
        f"  selection {s.selection}\n"
        f"  train on it: python -m sae train --dataset {s.selection} --text-field text"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from harvest.errors import HarvestError

    try:
        if args.command == "select":
            return run_select(args)
    except HarvestError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
