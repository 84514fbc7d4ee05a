"""save_quantized / load_quantized: safetensors + plan.json + config, written atomically.

Layout of a checkpoint directory::

    config.json            the model config (transformers), with quantization_config
                           {"quant_method": "moe_ao", ...} for from_pretrained
    README.md              a model card with the plan summary (moe_ao.hub_files)
    model.safetensors      plain tensors by FQN; packed tensors as their slot table under
                           "<fqn>" and buffers as "<fqn>::<inner>" (moe_ao.packed_state)
    moe_ao.json            format version, packed tensor attributes, report, tied weights
    plan.json              the Plan (the "moe_ao.plan" JSON format, moe_ao.plans)
    tokenizer files        when a tokenizer is given

Everything is written to a temporary sibling directory that is renamed into place
only when complete, so an interrupted or failed save never leaves a broken
checkpoint behind (and never damages an existing one).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moe_ao import experts as experts_impl
from moe_ao.api import PLAN_ATTR, REPORT_ATTR, QuantizationReport, swap_in
from moe_ao.hub_files import write_hub_files
from moe_ao.packed_state import packed_state_dict, rebuild_packed
from moe_ao.plans import Plan
from moe_ao.tensors.packed import PackedWeight

FORMAT = "moe_ao.checkpoint"
VERSION = 1


def save_quantized(model: nn.Module, out_dir: str | os.PathLike, tokenizer: Any = None, overwrite: bool = False) -> Path:
    """Saves a moe_ao-quantized model.

    Args:
        model: a model returned by :func:`moe_ao.quantize_`.
        out_dir: target directory.
        tokenizer: optional tokenizer saved beside the model.
        overwrite: replace an existing directory (only after the new one is complete).

    Returns:
        The checkpoint path.

    Raises:
        ValueError: the model is not quantized by moe_ao, or out_dir exists and
            ``overwrite`` is False.
    """
    plan = getattr(model, PLAN_ATTR, None)
    if plan is None:
        raise ValueError("model is not quantized by moe_ao; call moe_ao.quantize_ first")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tensors, meta = packed_state_dict(model)
        save_file(tensors, str(tmp / "model.safetensors"))
        model.config.save_pretrained(tmp)
        report = getattr(model, REPORT_ATTR, None)
        meta |= {"format": FORMAT, "version": VERSION, "report": report.to_dict() if report else None}
        (tmp / "moe_ao.json").write_text(json.dumps(meta, indent=1) + "\n")
        plan.to_json(str(tmp / "plan.json"))
        write_hub_files(tmp, model, plan)  # quantization_config in config.json, README.md model card
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_meta(path: Path) -> dict[str, Any]:
    """The checkpoint's moe_ao.json, checked for format and version (raises ValueError)."""
    meta_file = path / "moe_ao.json"
    if not meta_file.is_file():
        raise ValueError(f"{path}: not a moe_ao checkpoint (no moe_ao.json)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(
            f"{meta_file}: format {meta.get('format')!r} v{meta.get('version')!r} not supported;"
            f" allowed: {FORMAT!r} v{VERSION}"
        )
    return meta


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Loads a checkpoint written by :func:`save_quantized` (same logits, bit for bit).

    Args:
        path: checkpoint directory.
        device: where to put the model.

    Returns:
        The quantized model in eval mode, with its plan attached.

    Raises:
        ValueError: the directory is not a moe_ao checkpoint, or tensors are missing.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    meta = read_meta(path)
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=config.dtype)
    flat = load_file(str(path / "model.safetensors"))
    new = rebuild_packed(lambda key: flat.pop(key, None), meta, str(path))
    state = model.state_dict()
    missing = set(state) - set(flat) - set(new) - set(meta["tied"])
    if missing:
        raise ValueError(f"{path}: checkpoint lacks tensors {sorted(missing)[:5]}")
    swap_in(model, new)
    model.load_state_dict(flat, strict=False, assign=True)
    if meta["tied"]:
        model.tie_weights()
    if any(isinstance(t, PackedWeight) and t.ndim == 3 for t in new.values()):
        experts_impl.select(model)
    setattr(model, PLAN_ATTR, Plan.from_json(str(path / "plan.json")))
    report = meta.get("report")
    if report:
        setattr(model, REPORT_ATTR, QuantizationReport(**report))
    return model.to(device).eval()
