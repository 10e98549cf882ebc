"""Harvesting from a tiny random Gemma-2 saved to disk, so load_lm takes its real loading path."""

import json

import numpy as np
import pytest
import torch

from harvest import BufferConfig, DataConfig, Harvester, ModelConfig, load_lm
from harvest.activations import keep_mask, layer_activations, norm_outliers
from harvest.errors import HarvestError
from harvest.forward import GroupReader
from harvest.lm import decoder_layers, num_layers
from harvest.text import TokenRows, load_texts
from tests.conftest import N_LAYERS


def make(
    tiny_model,
    text_file,
    layer=2,
    batch_size=16,
    exclude_special_tokens=True,
    max_examples=12,
    layers=None,
    norm_outlier_factor=None,
    **buffer,
):
    buffer_cfg = BufferConfig(**{"buffer_tokens": 64, "forward_batch_rows": 4, "passes": 1, **buffer})
    data_cfg = DataConfig(
        dataset=text_file, context_size=16, max_examples=max_examples, exclude_special_tokens=exclude_special_tokens
    )
    model_cfg = ModelConfig(model=tiny_model, layer=layer, norm_outlier_factor=norm_outlier_factor)
    return Harvester(model_cfg, data_cfg, buffer_cfg, batch_size=batch_size, layers=layers, progress=False)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def padded_batch(harvester, n_rows):
    """The first n_rows token rows, right-padded, with their keep mask."""
    rows = [row for row, _ in harvester.rows.take(n_rows)]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask, keep_mask(ids, mask, harvester.tokenizer, True)


def assert_drawn_from(harvested, reference):
    """Check each harvested vector is one of the reference activations; return which one."""
    exact = "donot_use_mm_for_euclid_dist"  # the matmul form loses ~1e-2 to cancellation at these norms
    distance, source = torch.cdist(harvested, reference, compute_mode=exact).min(dim=1)
    assert distance.max() < 1e-4 * reference.norm(dim=1).mean()
    return source


def test_load_lm(tiny_model):
    model, tokenizer = load_lm(ModelConfig(model=tiny_model, layer=3))
    assert model.config._attn_implementation == "eager"  # Gemma-2 soft-capping needs it
    assert num_layers(model) == N_LAYERS and decoder_layers(model) is model.model.layers
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert tokenizer.bos_token_id == 2


@pytest.mark.parametrize("layer", [0, 2, N_LAYERS - 1])
def test_truncated_forward_matches_full_forward(tiny_model, text_file, layer):
    h = make(tiny_model, text_file, layer=layer)
    ids, mask, keep = padded_batch(h, 6)
    assert (~mask.bool()).any(), "the batch should include padding"
    captured = []
    handle = h.model.model.layers[layer].register_forward_hook(lambda m, a, out: captured.append(out))
    with torch.inference_mode():
        h.model(input_ids=ids, attention_mask=mask)  # the whole CausalLM, LM head included
    handle.remove()
    full = captured[0][0] if isinstance(captured[0], tuple) else captured[0]
    later = [h.model.lm_head, h.model.model.norm, *h.model.model.layers[layer + 1 :]]
    ran = []
    handles = [module.register_forward_hook(lambda m, a, out: ran.append(m)) for module in later]
    truncated = layer_activations(h.model, layer, ids, mask)
    for handle in handles:
        handle.remove()
    assert not ran, "nothing after the hooked layer may run"
    assert truncated.shape == (6, ids.shape[1], 32)
    torch.testing.assert_close(truncated[keep], full[keep], rtol=1e-6, atol=1e-6 * full[keep].abs().max().item())


def test_no_special_positions_harvested(tiny_model, text_file):
    h = make(tiny_model, text_file)
    ids, mask, keep = padded_batch(h, 12)
    # Our rows hold one special token, the BOS at position 0 (no EOS is appended), then text, then padding.
    assert torch.equal(keep, mask.bool() & (torch.arange(ids.shape[1]) > 0))
    assert torch.equal(keep_mask(ids, mask, h.tokenizer, exclude_special_tokens=False), mask.bool())
    # Position 0 always holds BOS, so every row shares one BOS activation: find it among the batches.
    bos = layer_activations(h.model, 2, ids[:1, :1], mask[:1, :1])[0, 0]

    def bos_count(harvester):
        batches = torch.cat(take(iter(harvester), 8))
        return int(torch.isclose(batches, bos, rtol=1e-5, atol=1e-6).all(dim=1).sum())

    assert bos_count(h) == 0
    assert bos_count(make(tiny_model, text_file, exclude_special_tokens=False)) > 0  # the Salmon setup keeps it


def test_batches_are_shuffled_activations_of_the_text(tiny_model, text_file):
    h = make(tiny_model, text_file, buffer_tokens=48)
    ids, mask, keep = padded_batch(h, 12)
    reference = layer_activations(h.model, 2, ids, mask)[keep]  # document order
    first, second = take(iter(h), 2)
    assert first.dtype == torch.float32 and first.shape == (16, h.d_in)
    source = assert_drawn_from(torch.cat([first, second]), reference)
    assert source.unique().numel() == 32  # drawn without replacement
    assert not torch.equal(source[:16], source[:16].sort().values)  # not in document order
    assert not torch.equal(first, reference[:16])


def reference_stream(h, n_tokens, layers=(2,)):
    """The first n_tokens harvested activations in document order, [n, L, D], from the same forward groups."""
    rows = TokenRows(
        load_texts(h.data_cfg), h.tokenizer, h.data_cfg.context_size, h.data_cfg.data_seed, h.data_cfg.max_examples
    )
    reader = GroupReader(
        h.model,
        h.tokenizer,
        rows,
        list(layers),
        h.buffer_cfg.forward_batch_rows,
        h.data_cfg.exclude_special_tokens,
        h.model_cfg.norm_outlier_factor,
    )
    groups, n = [], 0
    while n < n_tokens:
        groups.append(reader.next_group().acts)
        n += len(groups[-1])
    return torch.cat(groups)[:n_tokens]


def sorted_rows(x):
    """The rows of x [N, D] in lexicographic order: equal as multisets iff equal after this."""
    order = np.lexsort(x.numpy().T[::-1])
    return x[torch.from_numpy(order)]


@pytest.mark.parametrize("overlap", [False, True])
def test_every_token_delivered_exactly_once_per_pass(tiny_model, text_file, overlap):
    h = make(tiny_model, text_file, buffer_tokens=100, batch_size=16, overlap=overlap)  # halves of 48 = 3 batches
    assert h.segment_tokens == 48 and h.batches_per_pass == 3
    batches = take(iter(h), 5 * 3)  # five segments, crossing forward groups and epochs (12 examples, ~100 tokens)
    reference = reference_stream(h, 5 * 48)[:, 0]
    for k in range(5):
        delivered = torch.cat(batches[3 * k : 3 * k + 3])
        assert torch.equal(sorted_rows(delivered), sorted_rows(reference[48 * k : 48 * (k + 1)]))
    h.close()


def test_consecutive_batches_are_not_in_document_order(tiny_model, text_file):
    h = make(tiny_model, text_file, buffer_tokens=2 * 320, batch_size=16, max_examples=None)
    delivered = torch.cat(take(iter(h), 20))  # one segment of 320 tokens from ~30 documents
    reference = reference_stream(h, 320)[:, 0]
    source = assert_drawn_from(delivered, reference).double()
    rank = source.argsort().argsort().double()
    spearman = torch.corrcoef(torch.stack([torch.arange(320.0, dtype=torch.float64), rank]))[0, 1]
    adjacent = ((source[1:] - source[:-1]).abs() == 1).double().mean()
    # In document order both would be ~1; a uniform shuffle gives |rho| ~ 1/sqrt(320) and ~2/320 adjacent pairs.
    assert abs(spearman) < 0.2, spearman
    assert adjacent < 0.05, adjacent
    h.close()


def test_overlap_gives_the_same_batches(tiny_model, text_file):
    inline = take(iter(make(tiny_model, text_file, overlap=False)), 12)
    threaded = make(tiny_model, text_file, overlap=True)
    assert all(torch.equal(a, b) for a, b in zip(inline, take(iter(threaded), 12)))
    threaded.close()


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("passes,stop", [(1, 1), (1, 2), (1, 7), (2, 3), (2, 4), (2, 9)])
def test_resume_continues_the_identical_stream(tiny_model, text_file, passes, stop, overlap):
    # 2 batches per segment; 12 examples of at most 15 kept tokens each, so epochs end inside segments, and
    # segment boundaries fall inside forward groups (the cursor then skips part of a group).
    total = 16 if passes == 2 else 12
    reference = take(iter(make(tiny_model, text_file, passes=passes)), total)
    h = make(tiny_model, text_file, passes=passes, overlap=overlap)
    first = take(iter(h), stop)
    assert all(torch.equal(a, b) for a, b in zip(first, reference))
    state = json.loads(json.dumps(h.state_dict()))
    h.close()
    resumed = make(tiny_model, text_file, passes=passes, overlap=overlap)
    resumed.load_state_dict(state)
    rest = take(iter(resumed), total - stop)
    resumed.close()
    assert all(torch.equal(a, b) for a, b in zip(rest, reference[stop:]))
    assert not torch.equal(reference[0], reference[2])  # a new segment, or a new permutation of the same one


def test_segment_boundaries_inside_forward_groups(tiny_model, text_file):
    h = make(tiny_model, text_file)
    iterator = iter(h)
    skips = []
    for _ in range(6):
        take(iterator, 2)
        skips.append(h.state_dict()["cursor"]["skip"])
    h.close()
    assert any(skips), "the test data should put segment boundaries inside forward groups"


def test_several_layers_from_one_forward(tiny_model, text_file):
    both = make(tiny_model, text_file, layers=(3, 1))
    assert both.describe().startswith("activation buffer: 2 x 32 tokens x 2 layer(s) x 32 x float32")
    batches = take(iter(both), 3)
    assert batches[0].shape == (16, 2, 32)
    assert both.buffer_bytes == both._ring.numel() * 4
    for index, layer in enumerate((3, 1)):
        single = take(iter(make(tiny_model, text_file, layer=layer)), 3)
        assert all(torch.equal(b[:, index], s) for b, s in zip(batches, single))
    both.close()


def test_norm_outliers():
    acts = torch.ones(10, 2, 4)
    acts[3, 1] *= 20  # an outlier at the second layer only
    acts[7] *= 5
    assert norm_outliers(acts, 10.0).tolist() == [i == 3 for i in range(10)]
    assert norm_outliers(acts, 4.0).tolist() == [i in (3, 7) for i in range(10)]


def test_outlier_tokens_are_dropped(tiny_model, text_file):
    h = make(tiny_model, text_file, norm_outlier_factor=1.3, exclude_special_tokens=False)
    everything = make(tiny_model, text_file, exclude_special_tokens=False)
    group = GroupReader(h.model, h.tokenizer, everything.rows, [2], 4, exclude_special_tokens=False).next_group()
    norms = group.acts[:, 0].norm(dim=1)
    outlier = norms > 1.3 * norms.median()
    assert 0 < outlier.sum() < len(norms), "the test needs some outliers in the first group, not all"
    kept = reference_stream(h, int((~outlier).sum()))[:, 0]
    assert torch.equal(kept, group.acts[~outlier, 0])
    assert_drawn_from(torch.cat(take(iter(h), 2)), reference_stream(h, 64)[:, 0])
    h.close()


def test_producer_errors_reach_the_consumer(tiny_model, text_file):
    h = make(tiny_model, text_file, overlap=True)
    take_rows, calls = h.rows.take, []

    def failing(n):
        calls.append(n)
        if len(calls) > 6:
            raise HarvestError("the text source broke")
        return take_rows(n)

    h.rows.take = failing
    with pytest.raises(HarvestError, match="the text source broke"):
        take(iter(h), 50)
    h.close()


def test_a_position_of_another_harvester_version_is_refused(tiny_model, text_file):
    h = make(tiny_model, text_file)
    with pytest.raises(HarvestError, match="another version of the harvester"):
        h.load_state_dict({"fill_start": {"epoch": 0, "index": 0}, "fill": 0, "pass": 0, "batch": 0})


def test_token_rows_epochs_and_position(tiny_model, text_file):
    _, tokenizer = load_lm(ModelConfig(model=tiny_model, layer=0))
    texts = load_texts(DataConfig(dataset=text_file))
    rows = TokenRows(texts, tokenizer, context_size=16, data_seed=1, max_examples=5)
    epoch0, epoch1 = rows.take(5), rows.take(5)
    assert all(row[0] == 2 and 2 not in row[1:] and len(row) <= 16 for row, _ in epoch0 + epoch1)
    assert epoch0[-1][1] == {"epoch": 1, "index": 0}
    assert sorted(r for r, _ in epoch0) == sorted(r for r, _ in epoch1)  # the same 5 examples ...
    assert [r for r, _ in epoch0] != [r for r, _ in epoch1]  # ... in a new order
    again = TokenRows(texts, tokenizer, context_size=16, data_seed=1, max_examples=5)
    again.seek(epoch0[2][1])
    assert again.take(7) == epoch0[3:] + epoch1


def test_metadata(tiny_model, text_file):
    h = make(tiny_model, text_file, layer=3)
    assert h.d_in == 32
    assert h.metadata() == {
        "model_name": tiny_model,
        "hook_name": "blocks.3.hook_resid_post",
        "hook_layer": 3,
        "context_size": 16,
        "prepend_bos": True,
        "dataset_path": text_file,
        "exclude_special_tokens": True,
    }


def test_layer_out_of_range(tiny_model):
    with pytest.raises(HarvestError, match=f"has {N_LAYERS} decoder layers"):
        load_lm(ModelConfig(model=tiny_model, layer=N_LAYERS))


def test_unknown_model_fails_fast_offline(tmp_path):
    with pytest.raises(HarvestError, match="offline"):
        load_lm(ModelConfig(model="no-such-org/no-such-model"))
    with pytest.raises(HarvestError, match="no loadable config.json"):
        load_lm(ModelConfig(model=str(tmp_path)))


def test_missing_text_field_lists_columns(text_file):
    with pytest.raises(HarvestError, match=r"available columns: \['text', 'id'\]"):
        load_texts(DataConfig(dataset=text_file, text_field="body"))


def test_unknown_dataset(tmp_path):
    with pytest.raises(HarvestError, match="offline"):
        load_texts(DataConfig(dataset="no-such-org/no-such-dataset"))
    with pytest.raises(HarvestError, match="matches no file"):
        load_texts(DataConfig(dataset=str(tmp_path / "missing.jsonl")))


def test_buffer_too_small(tiny_model, text_file):
    with pytest.raises(HarvestError, match="buffer too small for one batch"):
        make(tiny_model, text_file, buffer_tokens=8, batch_size=16)


def test_config_validation():
    with pytest.raises(HarvestError, match="model_dtype"):
        ModelConfig(model_dtype="fp8")
    with pytest.raises(HarvestError, match="model_device"):
        ModelConfig(model_device="gpu")
    with pytest.raises(HarvestError, match="context_size"):
        DataConfig(context_size=1)
    with pytest.raises(HarvestError, match="passes"):
        BufferConfig(passes=0)


def test_offline_default_cache_is_written_atomically(tmp_path, monkeypatch):
    from harvest import offline_model

    monkeypatch.setenv("SAEKIT_CACHE", str(tmp_path))

    def crash(out):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(offline_model, "_convert", crash)
    with pytest.raises(KeyboardInterrupt):
        offline_model.offline_default_dir()
    assert list(tmp_path.iterdir()) == []  # neither a half cache nor a leftover temporary directory
    monkeypatch.setattr(offline_model, "_convert", lambda out: (out / "config.json").write_text("{}"))
    target = offline_model.offline_default_dir()
    assert target.parent == tmp_path and (target / "config.json").is_file()
    assert list(tmp_path.iterdir()) == [target]


def test_random_rows_feed_the_harvester(tiny_model, text_file):
    from harvest.random_rows import RandomTokenRows

    _, tokenizer = load_lm(ModelConfig(model=tiny_model, layer=2))

    def rows():
        return RandomTokenRows(
            len(tokenizer), 16, tokenizer.bos_token_id, seed=3, special_ids=tuple(tokenizer.all_special_ids)
        )

    first = rows().take(5)
    assert all(len(r) == 16 and r[0] == 2 and not set(r[1:]) & set(tokenizer.all_special_ids) for r, _ in first)
    again = rows()
    again.seek(first[1][1])
    assert again.take(3) == first[2:]
    h = make(tiny_model, text_file)
    h = Harvester(
        h.model_cfg, h.data_cfg, h.buffer_cfg, batch_size=16, lm=(h.model, h.tokenizer), rows=rows(), progress=False
    )
    batches = take(iter(h), 4)
    assert batches[0].shape == (16, 32) and h.state_dict()["segment"] == 2
    h.close()


@pytest.mark.parametrize("overlap", [False, True])
def test_a_superseded_iterator_says_so_instead_of_hanging(tiny_model, text_file, overlap):
    h = make(tiny_model, text_file, overlap=overlap)
    old = iter(h)
    take(old, 3)  # inside segment 1: the next batch needs a new segment from the producer
    new = iter(h)
    first = next(new)
    with pytest.raises(RuntimeError, match="iterator was stopped"):
        take(old, 4)
    assert first.shape == (16, 32)
    h.close()
