"""PackedWeight: a really packed, mixed-bit weight for a linear or a fused experts bank.

Shapes: E experts, N rows (out features), K in features, R = N / n_seg rows per slice,
G = K / group_size groups per row, n_b = slices stored at b bits.

A weight of logical shape [N, K] (a linear) or [E, N, K] (a fused experts tensor) is cut
into *slices* of R rows: one per expert and row segment. ``gate_up_proj`` [E, 2I, H]
has two segments per expert (gate rows, then up rows), so every gate and up of every
expert is one slice that can have its own bit width. Slices of the same width share
one buffer:

    q{b}  uint8 [n_b, R, ceil(K/8)*b]   codes, packed by moe_ao.tensors.packing
    s{b}  [n_b, R, G]                   scales in the model dtype
    z{b}  uint8 [n_b, R, G]             zero points (asymmetric only)
    d16   [n_16, R, K]                  slices kept in floating point
    slot  int32 [n_slices, 3]           per slice: (bits, row in its buffer, row in
                                        the concatenation of all buffers)

Ops: F.linear (2D), indexing experts with ints or index tensors (returns dequantized
dense weights), ``.to``, detach/clone, flatten/unflatten for torch.compile. Any other op
raises NotImplementedError naming it: call ``.dequantize()`` explicitly instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import return_and_correct_aliasing
from torchao.utils import TorchAOBaseTensor

from moe_ao.kernels import dispatch
from moe_ao.kernels._registry import BUFFER_NAMES
from moe_ao.kernels.activations import ACT_BITS
from moe_ao.primitives import QuantizedWeight, dequantize_codes
from moe_ao.tensors.packing import pack_codes, unpack_codes

__all__ = ["PackedWeight"]

BUFFER_BITS = (2, 3, 4, 8, 16)  # buffer order of the concatenation
CHUNK_WEIGHTS = 1 << 20  # weights per dequantization step in eager code: a few MB of temporaries
_aten = torch.ops.aten


def _traced(t: torch.Tensor) -> bool:
    """Whether t belongs to a trace (Dynamo, export, or AOT autograd's fake tensors), where
    data-dependent Python (``.tolist()``) is not allowed."""
    return torch.compiler.is_compiling() or is_fake(t)


def _buffer_names(bits: int) -> tuple[str, ...]:
    return ("d16",) if bits == 16 else (f"q{bits}", f"s{bits}", f"z{bits}")


class PackedWeight(TorchAOBaseTensor):
    """Mixed-bit packed weight; see the module docstring for the layout."""

    tensor_data_names = ["slot"]
    tensor_attribute_names = ["logical_shape", "slice_bits", "n_seg", "group_size", "symmetric"]
    optional_tensor_data_names = list(BUFFER_NAMES)  # the kernels' buffer list, in its order
    optional_tensor_attribute_names = ["act_bits"]  # None, or 8: int8 per-token activations (W+A)

    def __new__(cls, slot, logical_shape, slice_bits, n_seg, group_size, symmetric,
                q2=None, s2=None, z2=None, q3=None, s3=None, z3=None, q4=None, s4=None, z4=None,
                q8=None, s8=None, z8=None, d16=None, act_bits=None):
        ref = next(t for t in (s2, s3, s4, s8, d16) if t is not None)
        return torch.Tensor._make_wrapper_subclass(
            cls, logical_shape, dtype=ref.dtype, device=slot.device, requires_grad=False
        )

    def __init__(self, slot, logical_shape, slice_bits, n_seg, group_size, symmetric,
                 q2=None, s2=None, z2=None, q3=None, s3=None, z3=None, q4=None, s4=None, z4=None,
                 q8=None, s8=None, z8=None, d16=None, act_bits=None):
        if act_bits not in ACT_BITS:
            raise ValueError(f"act_bits={act_bits!r} is not supported; allowed: {ACT_BITS}")
        self.act_bits = act_bits
        self.slot = slot
        self.logical_shape = tuple(logical_shape)
        self.slice_bits = tuple(slice_bits)
        self.n_seg = n_seg
        self.group_size = group_size
        self.symmetric = symmetric
        self.q2, self.s2, self.z2, self.q3, self.s3, self.z3 = q2, s2, z2, q3, s3, z3
        self.q4, self.s4, self.z4, self.q8, self.s8, self.z8 = q4, s4, z4, q8, s8, z8
        self.d16 = d16

    def __tensor_flatten__(self) -> tuple[list[str], dict]:
        # A compiled model calls this twice per packed weight on every call (its metadata
        # guard, then unwrapping the subclass input); the generic version took ~10 us. The
        # fields never change after __init__, so it is computed once per tensor.
        flat = self.__dict__.get("_flat")
        if flat is None:
            flat = self._flat = super().__tensor_flatten__()
        return list(flat[0]), dict(flat[1])

    # ------------------------------------------------------------------ build
    @classmethod
    def from_slices(
        cls,
        slices: Sequence[QuantizedWeight | torch.Tensor],
        logical_shape: Sequence[int],
        n_seg: int,
        dtype: torch.dtype,
        act_bits: int | None = None,
    ) -> PackedWeight:
        """Packs per-slice results into one tensor.

        Args:
            slices: in natural order (expert-major, segment-minor), each a
                QuantizedWeight [R, K] or a float tensor [R, K] kept at 16 bits.
            logical_shape: [N, K] or [E, N, K].
            n_seg: row segments per expert (2 for gate_up_proj, else 1).
            dtype: compute dtype (the model's); scales and float slices use it.
            act_bits: None, or 8 to quantize activations per token to int8 before every
                product with this weight (``moe_ao.kernels.activations``).

        Returns:
            The packed tensor.
        """
        *lead, N, K = logical_shape
        E = lead[0] if lead else 1
        assert len(slices) == E * n_seg and N % n_seg == 0, f"{len(slices)=} {logical_shape=} {n_seg=}"
        qs = [s for s in slices if isinstance(s, QuantizedWeight)]
        group_size = qs[0].group_size if qs else K
        symmetric = qs[0].zero is None if qs else True
        assert all(q.group_size == group_size and (q.zero is None) == symmetric for q in qs), "mixed group/sym"
        slice_bits = tuple(s.bits if isinstance(s, QuantizedWeight) else 16 for s in slices)
        by_bits: dict[int, list[int]] = {b: [i for i, sb in enumerate(slice_bits) if sb == b] for b in BUFFER_BITS}
        buffers: dict[str, torch.Tensor] = {}
        slot = torch.zeros(len(slices), 3, dtype=torch.int32)
        offset = 0
        for b in BUFFER_BITS:
            idx = by_bits[b]
            if not idx:
                continue
            for pos, i in enumerate(idx):
                slot[i] = torch.tensor([b, pos, offset + pos])
            offset += len(idx)
            if b == 16:
                buffers["d16"] = torch.stack([slices[i].to(dtype) for i in idx])
                continue
            # Packed slice by slice: the bank's unpacked codes never exist all at once.
            buffers[f"q{b}"] = torch.stack([pack_codes(slices[i].codes, b) for i in idx])
            buffers[f"s{b}"] = torch.stack([slices[i].scale.to(dtype) for i in idx])
            if not symmetric:
                buffers[f"z{b}"] = torch.stack([slices[i].zero for i in idx])
        device = next(iter(buffers.values())).device
        return cls(slot.to(device), tuple(logical_shape), slice_bits, n_seg, group_size, symmetric, **buffers,
                   act_bits=act_bits)

    # ------------------------------------------------------------- properties
    @property
    def rows_per_slice(self) -> int:
        return self.logical_shape[-2] // self.n_seg

    @property
    def present_bits(self) -> tuple[int, ...]:
        return tuple(b for b in BUFFER_BITS if b in self.slice_bits)

    def nbytes_packed(self) -> int:
        """Real bytes of storage (codes, scales, zeros, float slices, slot table)."""
        flat, _ = self.__tensor_flatten__()
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in flat)

    # ---------------------------------------------------------- dequantizing
    # Eager code dequantizes slice by slice, CHUNK_WEIGHTS at a time, into the output, so a
    # bank costs its dense size plus a few MB (unpacking a 4096 x 14336 slice at once made
    # ~0.5 GB of temporaries). Traced code keeps whole-tensor expressions: Inductor fuses
    # them into one kernel without temporaries, where a loop would unroll into the graph.
    def _dequant_buffer(self, b: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Dequantizes buffer b ([n_b, R, K]), or only its entries ``rows`` ([..., R, K])."""
        K = self.logical_shape[-1]
        if b == 16:
            return self.d16 if rows is None else self.d16[rows]
        q, s, z = (getattr(self, n) for n in _buffer_names(b))
        if rows is not None:
            q, s = q[rows], s[rows]
            z = z[rows] if z is not None else None
        return dequantize_codes(unpack_codes(q, b, K), s, z, b, self.group_size, self.dtype)

    def _fill_slices(self, out: torch.Tensor, info: list[list[int]]) -> torch.Tensor:
        """Dequantizes the slices ``info`` ((bits, row in its buffer, -) each) into out [len(info), R, K]."""
        R, K = out.shape[-2:]
        step = max(1, CHUNK_WEIGHTS // K)  # rows per chunk
        for i, (b, pos, _) in enumerate(info):
            if b == 16:
                out[i] = self.d16[pos]
                continue
            q, s, z = (getattr(self, n) for n in _buffer_names(b))
            for r0 in range(0, R, step):
                r1 = min(R, r0 + step)
                zr = z[pos, r0:r1] if z is not None else None
                out[i, r0:r1] = dequantize_codes(unpack_codes(q[pos, r0:r1], b, K), s[pos, r0:r1], zr, b,
                                                 self.group_size, self.dtype)
        return out

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight of the logical shape (computed in the scales' dtype, then cast to ``dtype``)."""
        if not _traced(self.slot):
            out = torch.empty(self.logical_shape, dtype=dtype or self.dtype, device=self.slot.device)
            self._fill_slices(out.view(-1, self.rows_per_slice, self.logical_shape[-1]), self.slot.tolist())
            return out
        parts = [self._dequant_buffer(b) for b in self.present_bits]
        flat = parts[0] if len(parts) == 1 else torch.cat(parts)  # [n_slices, R, K], buffer order
        if len(parts) > 1:
            flat = flat[self.slot[:, 2].long()]
        out = flat.reshape(self.logical_shape)
        return out if dtype is None else out.to(dtype)

    def dequantize_experts(self, ids: torch.Tensor) -> torch.Tensor:
        """Dense weights of the experts ``ids`` ([...] int) -> [..., N, K] (3D tensors only)."""
        assert len(self.logical_shape) == 3, f"{self.logical_shape=}"
        _, N, K = self.logical_shape
        seg = torch.arange(self.n_seg, device=ids.device, dtype=ids.dtype)
        slice_ids = ids.unsqueeze(-1) * self.n_seg + seg  # [..., n_seg]
        info = self.slot[slice_ids].long()  # [..., n_seg, 3]
        if not _traced(self.slot):
            out = torch.empty(*ids.shape, N, K, dtype=self.dtype, device=self.slot.device)
            self._fill_slices(out.view(-1, self.rows_per_slice, K), info.reshape(-1, 3).tolist())
            return out
        out = None
        for b in self.present_bits:
            n_b = (self.d16 if b == 16 else getattr(self, f"q{b}")).shape[0]
            if len(self.present_bits) == 1:
                part = self._dequant_buffer(b, info[..., 1])
            else:
                rows = info[..., 1].clamp(max=n_b - 1)
                keep = (info[..., 0] == b)[..., None, None]
                part = torch.where(keep, self._dequant_buffer(b, rows), 0)
            out = part if out is None else out + part
        return out.reshape(*ids.shape, N, K)  # [..., n_seg, R, K] -> [..., N, K]

    def dequantize_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dense rows ``ids`` ([...] int) of a 2D tensor -> [..., K]: an embedding lookup that
        unpacks only the rows it reads (T rows of codes, never the table)."""
        assert len(self.logical_shape) == 2, f"{self.logical_shape=}"
        K, R = self.logical_shape[1], self.rows_per_slice
        info = self.slot[torch.div(ids, R, rounding_mode="floor")].long()  # [..., 3]: each row's slice
        within = ids % R
        out = None
        for b in self.present_bits:
            if b == 16:
                n_b = self.d16.shape[0]
                part = self.d16[info[..., 1].clamp(max=n_b - 1), within]
            else:
                q, s, z = (getattr(self, n) for n in _buffer_names(b))
                pos = info[..., 1].clamp(max=q.shape[0] - 1)
                part = dequantize_codes(unpack_codes(q[pos, within], b, K), s[pos, within],
                                        z[pos, within] if z is not None else None, b, self.group_size, self.dtype)
            if len(self.present_bits) > 1:
                part = torch.where((info[..., 0] == b).unsqueeze(-1), part, 0)
            out = part if out is None else out + part
        return out

    def _stable_hash_for_caching(self) -> str:
        """Deterministic metadata key for the AOT autograd cache (values excluded)."""
        flat, attrs = self.__tensor_flatten__()
        inner = [(n, tuple(getattr(self, n).shape), str(getattr(self, n).dtype)) for n in flat]
        text = repr((type(self).__qualname__, sorted(attrs.items()), inner, str(self.device)))
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    def __repr__(self) -> str:
        hist = {b: self.slice_bits.count(b) for b in self.present_bits}
        return (
            f"PackedWeight(shape={self.logical_shape}, slices by bits={hist}, "
            f"group_size={self.group_size}, symmetric={self.symmetric}, dtype={self.dtype})"
        )


implements = PackedWeight.implements
implements_torch_function = PackedWeight.implements_torch_function


@implements_torch_function([F.linear, torch.nn.functional.linear])
def _linear(func, types, args, kwargs):
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if not isinstance(w, PackedWeight) or len(w.logical_shape) != 2:
        raise NotImplementedError(f"PackedWeight: F.linear needs a 2D packed weight, got {type(w).__name__}")
    if isinstance(x, PackedWeight) or isinstance(bias, PackedWeight):
        raise NotImplementedError("PackedWeight: F.linear with a packed input or bias")
    out = dispatch.linear(x, w)  # a kernel reads the packed codes directly: no dense weight
    return out if bias is None else out + bias


@implements_torch_function([F.embedding, torch.nn.functional.embedding])
def _embedding(func, types, args, kwargs):
    params = dict(zip(("input", "weight", "padding_idx", "max_norm"), args)) | kwargs
    ids, w = params["input"], params["weight"]
    if not isinstance(w, PackedWeight) or len(w.logical_shape) != 2 or isinstance(ids, PackedWeight):
        raise NotImplementedError("PackedWeight: F.embedding needs integer ids and a 2D packed weight")
    if params.get("max_norm") is not None:
        raise NotImplementedError("PackedWeight: F.embedding with max_norm renormalises the table in place; "
                                  "a packed table is read only")
    return w.dequantize_rows(ids)  # padding_idx only changes gradients: the packed table has none


@implements(_aten.index.Tensor)
def _index(func, types, args, kwargs):
    w, indices = args[0], args[1]
    integer = len(indices) == 1 and indices[0] is not None and not indices[0].is_floating_point()
    if len(w.logical_shape) == 3 and integer:
        if indices[0].dtype == torch.bool:
            raise NotImplementedError("PackedWeight: boolean-mask indexing (aten.index.Tensor); use .dequantize()")
        return w.dequantize_experts(indices[0])
    raise NotImplementedError("PackedWeight: aten.index.Tensor supports one integer index over experts")


@implements(_aten.select.int)
def _select(func, types, args, kwargs):
    w, dim, i = args
    if len(w.logical_shape) == 3 and dim == 0:
        E = w.logical_shape[0]
        if not -E <= i < E:
            raise IndexError(f"expert index {i} out of range for {E} experts")
        return w.dequantize_experts(torch.tensor(i % E, device=w.device))
    return func(w.dequantize(), dim, i)


@implements(_aten._to_copy.default)
def _to_copy(func, types, args, kwargs):
    w = args[0]
    kw = w._get_to_kwargs(*args[1:], **kwargs)
    device, dtype = kw["device"], kw.get("dtype", w.dtype)
    buffers = {}
    for name in w.optional_tensor_data_names:
        t = getattr(w, name)
        if t is not None:
            buffers[name] = t.to(device, dtype=dtype) if t.is_floating_point() else t.to(device)
    new = PackedWeight(w.slot.to(device), w.logical_shape, w.slice_bits, w.n_seg, w.group_size, w.symmetric, **buffers,
                       act_bits=w.act_bits)
    return return_and_correct_aliasing(func, args, kwargs, new)
