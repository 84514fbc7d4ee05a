"""GGUF tensors from a unit's stored codes: ggml type choice, block encoding, layout edits.

Types: one ggml type per tensor. Symmetric 4-/8-bit codes at group sizes that are
multiples of 32 become Q4_0 / Q8_0 exactly (scale rounded to fp16); 2-/3-bit codes become
Q2_K / Q3_K (a requantization, :mod:`moe_ao.export.gguf_quants`) where rows are a
multiple of 256 weights, else Q4_0, which holds them exactly; 16-bit units the model's
float type.

Edits llama.cpp's layouts need, all exact on the stored codes: q/k row permutation
(llama's rotary layout), scaling by a power of two (d or the float weight), and zero
padding (codes at the zero point).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from moe_ao.export.gguf_quants import QK, QK_K, block_scales, pack_q4_0, pack_q8_0, quantize_q2_k, quantize_q3_k
from moe_ao.export.layout import UnitCodes
from moe_ao.tensors.packing import pack_codes


def gguf_module():
    """The ``gguf`` package, or an ImportError saying how to install it."""
    try:
        import gguf
    except ImportError as e:
        raise ImportError(f"GGUF export needs the gguf package ({e}): pip install 'moe_ao[export]'") from e
    return gguf


# ---------------------------------------------------------------- unit codes edits
def permute_rows(c: UnitCodes, perm: torch.Tensor) -> UnitCodes:
    take = lambda t: None if t is None else t[perm]  # noqa: E731
    return replace(c, packed=take(c.packed), scale=take(c.scale), zero=take(c.zero), dense=take(c.dense))


def scaled(c: UnitCodes, factor: float) -> UnitCodes:
    if c.dense is not None:
        return replace(c, dense=c.dense * factor)
    return replace(c, scale=c.scale * factor)


def padded(c: UnitCodes, rows: int, cols: int) -> UnitCodes:
    """Zero-padded to [rows, cols] (codes at the zero point, scales 0)."""
    R, K = c.shape
    if (R, K) == (rows, cols):
        return c
    if c.dense is not None:
        return replace(c, dense=torch.nn.functional.pad(c.dense, (0, cols - K, 0, rows - R)), shape=(rows, cols))
    if (cols - K) % c.group_size:
        raise ValueError(f"padding {K} -> {cols} columns is not a whole number of groups of {c.group_size}")
    z = 2 ** (c.bits - 1)
    codes = torch.nn.functional.pad(c.codes(), (0, cols - K, 0, rows - R), value=z)
    G = cols // c.group_size
    scale = torch.nn.functional.pad(c.scale, (0, G - c.scale.shape[1], 0, rows - R))
    zero = None if c.zero is None else torch.nn.functional.pad(c.zero, (0, G - c.zero.shape[1], 0, rows - R), value=z)
    return replace(c, packed=pack_codes(codes, c.bits), scale=scale, zero=zero, shape=(rows, cols))


def qk_permutation(n_rows: int, n_head: int) -> torch.Tensor:
    """The row order llama.cpp's converter gives q/k of llama models (rotate-half -> interleaved)."""
    return torch.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2).reshape(-1)


# ---------------------------------------------------------------- encoding
def float_type_of(dtype: torch.dtype, gguf) -> Any:
    T = gguf.GGMLQuantizationType
    return {torch.bfloat16: T.BF16, torch.float16: T.F16}.get(dtype, T.F32)


def np_float(t: torch.Tensor, ggml_type, gguf):
    T = gguf.GGMLQuantizationType
    if ggml_type == T.BF16:
        return t.detach().to(torch.bfloat16).contiguous().view(torch.int16).numpy().view("uint8").reshape(
            *t.shape[:-1], -1), T.BF16
    np_dtype = torch.float16 if ggml_type == T.F16 else torch.float32
    return t.detach().to(np_dtype).contiguous().numpy(), ggml_type


def _encode_codes(c: UnitCodes, qtype: str) -> torch.Tensor:
    """One unit's rows [R, K] as ggml blocks of ``qtype`` (uint8 [R, bytes])."""
    if qtype in ("Q2_K", "Q3_K"):
        return (quantize_q2_k if qtype == "Q2_K" else quantize_q3_k)(c.dequantize())
    d = block_scales(c.scale, c.group_size)  # [R, K/32]
    q = c.codes().to(torch.int16) - 2 ** (c.bits - 1)  # signed, w = s * q
    return pack_q8_0(q, d) if qtype == "Q8_0" else pack_q4_0(q + 8, d)


def choose_type(c: UnitCodes, name: str) -> str:
    """The ggml type holding ``c``'s codes (see the module doc).

    Raises:
        ValueError: asymmetric codes or a group size that is not a multiple of 32 (names the tensor).
    """
    if c.bits == 16:
        return "float"
    if c.zero is not None or c.group_size % QK:
        raise ValueError(f"{name}: llama.cpp's types need symmetric codes in groups that are multiples of {QK};"
                         f" got group_size={c.group_size}, symmetric={c.zero is None}")
    if c.bits in (2, 3) and c.shape[1] % QK_K == 0:
        return f"Q{c.bits}_K"
    return "Q8_0" if c.bits == 8 else "Q4_0"


def encode(parts: list[UnitCodes], name: str, float_type, gguf, stacked: bool) -> tuple[Any, Any, str]:
    """A tensor of one unit ([R, K]) or, ``stacked``, of a layer's experts ([E, R, K]).

    Returns:
        (numpy data: float values or uint8 blocks, ggml type, its name).

    Raises:
        ValueError: the parts need different types, or codes llama.cpp cannot hold (names the tensor).
    """
    kinds = {choose_type(c, name) for c in parts}
    if len(kinds) > 1:
        raise ValueError(f"{name}: its experts need different types {sorted(kinds)}; llama.cpp holds one per tensor")
    qtype = kinds.pop()
    if qtype == "float":
        data = torch.stack([c.dense for c in parts]) if stacked else parts[0].dense
        arr, t = np_float(data, float_type, gguf)
        return arr, t, t.name
    blocks = torch.stack([_encode_codes(c, qtype) for c in parts]) if stacked else _encode_codes(parts[0], qtype)
    return blocks.numpy(), getattr(gguf.GGMLQuantizationType, qtype), qtype
