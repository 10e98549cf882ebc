"""Harvester: an infinite, shuffled, resumable stream of activation batches from a live LM, no disk.

Activations go straight from the truncated forward into a ring buffer of two halves preallocated on the
training device (harvest/ring.py). Each half holds one segment of S = buffer_tokens / 2 tokens (rounded
down to whole batches); the consumer delivers it `passes` times, each pass in its own seeded permutation,
so with passes = 1 every harvested token is delivered exactly once, and a batch is a uniform sample of S
tokens from many documents. Meanwhile the next segment is harvested into the other half (in a background
thread with BufferConfig.overlap).

The position {"segment", "cursor", "pass", "batch"} resumes exactly: the cursor says where the segment's
tokens come from (harvest/segments.py), the segment is harvested again, and the batches already delivered
are skipped.

Data parallelism (harvest/shard.py): under torchrun each rank's Harvester runs the model on its own forward
groups (the rank-th of every round of world groups) into its own ring, and delivers batches of its own
tokens; harvest/gather.py assembles the global batch and the run's data position from all ranks.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import BufferConfig, DataConfig, ModelConfig
from .errors import HarvestError
from .forward import GroupReader
from .lm import check_layer, load_lm, num_layers
from .nonfinite import NonFiniteFilter
from .ring import CudaStreams, RingProducer, stream_sync
from .segments import SegmentFiller
from .shard import Shard
from .text import token_rows

_BUFFER_SEED = 0xB0FF
"""Mixed into the buffer's shuffle seeds, so they never coincide with the example-order seeds."""

_STATE_KEYS = {"segment", "cursor", "pass", "batch"}


class Harvester:
    """Iterate for float32 activation batches on `device`: [batch_size, d_in] with one captured layer,
    [batch_size, len(layers), d_in] with several. state_dict() / load_state_dict() resume exactly.

    Under torchrun (RANK and WORLD_SIZE set) a Harvester shards itself: it harvests only its rank's forward
    groups, and batch_size is this rank's share of the global batch (Shard.local_batch_size). Pass
    shard=Shard(0, 1) for a harvester that reads everything, e.g. one used by a single rank.

    One iterator at a time: iterating advances this object's position; starting a new iteration (or
    load_state_dict) stops the previous one's producer.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        data_cfg: DataConfig,
        buffer_cfg: BufferConfig,
        batch_size: int = 1024,
        device: str | torch.device = "cpu",
        lm: tuple | None = None,
        progress: bool = True,
        layers: Sequence[int] | None = None,
        rows=None,
        shard: Shard | None = None,
    ):
        """lm: an already loaded (model, tokenizer) for model_cfg, to share one model between harvesters.
        layers: the decoder layers to capture in one forward (default: model_cfg.layer alone).
        rows: a token-row source to read instead of data_cfg's (anything with TokenRows' take, position,
            seek and close; the bench feeds random token rows on machines without the datasets package).
        progress: show a bar while the first segment is harvested (the start-up wait).
        shard: which forward groups this harvester runs (harvest/shard.py); None reads torchrun's RANK and
            WORLD_SIZE (Shard.from_env: Shard(0, 1), everything, outside torchrun)."""
        if batch_size < 1:
            raise HarvestError(f"batch_size={batch_size} must be at least 1")
        half = buffer_cfg.buffer_tokens // 2
        if half < batch_size:
            raise HarvestError(
                f"buffer too small for one batch: buffer_tokens={buffer_cfg.buffer_tokens} is two halves of {half} "
                f"tokens, and each half must hold a batch of batch_size={batch_size}; raise buffer_tokens to at "
                f"least {2 * batch_size} or lower batch_size"
            )
        self.model_cfg, self.data_cfg, self.buffer_cfg = model_cfg, data_cfg, buffer_cfg
        self.batch_size, self.device, self.progress = batch_size, torch.device(device), progress
        self.layers = tuple(layers) if layers else (model_cfg.layer,)
        self.shard = shard if shard is not None else Shard.from_env()
        self.gathered = False
        """Set by harvest.gather.GatheredBatches, which assembles the global batch from every rank's."""
        self._warn_ungathered = shard is None and self.shard.world > 1
        self.model, self.tokenizer = lm or load_lm(model_cfg)
        check_layer(model_cfg, num_layers(self.model), self.layers)
        self.d_in: int = self.model.config.get_text_config().hidden_size
        # Tokenised ahead in a background thread.
        self.rows = rows if rows is not None else token_rows(data_cfg, self.tokenizer)
        self.batches_per_pass = half // batch_size
        self.segment_tokens = self.batches_per_pass * batch_size  # whole batches: no token is ever dropped
        self.dtype = next(self.model.parameters()).dtype
        self._ring: torch.Tensor | None = None
        self._sync: CudaStreams | None = None  # the ring's stream operations, shared by its producers
        self._producer: RingProducer | None = None
        self._segment, self._pass, self._batch = 0, 0, 0
        self._cursor = {"group_start": self.rows.position(), "skip": 0}
        self.nonfinite = NonFiniteFilter(model_cfg.max_nonfinite_fraction, self.dtype)

    @property
    def buffer_bytes(self) -> int:
        """Device memory of the ring buffer (the forward's own activations and one group's tail come on top)."""
        return 2 * self.segment_tokens * len(self.layers) * self.d_in * self.dtype.itemsize

    def describe(self) -> str:
        rank = f" (rank {self.shard.rank} of {self.shard.world})" if self.shard.world > 1 else ""
        return (
            f"activation buffer: 2 x {self.segment_tokens:,} tokens x {len(self.layers)} layer(s) x {self.d_in} x "
            f"{str(self.dtype).removeprefix('torch.')} = {self.buffer_bytes / 2**20:,.1f} MiB on {self.device}{rank}"
        )

    def metadata(self, layer: int | None = None) -> dict:
        """What a checkpoint records about where its activations came from (SAELens-style names)."""
        layer = self.layers[0] if layer is None else layer
        return {
            "model_name": self.model_cfg.model,
            "hook_name": f"blocks.{layer}.hook_resid_post",
            "hook_layer": layer,
            "context_size": self.data_cfg.context_size,
            "prepend_bos": bool(self.rows.prefix),
            "dataset_path": self.data_cfg.dataset,
            "exclude_special_tokens": self.data_cfg.exclude_special_tokens,
            **({"data_dir": self.data_cfg.data_dir} if self.data_cfg.data_dir else {}),
        }

    def stats(self) -> dict[str, int]:
        """Counts since this harvester was made (the trainer logs them): tokens harvested, non-finite dropped."""
        return self.nonfinite.stats()

    def state_dict(self) -> dict:
        """JSON-able position: a fresh Harvester with the same configs (and shard) continues from the next batch.
        Under data parallelism this is one rank's; harvest.gather.data_position collects every rank's."""
        return {
            "segment": self._segment,
            "cursor": {"group_start": dict(self._cursor["group_start"]), "skip": self._cursor["skip"]},
            "pass": self._pass,
            "batch": self._batch,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a position: this harvester's own state, or a data-parallel run's {"world", "ranks"}
        (harvest.gather.data_position), of which this rank takes its part by restore_data_position's policy
        (exact on as many ranks as saved it; otherwise the earliest unfinished position, with a warning)."""
        if set(state) == {"world", "ranks"}:
            from .gather import restore_data_position

            state = restore_data_position(state, self.shard.rank, self.shard.world)
        if set(state) != _STATE_KEYS:
            raise HarvestError(
                f"this data position has keys {sorted(state)}, not {sorted(_STATE_KEYS)}: it was written by another "
                "version of the harvester and cannot be continued; start a new run"
            )
        self.close()
        self._segment, self._pass, self._batch = int(state["segment"]), int(state["pass"]), int(state["batch"])
        self._cursor = {"group_start": dict(state["cursor"]["group_start"]), "skip": int(state["cursor"]["skip"])}

    def close(self) -> None:
        """Stop the background threads (harvesting, tokenising), if they run; iterating starts them again."""
        if self._producer is not None:
            self._producer.stop()
            self._producer = None
        self.rows.close()

    def _allocate(self) -> torch.Tensor:
        if self._ring is None:
            shape = (2, self.segment_tokens, len(self.layers), self.d_in)
            try:
                self._ring = torch.empty(shape, dtype=self.dtype, device=self.device)
            except torch.OutOfMemoryError as err:
                raise HarvestError(f"cannot allocate the {self.describe()}: lower buffer_tokens") from err
            self._sync = stream_sync(self._ring, self.buffer_cfg.overlap)
        return self._ring

    def __iter__(self):
        self.close()
        if self._warn_ungathered and not self.gathered:
            self._warn_ungathered = False
            warnings.warn(
                f"this Harvester sharded itself from torchrun's environment (rank {self.shard.rank} of "
                f"{self.shard.world}): it delivers only this rank's share of the data. Wrap it in "
                "harvest.gather.GatheredBatches for the global batch, pass shard=Shard(0, 1) for every token on "
                "every rank, or pass shard=Shard.from_env() if per-rank batches are what you want",
                stacklevel=2,
            )
        reader = GroupReader(
            self.model,
            self.tokenizer,
            self.rows,
            self.layers,
            self.buffer_cfg.forward_batch_rows,
            self.data_cfg.exclude_special_tokens,
            self.model_cfg.norm_outlier_factor,
            self.nonfinite,
            self.shard,
        )
        bar = tqdm(
            total=self.segment_tokens,
            desc=f"harvesting segment {self._segment}",
            unit="tok",
            leave=False,
            disable=not self.progress,
        )
        ring = self._allocate()
        producer = self._producer = RingProducer(
            ring,
            self._sync,
            SegmentFiller(reader),
            self._segment,
            self._cursor,
            self.buffer_cfg.overlap,
            bar.update,
        )
        try:
            while True:
                segment = producer.wait(self._segment)
                bar.close()
                half, perm_pass = self._ring[segment.half], None
                while self._segment == segment.index:
                    producer.check()  # a superseded iterator must not read the half a newer producer refills
                    if perm_pass != self._pass:  # each pass over the half in its own seeded order
                        perm_pass = self._pass
                        rng = np.random.default_rng([self.data_cfg.data_seed, _BUFFER_SEED, segment.index, self._pass])
                        perm = torch.from_numpy(rng.permutation(self.segment_tokens)).to(self.device)
                    start = self._batch * self.batch_size
                    batch = half.index_select(0, perm[start : start + self.batch_size]).to(torch.float32)
                    self._advance(segment)
                    if self._segment != segment.index:
                        producer.release(segment)
                    yield batch[:, 0] if len(self.layers) == 1 else batch
        finally:
            bar.close()
            producer.stop()
            if self._producer is producer:
                self._producer = None

    def _advance(self, segment) -> None:
        """Move the position to the next batch, so state_dict() between batches never points at a spent one."""
        self._batch += 1
        if self._batch == self.batches_per_pass:
            self._pass, self._batch = self._pass + 1, 0
        if self._pass == self.buffer_cfg.passes:
            self._segment, self._pass, self._cursor = self._segment + 1, 0, segment.end
