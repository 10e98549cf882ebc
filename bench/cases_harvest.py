"""Harvester cases: the bare truncated LM forward, the `Harvester` iterator, and the harvester feeding
`Trainer.train_step`; the bare forward is the baseline ("x ref" is tokens/s over the bare forward's).

Sizes: "gemma2-2b" (CUDA): a Gemma-2-2B-shaped model with random weights (hidden 2304, 26 layers, 8 heads, 4 KV
heads, head dim 256, intermediate 9216, vocab 256000, eager attention) in bf16, layer 20, context 1024, batch
4096, SAE 65536 latents (issue 13's criterion); "offline" (CPU): the offline default (ModelConfig() and
DataConfig(): Gemma-3 270M, layer 12, ICD-10-CM text, context 128), batch 1024, SAE 2560 latents; "tiny"
(--quick): a 3-layer random Gemma-2 of width 64. The random models read CPython's own prose (dataset
"pydoc-prose") through a byte-level BPE tokenizer trained on it here (no Gemma tokenizer exists offline); it
costs the forward nothing. The buffer holds 8 batches (4 for "offline"): two halves (segments), one delivered
while the next is harvested in the background (BufferConfig defaults: overlap, passes = 1, so delivered tokens/s
= harvested tokens/s in the steady state); one timed repetition is one segment. These cases are timed by wall
clock around a device-wide synchronisation (the harvesting runs on its own thread and CUDA stream).

Checks: the truncated forward equals the untruncated one at the hooked layer; every vector of the
harvester's first batch is the activation of a non-special position of the rows the harvester ran through
the model (seen by a forward pre-hook on the model's backbone, recomputed without truncation), and none is a
special (BOS) position's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from bench import counts
from bench import harvest_api as api
from bench.checks import Check, Comparison
from bench.env import Env, Workload
from bench.registry import Case
from bench.shapes import BenchDtype

ROWS = 16  # rows per LM forward (BufferConfig.forward_batch_rows)


class LMSetup(NamedTuple):
    model: nn.Module
    tokenizer: Any
    model_cfg: Any
    data_cfg: Any
    buffer_cfg: Any
    layer: int
    context: int
    batch: int
    d_sae: int
    target_l0: int
    dtype: BenchDtype  # "fp32" or "bf16"
    elt: int


_RANDOM_GEMMA2 = {
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "intermediate_size": 128,
        "vocab_size": 512,
    },
    "gemma2-2b": {
        "hidden_size": 2304,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "intermediate_size": 9216,
        "vocab_size": 256000,
    },
}
_SIZES = {  # layer, context, batch, d_sae, target L0, tokenizer vocabulary, buffer in batches
    "tiny": (1, 64, 256, 256, 8, 512, 8),
    "offline": (12, 128, 1024, 2560, 32, None, 4),  # segments of 2 batches: ~4 s each on 2 cores
    "gemma2-2b": (20, 1024, 4096, 65536, 64, 8192, 8),  # 32768 tokens, BufferConfig's default
}
_PROFILES = {"tiny": frozenset({"quick"}), "offline": frozenset({"cpu"}), "gemma2-2b": frozenset({"cuda"})}


def _tokenizer(context: int, vocab: int):
    """A byte-level BPE trained on the pydoc prose documents (with Gemma's pad/eos/bos/unk special tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from harvest.documents import pydoc_documents

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    bpe.train_from_iterator(
        pydoc_documents(context)[:400],
        trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def _random_gemma2(sizes: dict, device: torch.device, dtype: torch.dtype) -> nn.Module:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(**sizes, max_position_embeddings=8192, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    config._attn_implementation = "eager"  # soft-capping: SDPA refuses it (RECIPES 6), set on the config
    torch.manual_seed(0)
    with torch.device(device):
        model = Gemma2ForCausalLM._from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


def _setup(size: str, device: torch.device) -> LMSetup:
    layer, context, batch, d_sae, target_l0, vocab, buffered = _SIZES[size]
    buffer_cfg = api.BufferConfig(buffer_tokens=buffered * batch, forward_batch_rows=ROWS, passes=1)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars between the table's rows
    if size == "offline":
        model, tokenizer, model_cfg, data_cfg = api.offline_default()
        model.to(device)
        dtype = next(model.parameters()).dtype
    else:
        dtype = torch.bfloat16 if device.type == "cuda" and size != "tiny" else torch.float32
        tokenizer = _tokenizer(context, vocab)
        model = _random_gemma2(_RANDOM_GEMMA2[size], device, dtype)
        model_cfg = api.ModelConfig(
            model=f"random-gemma2-{size}", layer=layer, model_dtype="bfloat16" if dtype == torch.bfloat16 else "float32"
        )
        data_cfg = api.DataConfig(dataset="pydoc-prose", context_size=context)
    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    return LMSetup(
        model,
        tokenizer,
        model_cfg,
        data_cfg,
        buffer_cfg,
        layer,
        context,
        batch,
        d_sae,
        target_l0,
        name,
        2 if name == "bf16" else 4,
    )


def lm_setup(env: Env, size: str) -> LMSetup:
    """The size's model, tokenizer and configs, built once and shared by the cases of that size (the sweep's
    too: bench/cases_sweep.py)."""
    return env.shared(("lm", size), lambda: _setup(size, env.device))


def _layers(model: nn.Module) -> nn.ModuleList:
    n = model.config.get_text_config().num_hidden_layers
    return next(m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n)


def untruncated(model: nn.Module, layer: int, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Decoder layer `layer`'s output from a forward through every layer of the backbone (the reference)."""
    out: list[Tensor] = []
    handle = _layers(model)[layer].register_forward_hook(
        lambda m, a, o: out.append(o[0] if isinstance(o, tuple) else o)
    )
    try:
        with torch.inference_mode():
            model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        handle.remove()
    return out[0]


def _tolerance(s: LMSetup) -> float:
    """Relative to the activations' scale: the truncated and untruncated forwards run the same operations."""
    return 1e-4 if s.dtype == "fp32" else 2.0**-8


def _random_rows(s: LMSetup, rows: int, device: torch.device) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, len(s.tokenizer), (rows, s.context), generator=g)
    ids[:, 0] = s.tokenizer.bos_token_id
    return ids.to(device), torch.ones_like(ids, device=device)


def _check_bare(env: Env, s: LMSetup) -> Comparison:
    ids, mask = _random_rows(s, 2, env.device)
    got = api.bare_forward(s.model, s.layer, ids, mask).float()
    ref = untruncated(s.model, s.layer, ids, mask).float()
    cmp = Comparison(f"2 rows x {s.context} tokens, layer {s.layer}")
    err = (got - ref).abs().max().item() / ref.abs().max().item() if got.shape == ref.shape else float("inf")
    cmp.within("layer output (truncated vs full forward)", err, _tolerance(s))
    return cmp


def _nearest(batch: Tensor, candidates: Tensor) -> Tensor:
    """Distance from each row of batch [N, D] to its nearest row of candidates [M, D], in float64."""
    b, c = batch.double(), candidates.double()
    cc = c.pow(2).sum(1)
    out = []
    for chunk in b.split(1024):
        d2 = chunk.pow(2).sum(1, keepdim=True) + cc[None, :] - 2 * chunk @ c.t()
        out.append(d2.min(1).values.clamp_min(0).sqrt())
    return torch.cat(out)


def _check_harvester(env: Env, s: LMSetup, stream: api.Batches) -> tuple[Comparison, Tensor]:
    """The first batch against the activations of the rows the harvester read (captured by a pre-hook on the
    backbone, from whichever thread runs the forward); the stream is closed before the reference forwards, so
    that no harvesting thread's hook sits on the layer while they run."""
    seen: list[tuple[Tensor, Tensor]] = []

    def capture(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        seen.append((ids.detach().clone(), torch.ones_like(ids) if mask is None else mask.detach().clone()))

    handle = s.model.base_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        first = next(stream)
    finally:
        stream.close()
        handle.remove()
    if env.device.type == "cuda":  # the captured rows were copied on the harvesting thread's stream
        torch.cuda.synchronize(env.device)
    cmp = Comparison(f"first batch of {s.batch} vs {sum(int(m.sum()) for _, m in seen)} tokens read")
    D = s.model.config.get_text_config().hidden_size
    if tuple(first.shape) != (s.batch, D) or first.dtype != torch.float32:
        cmp.fail(f"batch is {tuple(first.shape)} {first.dtype}; expected ({s.batch}, {D}) torch.float32")
        return cmp, first
    special = torch.tensor(sorted(s.tokenizer.all_special_ids), device=env.device)
    keep, drop = [], []
    for ids, mask in seen:
        acts = untruncated(s.model, s.layer, ids, mask).float()
        is_special = torch.isin(ids, special) & mask.bool()
        keep.append(acts[mask.bool() & ~is_special])
        drop.append(acts[is_special])
    candidates = torch.cat(keep)
    scale = candidates.norm(dim=1).mean().item()
    cmp.within(
        "distance to the nearest read activation", _nearest(first, candidates).max().item() / scale, _tolerance(s)
    )
    specials = torch.cat(drop)
    if specials.numel() and s.data_cfg.exclude_special_tokens:
        on_special = _nearest(first, specials) <= _tolerance(s) * scale
        cmp.exact("vectors from special positions", on_special.sum(), torch.tensor(0))
    return cmp, first


def _check(size: str, impl: str) -> Callable[[Env], Check]:
    def check(env: Env) -> Check:
        s = lm_setup(env, size)
        if impl == "bare":
            return _check_bare(env, s).result()
        cmp, first = _check_harvester(env, s, _stream(s, env))
        if impl == "harvester+train" and cmp.result().ok:
            stats = _feed(env, s, iter([first])).step()
            if not all(math.isfinite(v) for v in stats) or not stats.l0 > 0:
                cmp.fail(f"train_step on a harvested batch gave {stats}")
        return cmp.result()

    return check


def _stream(s: LMSetup, env: Env) -> api.Batches:
    return api.Batches(s.model, s.tokenizer, s.model_cfg, s.data_cfg, s.buffer_cfg, s.batch, env.device)


def _feed(env: Env, s: LMSetup, source: Iterator[Tensor]) -> api.TrainerFeed:
    backend = "triton" if env.kernels == "compiled" else "reference"
    return api.TrainerFeed(
        source, s.model_cfg, s.data_cfg, s.buffer_cfg, s.batch, s.d_sae, s.target_l0, env.device, backend
    )


def step_counts(sparse: bool, B: int, D: int, F: int, K: float) -> tuple[float, float]:
    """FLOPs and bytes of one training step of the trainer's kind (sparse: at the nominal L0 K, no window pairs
    counted)."""
    if sparse:
        return counts.step_sparse(B, D, F, K, 0, min(F, B * K))
    return counts.step_dense(B, D, F)


def _prepare(size: str, impl: str) -> Callable[[Env], Workload]:
    def prepare(env: Env) -> Workload:
        s = lm_setup(env, size)
        config = s.model.config
        if impl == "bare":
            ids, mask = _random_rows(s, ROWS, env.device)
            tokens = ROWS * s.context
            flops, nbytes = counts.lm_forward(config, s.layer, tokens, 1, s.context, s.elt)
            return Workload(
                lambda: api.bare_forward(s.model, s.layer, ids, mask),
                flops,
                nbytes,
                tokens,
                s.dtype,
                note=f"{ROWS} rows x {s.context}",
                wall_clock=True,
            )
        stream = _stream(s, env)
        n = s.buffer_cfg.buffer_tokens // 2 // s.batch  # batches per segment (half of the ring buffer)
        tokens = n * s.batch
        forwards = math.ceil(tokens / (ROWS * (s.context - 1)))
        flops, nbytes = counts.lm_forward(config, s.layer, tokens, forwards, s.context, s.elt)
        if impl == "harvester":
            return Workload(
                lambda: [next(stream) for _ in range(n)],
                flops,
                nbytes,
                tokens,
                s.dtype,
                note=f"one segment: {n} batches of {s.batch}",
                wall_clock=True,
                cleanup=stream.close,
            )
        feed = _feed(env, s, stream)
        feed.step()  # the first batch: initialisation and the first step, before the timed segment
        D = config.get_text_config().hidden_size
        sparse = feed.trainer.sparse_step
        step_flops, step_bytes = step_counts(sparse, s.batch, D, s.d_sae, s.target_l0)
        return Workload(
            lambda: [feed.step() for _ in range(n)],
            flops + n * step_flops,
            nbytes + n * step_bytes,
            tokens,
            s.dtype,
            wall_clock=True,
            cleanup=stream.close,
            note=f"one segment + {n} {'sparse' if sparse else 'dense'} steps, F={s.d_sae}",
        )

    return prepare


def cases() -> list[Case]:
    return [
        Case("harvest", size, impl, _check(size, impl), _prepare(size, impl), _PROFILES[size], "torch", ("bare", None))
        for size in _SIZES
        for impl in ("bare", "harvester", "harvester+train")
    ]
