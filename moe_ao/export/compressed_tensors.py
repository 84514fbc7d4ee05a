"""Export to compressed-tensors ``pack-quantized``: the checkpoint layout vLLM and SGLang serve.

Per quantized linear ``m`` (named as transformers writes it, experts one by one:
``model.layers.3.block_sparse_moe.experts.5.w1``), with R rows, K in features, b bits:

    m.weight_packed       int32 [R, K*b/32]   codes, element i at bit i*b of the row's
                                              little-endian word stream
    m.weight_scale        [R, K/group]        scales (model dtype); [R, 1] per channel
    m.weight_shape        int64 [2]           (R, K)
    m.weight_zero_point   int32 [R*b/32, G]   asymmetric only: zero points packed along rows

compressed-tensors' integer range is signed, x in [-2^(b-1), 2^(b-1) - 1] with w =
(x - zp) * scale, and it packs x + 2^(b-1). moe_ao's codes are q = x + 2^(b-1) with w = (q
- z) * s and z = 2^(b-1) when symmetric, so the packed words carry moe_ao's codes
unchanged and dequantize to the same values. moe_ao's packing (code j of a run of 8 at
bit b*j of a little-endian word) is that same bit stream, so the bytes are reused as
they are whenever K*b is a multiple of 32.

``config_groups`` has one group per (bits, group size, symmetry) with ``re:`` targets per
module name (experts of a layer collapsed to ``\\d+``); routers, the head and 16-bit
units are listed in ``ignore``. The plan must fit what vLLM runs
(:mod:`moe_ao.planner.serving`), else the export is refused naming the layer.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from moe_ao.api import quantized_plan
from moe_ao.discovery import units
from moe_ao.export.layout import UnitCodes, disk_names, unit_codes
from moe_ao.planner.serving import check_plan, get_target
from moe_ao.plans import QuantSpec
from moe_ao.unit import Unit

logger = logging.getLogger(__name__)

FORMAT = "pack-quantized"
VLLM_GROUPS = (32, 64, 128)
CT_VERSION = "0.17.0"  # the oldest compressed-tensors whose config this matches (vLLM 0.32 pins it)


def pack_rows_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [R, K] -> int32 [R, ceil(K*bits/32)]: code i at bit i*bits of the row's word stream."""
    R, K = codes.shape
    n_words = -(-K * bits // 32)
    bit = torch.arange(K, dtype=torch.int64) * bits  # [K] global bit position of each code
    word, offset = bit // 32, bit % 32
    out = torch.zeros(R, n_words + 1, dtype=torch.int64)
    c = codes.to(torch.int64)
    out.index_add_(1, word, (c << offset) & 0xFFFFFFFF)
    spill = offset + bits > 32  # codes straddling two words
    out.index_add_(1, word[spill] + 1, c[:, spill] >> (32 - offset[spill]))
    out = out[:, :n_words]
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def _weight_packed(c: UnitCodes) -> torch.Tensor:
    K = c.shape[1]
    if K * c.bits % 32 == 0:  # moe_ao's packed row is already the word stream
        return c.packed.contiguous().view(torch.int32)
    return pack_rows_int32(c.codes(), c.bits)


def _compressed(c: UnitCodes, prefix: str) -> dict[str, torch.Tensor]:
    R, K = c.shape
    out = {f"{prefix}.weight_packed": _weight_packed(c),
           f"{prefix}.weight_scale": c.scale.contiguous(),
           f"{prefix}.weight_shape": torch.tensor([R, K], dtype=torch.int64)}
    if c.zero is not None:  # packed along rows (compressed-tensors' packed_dim=0)
        out[f"{prefix}.weight_zero_point"] = pack_rows_int32(c.zero.T.contiguous(), c.bits).T.contiguous()
    return out


def _channel(spec: QuantSpec, unit: Unit) -> bool:
    """One scale per row: a group of in_features that is not itself a vLLM group size
    (a 32-wide down_proj at group 32 stays ``group``, like its layer's gate and up)."""
    return spec.group_size == unit.shape[1] and spec.group_size not in VLLM_GROUPS


def _scheme(spec: QuantSpec, unit: Unit) -> dict[str, Any]:
    channel = _channel(spec, unit)
    return {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric,
            "strategy": "channel" if channel else "group", "group_size": None if channel else spec.group_size,
            "block_structure": None, "dynamic": False, "actorder": None, "observer": "minmax",
            "observer_kwargs": {}}


def _target(module: str) -> str:
    """A ``re:`` target for a module name, experts collapsed to any index."""
    pattern = re.escape(module)
    pattern = re.sub(r"experts\\\.\d+\\\.", r"experts\\.\\d+\\.", pattern)
    return f"re:^{pattern}$"


def quantization_config(groups: dict[tuple, list[str]], schemes: dict[tuple, dict], ignore: list[str]) -> dict:
    """The ``quantization_config`` entry of config.json."""
    config_groups = {}
    for i, key in enumerate(sorted(groups)):
        targets = sorted(dict.fromkeys(_target(m) for m in groups[key]))
        config_groups[f"group_{i}"] = {"targets": targets, "weights": schemes[key], "input_activations": None,
                                       "output_activations": None, "format": FORMAT}
    return {"quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": sorted(ignore), "kv_cache_scheme": None,
            "sparsity_config": {}, "global_compression_ratio": None, "version": CT_VERSION}


def _tensors(model: nn.Module, all_units: list[Unit]) -> tuple[dict[str, torch.Tensor], dict, dict, list[str]]:
    """(checkpoint tensors, spec key -> module names, spec key -> scheme, ignored modules)."""
    plan = quantized_plan(model)
    names = disk_names(model)
    state = model.state_dict(keep_vars=True)
    unit_params = {u.param for u in all_units}
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[tuple, list[str]] = defaultdict(list)
    schemes: dict[tuple, dict] = {}
    ignore: list[str] = []
    written: set[int] = set()  # tensor ids: a tied head is written once, as the embedding
    for name, t in state.items():
        if name not in unit_params and id(t) not in written:
            written.add(id(t))
            tensors[names[(name, None, 0)]] = t.detach().contiguous()
    for u in all_units:
        key = names.get((u.param, u.expert, u.rows[0] if u.fused else 0))
        c = unit_codes(model, u)
        if u.kind in ("embedding", "lm_head", "router") or c.bits == 16:
            if u.kind != "embedding":
                ignore.append(key.removesuffix(".weight") if key else u.name)
            tied = not u.fused and id(state[u.param]) in written
            if key is not None and not tied:
                tensors[key] = c.dense.detach().contiguous()
                if not u.fused:
                    written.add(id(state[u.param]))
            continue
        spec = plan[u.name]
        k = (spec.bits, -1 if _channel(spec, u) else spec.group_size, spec.symmetric)
        schemes[k] = _scheme(spec, u)
        groups[k].append(key.removesuffix(".weight"))
        tensors.update(_compressed(c, key.removesuffix(".weight")))
    return tensors, groups, schemes, ignore


def compressed_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The checkpoint tensors and ``quantization_config`` of a quantized model (no engine check).

    Args:
        model: a model quantized by moe_ao.

    Returns:
        (on-disk key -> tensor, the quantization_config dict).
    """
    tensors, groups, schemes, ignore = _tensors(model, units(model))
    expert_specs = {k for k, mods in groups.items() if any(".experts." in m for m in mods)}
    if len(expert_specs) > 1:
        # transformers (5.24) decompresses every fused experts bank with one scheme, the first
        # group naming experts; vLLM reads each layer's. Say so rather than let it load wrong.
        logger.warning("MoE layers use %d expert schemes %s: vLLM serves this, but transformers' compressed-tensors"
                       " loader applies the first one to every layer's experts", len(expert_specs),
                       sorted(expert_specs))
    return tensors, quantization_config(groups, schemes, ignore)


def export_compressed_tensors(model: nn.Module, out: str | Path, tokenizer: Any = None,
                              humming: bool = False) -> Path:
    """Writes a compressed-tensors ``pack-quantized`` checkpoint of a moe_ao-quantized model.

    Args:
        model: a model quantized by :func:`moe_ao.quantize_` (or loaded with its plan).
        out: the output directory (created; files in it are replaced).
        tokenizer: saved beside the weights when given.
        humming: allow 2/3-bit experts (vLLM's optional ``--moe-backend humming``).

    Returns:
        The directory.

    Raises:
        ValueError: the model is not quantized by moe_ao, or its plan holds something
            vLLM cannot run (names the layer: mixed widths in an MoE layer, a width,
            group size or asymmetric spec outside what vLLM runs).
    """
    plan = quantized_plan(model)
    if plan is None:
        raise ValueError("model is not quantized by moe_ao; call moe_ao.quantize_ first")
    check_plan(plan, units(model), get_target("vllm-humming" if humming else "vllm"))
    tensors, qconfig = compressed_state(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = qconfig
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    logger.info("compressed-tensors export: %d tensors, %d config groups -> %s", len(tensors),
                len(qconfig["config_groups"]), out)
    return out
