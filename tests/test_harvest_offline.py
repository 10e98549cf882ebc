"""The real offline default: Gemma-3 270M (converted once into the saekit cache) on ICD-10-CM text."""

import pytest
import torch

from harvest import BufferConfig, DataConfig, Harvester, ModelConfig
from harvest.lm import num_layers


@pytest.mark.slow
def test_offline_default_harvests_icd10():
    data_cfg = DataConfig(max_examples=4)
    h = Harvester(ModelConfig(), data_cfg, BufferConfig(buffer_tokens=256, forward_batch_rows=2), batch_size=128)
    assert h.model.config.model_type == "gemma3_text"
    assert num_layers(h.model) == 18 and h.d_in == 640
    row, _ = h.rows.take(1)[0]
    assert row[0] == h.tokenizer.bos_token_id and len(row) == data_cfg.context_size  # an ICD-10 block fills a row
    assert "\n" in h.tokenizer.decode(row) and h.tokenizer.bos_token_id not in row[1:]
    batch = next(iter(h))
    assert batch.shape == (128, 640) and batch.dtype == torch.float32
    assert torch.isfinite(batch).all() and batch.norm(dim=1).min() > 0
