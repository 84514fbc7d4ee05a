"""Random-weight checkpoints of real models' shapes, written layer by layer (little memory).

``write_random_checkpoint(config, out)`` makes what a downloaded checkpoint looks like:
``config.json`` and safetensors shards (one per decoder layer, plus one for the rest)
with an HF index, in the checkpoint's on-disk layout (transformers' conversion mapping
reversed: e.g. Mixtral's experts one tensor per expert). Only one layer exists in
memory at a time, so a 28.6 GB checkpoint is written on a 24 GiB machine. Weights are
N(0, 0.02) (norms 1, biases 0), seeded per tensor name: any layer's values are the
same whatever the depth or shard order. For speed and memory benchmarks and tests;
quality is meaningless on them.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from moe_ao.discovery import decoder_layers

__all__ = ["write_random_checkpoint"]


def _value(name: str, like: torch.Tensor, seed: int) -> torch.Tensor:
    if like.ndim < 2:
        return (torch.ones if name.endswith("weight") else torch.zeros)(like.shape, dtype=like.dtype)
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return (torch.randn(like.shape, generator=g, dtype=torch.float32) * 0.02).to(like.dtype)


def write_random_checkpoint(config: Any, out: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                            seed: int = 0) -> Path:
    """Writes a random checkpoint of ``config``'s architecture to ``out`` (see the module doc).

    Args:
        config: a transformers config of a causal LM.
        out: a new directory.
        dtype: the stored dtype.
        seed: the weights' seed.

    Returns:
        ``out``.
    """
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    out = Path(out)
    out.mkdir(parents=True, exist_ok=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    prefix, layers = decoder_layers(model)
    persistent = {k: v for k, v in model.state_dict().items()}
    groups: dict[str, list[str]] = {}
    for key in persistent:
        head = key[len(prefix) + 1:].split(".", 1)[0] if key.startswith(prefix + ".") else "rest"
        groups.setdefault(f"layer-{int(head):05d}" if head != "rest" else "rest", []).append(key)
    weight_map, total = {}, 0
    for group, keys in groups.items():
        tensors = {k: _value(k, persistent[k], seed) for k in keys}
        disk = {k: v.contiguous() for k, v in revert_weight_conversion(model, tensors).items()}
        name = f"model-{group}.safetensors"
        save_file(disk, str(out / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(disk, name)
        total += sum(t.numel() * t.element_size() for t in disk.values())
        del tensors, disk
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    config.dtype = dtype
    config.save_pretrained(out)
    return out
