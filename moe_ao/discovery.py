"""Units: the logical linear maps of an MoE model, whatever their storage layout.

A unit is one logical ``y = x Wᵀ`` with W of shape (out_features, in_features):
expert 5's down_proj, layer 3's q_proj, a router. transformers 5 stores routed experts
fused as 3D parameters (``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj``
[E, H, I]); older and remote-code models keep an ``nn.ModuleList`` of MLPs. Both give
the same unit names, e.g. ``model.layers.3.mlp.experts.5.down_proj``, so a plan
written for one layout applies to the other.

Discovery walks the module tree by structure and module names. Where that fails (a
module holding a weight of two or more dimensions that it cannot place, or no decoder
layer list), :func:`units` falls back to the graph pass ``moe_ao.passes``, which reads
the roles from the dataflow of the exported model instead of from names. If that fails
too, a ValueError names the module: nothing is skipped silently.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from moe_ao.unit import Unit, layer_index

logger = logging.getLogger(__name__)

# Canonical projection names; Mixtral-v0 style ModuleList experts call them w1/w3/w2.
PROJ_ALIASES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
SHARED_NAMES = ("shared_expert", "shared_experts", "shared_mlp")
ROUTER_NAMES = ("gate", "router")


def _is_mlp(module: nn.Module) -> bool:
    names = {n for n, c in module.named_children() if isinstance(c, nn.Linear)}
    return {"gate_proj", "up_proj", "down_proj"} <= names or {"w1", "w2", "w3"} <= names or {
        "up_proj",
        "down_proj",
    } <= names


def _mlp_units(prefix: str, module: nn.Module, kind: str, layer: int | None, expert: int | None) -> list[Unit]:
    units = []
    for child_name, child in module.named_children():
        if not isinstance(child, nn.Linear):
            continue
        proj = PROJ_ALIASES.get(child_name, child_name)
        base = prefix.rsplit(".", 1)[0] + f".{expert}" if expert is not None else prefix
        units.append(
            Unit(
                name=f"{base}.{proj}",
                kind=kind,
                layer=layer,
                expert=expert,
                proj=proj,
                shape=(child.out_features, child.in_features),
                param=f"{prefix}.{child_name}.weight",
            )
        )
    return units


def _fused_expert_units(prefix: str, experts: nn.Module, layer: int | None) -> list[Unit]:
    """Units of a transformers-5 fused experts module (``@use_experts_implementation``)."""
    if getattr(experts, "is_transposed", False) or not getattr(experts, "is_concatenated", True):
        raise ValueError(
            f"{prefix}: fused experts layout not understood (is_transposed="
            f"{getattr(experts, 'is_transposed', False)}, is_concatenated="
            f"{getattr(experts, 'is_concatenated', True)}); supported: [E, out, in] with [gate; up] concatenated"
        )
    if getattr(experts, "has_bias", False):
        raise ValueError(f"{prefix}: fused experts with biases are not supported")
    units = []
    has_gate = hasattr(experts, "gate_up_proj")
    first = experts.gate_up_proj if has_gate else experts.up_proj
    E, N, K = first.shape
    segs = (("gate_proj", 0, N // 2), ("up_proj", N // 2, N)) if has_gate else (("up_proj", 0, N),)
    down = experts.down_proj
    if down.ndim != 3 or down.shape[0] != E:
        raise ValueError(f"{prefix}: down_proj shape {tuple(down.shape)} does not match {E} experts")
    for e in range(E):
        for seg, (proj, r0, r1) in enumerate(segs):
            units.append(
                Unit(
                    name=f"{prefix}.{e}.{proj}",
                    kind="expert",
                    layer=layer,
                    expert=e,
                    proj=proj,
                    shape=(r1 - r0, K),
                    param=f"{prefix}.{'gate_up_proj' if has_gate else 'up_proj'}",
                    fused=True,
                    rows=(r0, r1),
                    segment=seg,
                )
            )
        units.append(
            Unit(
                name=f"{prefix}.{e}.down_proj",
                kind="expert",
                layer=layer,
                expert=e,
                proj="down_proj",
                shape=(down.shape[1], down.shape[2]),
                param=f"{prefix}.down_proj",
                fused=True,
                rows=(0, down.shape[1]),
            )
        )
    return units


def _router_unit(name: str, module: nn.Module, layer: int | None) -> Unit:
    weight = module.weight
    if weight.ndim != 2:
        raise ValueError(f"{name}: router weight of shape {tuple(weight.shape)} not understood")
    return Unit(name, "router", layer, None, "weight", tuple(weight.shape), f"{name}.weight")


def _moe_block_units(prefix: str, block: nn.Module, layer: int | None) -> list[Unit]:
    units: list[Unit] = []
    for child_name, child in block.named_children():
        path = f"{prefix}.{child_name}"
        if child_name == "experts":
            if isinstance(child, nn.ModuleList):
                for e, mlp in enumerate(child):
                    if not _is_mlp(mlp):
                        raise ValueError(f"{path}.{e}: expert module {type(mlp).__name__} not understood")
                    units += _mlp_units(f"{path}.{e}", mlp, "expert", layer, e)
            elif hasattr(child, "down_proj") and child.down_proj.ndim == 3:
                units += _fused_expert_units(path, child, layer)
            else:
                raise ValueError(f"{path}: experts module {type(child).__name__} not understood")
        elif child_name in ROUTER_NAMES or child_name.endswith("_gate"):
            units.append(_router_unit(path, child, layer))
        elif child_name in SHARED_NAMES and _is_mlp(child):
            units += _mlp_units(path, child, "shared_expert", layer, None)
        elif any(p.ndim >= 2 for p in child.parameters()):
            raise ValueError(f"{path}: module {type(child).__name__} inside MoE block {prefix} not understood")
    return units


def _layer_units(prefix: str, layer_module: nn.Module, layer: int) -> list[Unit]:
    units: list[Unit] = []
    claimed: set[str] = set()
    for child_name, child in layer_module.named_children():
        path = f"{prefix}.{child_name}"
        if child_name in ATTENTION_NAMES:
            for sub, lin in child.named_modules():
                if isinstance(lin, nn.Linear):
                    proj = sub.rsplit(".", 1)[-1]
                    units.append(
                        Unit(f"{path}.{sub}", "attention", layer, None, proj,
                             (lin.out_features, lin.in_features), f"{path}.{sub}.weight")
                    )
        elif hasattr(child, "experts"):
            units += _moe_block_units(path, child, layer)
        elif _is_mlp(child):
            units += _mlp_units(path, child, "dense_mlp", layer, None)
        else:
            continue
        claimed.add(child_name)
    for child_name, child in layer_module.named_children():
        if child_name not in claimed and any(p.ndim >= 2 for p in child.parameters()):
            raise ValueError(
                f"{prefix}.{child_name}: module {type(child).__name__} in decoder layer {layer} not understood"
            )
    return units


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layer list and its FQN (``model.layers``, ``transformer.h``, ...).

    Raises:
        ValueError: no (or more than one) decoder layer list.
    """
    found = [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks")
    ]
    if len(found) != 1:
        raise ValueError(
            f"{type(model).__name__}: expected one decoder layer list (layers/h/blocks), found {[n for n, _ in found]}"
        )
    return found[0]


def units(model: nn.Module) -> list[Unit]:
    """Every quantizable linear of ``model``, by logical role, in model order.

    Name-based discovery first; where it raises ValueError, the dataflow graph pass
    (:func:`moe_ao.passes.find_moe_units`) is tried on the whole model.

    Args:
        model: a transformers causal LM (or its base model) with MoE or dense layers.

    Returns:
        The units: attention, router, expert, shared_expert, dense_mlp, plus
        embedding and lm_head (listed, left alone by default).

    Raises:
        ValueError: a module holding weights was understood neither by names nor by
            the graph pass (both reasons are in the message).
    """
    try:
        return _named_units(model)
    except ValueError as by_name:
        return _graph_units(model, by_name)


def _graph_units(model: nn.Module, by_name: ValueError) -> list[Unit]:
    from moe_ao.passes.moe_structure import find_moe_units  # loads torch.export machinery: only when needed

    logger.info("%s; reading roles from the model's graph instead", by_name)
    try:
        return find_moe_units(model)
    except ValueError as by_graph:
        raise ValueError(f"{by_name}; graph pass: {by_graph}") from by_graph


def _named_units(model: nn.Module) -> list[Unit]:
    """Name-based discovery (see the module docstring); raises ValueError on unknown modules."""
    found: list[Unit] = []
    list_name, layer_list = decoder_layers(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and layer_index(name) is None:
            found.append(Unit(name, "embedding", None, None, "weight",
                              tuple(module.weight.shape), f"{name}.weight"))
    for i, layer_module in enumerate(layer_list):
        found += _layer_units(f"{list_name}.{i}", layer_module, i)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Linear):
        head_name = next(n for n, m in model.named_modules() if m is head)
        found.append(Unit(head_name, "lm_head", None, None, "weight",
                          (head.out_features, head.in_features), f"{head_name}.weight"))
    return found


def as_units(model_or_units: nn.Module | Iterable[Unit]) -> list[Unit]:
    """Accepts a model or an already computed unit list."""
    if isinstance(model_or_units, nn.Module):
        return units(model_or_units)
    return list(model_or_units)


def unit_weight(model: nn.Module, unit: Unit) -> torch.Tensor:
    """The unit's weight [out, in] as a view of the stored parameter (no copy)."""
    param = model.get_parameter(unit.param)
    if unit.fused:
        w = param[unit.expert]
        return w[unit.rows[0]: unit.rows[1]]
    return param


def describe(units_list: Iterable[Unit]) -> dict[str, Any]:
    """Counts and parameter totals per kind, for reports."""
    out: dict[str, Any] = {}
    for u in units_list:
        d = out.setdefault(u.kind, {"units": 0, "params": 0})
        d["units"] += 1
        d["params"] += u.numel
    return out
