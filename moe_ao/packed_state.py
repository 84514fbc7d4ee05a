"""Packed tensors <-> flat safetensors entries: the one key layout every loader shares.

A :class:`~moe_ao.tensors.packed.PackedWeight` at FQN ``f`` is stored as plain tensors:

    f              int32 [n_slices, 3]   its slot table, under the parameter's own name
    f::q4, f::s4   uint8 codes, scales   one entry per inner buffer (``f::<inner>``)

The slot table sits under the bare FQN on purpose: a loader that does not know moe_ao
(``from_pretrained`` without ``import moe_ao``) finds a tensor of the wrong shape for
that parameter and raises a size-mismatch error, instead of silently initialising the
weight at random. The packed attributes (logical shape, bits per slice, group size,
symmetry) live in ``moe_ao.json`` (``meta["packed"]``), which this module writes and reads.

:func:`rebuild_packed` is what both :func:`moe_ao.load_quantized` and the transformers
quantizer (:mod:`moe_ao.hf_quantizer`) call, so both check the same things.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from moe_ao.tensors.packed import PackedWeight

SEP = "::"
# An inner buffer's key suffix: f"{SEP}q4", f"{SEP}s4", f"{SEP}z4", f"{SEP}d16", legacy f"{SEP}slot".
INNER_KEY_PATTERN = r"::(?:[qsz](?:2|3|4|8)|d16|slot)$"


def packed_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The model's tensors by key, packed ones flattened, plus their moe_ao.json meta.

    Args:
        model: a (quantized) model.

    Returns:
        (key -> tensor, {"packed": fqn -> attributes, "tied": fqn -> the fqn it is tied to}).
    """
    tensors: dict[str, torch.Tensor] = {}
    packed: dict[str, Any] = {}
    tied: dict[str, str] = {}
    seen: dict[int, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            tied[name] = seen[id(t)]  # rebuilt by the model's own tie_weights on load
            continue
        seen[id(t)] = name
        if isinstance(t, PackedWeight):
            inner, attrs = t.__tensor_flatten__()
            assert tuple(t.slot.shape) != tuple(t.logical_shape), f"{name}: {t.slot.shape=} would pass as the weight"
            for n in inner:
                key = name if n == "slot" else f"{name}{SEP}{n}"
                tensors[key] = getattr(t, n).detach().contiguous()
            packed[name] = attrs | {"inner": inner, "dtype": str(t.dtype).removeprefix("torch.")}
        else:
            tensors[name] = t.detach().contiguous()
    return tensors, {"packed": packed, "tied": tied}


def packed_keys(meta: Mapping[str, Any]) -> list[str]:
    """Every checkpoint key that belongs to a packed tensor (slot tables included)."""
    return [key for fqn, info in meta["packed"].items() for key in _keys_of(fqn, info["inner"])]


def _keys_of(fqn: str, inner: Iterable[str]) -> dict[str, str]:
    return {n: fqn if n == "slot" else f"{fqn}{SEP}{n}" for n in inner}


def rebuild_packed(
    get: Callable[[str], torch.Tensor | None], meta: Mapping[str, Any], where: str
) -> dict[str, PackedWeight]:
    """Rebuilds the packed tensors of a checkpoint from its flat entries and meta.

    Args:
        get: key -> tensor, or None when the checkpoint lacks the key (e.g. ``flat.pop``
            with a default, or a lookup into an open safetensors file).
        meta: the checkpoint's moe_ao.json content (``meta["packed"]`` is read).
        where: the checkpoint, for error messages.

    Returns:
        FQN -> PackedWeight, on the device the tensors came on.

    Raises:
        ValueError: an inner tensor is missing, or has a dtype or shape that does not
            fit the recorded attributes (names the tensor and the value).
    """
    out: dict[str, PackedWeight] = {}
    for fqn, info in meta["packed"].items():
        inner = {}
        for n, key in _keys_of(fqn, info["inner"]).items():
            t = get(key)
            if t is None and n == "slot":
                t = get(f"{fqn}{SEP}slot")  # checkpoints written before the slot moved to the bare name
            if t is None:
                raise ValueError(f"{where}: packed tensor {fqn} lacks inner tensor {n!r} (key {key!r})")
            inner[n] = t
        attrs = [info[k] for k in PackedWeight.tensor_attribute_names]
        attrs[0], attrs[1] = tuple(attrs[0]), tuple(attrs[1])
        _check_inner(fqn, inner, attrs, info.get("dtype"), where)
        out[fqn] = PackedWeight(inner.pop("slot"), *attrs, **inner)
    return out


def _check_inner(fqn: str, inner: Mapping[str, torch.Tensor], attrs: list, dtype: str | None, where: str) -> None:
    """Shapes and dtypes of the inner tensors against the recorded attributes."""
    logical_shape, slice_bits = attrs[0], attrs[1]
    slot = inner["slot"]
    if slot.dtype != torch.int32 or tuple(slot.shape) != (len(slice_bits), 3):
        raise ValueError(f"{where}: {fqn} slot table is {slot.dtype} {tuple(slot.shape)};"
                         f" expected int32 ({len(slice_bits)}, 3)")
    buffers = {n: t for n, t in inner.items() if n != "slot"}  # q2 s2 z2 ... d16
    for n, t in buffers.items():
        if n[0] in "qz" and t.dtype != torch.uint8:
            raise ValueError(f"{where}: {fqn}::{n} has dtype {t.dtype}; expected torch.uint8")
        if n[0] in "sd" and dtype is not None and str(t.dtype).removeprefix("torch.") != dtype:
            raise ValueError(f"{where}: {fqn}::{n} has dtype {t.dtype}; the checkpoint records {dtype}")
    n_slices = sum(t.shape[0] for n, t in buffers.items() if n[0] == "q" or n == "d16")
    if n_slices != len(slice_bits) or len(logical_shape) not in (2, 3):
        raise ValueError(f"{where}: {fqn} holds {n_slices} slices in its buffers, its attributes"
                         f" {len(slice_bits)} (logical shape {logical_shape})")
