"""Packed tensors <-> flat safetensors entries: the one key layout every writer and loader shares.

A :class:`~moe_ao.tensors.packed.PackedWeight` at FQN ``f`` is stored as plain tensors:

    f              int32 [n_slices, 3]   its slot table, under the parameter's own name
    f::q4, f::s4   uint8 codes, scales   one entry per inner buffer (``f::<inner>``)

The slot table sits under the bare FQN on purpose: a loader that does not know moe_ao
(``from_pretrained`` without ``import moe_ao``) finds a tensor of the wrong shape for
that parameter and raises a size-mismatch error, instead of silently initialising the
weight at random. The packed attributes (logical shape, bits per slice, group size,
symmetry) live in ``moe_ao.json`` (``meta["packed"]``).

:func:`rebuild_packed` is what both :func:`moe_ao.load_quantized` and the transformers
quantizer (:mod:`moe_ao.hf_quantizer`) call, so both check the same things
(``moe_ao.tensors.layout``: buffers, shapes, dtypes, slot table, zero points, scales).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from moe_ao.tensors.layout import packed_from_parts
from moe_ao.tensors.packed import PackedWeight

__all__ = ["INNER_KEY_PATTERN", "SEP", "inner_keys", "packed_keys", "rebuild_packed", "state_and_meta"]

SEP = "::"
# An inner buffer's key suffix: f"{SEP}q4", f"{SEP}s4", f"{SEP}z4", f"{SEP}d16", legacy f"{SEP}slot".
INNER_KEY_PATTERN = r"::(?:[qsz](?:2|3|4|8)|d16|slot)$"


def inner_keys(fqn: str, inner: Iterable[str], legacy: bool = False) -> dict[str, str]:
    """Inner tensor name -> checkpoint key (format 1 kept the slot table as ``<fqn>::slot``)."""
    return {n: fqn if n == "slot" and not legacy else f"{fqn}{SEP}{n}" for n in inner}


def packed_keys(meta: Mapping[str, Any], legacy: bool = False) -> list[str]:
    """Every checkpoint key that belongs to a packed tensor (slot tables included)."""
    return [key for fqn, info in meta["packed"].items() for key in inner_keys(fqn, info["inner"], legacy).values()]


def state_and_meta(
    model: nn.Module, keys: set[str] | None = None, override: Mapping[str, PackedWeight] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors a checkpoint stores (packed ones split into their parts) and their metadata.

    Args:
        model: the model.
        keys: only these state-dict entries (default: all); a streamed model passes one
            layer's keys at a time.
        override: FQN -> packed tensor to store instead of the model's own (a streamed
            layer's results, never swapped into the model).

    Returns:
        (key -> tensor, {"packed": fqn -> attributes, "tied": name -> the name it shares storage
        with, "tensors": plain tensor name -> {dtype, shape}}).
    """
    tensors: dict[str, torch.Tensor] = {}
    packed: dict[str, Any] = {}
    plain: dict[str, Any] = {}
    tied: dict[str, str] = {}
    seen: dict[int, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if keys is not None and name not in keys:
            continue
        t = (override or {}).get(name, t)
        if id(t) in seen:
            tied[name] = seen[id(t)]  # rebuilt by the model's own tie_weights on load
            continue
        seen[id(t)] = name
        if isinstance(t, PackedWeight):
            inner, attrs = t.__tensor_flatten__()
            assert tuple(t.slot.shape) != tuple(t.logical_shape), f"{name}: {t.slot.shape=} would pass as the weight"
            for n, key in inner_keys(name, inner).items():
                tensors[key] = getattr(t, n).detach().contiguous()
            packed[name] = attrs | {"inner": inner, "dtype": str(t.dtype).removeprefix("torch.")}
        else:
            tensors[name] = t.detach().contiguous()
            plain[name] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
    return tensors, {"packed": packed, "tied": tied, "tensors": plain}


def rebuild_packed(get: Callable[[str], torch.Tensor | None], meta: Mapping[str, Any], where: str,
                   legacy: bool = False) -> dict[str, PackedWeight]:
    """Rebuilds the packed tensors of a checkpoint from its flat entries and meta.

    Args:
        get: key -> tensor, or None when the checkpoint lacks the key (e.g. ``flat.pop``
            with a default, or a lookup into an open safetensors file).
        meta: the checkpoint's moe_ao.json content (``meta["packed"]`` is read).
        where: the checkpoint, for error messages.
        legacy: format-1 keys (slot tables as ``<fqn>::slot``).

    Returns:
        FQN -> PackedWeight, on the device the tensors came on.

    Raises:
        ValueError: an inner tensor is missing, or does not fit the recorded attributes
            (names the tensor; see ``moe_ao.tensors.layout.check_packed``).
    """
    out: dict[str, PackedWeight] = {}
    for fqn, info in meta["packed"].items():
        inner = {}
        for n, key in inner_keys(fqn, info["inner"], legacy).items():
            t = get(key)
            if t is None:
                raise ValueError(f"{where}: packed tensor {fqn} lacks inner tensor {n!r} (key {key!r})")
            inner[n] = t
        try:
            out[fqn] = packed_from_parts(fqn, info, inner)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    return out
