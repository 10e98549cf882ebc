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
from sae.errors import ConfigError
from sae.fanout import Fanout
from sae.health import TrainingHealthError

if TYPE_CHECKING:
    from sae.trainer import StepStats

SWEEP_FILE = "sweep.json"
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
    ):
        """lm, rows: an already loaded (model, tokenizer) and a token-row source, passed to the `Harvester` (the
        bench's random-weight model and random token rows); None loads base.model and reads base.data.
        write: False keeps no sweep.json and no member run folders (the bench: nothing written, nothing saved).
        """
        from harvest import Harvester
        from harvest.lm import resolve_device
        from sae.trainer import Trainer

        self.base, self.grid, self.progress = base, grid, progress
        self.out_dir, self.write = Path(base.run.out_dir), write
        self.members = members(base, grid)
        layers = list(dict.fromkeys(cfg.model.layer for _, cfg in self.members))
        device = resolve_device(base.run.device)
        self.harvester = Harvester(
            base.model,
            base.data,
            base.buffer,
            batch_size=base.optim.batch_size,
            device=str(device),
            layers=layers,
            progress=progress,
            lm=lm,
            rows=rows,
        )
        self.fanout = fanout = Fanout(self.harvester, len(self.members))
        self.stopped: dict[str, str] = self._stopped_before() if resume else {}
        self.trainers = []
        for k, (name, cfg) in enumerate(self.members):
            if name in self.stopped:  # left out of a resumed sweep: it stopped on a non-finite value
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
                )
            )
        steps = {t.step for t in self.trainers if t is not None}
        if len(steps) > 1:
            raise ConfigError(
                f"the sweep's members were saved at different steps {sorted(steps)}; resume them one "
                "by one with python -m sae train --resume"
            )
        if not steps:
            raise ConfigError(f"every member of the sweep in {self.out_dir} had stopped; see its {SWEEP_FILE}")
        self.active = [k for k, (name, _) in enumerate(self.members) if name not in self.stopped]
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

    def fit(self) -> list:
        """Train every member to the end; on Ctrl-C, checkpoint them all before re-raising.

        A member whose values go non-finite (`TrainingHealthError`) stops alone: its last good checkpoint is
        kept, the reason is recorded in sweep.json ("stopped") and printed, and the other members go on from
        the same batches (a resumed sweep leaves it out). Only when every member has stopped does the sweep
        raise.
        """
        trainers, active = self.trainers, self.active
        bar = tqdm(
            total=self.base.run.steps,
            initial=trainers[active[0]].step,
            unit="step",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        try:
            while not trainers[active[0]].done:
                stats = self.step(bar.write)
                lead = trainers[active[0]]
                if lead.step % self.base.run.log_every == 0 or lead.done:
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
            saved = [trainers[k].save_if_unsaved() for k in active]
            if any(saved):
                bar.write(
                    f"interrupted at step {trainers[active[0]].step}; saved every member. Continue with "
                    f"python -m sae sweep --resume {self.out_dir}"
                )
            raise
        finally:
            bar.close()
            self.harvester.close()
        return [None if t is None else t.summary() for t in trainers]

    def step(self, say: Callable[[str], None] = print) -> dict[int, StepStats | None]:
        """One `Trainer.fit_step` of every active member, all on the same batch: {member index: its StepStats}.

        A member that raises `TrainingHealthError` leaves `self.active` (its reason is passed to `say`, with
        the members' alerts); raises `TrainingHealthError` when none is left.
        """
        stats = {}
        for k in list(self.active):
            try:
                stats[k] = self.trainers[k].fit_step()
            except TrainingHealthError as err:
                self.active.remove(k)
                say(self._stop_member(k, err))
            for text in self.trainers[k].pop_alerts():
                say(f"{self.members[k][0]}: {text}")
        if not self.active:
            raise TrainingHealthError(f"every member of the sweep stopped; see {self.out_dir / SWEEP_FILE}")
        return stats

    def _stop_member(self, k: int, err: TrainingHealthError) -> str:
        name = self.members[k][0]
        self.fanout.detach(k)
        self.stopped[name] = str(err)
        self._write_spec()
        return f"member {name} stopped; the others go on. {err}"

    def _write_spec(self) -> None:
        if not self.write:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / SWEEP_FILE).write_text(
            json.dumps(
                {
                    "grid": self.grid,
                    "config": self.base.to_dict(),
                    "members": [name for name, _ in self.members],
                    "stopped": self.stopped,
                },
                indent=2,
            )
        )
