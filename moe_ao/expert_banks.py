"""Expert banks: the units of routed (and shared) experts stored as 3D parameters, in every layout.

transformers 5 fuses a layer's experts into banks, ``gate_up_proj`` [E, 2I, H] and
``down_proj`` [E, H, I], and flags other layouts on the experts class
(``@use_experts_implementation``: ``is_transposed``, ``is_concatenated``); some classes
carry no flag (Llama 4), some keep flat 2D banks (DBRX), some hold one bank per module
(JetMoE) or their shared experts as banks (Inkling). Each reader here turns one of these
into units with the bank's layout (``moe_ao.unit.LAYOUTS``); ``moe_ao.discovery`` decides
which reader a module needs. Shapes: E experts, N = 2I (gate; up) or I out rows, K = H in.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from moe_ao.tensors.packed import PackedWeight
from moe_ao.unit import Unit

# Experts classes that transformers does not route through ``use_experts_implementation``
# (so they carry no ``is_transposed`` flag) and whose layout their shapes alone cannot tell:
# class name -> (gate_up / up layout, down layout). Llama 4 stores [E, H, 2I] and [E, I, H].
UNDECORATED_LAYOUTS = {"Llama4TextExperts": ("cols", "cols")}


def _bank_layouts(prefix: str, experts: nn.Module, first: torch.Tensor, down: torch.Tensor,
                  n_seg: int) -> tuple[str, str]:
    """(layout of the gate_up/up bank, layout of the down bank); see moe_ao.unit.LAYOUTS.

    Raises:
        ValueError: a layout moe_ao cannot read, or one the shapes leave ambiguous.
    """
    if hasattr(experts, "is_transposed"):  # transformers' @use_experts_implementation flags
        transposed, concatenated = experts.is_transposed, getattr(experts, "is_concatenated", True)
        if not transposed and not concatenated:
            raise ValueError(f"{prefix}: interleaved gate/up rows in an [E, out, in] bank are not supported "
                             f"(is_transposed=False, is_concatenated=False)")
        if not transposed:
            return "rows", "rows"
        return ("cols" if concatenated or n_seg == 1 else "cols_interleaved"), "cols"
    name = type(experts).__name__
    if name in UNDECORATED_LAYOUTS:
        return UNDECORATED_LAYOUTS[name]
    (_, A, B), (_, C, D) = first.shape, down.shape
    fits_rows = B == C and D * n_seg == A  # [E, N, H] and [E, H, I]
    fits_cols = A == D and C * n_seg == B  # [E, H, N] and [E, I, H]
    if fits_rows and not fits_cols:
        return "rows", "rows"
    if fits_cols and not fits_rows:
        return "cols", "cols"
    raise ValueError(
        f"{prefix}: experts class {name} is not dispatched through transformers' ExpertsInterface (no "
        f"is_transposed flag) and its banks {tuple(first.shape)} / {tuple(down.shape)} "
        f"{'fit both [E, out, in] and [E, in, out]' if fits_rows else 'fit neither [E, out, in] nor [E, in, out]'}"
        f"; add it to moe_ao.expert_banks.UNDECORATED_LAYOUTS"
    )


def _expert_unit(prefix: str, e: int, proj: str, layer: int | None, shape: tuple[int, int], param: str,
                 rows: tuple[int, int], seg: int, layout: str) -> Unit:
    return Unit(name=f"{prefix}.{e}.{proj}", kind="expert", layer=layer, expert=e, proj=proj, shape=shape,
                param=param, fused=True, rows=rows, segment=seg, layout=layout)


def fused_expert_units(prefix: str, experts: nn.Module, layer: int | None) -> list[Unit]:
    """Units of a fused experts module: transformers 5's ``@use_experts_implementation`` banks in any
    of their layouts, Llama 4's transposed banks, DBRX's flat 2D ones."""
    if hasattr(experts, "mlp") and all(hasattr(experts.mlp, n) for n in ("w1", "v1", "w2")):
        return _flat_glu_units(prefix, experts, layer)
    has_gate = hasattr(experts, "gate_up_proj")
    first = experts.gate_up_proj if has_gate else experts.up_proj
    down = experts.down_proj
    n_seg = 2 if has_gate else 1
    if first.ndim != 3 or down.ndim != 3:
        raise ValueError(f"{prefix}: expert banks of shapes {tuple(first.shape)} / {tuple(down.shape)}; "
                         f"expected 3D [E, ., .]")
    packed = isinstance(down, PackedWeight)  # quantized banks are always [E, out, in], [gate; up]
    up_layout, down_layout = ("rows", "rows") if packed else _bank_layouts(prefix, experts, first, down, n_seg)
    E = down.shape[0]
    if first.shape[0] != E and not (first.shape[0] > E and getattr(experts, "num_routed_experts", None) == E):
        raise ValueError(f"{prefix}: down_proj shape {tuple(down.shape)} does not match the "
                         f"{first.shape[0]} experts of {tuple(first.shape)}")
    # Extra gate_up experts without a down_proj (LongCat's zero / identity experts) are never
    # multiplied: they are no units and stay as float slices.
    N, K = (first.shape[1], first.shape[2]) if up_layout == "rows" else (first.shape[2], first.shape[1])
    Hd, Id = (down.shape[1], down.shape[2]) if down_layout == "rows" else (down.shape[2], down.shape[1])
    if K != Hd or N != Id * n_seg:  # the banks must chain: x [., H] -> [., N] -> [., I] -> [., H]
        raise ValueError(
            f"{prefix}: banks {tuple(first.shape)} read as {up_layout} and {tuple(down.shape)} read as "
            f"{down_layout} (is_transposed={getattr(experts, 'is_transposed', None)}, is_concatenated="
            f"{getattr(experts, 'is_concatenated', None)}) do not chain: in {K} -> {N} -> down [{Hd}, {Id}]")
    segs = (("gate_proj", 0, N // 2), ("up_proj", N // 2, N)) if has_gate else (("up_proj", 0, N),)
    up_name = f"{prefix}.{'gate_up_proj' if has_gate else 'up_proj'}"
    units = []
    for e in range(E):
        for seg, (proj, r0, r1) in enumerate(segs):
            units.append(_expert_unit(prefix, e, proj, layer, (r1 - r0, K), up_name, (r0, r1), seg, up_layout))
        units.append(_expert_unit(prefix, e, "down_proj", layer, (Hd, Id), f"{prefix}.down_proj", (0, Hd), 0,
                                  down_layout))
    return units


def _flat_glu_units(prefix: str, experts: nn.Module, layer: int | None) -> list[Unit]:
    """DBRX: ``mlp.w1`` (gate), ``mlp.v1`` (up) [E*I, H] and ``mlp.w2`` [E*I, H] used as x @ w2 (down, transposed)."""
    mlp = experts.mlp
    if isinstance(mlp.w1, PackedWeight):  # quantized: [E, I, H], [E, I, H], [E, H, I]
        E, I, H = mlp.w1.shape
        layouts = ("rows", "rows", "rows")
    else:
        E = experts.num_experts
        I, H = mlp.w1.shape[0] // E, mlp.w1.shape[1]
        layouts = ("flat_rows", "flat_rows", "flat_cols")
    units = []
    for e in range(E):
        for (proj, pname, shape), layout in zip(
            (("gate_proj", "w1", (I, H)), ("up_proj", "v1", (I, H)), ("down_proj", "w2", (H, I))), layouts
        ):
            units.append(_expert_unit(prefix, e, proj, layer, shape, f"{prefix}.mlp.{pname}", (0, shape[0]), 0,
                                      layout))
    return units


def bank_pair_units(prefix: str, names: tuple[str, str], up: torch.Tensor, down: torch.Tensor,
                     kind: str, layer: int | None, unit_prefix: str) -> list[Unit]:
    """Units of an [E, N, H] up bank ([gate; up] rows when N = 2·I) and an [E, H, I] down bank
    stored as two parameters ``{prefix}.{names[0]}`` / ``{prefix}.{names[1]}``.

    Raises:
        ValueError: the banks are not 3D or do not chain H -> N -> I -> H.
    """
    if up.ndim != 3 or down.ndim != 3 or up.shape[0] != down.shape[0]:
        raise ValueError(f"{prefix}: expert banks {names[0]} {tuple(up.shape)} / {names[1]} {tuple(down.shape)}: "
                         f"expected [E, N, H] and [E, H, I]")
    E, N, K = up.shape
    Hd, Id = down.shape[1], down.shape[2]
    if K != Hd or N not in (Id, 2 * Id):
        raise ValueError(f"{prefix}: expert banks {names[0]} {tuple(up.shape)} / {names[1]} {tuple(down.shape)} "
                         f"do not chain as [E, N, H] -> [E, H, I] with N = I or 2·I")
    segs = (("gate_proj", 0, Id), ("up_proj", Id, N)) if N == 2 * Id else (("up_proj", 0, N),)
    units = []
    for e in range(E):
        for seg, (proj, r0, r1) in enumerate(segs):
            units.append(replace(_expert_unit(unit_prefix, e, proj, layer, (r1 - r0, K), f"{prefix}.{names[0]}",
                                              (r0, r1), seg, "rows"), kind=kind))
        units.append(replace(_expert_unit(unit_prefix, e, "down_proj", layer, (Hd, Id), f"{prefix}.{names[1]}",
                                          (0, Hd), 0, "rows"), kind=kind))
    return units


def shared_bank_units(path: str, shared: nn.Module, layer: int | None) -> list[Unit] | None:
    """Shared experts stored as 3D banks ``gate_proj`` / ``up_proj`` [S, I, H] and ``down_proj`` [S, H, I]
    (Inkling's InklingSharedExperts: S shared experts, every token through each), or None."""
    banks = [getattr(shared, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(b, nn.Parameter) and b.ndim == 3 for b in banks):
        return None
    gate, up, down = banks
    if gate.shape != up.shape or down.shape != (gate.shape[0], gate.shape[2], gate.shape[1]):
        raise ValueError(f"{path}: shared expert banks gate {tuple(gate.shape)} / up {tuple(up.shape)} / down "
                         f"{tuple(down.shape)}: expected [S, I, H], [S, I, H], [S, H, I]")
    S, I, H = gate.shape
    units = []
    for s in range(S):
        for proj, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            units.append(Unit(f"{path}.{s}.{proj}", "shared_expert", layer, s, proj, shape, f"{path}.{proj}",
                              fused=True, rows=(0, shape[0]), segment=0, layout="rows"))
    return units
