"""Who this process is among the ranks, and the few collectives the sharded step uses, each counted in bytes.

`Mesh.single()` is one process without a process group: every collective is a no-op that moves (and counts)
nothing, so the single-process step is the world-size-1 case of the same code. `Mesh.from_env()` joins the
process group torchrun describes in the environment (gloo on CPU, nccl on CUDA), with a timeout: a rank that
dies or stalls makes the others fail with `CollectiveError` instead of waiting forever.

Under nccl the collectives run asynchronously on the GPU: a timed-out one is reported by torch's NCCL watchdog
(TORCH_NCCL_ASYNC_ERROR_HANDLING, on by default), which ends the process with its own message after the same
timeout, rather than as a `CollectiveError` raised here; gloo (CPU) raises here.

Bytes are counted per kind ("<collective>/<tag>", e.g. "all_reduce/x_hat") as the payload each rank hands to
the collective (an all-gather: its own contribution), not the wire traffic of the algorithm underneath (a ring
all-reduce of n bytes sends and receives about 2 n (W - 1) / W bytes per rank).
"""

from __future__ import annotations

import os
import pickle
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from sae.errors import ConfigError

DEFAULT_TIMEOUT_S = 300.0  # long enough for a slow first step or a checkpoint write, short enough to notice
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun (its environment names a rank and a world size)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


class CollectiveError(RuntimeError):
    """A collective failed or timed out: another rank probably died or stalled (the message says what to do)."""


@dataclass
class Mesh:
    """This process's place among `world` ranks and its collectives.

    rank, world: this process's rank and the number of ranks. group: the process group (None: world 1, no
    group). device: where this rank computes (cuda:LOCAL_RANK under nccl, cpu under gloo). timeout_s: how
    long a collective waits for the other ranks before failing. sent: payload bytes per kind (module
    docstring), counted from this rank's side.
    """

    rank: int
    world: int
    group: dist.ProcessGroup | None
    device: torch.device
    timeout_s: float
    sent: Counter[str] = field(default_factory=Counter)

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> Mesh:
        """One process, no process group: every collective is a no-op."""
        return cls(0, 1, None, torch.device(device), float("inf"))

    @classmethod
    def from_env(cls, backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Mesh:
        """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

        backend: "gloo" (CPU tensors) or "nccl" (one CUDA device per rank, cuda:LOCAL_RANK); None: nccl when
        CUDA is available, else gloo. timeout_s: how long any collective (the rendezvous included) waits for
        the other ranks before this rank fails with `CollectiveError`.
        """
        missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
        if missing:
            raise ConfigError(
                f"not started by torchrun: the environment lacks {', '.join(missing)}; launch with "
                "`torchrun --nproc-per-node N -m ...`, or use Mesh.single() for one process"
            )
        if not timeout_s > 0:
            raise ConfigError(f"the collective timeout must be > 0 seconds, got {timeout_s}")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend not in ("gloo", "nccl"):
            raise ConfigError(f"unknown distributed backend {backend!r}; use 'gloo' (CPU) or 'nccl' (CUDA)")
        if backend == "nccl":
            if not torch.cuda.is_available():
                raise ConfigError("the nccl backend needs CUDA devices; use backend 'gloo' on the CPU")
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        timeout = timedelta(seconds=timeout_s)
        try:
            if backend == "nccl":
                dist.init_process_group(backend, timeout=timeout, device_id=device)
            else:
                dist.init_process_group(backend, timeout=timeout)
        except (RuntimeError, TimeoutError) as error:  # torch's DistError subclasses RuntimeError
            raise CollectiveError(
                _failure("joining the process group", int(os.environ["RANK"]), timeout_s, error)
            ) from error
        return cls(dist.get_rank(), dist.get_world_size(), dist.group.WORLD, device, timeout_s)

    def close(self) -> None:
        """Leave the process group (a no-op for `Mesh.single()`)."""
        if self.group is not None and dist.is_initialized():
            dist.destroy_process_group()
            self.group = None

    # -- collectives ----------------------------------------------------------------------------------

    def all_reduce_sum_(self, t: Tensor, tag: str = "") -> Tensor:
        """Sum `t` over the ranks, in place (every rank gets the same result); returns t."""
        if self.world > 1:
            self._run("all_reduce", tag, t.numel() * t.element_size(), lambda: dist.all_reduce(t, group=self.group))
        return t

    def barrier(self, tag: str = "") -> None:
        """Wait until every rank gets here (with the mesh's timeout, as `CollectiveError`)."""
        if self.world > 1:
            self._run("barrier", tag, 0, lambda: dist.barrier(group=self.group))

    def all_gather(self, t: Tensor, tag: str = "") -> list[Tensor]:
        """Every rank's `t` (same shape and dtype on every rank), by rank."""
        if self.world == 1:
            return [t]
        out = [torch.empty_like(t) for _ in range(self.world)]
        payload = t.numel() * t.element_size()
        self._run("all_gather", tag, payload, lambda: dist.all_gather(out, t.contiguous(), group=self.group))
        return out

    def all_gather_object(self, obj: Any, tag: str = "") -> list[Any]:
        """Every rank's picklable `obj`, by rank (counted as its pickled size)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        payload = len(pickle.dumps(obj))
        self._run("all_gather_object", tag, payload, lambda: dist.all_gather_object(out, obj, group=self.group))
        return out

    def sent_total(self) -> int:
        """Bytes counted so far over every kind."""
        return sum(self.sent.values())

    def _run(self, op: str, tag: str, payload: int, call) -> None:
        try:
            call()
        except (RuntimeError, TimeoutError) as error:  # gloo: RuntimeError / DistBackendError on timeout or EOF
            raise CollectiveError(_failure(f"{op} {tag!r}", self.rank, self.timeout_s, error, self.world)) from error
        self.sent[f"{op}/{tag}" if tag else op] += payload


def _failure(what: str, rank: int, timeout_s: float, error: BaseException, world: int | None = None) -> str:
    ranks = f"rank {rank} of {world}" if world else f"rank {rank}"
    return (
        f"{what} failed on {ranks} (collective timeout {timeout_s:g} s): another rank probably died or stalled; "
        "look for the first error in the other ranks' output, fix it and restart every rank (resume from the last "
        f"checkpoint); if a rank is merely slow (a long checkpoint write), raise the timeout. Cause: {error}"
    )


def _flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested sections named by dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def check_same_config(mesh: Mesh, cfg: Mapping[str, Any]) -> None:
    """Raise ConfigError on every rank when the ranks were started with different configs (nested dicts of
    picklable values, e.g. `dataclasses.asdict(run_config)`), naming each differing key and its values by rank."""
    configs = [_flatten(c) for c in mesh.all_gather_object(dict(cfg), tag="config")]
    differing: list[str] = []
    for key in sorted(set().union(*configs)):
        values = [c.get(key, "<missing>") for c in configs]
        if any(v != values[0] for v in values[1:]):
            by_rank = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
            differing.append(f"{key} ({by_rank})")
    if differing:
        raise ConfigError(
            f"the {mesh.world} ranks were started with different configs, so they would train different SAEs: "
            f"{'; '.join(differing)}. Start every rank with the same command line and config file"
        )
