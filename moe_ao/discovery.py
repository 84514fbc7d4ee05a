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

from moe_ao.expert_banks import bank_pair_units, fused_expert_units, shared_bank_units
from moe_ao.tensors.packed import PackedWeight
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


# MoE blocks without an ``experts`` child whose banks are modules holding one 3D ``weight``
# [E, out, in] (JetMoE's JetMoeParallelExperts): (up bank child, down bank child).
PARALLEL_BANKS = (("input_linear", "output_linear"),)


def _parallel_banks(block: nn.Module) -> tuple[str, str] | None:
    """The (up, down) bank children of an MoE block that stores its experts as PARALLEL_BANKS."""
    for up_name, down_name in PARALLEL_BANKS:
        mods = [getattr(block, n, None) for n in (up_name, down_name)]
        if all(isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.ndim == 3 for m in mods) and any(
                n in ROUTER_NAMES for n, _ in block.named_children()):
            return up_name, down_name
    return None


def _parallel_block_units(prefix: str, block: nn.Module, banks: tuple[str, str], layer: int | None,
                          kept: dict[str, str]) -> list[Unit]:
    """JetMoE-style block: banks ``input_linear.weight`` [E, 2I, H] / ``output_linear.weight`` [E, H, I]
    (named ``{prefix}.experts.{e}.{proj}`` like every other layout), its router, the rest kept."""
    up, down = (getattr(block, n).weight for n in banks)
    units = bank_pair_units(prefix, (f"{banks[0]}.weight", f"{banks[1]}.weight"), up, down, "expert", layer,
                             f"{prefix}.experts")
    for child_name, child in block.named_children():
        if child_name not in banks:
            units += _moe_child_units(prefix, child_name, child, layer, kept)
    return units


def _router_units(name: str, module: nn.Module, layer: int | None) -> list[Unit]:
    """A router's weight, or, for a router that wraps its linear(s) (DBRX's ``router.layer``,
    AFMoE's ``router.gate``, Zaya's router MLP), every linear inside it."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        if weight.ndim != 2:
            raise ValueError(f"{name}: router weight of shape {tuple(weight.shape)} not understood")
        return [Unit(name, "router", layer, None, "weight", tuple(weight.shape), f"{name}.weight")]
    linears = [(sub, m) for sub, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{name}: router {type(module).__name__} has neither a weight nor an nn.Linear inside")
    return [Unit(f"{name}.{sub}", "router", layer, None, "weight", (m.out_features, m.in_features),
                 f"{name}.{sub}.weight") for sub, m in linears]


def _holds_weights(module: nn.Module) -> bool:
    return any(p.ndim >= 2 for p in module.parameters())


def _looks_like_moe(module: nn.Module) -> str | None:
    """Why an unknown module may hold MoE structure (then it is an error, not kept): a 3D+
    parameter outside a convolution, or a submodule named like experts or a router."""
    for sub, m in module.named_modules():
        last = sub.rsplit(".", 1)[-1]
        if sub and ("expert" in last or "router" in last or last == "gate" or last.endswith("_gate")):
            return f"holds a submodule {sub!r} ({type(m).__name__})"
        if isinstance(m, nn.modules.conv._ConvNd):
            continue
        for pname, p in m.named_parameters(recurse=False):
            if p.ndim >= 3:
                return f"holds a {p.ndim}D parameter {(sub + '.' if sub else '') + pname} {tuple(p.shape)}"
    return None


def _keep(kept: dict[str, str], path: str, module: nn.Module, where: str) -> None:
    """Records an unknown module as kept in floating point, or raises if it may be MoE structure."""
    why = _looks_like_moe(module)
    if why:
        raise ValueError(f"{path}: module {type(module).__name__} {where} not understood: it {why}")
    if _holds_weights(module):
        kept[path] = f"{type(module).__name__}: not a unit kind moe_ao quantizes; kept in floating point"


def _moe_block_units(prefix: str, block: nn.Module, layer: int | None, kept: dict[str, str]) -> list[Unit]:
    units: list[Unit] = []
    for child_name, child in block.named_children():
        units += _moe_child_units(prefix, child_name, child, layer, kept)
    return units


def _moe_child_units(prefix: str, child_name: str, child: nn.Module, layer: int | None,
                     kept: dict[str, str]) -> list[Unit]:
    """Units of one child of an MoE block (or of a decoder layer that is its own MoE block, Gemma 4)."""
    path = f"{prefix}.{child_name}"
    if child_name == "experts":
        if isinstance(child, nn.ModuleList):
            units = []
            for e, mlp in enumerate(child):
                if not _is_mlp(mlp):
                    raise ValueError(f"{path}.{e}: expert module {type(mlp).__name__} not understood")
                units += _mlp_units(f"{path}.{e}", mlp, "expert", layer, e)
            return units
        if isinstance(getattr(child, "down_proj", None), torch.Tensor) or hasattr(child, "mlp"):
            return fused_expert_units(path, child, layer)
        raise ValueError(f"{path}: experts module {type(child).__name__} not understood")
    if child_name in ROUTER_NAMES or child_name.endswith("_gate"):
        return _router_units(path, child, layer)
    if child_name in SHARED_NAMES and _is_mlp(child):
        return _mlp_units(path, child, "shared_expert", layer, None)
    if child_name in SHARED_NAMES and (shared := shared_bank_units(path, child, layer)) is not None:
        return shared
    if _holds_weights(child):
        _keep(kept, path, child, f"inside MoE block {prefix}")
    return []


def _plain_linear(module: nn.Module) -> bool:
    """An nn.Linear that multiplies through nn.Linear.forward (F.linear): a packed weight serves it.
    Subclasses with their own forward (DeepSeek-V4's grouped output projection views its weight)
    are kept in float."""
    return isinstance(module, nn.Linear) and type(module).forward in (nn.Linear.forward,)


def _attention_experts(path: str, attention: nn.Module, kept: dict[str, str]) -> list[str]:
    """Children of an attention module that hold routed attention experts (a router submodule and
    3D [E, ., .] banks: JetMoE's mixture of attention heads, JetMoeMoA): kept in floating point whole,
    router included (moe_ao's kinds have no routed attention expert); their relative paths."""
    moa = []
    for name, child in attention.named_children():
        routed = any(sub.rsplit(".", 1)[-1] in ROUTER_NAMES for sub, _ in child.named_modules() if sub)
        banks = any(p.ndim == 3 and p.shape[0] > 1 for m in child.modules()
                    if not isinstance(m, nn.modules.conv._ConvNd) for p in m.parameters(recurse=False))
        if routed and banks:
            kept[f"{path}.{name}"] = (f"{type(child).__name__}: routed attention experts (3D banks); moe_ao "
                                      f"quantizes routed MLP experts only; kept in floating point")
            moa.append(name)
    return moa


def _layer_units(prefix: str, layer_module: nn.Module, layer: int, kept: dict[str, str]) -> list[Unit]:
    units: list[Unit] = []
    for child_name, child in layer_module.named_children():
        path = f"{prefix}.{child_name}"
        if child_name in ATTENTION_NAMES:
            moa = _attention_experts(path, child, kept)
            for sub, lin in child.named_modules():
                if any(sub == m or sub.startswith(f"{m}.") for m in moa):
                    continue
                if isinstance(lin, nn.Linear) and not _plain_linear(lin):
                    kept[f"{path}.{sub}"] = (f"{type(lin).__name__}: an nn.Linear with its own forward (reads its "
                                             f"weight as a plain tensor); kept in floating point")
                elif isinstance(lin, nn.Linear):
                    proj = sub.rsplit(".", 1)[-1]
                    units.append(
                        Unit(f"{path}.{sub}", "attention", layer, None, proj,
                             (lin.out_features, lin.in_features), f"{path}.{sub}.weight")
                    )
        elif hasattr(child, "experts"):
            units += _moe_block_units(path, child, layer, kept)
        elif banks := _parallel_banks(child):
            units += _parallel_block_units(path, child, banks, layer, kept)
        elif isinstance(getattr(layer_module, "experts", None), nn.Module) and (
                child_name == "experts" or child_name in ROUTER_NAMES):  # the layer is its own MoE block
            units += _moe_child_units(prefix, child_name, child, layer, kept)
        elif tables := [n for n, m in child.named_modules() if isinstance(m, nn.Embedding)]:
            raise NotImplementedError(
                f"{path}: {type(child).__name__} holds routed experts as nn.Embedding tables {tables} "
                f"(single-neuron product-key experts); moe_ao quantizes experts stored as linear weights only")
        elif _is_mlp(child):
            units += _mlp_units(path, child, "dense_mlp", layer, None)
        elif _holds_weights(child):
            _keep(kept, path, child, f"in decoder layer {layer}")
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


class Units(list):
    """The unit list, plus ``kept``: module FQN -> why it stays in floating point.

    Modules that are none of the unit kinds (linear-attention / SSM / short-conv mixers,
    hyper-connections, per-layer input gates, ...) are not a reason to refuse a model:
    they are listed here by name and left as they are.
    """

    def __init__(self, items: Iterable[Unit] = (), kept: dict[str, str] | None = None) -> None:
        super().__init__(items)
        self.kept = dict(kept or {})


# Where units() keeps the example inputs it was given, so that the calls quantize_, the report
# and the exporters make later (units(model), no inputs) trace the model the same way.
EXAMPLE_INPUTS_ATTR = "_moe_ao_example_inputs"


def units(model: nn.Module, example_inputs: Any = None) -> Units:
    """Every quantizable linear of ``model``, by logical role, in model order.

    Name-based discovery first; where it raises ValueError (MoE structure it cannot read),
    the dataflow graph pass (:func:`moe_ao.passes.find_moe_units`) is tried on the whole
    model. Modules of no unit kind are kept in floating point and named in ``.kept``.

    Args:
        model: a transformers causal LM (or its base model) with MoE or dense layers, or
            any module the graph pass can read.
        example_inputs: for the graph pass, what ``model``'s forward takes when that is not
            ``[batch, seq]`` token ids: a tensor, a tuple of positional inputs or a dict of
            keyword inputs. Remembered on the model (``EXAMPLE_INPUTS_ATTR``), so later
            ``units(model)`` calls (``quantize_``, reports, exports) trace it the same way.

    Returns:
        The units: attention, router, expert, shared_expert, dense_mlp, plus
        embedding and lm_head (listed, left alone by default).

    Raises:
        ValueError: MoE structure was understood neither by names nor by the graph pass
            (both reasons are in the message).
        NotImplementedError: experts stored in a form moe_ao cannot quantize (named).
    """
    if example_inputs is not None:
        object.__setattr__(model, EXAMPLE_INPUTS_ATTR, example_inputs)  # a plain attribute, never a buffer
    try:
        return _named_units(model)
    except ValueError as by_name:
        return Units(_graph_units(model, by_name))


def _graph_units(model: nn.Module, by_name: ValueError) -> list[Unit]:
    from moe_ao.passes.moe_structure import find_moe_units  # loads torch.export machinery: only when needed

    logger.info("%s; reading roles from the model's graph instead", by_name)
    try:
        return find_moe_units(model, getattr(model, EXAMPLE_INPUTS_ATTR, None))
    except ValueError as by_graph:
        raise ValueError(f"{by_name}; graph pass: {by_graph}") from by_graph


def _named_units(model: nn.Module) -> list[Unit]:
    """Name-based discovery (see the module docstring); raises ValueError on unknown modules."""
    found: list[Unit] = []
    kept: dict[str, str] = {}
    list_name, layer_list = decoder_layers(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and layer_index(name) is None:
            found.append(Unit(name, "embedding", None, None, "weight",
                              tuple(module.weight.shape), f"{name}.weight"))
    for i, layer_module in enumerate(layer_list):
        found += _layer_units(f"{list_name}.{i}", layer_module, i, kept)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Linear):
        head_name = next(n for n, m in model.named_modules() if m is head)
        found.append(Unit(head_name, "lm_head", None, None, "weight",
                          (head.out_features, head.in_features), f"{head_name}.weight"))
    return Units(found, kept)


def as_units(model_or_units: nn.Module | Iterable[Unit]) -> list[Unit]:
    """Accepts a model or an already computed unit list."""
    if isinstance(model_or_units, nn.Module):
        return units(model_or_units)
    return list(model_or_units)


def unit_weight(model: nn.Module, unit: Unit) -> torch.Tensor:
    """The unit's weight [out, in] as a view of the stored parameter (no copy), whatever its layout."""
    param = model.get_parameter(unit.param)
    if not unit.fused:
        return param
    r0, r1 = unit.rows
    layout = "rows" if isinstance(param, PackedWeight) else unit.layout
    if layout == "rows":
        return param[unit.expert][r0:r1]
    if layout == "cols":
        return param[unit.expert].T[r0:r1]
    if layout == "cols_interleaved":  # gate = columns 0, 2, 4, ...; up = 1, 3, 5, ...
        return param[unit.expert].T[unit.segment::2]
    if layout == "flat_rows":
        return param.view(-1, unit.shape[0], param.shape[-1])[unit.expert][r0:r1]
    return param.view(-1, unit.shape[1], param.shape[-1])[unit.expert].T[r0:r1]  # flat_cols


def packed_shape(param: torch.Tensor, param_units: list[Unit]) -> tuple[int, ...]:
    """The logical shape a parameter takes once packed: its own, except that banks in another
    layout than ``rows`` are repacked to [E, out, in] with [gate; up] rows (moe_ao.unit.LAYOUTS)."""
    u0 = param_units[0]
    if not u0.fused or u0.layout == "rows":
        return tuple(param.shape)
    E = param.shape[0] if u0.layout.startswith("cols") else len({u.expert for u in param_units})
    return (E, max(u.rows[1] for u in param_units), u0.shape[1])


def describe(units_list: Iterable[Unit]) -> dict[str, Any]:
    """Counts and parameter totals per kind, for reports."""
    out: dict[str, Any] = {}
    for u in units_list:
        d = out.setdefault(u.kind, {"units": 0, "params": 0})
        d["units"] += 1
        d["params"] += u.numel
    return out
