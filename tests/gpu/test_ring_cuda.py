"""On a CUDA device: the harvester's ring buffer, with the overlap on, delivers every harvested token exactly once
while one of its two streams is kept slow, so that a missing wait would show.

Skipped without CUDA (tests/test_ring_protocol.py checks the same protocol's ordering on the CPU, against a
model of streams and events). A tiny random Gemma-2 (bf16, 3 layers, d_in 512) reads random token rows: nothing
comes from the hub and `datasets` is not needed. Every group the producer's forward returns is captured (a
clone, on the producer's stream) and the delivered batches are compared with it segment by segment: the
delivered rows are rows of their segment, none more often than it holds them, and a full segment's checksum
equals the harvested one's; rows are compared through an exact integer hash of their bits.

torch.cuda._sleep keeps a stream busy for a number of GPU cycles. A slow consumer (its stream sleeps before
every read) still has a half's reads queued when the producer may overwrite it; a slow producer (its stream
sleeps after every forward, before the copies) still has a segment's writes queued when the consumer is handed
it; a rewind (load_state_dict to the start) refills a half the old iterator's queued reads still read. Then each
wait is knocked out in turn, and the comparison must see it.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from harvest import BufferConfig, DataConfig, Harvester, ModelConfig
from harvest.forward import GroupReader
from harvest.random_rows import RandomTokenRows
from harvest.ring import CudaStreams

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device: the ring's streams and events exist only there"
)

D, CONTEXT, ROWS, VOCAB = 512, 128, 8, 512  # a forward group: 8 rows x 127 tokens (the BOS is not harvested)
BATCH, PER_SEGMENT = 512, 8
SEGMENT = BATCH * PER_SEGMENT  # 4096 tokens: a half of the ring, ~4 forward groups
SPECIAL = (0, 1, 2, 3)  # pad, eos, bos, unk
# GPU cycles (~2 GHz). The consumer's stream sleeps before each read: ~5 ms, so when a segment is released
# (the consumer's thread has issued its 8 reads) ~35 ms of them are still queued, while the producer, a few ms
# per forward of this tiny model, waits only for that release. The producer's stream sleeps after each forward,
# before its copies: ~20 ms, so a segment is handed over with its last copies still queued.
SLOW_READ = 10_000_000
SLOW_FILL = 40_000_000


@pytest.fixture(scope="module")
def lm():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=D,
        intermediate_size=2 * D,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=128,
        max_position_embeddings=CONTEXT,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    config._attn_implementation = "eager"  # Gemma-2's soft-capping (RECIPES 6)
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config).to("cuda", torch.bfloat16).eval().requires_grad_(False)
    return model, SimpleNamespace(all_special_ids=list(SPECIAL), pad_token_id=0, bos_token_id=2)


def harvester(lm) -> Harvester:
    rows = RandomTokenRows(VOCAB, CONTEXT, bos_token_id=2, seed=0, special_ids=SPECIAL)
    return Harvester(
        ModelConfig(model="random-gemma2", layer=1, model_dtype="bfloat16"),
        DataConfig(dataset="random-token-rows", context_size=CONTEXT),
        BufferConfig(buffer_tokens=2 * SEGMENT, forward_batch_rows=ROWS, passes=1, overlap=True),
        batch_size=BATCH,
        device=next(lm[0].parameters()).device,
        lm=lm,
        progress=False,
        rows=rows,
    )


class Capture:
    """Every group the producers harvest, by the index of its first row; `slow` makes the producer's stream sleep
    after each forward."""

    def __init__(self, monkeypatch):
        self.groups: dict[int, list[torch.Tensor]] = {}
        self.slow = False
        next_group = GroupReader.next_group

        def capture(reader):
            group = next_group(reader)
            self.groups.setdefault(group.start["index"], []).append(group.acts[:, 0].clone())
            if self.slow:
                torch.cuda._sleep(SLOW_FILL)
            return group

        monkeypatch.setattr(GroupReader, "next_group", capture)

    def stream(self) -> torch.Tensor:
        """The harvested activations in document order, [N, D] (after a device synchronisation)."""
        for index, copies in self.groups.items():
            assert all(torch.equal(c, copies[0]) for c in copies), f"group {index} harvested twice differs"
        return torch.cat([self.groups[i][0] for i in sorted(self.groups)]).float()


@pytest.fixture
def capture(monkeypatch) -> Capture:
    return Capture(monkeypatch)


def row_hashes(x: torch.Tensor) -> torch.Tensor:
    """An exact integer hash of each row of x [N, D] float32, [N] int64 (bits below 2^31 times weights below 2^20,
    summed over D = 512: no overflow); their sum is an order-free checksum."""
    weights = torch.randint(1, 2**20, (x.shape[1],), generator=torch.Generator().manual_seed(0))
    return (x.contiguous().view(torch.int32).long() * weights.to(x.device)).sum(1)


def excess(got: torch.Tensor, want: torch.Tensor) -> int:
    """How many of the hashes got [n] exceed their count among want [m] (0: got is a sub-multiset of want)."""
    values, counts = got.unique(return_counts=True)
    ordered = want.sort().values
    have = torch.searchsorted(ordered, values, right=True) - torch.searchsorted(ordered, values)
    return int((counts - have).clamp_min(0).sum())


def problems(delivered: list[torch.Tensor], stream: torch.Tensor) -> list[str]:
    """How delivered batches [BATCH, D] (from the first batch of segment 0 on) differ from the harvested stream.
    Rows are compared as multisets: two tokens can have equal activations (the same first token after the BOS)."""
    found = []
    for k in range(0, len(delivered), PER_SEGMENT):
        segment = k // PER_SEGMENT
        got = row_hashes(torch.cat(delivered[k : k + PER_SEGMENT]))
        want = row_hashes(stream[segment * SEGMENT : (segment + 1) * SEGMENT])
        extra = excess(got, want)
        checksum = len(got) < SEGMENT or int(got.sum()) == int(want.sum())
        if len(want) < SEGMENT or extra or not checksum:
            found.append(
                f"segment {segment}: {len(got)} rows delivered of {len(want)} harvested, {extra} of them "
                f"not harvested or repeated, checksum {int(got.sum())} vs {int(want.sum())}"
            )
    return found


def consume(iterator, n: int, slow: bool) -> list[torch.Tensor]:
    batches = []
    for _ in range(n):
        batches.append(next(iterator))
        if slow:
            torch.cuda._sleep(SLOW_READ)  # queued on the consumer's stream before the next batch's read
    return batches


def once(lm, capture: Capture, pace: str) -> list[str]:
    """Six segments with a slow consumer or a slow producer; what differs."""
    capture.slow = pace == "slow producer"
    h = harvester(lm)
    delivered = consume(iter(h), 6 * PER_SEGMENT, slow=pace == "slow consumer")
    h.close()
    torch.cuda.synchronize()
    return problems(delivered, capture.stream())


def rewind(lm, capture: Capture) -> list[str]:
    """A slow consumer in segment 4 (half 0, half its batches read) rewinds to the start over the same ring."""
    h = harvester(lm)
    start = h.state_dict()
    first = consume(iter(h), 4 * PER_SEGMENT + PER_SEGMENT // 2, slow=True)
    h.load_state_dict(start)
    second = consume(iter(h), 2 * PER_SEGMENT, slow=True)
    h.close()
    torch.cuda.synchronize()
    stream = capture.stream()
    return [f"before the rewind: {p}" for p in problems(first, stream)] + [
        f"after the rewind: {p}" for p in problems(second, stream)
    ]


@pytest.mark.parametrize("pace", ["slow consumer", "slow producer"])
def test_every_token_is_delivered_exactly_once(lm, capture, pace):
    assert once(lm, capture, pace) == []


def test_a_rewind_over_the_same_ring(lm, capture):
    assert rewind(lm, capture) == []


def knock_out(monkeypatch, edge: str) -> None:
    """Leave one wait out of the protocol: "ready" (the consumer's, before reading a fill), "freed" (the
    producer's, before overwriting a half the consumer read) or "start" (a new producer's, after the previous
    iterator's reads)."""
    if edge == "ready":
        monkeypatch.setattr(CudaStreams, "consumer_waits", lambda self, event: None)
        return
    caller = {"freed": "release", "start": "__init__"}[edge]
    consumer_event = CudaStreams.consumer_event

    def event(self):  # an event never recorded: waiting on it waits for nothing
        return torch.cuda.Event() if sys._getframe(1).f_code.co_name == caller else consumer_event(self)

    monkeypatch.setattr(CudaStreams, "consumer_event", event)


@pytest.mark.parametrize("edge", ["ready", "freed", "start"])
def test_a_missing_wait_is_seen(lm, capture, monkeypatch, edge):
    knock_out(monkeypatch, edge)
    if edge == "start":
        found = rewind(lm, capture)
    else:
        found = once(lm, capture, "slow producer" if edge == "ready" else "slow consumer")
    assert found, (
        f"with the {edge} wait knocked out every token still arrived once: these tests cannot see that "
        "wait missing (make the slow stream slower)"
    )
