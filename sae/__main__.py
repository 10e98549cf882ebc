"""`python -m sae` (or the `saekit` console script): the command line.

python -m sae train                       # the embedded offline default: Gemma-3 270M, ICD-10-CM text
python -m sae train --resume runs/default # continue an interrupted run where its last checkpoint left off
python -m sae train --help                # every setting, grouped by section, with its default
python -m sae sweep --grid target_l0=16,32 --grid layer=6,12   # four SAEs from one harvest
python -m sae eval runs/default           # held-out metrics, delta CE, dark matter, feature browser
python -m sae select --seeds seeds.txt --pool icd10-cm --out runs/sel --token-budget 200000  # domain text
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

from harvest.select import SelectConfig
from sae.config import ConfigError, TrainConfig
from sae.config_cli import add_config_arguments, build_config, given_flags
from sae.evaluation.report import EvalCommand


@dataclass
class SelectCommand:
    """The settings of `python -m sae select`."""

    select: SelectConfig


_SELECT_EPILOG = """\
example (offline, seeds one per line in a text file):
  python -m sae select --seeds seeds.txt --pool icd10-cm --out runs/cardio --token-budget 200000
then train on the selection:
  python -m sae train --dataset runs/cardio/selection.jsonl --text-field text

An interrupted run continues where it stopped when the same command is run again; a finished one
only prints its summary. Results: OUT/selection.jsonl (text, score, source_index, tokens) and OUT/summary.json.
"""


def _command(
    commands, name: str, config_cls: type, progress_help: str = "no progress bars", **kwargs
) -> argparse.ArgumentParser:
    """Subcommand `name`: one flag per field of `config_cls` (sae.config_cli), --no-progress, and `kwargs` of
    argparse's add_parser (help, description, ...)."""
    parser = commands.add_parser(name, **kwargs)
    parser.add_argument("--no-progress", action="store_true", help=progress_help)
    add_config_arguments(parser, config_cls)
    return parser


def _parser() -> argparse.ArgumentParser:
    prog = "saekit" if Path(sys.argv[0]).name == "saekit" else "python -m sae"  # the console script or -m
    parser = argparse.ArgumentParser(prog=prog, description="saekit: train JumpReLU sparse autoencoders.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = _command(
        commands,
        "train",
        TrainConfig,
        "no progress bars (log lines still go to metrics.jsonl)",
        help="train a JumpReLU SAE on activations harvested live from a language model",
        description=(
            "Train a JumpReLU SAE on activations harvested live from a language model. With no flags it trains "
            "on the offline default (Gemma-3 270M from PyPI, layer 12, ICD-10-CM descriptions) in a few CPU "
            "minutes and writes runs/default/. Every flag below overrides one config field."
        ),
    )
    train.add_argument(
        "--resume",
        metavar="PATH",
        default=None,
        help="continue from a run folder (its latest checkpoint) or a checkpoint folder; the saved config is "
        "used, and flags given here may change only the objective, optimiser and run settings",
    )
    sweep = _command(
        commands,
        "sweep",
        TrainConfig,
        help="train several SAEs (layers, widths, L0 targets, ...) from one harvest: one LM forward per batch",
        description=(
            "Train one SAE per combination of the --grid values, all from the same harvested batches (the "
            "language model runs once and captures every layer needed). Each member writes its own run folder "
            "OUT_DIR/FIELD=VALUE_... with the usual checkpoints; OUT_DIR/sweep.json records the grid."
        ),
    )
    sweep.add_argument(
        "--placement",
        choices=("members", "latents"),
        default=None,
        help="under torchrun: 'members' trains each SAE whole on one rank (member k on rank k %% N; needs at "
        "least N members), 'latents' splits every SAE's latents over all N ranks; either way each rank harvests "
        "its share of the documents and every SAE trains on the gathered batch (default: members, or the "
        "resumed sweep's)",
    )
    sweep.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="FIELD=V1,V2",
        help="a field and its values, e.g. target_l0=16,32 (repeatable: the sweep is every combination). "
        "Sweepable: layer, seed and the fields of the sae, objective and optim sections except batch_size",
    )
    sweep.add_argument(
        "--resume",
        metavar="OUT_DIR",
        default=None,
        help="continue a sweep from its folder (every member from its latest checkpoint)",
    )
    evaluate = _command(
        commands,
        "eval",
        EvalCommand,
        help="compare SAEs side by side on held-out tokens (explained variance, L0, dead latents, delta CE, ...)",
        description=(
            "Evaluate one or several SAEs on the same held-out tokens of a live model: reconstruction (FVU about "
            "the mean), sparsity, the worst-reconstructed tokens, dark matter and the spliced downstream loss. "
            "Writes report.json and report.md. Model, layer and data default to the first SAE's metadata."
        ),
    )
    evaluate.add_argument(
        "saes",
        nargs="+",
        metavar="SAE",
        help="run folders, checkpoint or SAELens-style folders, or Gemma Scope params.npz files",
    )
    _command(
        commands,
        "select",
        SelectCommand,
        "no progress bar",
        help="select the pool texts nearest to a few in-domain seed texts, up to a token budget (training text)",
        description=textwrap.fill(
            "Dense-retrieval data selection (as in the Specialized SAEs paper): embed the seed texts and every "
            "pool text with a sentence encoder, score each pool text by its cosine similarity to the seeds, and "
            "keep the best-scoring ones until the token budget is full. The pool is read in chunks and only the "
            "running selection is held in memory, so the pool may be larger than RAM.",
            width=100,
        ),
        epilog=_SELECT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def train(args: argparse.Namespace) -> int:
    from harvest import Harvester, Shard
    from harvest.gather import GatheredBatches
    from harvest.lm import resolve_device
    from sae import checkpoint as ckpt
    from sae.distributed.mesh import Mesh, launched_by_torchrun
    from sae.trainer import Trainer

    overrides = given_flags(args, TrainConfig)
    base = None
    if args.resume is not None:
        base = ckpt.load_training_info(ckpt.resume_checkpoint(args.resume))["config"]
    cfg = build_config(TrainConfig, overrides, base)
    mesh = Mesh.from_env(timeout_s=cfg.run.collective_timeout_s) if launched_by_torchrun() else None
    lead = mesh is None or mesh.rank == 0
    say = print if lead else (lambda *a, **k: None)  # rank 0 speaks for the run
    device = mesh.device if mesh is not None and mesh.device.type == "cuda" else resolve_device(cfg.run.device)
    say(f"saekit: model {cfg.model.model} layer {cfg.model.layer}, data {cfg.data.dataset}, device {device}")
    shard = Shard(mesh.rank, mesh.world) if mesh is not None else Shard(0, 1)
    harvester = Harvester(
        cfg.model,
        cfg.data,
        cfg.buffer,
        batch_size=shard.local_batch_size(cfg.optim.batch_size),
        device=str(device),
        progress=not args.no_progress and lead,
        shard=shard,
    )
    say(harvester.describe())
    source = GatheredBatches(harvester, mesh.group) if mesh is not None else harvester
    try:
        trainer = Trainer(
            cfg, source, metadata=harvester.metadata(), resume=args.resume, progress=not args.no_progress, mesh=mesh
        )
        ranks = f", latents split over {mesh.world} ranks ({trainer.slice.size} on rank 0)" if mesh else ""
        say(
            f"SAE d_in={trainer.model.d_in} d_sae={trainer.d_sae}{ranks}, {cfg.objective.sparsity} objective, "
            f"{cfg.run.steps} steps x {cfg.optim.batch_size} tokens -> {cfg.run.out_dir}"
            + (f" (resuming at step {trainer.step})" if args.resume else "")
        )
        summary = trainer.fit()
    except KeyboardInterrupt:
        return 130
    finally:
        source.close()
        if mesh is not None:
            mesh.close()
    say(
        f"\ndone: {summary.step} steps, {summary.tokens:,} tokens\n"
        f"  checkpoint          {summary.checkpoint}\n"
        f"  L0                  {summary.l0:.1f} (mean over the last {cfg.run.log_every} steps)\n"
        f"  explained variance  {summary.explained_variance:.3f} (same steps; variance about the mean)\n"
        f"  dead latents        {summary.dead_fraction:.1%} "
        f"(no fire in the last {summary.dead_window_tokens:,} tokens)\n"
        f"  metrics             {cfg.run.out_dir}/metrics.jsonl"
    )
    counts = harvester.stats()
    if counts["nonfinite_dropped"] or trainer.skipped_batches:
        say(
            f"  dropped             {counts['nonfinite_dropped']:,} non-finite activations of "
            f"{counts['harvested_tokens']:,} harvested; {trainer.skipped_batches} batches skipped"
        )
    return 0


def sweep(args: argparse.Namespace) -> int:
    from sae.distributed.mesh import Mesh, launched_by_torchrun
    from sae.sweep import Sweep, parse_grid

    overrides = given_flags(args, TrainConfig)
    placement = args.placement
    if args.resume is not None:
        base, saved_grid = Sweep.load_spec(args.resume)
        if args.grid:
            raise ConfigError("--grid cannot change on --resume: the sweep keeps the grid in its sweep.json")
        grid = saved_grid
        placement = placement or Sweep.load_placement(args.resume)
    else:
        base, grid = None, parse_grid(args.grid)
        overrides.setdefault("run", {}).setdefault("out_dir", "runs/sweep")
    cfg = build_config(TrainConfig, overrides, base)
    mesh = Mesh.from_env(timeout_s=cfg.run.collective_timeout_s) if launched_by_torchrun() else None
    say = print if mesh is None or mesh.rank == 0 else (lambda *a, **k: None)
    try:
        run = Sweep(
            cfg, grid, resume=args.resume is not None, progress=not args.no_progress, mesh=mesh,
            placement=placement or "members",
        )  # fmt: skip
        ranks = f", {run.placement} placed over {mesh.world} ranks" if mesh is not None and mesh.world > 1 else ""
        say(
            f"saekit sweep: {len(run.trainers)} SAEs from one harvest of {cfg.model.model} layers "
            f"{sorted(run.harvester.layers)}{ranks}; {run.harvester.describe()}"
        )
        summaries = run.fit()
    except KeyboardInterrupt:
        return 130
    finally:
        if mesh is not None:
            mesh.close()
    done = next((s for (name, _), s in zip(run.members, summaries) if s is not None), None)
    if done is not None:
        say(f"\ndone: {done.step} steps, {done.tokens:,} tokens each")
    for k, ((name, _), summary) in enumerate(zip(run.members, summaries)):
        if name in run.stopped:
            say(f"  {name:<40} stopped (not resumed; its last good checkpoint is kept): see sweep.json")
            continue
        if summary is None:
            say(f"  {name:<40} trained on rank {k % mesh.world}: {Path(cfg.run.out_dir) / name}")
            continue
        say(
            f"  {name:<40} L0 {summary.l0:6.1f}  EV {summary.explained_variance:.3f}  "
            f"dead {summary.dead_fraction:.1%}  {summary.checkpoint}"
        )
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from sae.evaluation.report import evaluate as run_eval
    from sae.evaluation.report import markdown_table, write_report

    cfg = build_config(EvalCommand, given_flags(args, EvalCommand)).eval
    report = run_eval(cfg, args.saes, progress=not args.no_progress)
    folder = write_report(report, cfg.out)
    written = sorted(p.name for p in folder.iterdir() if p.suffix in (".json", ".md", ".png", ".html"))
    print("\n" + markdown_table(report) + f"\nwritten to {folder}: {', '.join(written)}")
    return 0


def select(args: argparse.Namespace) -> int:
    from harvest.select import select as run_select

    cfg = build_config(SelectCommand, given_flags(args, SelectCommand)).select
    print(
        f"saekit select: seeds {cfg.seeds}, pool {cfg.pool}, encoder {cfg.encoder}, budget {cfg.token_budget:,} "
        f"tokens of {cfg.tokenizer_model} -> {cfg.out}",
        file=sys.stderr,
    )
    try:
        s = run_select(cfg, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"\ninterrupted: run the same command again to continue from {cfg.out}", file=sys.stderr)
        return 130
    if s.selected == 0:
        print(
            "warning: nothing was selected: the best-scoring text alone has more tokens than --token-budget; "
            "raise it, or cap each text's count with --context-size",
            file=sys.stderr,
        )
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
    from sae.checkpoint import CheckpointError
    from sae.distributed.mesh import CollectiveError
    from sae.evaluation.autointerp.clients import EndpointError
    from sae.health import TrainingHealthError

    try:
        if args.command == "train":
            return train(args)
        if args.command == "sweep":
            return sweep(args)
        if args.command == "eval":
            return evaluate(args)
        if args.command == "select":
            return select(args)
    except (ConfigError, CheckpointError, HarvestError, TrainingHealthError, CollectiveError, EndpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
