"""save_quantized / load_quantized: checkpoints that are atomic on disk and verified at load.

Layout of a checkpoint directory (format 2)::

    config.json                     the model config (transformers), with quantization_config
                                    {"quant_method": "moe_ao", ...} for from_pretrained
    README.md                       a model card with the plan summary (moe_ao.hub_files)
    model.safetensors               plain tensors by FQN; a packed tensor's slot table under its
                                    own FQN and its buffers as "<fqn>::<inner>" (moe_ao.packed_state)
      or model-0000i-of-0000n.safetensors + model.safetensors.index.json (HF's sharded layout)
    moe_ao.json                     format, packed tensor attributes, tied weights, report, and
                                    the manifest: every other file's size and sha256
    plan.json                       the Plan (the "moe_ao.plan" JSON format, moe_ao.plans)
    tokenizer files                 when a tokenizer is given

What a checkpoint guarantees:

- **Atomic replace.** Everything is written into a staging directory and moved into
  place whole (``moe_ao.staged_dir``): a failed or killed save leaves the target as it
  was (the complete old checkpoint, or nothing), never a mix. ``overwrite=True``
  replaces only an empty directory or a moe_ao checkpoint holding nothing but the files
  its manifest lists; anything else there is named and refused.
- **Verified at load.** ``load_quantized`` checks, before building the model, that
  moe_ao.json is intact (it carries its own sha256), that every listed file has its
  recorded size and sha256 (``verify=False`` skips the hashing: about 1.4 GB/s of
  checkpoint on this project's CPUs), that the stored tensors are exactly those the
  model and the packed attributes call for, with the right shapes and dtypes, that
  scales are finite, that tied weights are really tied, and that the plan agrees with
  the stored bits. Every refusal is a ``CheckpointError`` (a ``ValueError``) naming
  the file and the tensor.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from moe_ao.api import PLAN_ATTR, REPORT_ATTR
from moe_ao.hub_files import write_hub_files
from moe_ao.packed_state import SEP, state_and_meta
from moe_ao.staged_dir import StagedDir

FORMAT = "moe_ao.checkpoint"
VERSION = 2
READABLE_VERSIONS = (1, 2)
META_FILE = "moe_ao.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 4 * 2**30  # HF-style shards; a packed tensor's parts stay in one shard
_CHUNK = 16 * 2**20


class CheckpointError(ValueError):
    """A checkpoint that is not one, is incomplete, or does not match what it claims."""


def unwrap(model: nn.Module) -> nn.Module:
    """The model under ``torch.compile`` wrappers (their state dicts add ``_orig_mod.``)."""
    while isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    return model


def file_digest(path: Path) -> str:
    """sha256 of a file, streamed in 16 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def meta_digest(meta: dict[str, Any]) -> str:
    """sha256 of moe_ao.json's content without its own ``sha256`` field (canonical JSON)."""
    body = {k: v for k, v in meta.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _config_for(model: nn.Module) -> Any:
    """The model's config with ``dtype`` set to its floating dtype (what HF's save records), so that
    the loader builds its skeleton in the dtype the tensors are stored in."""
    config = copy.deepcopy(model.config)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if dtype is not None:
        config.dtype = dtype
    return config


def finish_checkpoint(stage: Path, weights: list[str], meta: dict[str, Any], model: nn.Module, config: Any,
                      plan: Any, report: Any, tokenizer: Any = None) -> None:
    """Writes everything but the weights into ``stage``: config (with its quantization_config),
    model card, plan, tokenizer, then moe_ao.json with the manifest of every file (written last:
    it is what makes the folder a checkpoint)."""
    config.save_pretrained(stage)
    plan.to_json(str(stage / "plan.json"))
    write_hub_files(stage, model, plan)
    if tokenizer is not None:
        tokenizer.save_pretrained(stage)
    names = sorted(str(p.relative_to(stage)) for p in stage.rglob("*") if p.is_file() and p.name != META_FILE)
    files = {f: {"bytes": (stage / f).stat().st_size, "sha256": file_digest(stage / f)} for f in names}
    meta = {"format": FORMAT, "version": VERSION, "weights": weights, **meta,
            "report": report.to_dict() if report else None, "files": files}
    meta["sha256"] = meta_digest(meta)
    (stage / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")


def owned_files(path: Path) -> set[str] | None:
    """The files moe_ao wrote in a checkpoint directory (its manifest), or None if it is not one."""
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return None
    if meta.get("version") == 1:  # format 1 had no manifest: its fixed files, plus a tokenizer's
        return {META_FILE, SINGLE_FILE, "plan.json", "config.json", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja"}
    files = meta.get("files")
    return {META_FILE, *files} if isinstance(files, dict) else None


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Tensors split into shards of at most ``max_bytes`` (one tensor's parts never split)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for owner in dict.fromkeys(k.split(SEP)[0] for k in tensors):
        group = {k: t for k, t in tensors.items() if k == owner or k.startswith(owner + SEP)}
        nbytes = sum(t.numel() * t.element_size() for t in group.values())
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1].update(group)
        size += nbytes
    return shards


def write_weights(stage: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Writes the tensors as one file or as HF-style shards with an index; returns the weight files."""
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(stage / SINGLE_FILE), metadata={"format": "pt"})
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(stage / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, name)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (stage / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                               indent=1) + "\n")
    return names


def save_quantized(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Saves a moe_ao-quantized model, atomically (see the module doc for the guarantees).

    Args:
        model: a model returned by :func:`moe_ao.quantize_` (a ``torch.compile`` wrapper of
            one is unwrapped).
        out_dir: target directory; a new path or an empty directory is used as is.
        tokenizer: optional tokenizer saved beside the model.
        overwrite: replace an existing moe_ao checkpoint there (only once the new one is
            complete; a directory holding anything else is refused).
        max_shard_bytes: weights above this are split into HF-style shards.

    Returns:
        The checkpoint path.

    Raises:
        ValueError: the model is not quantized by moe_ao, or out_dir may not be replaced
            (a file; a non-empty directory without ``overwrite``; files moe_ao did not
            write). Nothing is written then.
        TypeError: the model has no transformers config (a plain ``nn.Module`` read by the
            graph pass); nothing is written.
    """
    model = unwrap(model)
    plan = getattr(model, PLAN_ATTR, None)
    if plan is None:
        raise ValueError("model is not quantized by moe_ao; call moe_ao.quantize_ first")
    if not hasattr(getattr(model, "config", None), "save_pretrained"):
        raise TypeError(f"{type(model).__name__}: save_quantized writes a transformers checkpoint (config.json, "
                        f"rebuilt by load_quantized from its model class) and needs a model with a transformers "
                        f"config; this one has none")
    with StagedDir(out_dir, overwrite, owned_files) as stage:
        tensors, meta = state_and_meta(model)
        weights = write_weights(stage.path, tensors, max_shard_bytes)
        del tensors
        finish_checkpoint(stage.path, weights, meta, model, _config_for(model), plan,
                          getattr(model, REPORT_ATTR, None), tokenizer)
        return stage.commit()


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True) -> nn.Module:
    """Loads a checkpoint written by :func:`save_quantized` (same logits, bit for bit).

    Args:
        path: checkpoint directory.
        device: where to put the model.
        verify: check every file's sha256 against the manifest (on by default; costs
            reading the checkpoint once more, ~1.4 GB/s). The structural checks (tensor
            names, shapes, dtypes, packed layouts, finite scales, ties, plan) always run.

    Returns:
        The quantized model in eval mode, with its plan attached.

    Raises:
        CheckpointError: the directory is not a moe_ao checkpoint, is incomplete, or a
            file, tensor, tie or the plan does not match; names the file and tensor.
    """
    from moe_ao.checkpoint_load import load_checkpoint  # the reader and its checks

    return load_checkpoint(Path(path), device, verify)
