"""Splicing into the live tiny random Gemma-2: exact identities of the spliced, zero- and mean-ablated runs."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from harvest import DataConfig, ModelConfig, load_lm
from harvest.activations import keep_mask, layer_activations
from harvest.text import TokenRows, load_texts
from sae.checkpoint import load_sae_weights, sae_cfg
from sae.evaluation.metrics import FiringAccumulator
from sae.evaluation.splice import (
    activation_mean,
    downstream_loss,
    lm_logits,
    pad_rows,
    prediction_mask,
    sae_from_weights,
    spliced,
)

LAYER = 1


@pytest.fixture(scope="module")
def lm(tiny_model):
    return load_lm(ModelConfig(model=tiny_model, layer=LAYER, model_device="cpu"))


@pytest.fixture(scope="module")
def batches(lm, text_file):
    """Two right-padded batches of 5 rows (BOS + up to 15 text tokens), with padding in each."""
    _, tokenizer = lm
    stream = TokenRows(load_texts(DataConfig(dataset=text_file, context_size=16)), tokenizer, 16)
    rows = [row for row, _ in stream.take(10)]
    out = [pad_rows(rows[:5], tokenizer.pad_token_id), pad_rows(rows[5:], tokenizer.pad_token_id)]
    assert all((mask == 0).any() for _, mask in out), "each batch should include padding"
    return out


def run(lm, batches, sae, **kwargs):
    model, tokenizer = lm
    return downstream_loss(model, tokenizer, LAYER, batches, sae, **kwargs)


def reference_ce(model, input_ids, attention_mask, target_mask):
    """Summed next-token CE over the target mask, by F.cross_entropy on the full logits."""
    logits = lm_logits(model, input_ids, attention_mask)[:, :-1].float()
    targets = input_ids[:, 1:].masked_fill(~target_mask, -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()


def test_prediction_mask_scores_every_real_next_token(lm, batches):
    _, tokenizer = lm
    for input_ids, attention_mask in batches:
        mask = prediction_mask(input_ids, attention_mask, tokenizer)
        # Rows are [BOS, text..., pad...]: positions 0 .. len - 2 predict the text tokens, nothing predicts
        # BOS or padding.
        assert torch.equal(mask.sum(1), attention_mask.sum(1) - 1)
        assert torch.equal(mask, attention_mask[:, 1:].bool())


def test_identity_splice_is_exactly_clean(lm, batches):
    model, tokenizer = lm
    r = run(lm, batches, lambda x: x.clone())
    assert r.delta_ce == 0.0 and r.kl == 0.0 and r.ce_spliced == r.ce_clean
    assert r.loss_recovered_zero == 1.0 and r.loss_recovered_mean == 1.0
    assert r.tokens == sum(int(m.sum()) - len(m) for _, m in batches)
    assert r.spliced_positions == r.tokens  # no EOS: every text token is spliced and predicted once
    ce = sum(reference_ce(model, i, m, prediction_mask(i, m, tokenizer)) for i, m in batches) / r.tokens
    assert r.ce_clean == pytest.approx(ce, rel=1e-6)
    assert r.ce_zero_ablation != r.ce_clean and r.ce_mean_ablation != r.ce_clean


def test_zero_splice_equals_zero_ablation(lm, batches):
    model, tokenizer = lm
    r = run(lm, batches, torch.zeros_like)
    assert r.ce_spliced == r.ce_zero_ablation and r.loss_recovered_zero == 0.0
    assert r.delta_ce == pytest.approx(r.ce_zero_ablation - r.ce_clean, rel=1e-12)
    # Independently: zero the kept positions with a hook written here (torch.where, not index assignment).
    total = 0.0
    for input_ids, attention_mask in batches:
        keep = keep_mask(input_ids, attention_mask, tokenizer, exclude_special_tokens=True)

        def zero_kept(module, args, out, keep=keep):
            return torch.where(keep[..., None], 0.0, out)

        handle = model.model.layers[LAYER].register_forward_hook(zero_kept)
        try:
            scored = prediction_mask(input_ids, attention_mask, tokenizer)
            total += reference_ce(model, input_ids, attention_mask, scored)
        finally:
            handle.remove()
    assert r.ce_zero_ablation == pytest.approx(total / r.tokens, rel=1e-6)


def test_mean_splice_equals_mean_ablation(lm, batches):
    model, tokenizer = lm
    acts = []
    for input_ids, attention_mask in batches:
        keep = keep_mask(input_ids, attention_mask, tokenizer, exclude_special_tokens=True)
        acts.append(layer_activations(model, LAYER, input_ids, attention_mask)[keep])
    expected_mean = torch.cat(acts).double().mean(0)
    mean = activation_mean(model, tokenizer, LAYER, batches)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-12, atol=1e-9)
    r = run(lm, batches, lambda x: mean.to(x).expand_as(x))
    assert r.ce_spliced == r.ce_mean_ablation and r.loss_recovered_mean == 0.0
    # The mean passed in or computed from the evaluated set is the same mean.
    assert run(lm, batches, lambda x: x.clone(), mean=mean).ce_mean_ablation == r.ce_mean_ablation
    # Another mean gives another mean ablation: the passed-in mean is the one used.
    assert run(lm, batches, lambda x: x.clone(), mean=2 * mean).ce_mean_ablation != r.ce_mean_ablation


def test_corrupted_reconstruction_changes_the_loss(lm, batches):
    gen = torch.Generator().manual_seed(0)
    r = run(lm, batches, lambda x: x + x.std() * torch.randn(x.shape, generator=gen))
    assert r.delta_ce != 0.0 and abs(r.delta_ce) > 1e-3
    assert r.kl > 1e-3
    recovered = (r.ce_zero_ablation - r.ce_spliced) / (r.ce_zero_ablation - r.ce_clean)
    assert r.loss_recovered_zero == pytest.approx(recovered, rel=1e-12)
    recovered = (r.ce_mean_ablation - r.ce_spliced) / (r.ce_mean_ablation - r.ce_clean)
    assert r.loss_recovered_mean == pytest.approx(recovered, rel=1e-12)


def test_kl_is_clean_to_spliced(lm, batches):
    model, tokenizer = lm

    def distort(x):
        return 1.5 * x + 0.3

    r = run(lm, batches, distort)
    total = 0.0
    for input_ids, attention_mask in batches:
        keep = keep_mask(input_ids, attention_mask, tokenizer, exclude_special_tokens=True)
        scored = prediction_mask(input_ids, attention_mask, tokenizer)
        clean = lm_logits(model, input_ids, attention_mask)[:, :-1][scored].float().log_softmax(-1)
        with spliced(model, LAYER, keep, distort):
            out = lm_logits(model, input_ids, attention_mask)[:, :-1][scored].float().log_softmax(-1)
        # F.kl_div(input=log q, target=log p) = sum p (log p - log q) = KL(p_clean || q_spliced).
        total += F.kl_div(out, clean, log_target=True, reduction="sum").item()
    assert r.kl == pytest.approx(total / r.tokens, rel=1e-5)
    assert r.kl > 1e-3


def test_special_positions_keep_their_activation(lm, batches):
    model, tokenizer = lm
    input_ids, attention_mask = batches[0]
    keep = keep_mask(input_ids, attention_mask, tokenizer, exclude_special_tokens=True)
    assert not keep[:, 0].any() and (input_ids[:, 0] == tokenizer.bos_token_id).all()
    seen = []

    def corrupt(x):
        seen.append(x.clone())
        return x + 1000.0

    clean = lm_logits(model, input_ids, attention_mask)
    with spliced(model, LAYER, keep, corrupt):
        out = lm_logits(model, input_ids, attention_mask)
    # The function saw exactly the non-special, non-pad activations ...
    torch.testing.assert_close(seen[0], layer_activations(model, LAYER, input_ids, attention_mask)[keep])
    # ... and the BOS position, which attends only to itself, is untouched, while text positions change.
    assert torch.equal(out[:, 0], clean[:, 0])
    assert not torch.allclose(out[keep], clean[keep])
    # Splicing BOS too (the Salmon setup) does change it: the check above can fail.
    with spliced(model, LAYER, keep_mask(input_ids, attention_mask, tokenizer, False), corrupt):
        assert not torch.allclose(lm_logits(model, input_ids, attention_mask)[:, 0], clean[:, 0])


def identity_sae_folder(path, d: int):
    """A JumpReLU SAE whose x_hat is exactly x: latents +x_d and -x_d, thresholds ~0, zero biases."""
    eye = torch.eye(d)
    weights = {
        "W_enc": torch.cat([eye, -eye], dim=1),
        "b_enc": torch.zeros(2 * d),
        "W_dec": torch.cat([eye, -eye], dim=0),
        "b_dec": torch.zeros(d),
        "threshold": torch.full((2 * d,), 1e-30),
    }
    path.mkdir()
    save_file(weights, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps(sae_cfg(d, 2 * d, metadata={}, extra={})))
    return path


def test_sae_from_checkpoint_weights(lm, batches, tmp_path):
    model, _ = lm
    d = model.config.hidden_size
    weights, _ = load_sae_weights(identity_sae_folder(tmp_path / "sae", d))
    firing = FiringAccumulator(2 * d)
    sae = sae_from_weights(weights, on_forward=lambda x, out: firing.update(out.indices, out.values))
    r = run(lm, batches, sae)
    assert r.delta_ce == 0.0 and r.kl == 0.0
    # One of the +x_d / -x_d latents fires per dimension on every spliced token.
    assert firing.tokens == r.spliced_positions and firing.result().mean_l0 == d
    x = torch.randn(4, d).to(torch.bfloat16)
    assert sae(x).dtype == torch.bfloat16 and torch.equal(sae(x), x)
    with pytest.raises(ValueError, match="threshold"):
        sae_from_weights({k: v for k, v in weights.items() if k != "threshold"})


def test_a_one_shot_iterator_needs_a_mean(lm, batches):
    with pytest.raises(ValueError, match="one-shot"):
        run(lm, iter(batches), lambda x: x)


class _TupleLayer(nn.Module):
    """A decoder layer in the older transformers style: returns (hidden_states,)."""

    def __init__(self, d: int):
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, h):
        return (h + torch.tanh(self.proj(h)),)


class _TupleLM(nn.Module):
    def __init__(self, vocab: int = 11, d: int = 6, n_layers: int = 3):
        super().__init__()
        self.config = SimpleNamespace(get_text_config=lambda: SimpleNamespace(num_hidden_layers=n_layers))
        self.embed, self.head = nn.Embedding(vocab, d), nn.Linear(d, vocab)
        self.layers = nn.ModuleList(_TupleLayer(d) for _ in range(n_layers))

    def forward(self, input_ids, attention_mask, use_cache=False):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)[0]
        return SimpleNamespace(logits=self.head(h))


def test_tuple_layer_outputs_are_spliced_too():
    torch.manual_seed(0)
    model = _TupleLM()
    ids = torch.randint(0, 11, (2, 5))
    mask = torch.ones_like(ids)
    where = torch.zeros(2, 5, dtype=torch.bool)
    where[:, 2:] = True
    clean = lm_logits(model, ids, mask)
    with spliced(model, 1, where, lambda x: x.clone()):
        assert torch.equal(lm_logits(model, ids, mask), clean)
    with spliced(model, 1, where, torch.zeros_like):
        out = lm_logits(model, ids, mask)
    assert torch.equal(out[:, :2], clean[:, :2]) and not torch.allclose(out[:, 2:], clean[:, 2:])
