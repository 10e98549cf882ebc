"""Shared fixtures: a tiny random Gemma-2 saved to disk with a trained BPE tokenizer, and a small JSONL text."""

import json
import os
import random

import pytest
import torch
from hypothesis import settings

# Without a GPU the kernels run in Triton's interpreter, which is read when a module defining a kernel is
# imported: set it before any test module imports one, so the result does not depend on which test file
# pytest collects first (bench's interpreted checks failed when tests/test_sweep.py ran first).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# CI runs the same hypothesis examples every time (a submission lands or not on its own merits); local runs
# keep exploring new examples, and a failure they find is a bug to fix, not to rerun.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tests run tiny products: on the shared 2-core machines, under load, two OpenMP threads made a [80, 32]
    matmul take ~14 ms instead of ~0.05 ms, and the test shapes gain nothing from a second thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


N_LAYERS = 4
WORDS = (
    "patient presents with acute chest pain radiating to the left arm fever cough dyspnea "
    "history of diabetes hypertension fracture of femur unspecified sequela encounter"
).split()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-gemma2")
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    bpe.train_from_iterator([" ".join(WORDS)] * 4, trainers.BpeTrainer(vocab_size=300, special_tokens=specials))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    config = Gemma2Config(
        vocab_size=bpe.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        initializer_range=0.5,
    )
    torch.manual_seed(0)
    Gemma2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> str:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "notes.jsonl"
    # Lengths 1..40 words: some rows are truncated at context 16, some are mostly padding.
    lines = [{"text": " ".join(rng.choices(WORDS, k=rng.randint(1, 40))), "id": i} for i in range(40)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)
