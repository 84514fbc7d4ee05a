"""Quantizing checkpoints larger than memory: layer by layer, from their safetensors files, resumable."""

from moe_ao.stream.model import StreamedModel
from moe_ao.stream.pipeline import quantize_pretrained
from moe_ao.stream.source import CheckpointSource, SourceError
from moe_ao.stream.synthetic import write_random_checkpoint

__all__ = ["CheckpointSource", "SourceError", "StreamedModel", "quantize_pretrained", "write_random_checkpoint"]
