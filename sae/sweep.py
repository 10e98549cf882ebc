"""A sweep: several SAEs (layers, widths, sparsity targets, learning rates ...) trained from one harvest.

The language model runs once per batch and captures every layer the members need; each member is a
normal Trainer with its own run folder under the sweep's out_dir, fed its layer's slice of the shared
batch (sae/fanout.py). All members take the same steps on the same tokens and checkpoint together, so
the sweep resumes as one.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from sae.config import TrainConfig
from sae.config_cli import value_parser
from sae.distributed.mesh import Mesh, check_same_config
from sae.errors import ConfigError
from sae.fanout import Fanout
from sae.health import TrainingHealthError

if TYPE_CHECKING:
    from sae.trainer import StepStats

SWEEP_FILE = "sweep.json"
PLACEMENTS = ("members", "latents")
"""Under torchrun: "members" trains each SAE whole on one rank (member k on rank k % world), "latents" splits
every SAE's latents over all ranks (sae/distributed); either way every rank harvests its share of the documents
and every SAE trains on the gathered global batch."""
_SWEEPABLE_SECTIONS = ("sae", "objective", "optim")
_NOT_SWEEPABLE = {"batch_size"}  # one stream of batches feeds every member
_EXTRA_SWEEPABLE = {"layer": "model", "seed": "run"}


def _field_types() -> dict[str, tuple[str, Any]]:
    """{field: (section, parser)} of every field a grid may vary."""
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for section in dataclasses.fields(TrainConfig):
        section_hints = typing.get_type_hints(hints[section.name])
        for f in dataclasses.fields(hints[section.name]):
            if (section.name in _SWEEPABLE_SECTIONS and f.name not in _NOT_SWEEPABLE) or _EXTRA_SWEEPABLE.get(
                f.name
            ) == section.name:
                out[f.name] = (section.name, value_parser(section_hints[f.name])[1])
    return out


def parse_grid(specs: list[str]) -> dict[str, list]:
    """["target_l0=16,32", "layer=6,12"] -> {"target_l0": [16.0, 32.0], "layer": [6, 12]}."""
    types_ = _field_types()
    grid: dict[str, list] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip().lstrip("-").replace("-", "_")
        if not sep or not values.strip():
            raise ConfigError(f"--grid {spec!r}: write FIELD=V1,V2,... e.g. --grid target_l0=16,32")
        if name not in types_:
            raise ConfigError(
                f"--grid {name}: not a field a sweep can vary (one harvest feeds every member, so the model, data, "
                f"buffer, batch size and steps are shared); sweepable: {', '.join(sorted(types_))}"
            )
        if name in grid:
            raise ConfigError(f"--grid {name} is given twice; list all its values in one --grid")
        try:
            grid[name] = [types_[name][1](v.strip()) for v in values.split(",")]
        except ValueError as err:
            raise ConfigError(f"--grid {spec!r}: {err}") from err
        if len(set(map(repr, grid[name]))) != len(grid[name]):
            raise ConfigError(f"--grid {spec!r} repeats a value")
    if not grid:
        raise ConfigError("a sweep needs at least one --grid FIELD=V1,V2,...")
    return grid


def members(base: TrainConfig, grid: dict[str, list]) -> list[tuple[str, TrainConfig]]:
    """(name, config) of every combination, each writing to base.run.out_dir / name."""
    types_ = _field_types()
    out = []
    for values in itertools.product(*grid.values()):
        data = base.to_dict()
        for name, value in zip(grid, values):
            data[types_[name][0]][name] = value
        label = "_".join(f"{name}={value}" for name, value in zip(grid, values))
        data["run"]["out_dir"] = str(Path(base.run.out_dir) / label)
        out.append((label, TrainConfig.from_dict(data)))
    return out


class Sweep:
    def __init__(
        self,
        base: TrainConfig,
        grid: dict[str, list],
        resume: bool = False,
        progress: bool = True,
        lm: tuple | None = None,
        rows=None,
        write: bool = True,
        mesh: Mesh | None = None,
        placement: str = "members",
    ):
        """lm, rows: an already loaded (model, tokenizer) and a token-row source, passed to the `Harvester` (the
        bench's random-weight model and random token rows); None loads base.model and reads base.data.
        write: False keeps no sweep.json and no member run folders (the bench: nothing written, nothing saved).
        mesh, placement: the ranks of a torchrun launch and how the members use them (`PLACEMENTS`); every rank
        must build the same sweep. None: one process.
        """
        from harvest import Harvester, Shard
        from harvest.gather import GatheredBatches
        from harvest.lm import resolve_device
        from sae.trainer import Trainer

        if placement not in PLACEMENTS:
            raise ConfigError(f"--placement must be one of {', '.join(PLACEMENTS)}; got {placement!r}")
        self.base, self.grid, self.progress = base, grid, progress
        self.out_dir, self.write = Path(base.run.out_dir), write
        self.members = members(base, grid)
        self.mesh = mesh if mesh is not None and mesh.world > 1 else None
        rank, world = (self.mesh.rank, self.mesh.world) if self.mesh else (0, 1)
        self.lead, self.placement = rank == 0, placement
        if self.mesh is not None:
            check_same_config(self.mesh, {"config": base.to_dict(), "grid": grid, "placement": placement})
            if placement == "members" and len(self.members) < world:
                raise ConfigError(
                    f"--placement members puts whole SAEs on ranks, but this sweep has {len(self.members)} members "
                    f"for {world} ranks: every rank needs one; use --placement latents or fewer ranks"
                )
        owned = [k % world == rank if placement == "members" else True for k in range(len(self.members))]
        layers = list(dict.fromkeys(cfg.model.layer for _, cfg in self.members))
        device = self.mesh.device if self.mesh and self.mesh.device.type == "cuda" else resolve_device(base.run.device)
        shard = Shard(rank, world)
        self.harvester = Harvester(
            base.model,
            base.data,
            base.buffer,
            batch_size=shard.local_batch_size(base.optim.batch_size),
            device=str(device),
            layers=layers,
            progress=progress and self.lead,
            lm=lm,
            rows=rows,
            shard=shard,
        )
        source = self.harvester
        if self.mesh is not None:  # members on different ranks: each checkpoint holds every rank's position
            source = GatheredBatches(self.harvester, self.mesh.group, every_rank_position=placement == "members")
        # One view per member, and a pacer this rank reads every step: it keeps pulling the gathered stream in
        # lockstep with the other ranks when none of this rank's members is left.
        self.fanout = fanout = Fanout(source, len(self.members) + 1)
        self._pacer = iter(fanout.view(len(self.members)))
        self.stopped: dict[str, str] = self._stopped_before() if resume else {}
        self.trainers = []
        for k, (name, cfg) in enumerate(self.members):
            if name in self.stopped or not owned[k]:  # another rank's, or stopped on a non-finite value
                fanout.detach(k)
                self.trainers.append(None)
                continue
            i = layers.index(cfg.model.layer)
            select = (lambda x: x) if len(layers) == 1 else (lambda x, i=i: x[:, i])
            view = fanout.view(k, select, d_in=self.harvester.d_in)
            self.trainers.append(
                Trainer(
                    cfg,
                    view,
                    metadata=self.harvester.metadata(cfg.model.layer),
                    resume=cfg.run.out_dir if resume else None,
                    progress=False,
                    write=write,
                    mesh=self.mesh if placement == "latents" else None,
                )
            )
        steps = {t.step for t in self.trainers if t is not None}
        if self.mesh is not None:
            steps = set().union(*self.mesh.all_gather_object(steps, "sweep_steps"))
        if len(steps) > 1:
            raise ConfigError(
                f"the sweep's members were saved at different steps {sorted(steps)}; resume them one "
                "by one with python -m sae train --resume"
            )
        if not steps:
            raise ConfigError(f"every member of the sweep in {self.out_dir} had stopped; see its {SWEEP_FILE}")
        self.active = [k for k, t in enumerate(self.trainers) if t is not None]
        self.step_count = steps.pop()
        self._write_spec()

    def _stopped_before(self) -> dict[str, str]:
        path = self.out_dir / SWEEP_FILE
        return json.loads(path.read_text()).get("stopped", {}) if path.is_file() else {}

    @staticmethod
    def load_spec(folder: str | Path) -> tuple[dict, dict[str, list]]:
        """(base config dict, grid) of the sweep in `folder`, for --resume."""
        path = Path(folder) / SWEEP_FILE
        if not path.is_file():
            raise ConfigError(f"{folder} holds no {SWEEP_FILE}: pass the out_dir of a python -m sae sweep run")
        spec = json.loads(path.read_text())
        return spec["config"], spec["grid"]

    @staticmethod
    def load_placement(folder: str | Path) -> str:
        """The placement a sweep in `folder` was run with ("members" for a sweep that predates the setting)."""
        return json.loads((Path(folder) / SWEEP_FILE).read_text()).get("placement", "members")

    def fit(self) -> list:
        """Train every member to the end; on Ctrl-C, checkpoint them all before re-raising.

        A member whose values go non-finite (`TrainingHealthError`) stops alone: its last good checkpoint is
        kept, the reason is recorded in sweep.json ("stopped") and printed, and the other members go on from
        the same batches (a resumed sweep leaves it out). Only when every member has stopped does the sweep
        raise. Under torchrun rank 0 shows the bar and writes sweep.json for the members of every rank.
        """
        trainers = self.trainers
        bar = tqdm(
            total=self.base.run.steps,
            initial=self.step_count,
            unit="step",
            disable=not (self.progress and self.lead),
            dynamic_ncols=True,
        )
        try:
            while self.step_count < self.base.run.steps:
                stats = self.step(bar.write)
                lead = next((trainers[k] for k in self.active), None)
                if lead is not None and (self.step_count % self.base.run.log_every == 0 or lead.done):
                    tokens_per_s = lead.last_logged.get("tokens_per_s_run", 0.0)
                    bar.set_postfix(
                        {
                            "tok/s": f"{tokens_per_s:,.0f}",
                            "L0": "/".join(f"{s.l0:.0f}" if s else "-" for s in stats.values()),
                        },
                        refresh=False,
                    )
                bar.update(1)
        except KeyboardInterrupt:
            saved = [trainers[k].save_if_unsaved() for k in self.active]
            if any(saved):
                bar.write(
                    f"interrupted at step {self.step_count}; saved every member. Continue with "
                    f"python -m sae sweep --resume {self.out_dir}"
                )
            raise
        finally:
            bar.close()
            self.fanout.source.close()
        return [None if t is None else t.summary() for t in trainers]

    def step(self, say: Callable[[str], None] = print) -> dict[int, StepStats | None]:
        """One `Trainer.fit_step` of every active member of this rank, all on the same batch: {member index: its
        StepStats}.

        A member that raises `TrainingHealthError` leaves `self.active` (its reason is passed to `say`, with
        the members' alerts); raises `TrainingHealthError` when none is left on any rank.
        """
        stats = {}
        stopped_now: dict[str, str] = {}
        for k in list(self.active):
            try:
                stats[k] = self.trainers[k].fit_step()
            except TrainingHealthError as err:
                self.active.remove(k)
                self.fanout.detach(k)
                stopped_now[self.members[k][0]] = str(err)
                say(f"member {self.members[k][0]} stopped; the others go on. {err}")
            for text in self.trainers[k].pop_alerts():
                say(f"{self.members[k][0]}: {text}")
        next(self._pacer)
        self.step_count += 1
        left = len(self.active)
        if self.mesh is not None:  # every rank learns which members stopped, and how many are left
            reports = self.mesh.all_gather_object((stopped_now, left), "sweep_stopped")
            stopped_now = {name: why for stops, _ in reports for name, why in stops.items()}
            left = sum(n for _, n in reports)
        if stopped_now:
            self.stopped.update(stopped_now)
            self._write_spec()
        if not left:
            raise TrainingHealthError(f"every member of the sweep stopped; see {self.out_dir / SWEEP_FILE}")
        return stats

    def _write_spec(self) -> None:
        if not (self.write and self.lead):
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / SWEEP_FILE).write_text(
            json.dumps(
                {
                    "grid": self.grid,
                    "config": self.base.to_dict(),
                    "members": [name for name, _ in self.members],
                    "stopped": self.stopped,
                    "placement": self.placement,
                    "world_size": self.mesh.world if self.mesh is not None else 1,
                },
                indent=2,
            )
        )
