"""Harvester: an infinite, shuffled, resumable stream of activation batches [B, D] from a live LM.

Buffer semantics: fill a buffer with buffer_tokens activations (special positions dropped) from the token
rows; deliver it `passes` times, each pass in its own seeded permutation, in batches of batch_size (the
last buffer_tokens % batch_size tokens of each permutation are dropped; a new permutation drops others);
then refill from where the text stream stopped. The position is (text position at the start of the
current fill, fill index, pass index, batch index): resuming re-harvests the current fill, which is
deterministic, and skips the batches already delivered.
"""

import numpy as np
import torch
from tqdm.auto import tqdm

from .activations import keep_mask, layer_activations
from .config import BufferConfig, DataConfig, ModelConfig
from .errors import HarvestError
from .lm import check_layer, load_lm, num_layers
from .text import TokenRows, load_texts

_BUFFER_SEED = 0xB0FF
"""Mixed into the buffer's shuffle seeds, so they never coincide with the example-order seeds."""


class Harvester:
    """Iterate for float32 activation batches [batch_size, d_in] on `device`; state_dict() resumes exactly.

    One iterator at a time: iterating advances this object's position.
    """

    def __init__(self, model_cfg: ModelConfig, data_cfg: DataConfig, buffer_cfg: BufferConfig,
                 batch_size: int = 1024, device: str | torch.device = "cpu", lm: tuple | None = None,
                 progress: bool = True):
        """lm: an already loaded (model, tokenizer) for model_cfg, to share one model between harvesters.
        progress: show a bar while filling the buffer (the slow part on a CPU)."""
        if batch_size < 1:
            raise HarvestError(f"batch_size={batch_size} must be at least 1")
        if buffer_cfg.buffer_tokens < batch_size:
            raise HarvestError(
                f"buffer too small for one batch: buffer_tokens={buffer_cfg.buffer_tokens} < batch_size={batch_size}; "
                "raise buffer_tokens or lower batch_size"
            )
        self.model_cfg, self.data_cfg, self.buffer_cfg = model_cfg, data_cfg, buffer_cfg
        self.batch_size, self.device, self.progress = batch_size, torch.device(device), progress
        self.model, self.tokenizer = lm or load_lm(model_cfg)
        check_layer(model_cfg, num_layers(self.model))
        self.d_in: int = self.model.config.get_text_config().hidden_size
        self.rows = TokenRows(load_texts(data_cfg), self.tokenizer, data_cfg.context_size, data_cfg.data_seed,
                              data_cfg.max_examples)
        self.batches_per_pass = buffer_cfg.buffer_tokens // batch_size
        self._special = set(self.tokenizer.all_special_ids) if data_cfg.exclude_special_tokens else set()
        self._fill_start, self._fill, self._pass, self._batch = self.rows.position(), 0, 0, 0

    def metadata(self) -> dict:
        """What a checkpoint records about where its activations came from (SAELens-style names)."""
        layer = self.model_cfg.layer
        return {
            "model_name": self.model_cfg.model,
            "hook_name": f"blocks.{layer}.hook_resid_post",
            "hook_layer": layer,
            "context_size": self.data_cfg.context_size,
            "prepend_bos": bool(self.rows.prefix),
            "dataset_path": self.data_cfg.dataset,
            "exclude_special_tokens": self.data_cfg.exclude_special_tokens,
        }

    def state_dict(self) -> dict:
        """JSON-able position: a fresh Harvester with the same configs continues from the next batch."""
        return {"fill_start": dict(self._fill_start), "fill": self._fill, "pass": self._pass, "batch": self._batch}

    def load_state_dict(self, state: dict) -> None:
        self._fill_start = {"epoch": int(state["fill_start"]["epoch"]), "index": int(state["fill_start"]["index"])}
        self._fill, self._pass, self._batch = int(state["fill"]), int(state["pass"]), int(state["batch"])

    def __iter__(self):
        while True:
            buffer = self._fill_buffer()
            fill, perms = self._fill, {}
            while self._fill == fill:
                if self._pass not in perms:
                    rng = np.random.default_rng([self.data_cfg.data_seed, _BUFFER_SEED, fill, self._pass])
                    perms[self._pass] = torch.from_numpy(rng.permutation(len(buffer))).to(buffer.device)
                start = self._batch * self.batch_size
                idx = perms[self._pass][start:start + self.batch_size]
                self._advance()
                yield buffer[idx].to(self.device, torch.float32)

    def _advance(self) -> None:
        """Move the position to the next batch, so state_dict() between batches never points at a spent one."""
        self._batch += 1
        if self._batch == self.batches_per_pass:
            self._pass, self._batch = self._pass + 1, 0
        if self._pass == self.buffer_cfg.passes:
            # The text stream stands where this fill stopped reading (see _fill_buffer).
            self._fill_start, self._fill, self._pass = self.rows.position(), self._fill + 1, 0

    def _fill_buffer(self) -> torch.Tensor:
        """buffer_tokens activations [N, D] in the model's dtype, read from the text position of this fill."""
        n_total = self.buffer_cfg.buffer_tokens
        self.rows.seek(self._fill_start)
        param = next(self.model.parameters())
        buffer = torch.empty(n_total, self.d_in, dtype=param.dtype, device=param.device)
        n = 0
        with tqdm(total=n_total, desc=f"harvesting fill {self._fill}", unit="tok", leave=False,
                  disable=not self.progress) as bar:
            while n < n_total:
                input_ids, attention_mask = self._next_rows(n_total - n, param.device)
                keep = keep_mask(input_ids, attention_mask, self.tokenizer, self.data_cfg.exclude_special_tokens)
                acts = layer_activations(self.model, self.model_cfg.layer, input_ids, attention_mask)[keep]
                acts = acts[: n_total - n]
                buffer[n:n + len(acts)] = acts
                n += len(acts)
                bar.update(len(acts))
        return buffer

    def _next_rows(self, need: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to forward_batch_rows rows, no more than `need` kept tokens require, right-padded.

        Rows after the one that completes `need` are handed back to the text stream (by seeking to the
        position after the last row used), so at most one row's tail is wasted per fill.
        """
        rows, kept, empty = [], 0, 0
        while not rows or (kept < need and len(rows) < self.buffer_cfg.forward_batch_rows):
            candidates = self.rows.take(self.buffer_cfg.forward_batch_rows - len(rows))
            for row, position in candidates:
                n_keep = sum(t not in self._special for t in row)
                empty = 0 if n_keep else empty + 1
                if empty > self.rows.num_examples:
                    raise HarvestError("the dataset yields no tokens to harvest: every example is empty")
                self.rows.seek(position)
                if n_keep:  # a row of special tokens only would cost a forward and give nothing
                    rows.append(row)
                    kept += n_keep
                if kept >= need:
                    break
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(map(len, rows))
        input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows], device=device)
        attention_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=device)
        return input_ids, attention_mask
