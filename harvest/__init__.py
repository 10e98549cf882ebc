"""Harvesting residual-stream activations from a live language model, as shuffled, resumable batches."""

from .config import BufferConfig, DataConfig, ModelConfig
from .errors import HarvestError
from .harvester import Harvester
from .lm import load_lm
from .shard import Shard

__all__ = ["BufferConfig", "DataConfig", "HarvestError", "Harvester", "ModelConfig", "Shard", "load_lm"]
