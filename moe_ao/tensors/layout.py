"""The buffers a PackedWeight must have, derived from its attributes alone.

A stored packed weight is a set of inner tensors plus attributes (see
``moe_ao.tensors.packed``). Everything about the buffers follows from the attributes:
which widths are present, each buffer's shape and dtype, and the slot table, which
``PackedWeight.from_slices`` always builds the same way. Checking a stored weight
against that derivation before building it turns an edited or corrupt checkpoint
into a named error instead of a crash inside a kernel, or wrong logits.

Shapes: E experts, N rows, K in features, R = N / n_seg rows per slice, G = K / group
size, n_b slices at b bits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from moe_ao.tensors.packed import BUFFER_BITS, PackedWeight
from moe_ao.tensors.packing import packed_size

__all__ = ["canonical_slot", "check_packed", "expected_buffers", "packed_from_parts"]

FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def canonical_slot(slice_bits: Sequence[int]) -> torch.Tensor:
    """The slot table of ``from_slices``: per slice (bits, row in its buffer, row overall)."""
    slot = torch.zeros(len(slice_bits), 3, dtype=torch.int32)
    offset = 0
    for b in BUFFER_BITS:
        idx = [i for i, sb in enumerate(slice_bits) if sb == b]
        for pos, i in enumerate(idx):
            slot[i, 0], slot[i, 1], slot[i, 2] = b, pos, offset + pos
        offset += len(idx)
    return slot


def _int(value: Any, what: str, lo: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{what}={value!r}; allowed: an int >= {lo}")
    return value


def _check_attrs(attrs: Mapping[str, Any]) -> tuple[list[int], list[int], int, int, bool]:
    shape, bits = attrs.get("logical_shape"), attrs.get("slice_bits")
    if not isinstance(shape, (list, tuple)) or len(shape) not in (2, 3):
        raise ValueError(f"logical_shape={shape!r}; allowed: [N, K] or [E, N, K]")
    shape = [_int(d, "logical_shape entry") for d in shape]
    n_seg = _int(attrs.get("n_seg"), "n_seg")
    *lead, N, K = shape
    if N % n_seg:
        raise ValueError(f"n_seg={n_seg} does not divide the {N} rows of logical_shape={shape}")
    n_slices = (lead[0] if lead else 1) * n_seg
    if not isinstance(bits, (list, tuple)) or len(bits) != n_slices or any(b not in BUFFER_BITS for b in bits):
        raise ValueError(f"slice_bits={bits!r}; expected {n_slices} entries from {BUFFER_BITS}")
    group = _int(attrs.get("group_size"), "group_size")
    if any(b != 16 for b in bits) and K % group:
        raise ValueError(f"group_size={group} does not divide in_features={K}")
    symmetric = attrs.get("symmetric")
    if not isinstance(symmetric, bool):
        raise ValueError(f"symmetric={symmetric!r}; allowed: true or false")
    return shape, list(bits), n_seg, group, symmetric


def expected_buffers(attrs: Mapping[str, Any], dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Inner tensor name -> (shape, dtype) that a packed weight with these attributes has.

    Args:
        attrs: ``logical_shape``, ``slice_bits``, ``n_seg``, ``group_size``, ``symmetric``.
        dtype: the weight's float dtype (scales and float slices).

    Returns:
        The expected inner tensors, ``slot`` included.

    Raises:
        ValueError: attributes that do not describe a packed weight (names the attribute).
    """
    shape, bits, n_seg, group, symmetric = _check_attrs(attrs)
    K = shape[-1]
    R = shape[-2] // n_seg
    out = {"slot": ((len(bits), 3), torch.int32)}
    for b in BUFFER_BITS:
        n_b = bits.count(b)
        if not n_b:
            continue
        if b == 16:
            out["d16"] = ((n_b, R, K), dtype)
            continue
        out[f"q{b}"] = ((n_b, R, packed_size(K, b)), torch.uint8)
        out[f"s{b}"] = ((n_b, R, K // group), dtype)
        if not symmetric:
            out[f"z{b}"] = ((n_b, R, K // group), torch.uint8)
    return out


def check_packed(fqn: str, attrs: Mapping[str, Any], dtype: torch.dtype, inner: Mapping[str, torch.Tensor]) -> None:
    """Checks a stored packed weight's buffers against its attributes, and their contents.

    Shapes, dtypes and the set of buffers must match :func:`expected_buffers`; the slot
    table must be the canonical one; zero points must be valid codes; scales finite.

    Raises:
        ValueError: naming ``fqn`` and the first mismatch.
    """
    try:
        want = expected_buffers(attrs, dtype)
    except ValueError as e:
        raise ValueError(f"packed tensor {fqn}: {e}") from None
    if set(inner) != set(want):
        missing, extra = sorted(set(want) - set(inner)), sorted(set(inner) - set(want))
        raise ValueError(f"packed tensor {fqn}: inner tensors {sorted(inner)} do not match its attributes "
                         f"(missing {missing}, unexpected {extra})")
    for name, (shape, dt) in want.items():
        t = inner[name]
        if tuple(t.shape) != shape or t.dtype != dt:
            raise ValueError(f"packed tensor {fqn}: {name} is {t.dtype} {tuple(t.shape)}, its attributes say "
                             f"{dt} {shape}")
    if not torch.equal(inner["slot"], canonical_slot(attrs["slice_bits"])):
        raise ValueError(f"packed tensor {fqn}: its slot table does not match slice_bits")
    for b in BUFFER_BITS:
        s, z = inner.get(f"s{b}"), inner.get(f"z{b}")
        if s is not None and not torch.isfinite(s).all():
            raise ValueError(f"packed tensor {fqn}: {(~torch.isfinite(s)).sum().item()} scales of s{b} are NaN/Inf")
        if z is not None and z.numel() and int(z.max()) >= 2**b:
            raise ValueError(f"packed tensor {fqn}: zero point {int(z.max())} in z{b} is not a {b}-bit code")


def packed_from_parts(fqn: str, attrs: Mapping[str, Any], inner: Mapping[str, torch.Tensor]) -> PackedWeight:
    """Builds a PackedWeight from stored attributes and inner tensors, after :func:`check_packed`.

    Args:
        fqn: the parameter's name (for errors).
        attrs: the stored attributes, with ``dtype`` as a name (``"bfloat16"``).
        inner: the stored inner tensors, ``slot`` included.

    Raises:
        ValueError: anything :func:`check_packed` refuses, or an unknown dtype.
    """
    name = attrs.get("dtype")
    dtype = FLOAT_DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise ValueError(f"packed tensor {fqn}: dtype={attrs.get('dtype')!r}; allowed: {sorted(FLOAT_DTYPES)}")
    check_packed(fqn, attrs, dtype, inner)
    extra = {k: attrs[k] for k in PackedWeight.tensor_attribute_names if k in attrs}
    extra["logical_shape"], extra["slice_bits"] = tuple(extra["logical_shape"]), tuple(extra["slice_bits"])
    missing = [k for k in PackedWeight.tensor_attribute_names if k not in extra]
    if missing:
        raise ValueError(f"packed tensor {fqn}: attributes {missing} are missing")
    buffers = {k: v for k, v in inner.items() if k != "slot"}
    optional = {k: attrs[k] for k in getattr(PackedWeight, "optional_tensor_attribute_names", []) if k in attrs}
    try:
        return PackedWeight(inner["slot"], *(extra[k] for k in PackedWeight.tensor_attribute_names), **buffers,
                            **optional)
    except ValueError as e:  # e.g. an act_bits the kernels do not take
        raise ValueError(f"packed tensor {fqn}: {e}") from None
