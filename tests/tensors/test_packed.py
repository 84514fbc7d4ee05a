"""PackedWeight contract tests, all in one place.

Every property of the tensor subclass is checked against a dense reference built
slice by slice in float64 from the same codes and scales: dequantize, indexing,
F.linear, flatten/unflatten, ``.to``, detach/clone, Parameter wrapping,
torch.compile, unsupported ops and the byte count.

Shapes: E experts, N rows, K in features, n_seg row segments per expert, R = N / n_seg.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe_ao.primitives import QuantizedWeight, rtn_quantize
from moe_ao.tensors.packed import PackedWeight

K = 128
R = 8  # rows per slice
DTYPES = [torch.float32, torch.bfloat16]
# bit patterns cycled over the slices (expert-major, segment-minor); 16 = kept in float
PATTERNS = {
    "b2": (2,), "b3": (3,), "b4": (4,), "b8": (8,),
    "mixed": (2, 3, 16, 4, 8), "mixed16": (16, 4, 3),
}


def make_slices(n_slices: int, pattern: tuple[int, ...], group_size: int, symmetric: bool,
                dtype: torch.dtype, seed: int = 0) -> list[QuantizedWeight | torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out: list[QuantizedWeight | torch.Tensor] = []
    for i in range(n_slices):
        W = (torch.randn(R, K, generator=g) * 0.1).to(dtype)
        bits = pattern[i % len(pattern)]
        out.append(W if bits == 16 else rtn_quantize(W, bits, group_size, symmetric, dtype))
    return out


def reference_slice(s: QuantizedWeight | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(q - z) * s in float64, rounded once to dtype; float slices as they are."""
    if isinstance(s, torch.Tensor):
        return s.to(dtype)
    gs = s.group_size
    scale = s.scale.double().repeat_interleave(gs, -1)
    zero = (torch.full_like(s.scale, 2 ** (s.bits - 1), dtype=torch.float64) if s.zero is None
            else s.zero.double()).repeat_interleave(gs, -1)
    return ((s.codes.double() - zero) * scale).to(dtype)


def build(E: int | None, n_seg: int, pattern, group_size: int, dtype, symmetric: bool = True, seed: int = 0):
    """A packed weight ([N, K] when E is None, else [E, N, K]) and its dense reference."""
    n_slices = (E or 1) * n_seg
    slices = make_slices(n_slices, pattern, group_size, symmetric, dtype, seed)
    N = R * n_seg
    shape = (N, K) if E is None else (E, N, K)
    packed = PackedWeight.from_slices(slices, shape, n_seg, dtype)
    dense = torch.stack([reference_slice(s, dtype) for s in slices]).reshape(shape)
    return packed, dense


def inner_tensors(w: PackedWeight) -> dict[str, torch.Tensor]:
    names, _ = w.__tensor_flatten__()
    return {n: getattr(w, n) for n in names}


# ----------------------------------------------------------------- dequantize
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E", [1, 3, 5])
@pytest.mark.parametrize("n_seg", [1, 2])
def test_dequantize_and_index_match_reference(pattern, group_size, dtype, E, n_seg):
    w, dense = build(E, n_seg, PATTERNS[pattern], group_size, dtype)
    assert isinstance(w, PackedWeight)
    assert w.shape == dense.shape and w.dtype == dtype and w.device.type == "cpu"
    assert w.slice_bits == tuple(PATTERNS[pattern][i % len(PATTERNS[pattern])] for i in range(E * n_seg))
    assert torch.equal(w.dequantize(), dense)
    assert torch.equal(w.dequantize(torch.float64), dense.double())
    # Index tensor (repeats, any order, 2-D) and ints (negative too) equal dense indexing.
    ids = torch.tensor([E - 1, 0, E - 1, E // 2])
    assert torch.equal(w[ids], dense[ids])
    ids2 = torch.tensor([[0, E - 1], [E // 2, 0]])
    assert torch.equal(w[ids2], dense[ids2])
    for i in (0, E - 1, -1):
        assert torch.equal(w[i], dense[i])
    with pytest.raises(IndexError, match="out of (range|bounds)"):
        w[E]


@pytest.mark.parametrize("pattern", ["b2", "b3", "mixed"])
@pytest.mark.parametrize("E", [1, 3])
def test_asymmetric_dequantize_and_index(pattern, E):
    w, dense = build(E, 2, PATTERNS[pattern], 32, torch.bfloat16, symmetric=False)
    assert not w.symmetric
    assert torch.equal(w.dequantize(), dense)
    ids = torch.tensor([E - 1, 0])
    assert torch.equal(w[ids], dense[ids])


def test_all_float_slices():
    w, dense = build(3, 2, (16,), 32, torch.float32)
    assert w.present_bits == (16,) and w.group_size == K
    assert torch.equal(w.dequantize(), dense) and torch.equal(w[torch.tensor([2, 1])], dense[[2, 1]])


# ------------------------------------------------------------------ F.linear
def close(dtype: torch.dtype) -> dict[str, float]:
    """Tolerance of one compute dtype (summation order and one output rounding)."""
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-2}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("rows", [3, 40], ids=["decode", "prefill"])  # CPU kernel / dequantize path
def test_linear_matches_dense(bits, group_size, dtype, symmetric, rows):
    w, dense = build(None, 1, (bits,), group_size, dtype, symmetric)
    assert w.ndim == 2 and w.shape == (R, K)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, K, generator=g).to(dtype)
    bias = torch.randn(R, generator=g).to(dtype)
    out = F.linear(x, w)
    assert out.dtype == dtype and out.shape == (rows, R)
    torch.testing.assert_close(out, F.linear(x, dense), **close(dtype))
    torch.testing.assert_close(F.linear(x, w, bias), F.linear(x, dense, bias), **close(dtype))
    # ... and float64 math on the same weights; leading dims are kept.
    torch.testing.assert_close(out.double(), x.double() @ dense.double().T, **close(dtype))
    x3 = x.reshape(1, rows, K)
    torch.testing.assert_close(F.linear(x3, w), out.reshape(1, rows, R), **close(dtype))


def test_linear_rejects_3d_weight():
    w, _ = build(3, 1, (4,), 32, torch.float32)
    with pytest.raises(NotImplementedError, match="2D"):
        F.linear(torch.randn(2, K), w)


# ---------------------------------------------------- flatten, to, detach, clone
@pytest.mark.parametrize("pattern", ["b3", "mixed"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_flatten_unflatten_round_trip(pattern, symmetric):
    w, dense = build(3, 2, PATTERNS[pattern], 32, torch.bfloat16, symmetric)
    names, attrs = w.__tensor_flatten__()
    assert names[0] == "slot" and ("z3" in names) == (not symmetric)
    assert all(getattr(w, n) is None for n in w.optional_tensor_data_names if n not in names)
    assert attrs == {"logical_shape": (3, 2 * R, K), "slice_bits": w.slice_bits, "n_seg": 2,
                     "group_size": 32, "symmetric": symmetric, "act_bits": None}
    back = PackedWeight.__tensor_unflatten__(inner_tensors(w), attrs, w.shape, w.stride())
    assert type(back) is PackedWeight and back.shape == w.shape and back.dtype == w.dtype
    assert back.__tensor_flatten__() == (names, attrs)
    assert torch.equal(back.dequantize(), dense)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_to_dtype_and_device(symmetric):
    w, dense = build(3, 2, PATTERNS["mixed"], 32, torch.bfloat16, symmetric)
    f32 = w.to(torch.float32)
    assert type(f32) is PackedWeight and f32.dtype == torch.float32 and f32.slice_bits == w.slice_bits
    # codes and zeros keep their integer dtype; scales and float slices change dtype
    assert f32.q2.dtype == torch.uint8 and f32.slot.dtype == torch.int32
    assert f32.s2.dtype == torch.float32 and f32.d16.dtype == torch.float32
    if not symmetric:
        assert f32.z2.dtype == torch.uint8
    # bf16 -> f32 is exact and (q - z) * s is exact in float32, so rounding back gives bf16's result.
    assert torch.equal(f32.dequantize().to(torch.bfloat16), dense)
    assert torch.equal(f32.to(torch.bfloat16).dequantize(), dense)
    same = w.to("cpu")
    assert same.dtype == w.dtype and torch.equal(same.dequantize(), dense)
    both = w.to(device="cpu", dtype=torch.float32)
    assert torch.equal(both.dequantize(), f32.dequantize())


def test_detach_clone_and_parameter():
    w, dense = build(3, 2, PATTERNS["mixed"], 32, torch.float32)
    for t in (w.detach(), w.clone()):
        assert type(t) is PackedWeight and torch.equal(t.dequantize(), dense)
        assert t.__tensor_flatten__()[1] == w.__tensor_flatten__()[1]
    clone = w.clone()
    assert clone.q2.data_ptr() != w.q2.data_ptr()  # a real copy
    p = nn.Parameter(w, requires_grad=False)
    assert isinstance(p, PackedWeight) and isinstance(p, nn.Parameter) and not p.requires_grad
    assert torch.equal(p.dequantize(), dense) and torch.equal(p[torch.tensor([1])], dense[[1]])


def test_parameter_in_linear_module():
    w, dense = build(None, 1, (3,), 32, torch.bfloat16, symmetric=False)
    lin = nn.Linear(K, R, bias=True, dtype=torch.bfloat16)
    lin.weight = nn.Parameter(w, requires_grad=False)
    x = torch.randn(4, K, dtype=torch.bfloat16)
    torch.testing.assert_close(lin(x), F.linear(x, dense, lin.bias), **close(torch.bfloat16))


@pytest.mark.parametrize("pattern", ["b2", "b3", "b4", "b8", "mixed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_embedding_reads_the_rows_of_the_reference(pattern, dtype, symmetric):
    """F.embedding (nn.Embedding's forward) on a 2D packed table: the reference's rows, from
    every slice (mixed: 2/3/16/4/8-bit slices of one table), ids in any shape and order."""
    w, dense = build(None, 5, PATTERNS[pattern], 32, dtype, symmetric)
    ids = torch.randint(0, 5 * R, (3, 11), generator=torch.Generator().manual_seed(1))
    ids[0, :3] = torch.tensor([0, 5 * R - 1, 0])  # both ends of the table, repeated
    assert torch.equal(F.embedding(ids, w), dense[ids])
    emb = nn.Embedding(5 * R, K, padding_idx=0, dtype=dtype)
    emb.weight = nn.Parameter(w, requires_grad=False)
    assert torch.equal(emb(ids), dense[ids])
    with pytest.raises(NotImplementedError, match="max_norm"):
        F.embedding(ids, w, max_norm=1.0)


# ------------------------------------------------------------------ compile
def index_bmm(w: torch.Tensor, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.bmm(w[ids], x)  # [S, N, K] @ [S, K, 1]


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


BACKENDS = ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern, E, n_seg, dtype", [
    ("mixed", 5, 2, torch.float32),
    ("b2", 3, 1, torch.bfloat16),
], ids=["mixed-E5-seg2-f32", "b2-E3-seg1-bf16"])
def test_compile_index_bmm_fullgraph(backend, pattern, E, n_seg, dtype):
    w, dense = build(E, n_seg, PATTERNS[pattern], 32, dtype)
    ids = torch.tensor([E - 1, 0, E - 1, 1])
    x = torch.randn(4, K, 1).to(dtype)
    eager = index_bmm(w, ids, x)
    assert torch.equal(eager, index_bmm(dense, ids, x))
    compiled = torch.compile(index_bmm, fullgraph=True, backend=backend)(w, ids, x)
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_compile_linear_fullgraph(backend, symmetric):
    w, dense = build(None, 1, (4,), 32, torch.float32, symmetric)
    x = torch.randn(3, K)
    compiled = torch.compile(linear, fullgraph=True, backend=backend)(x, w)
    torch.testing.assert_close(compiled, F.linear(x, w), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(compiled, F.linear(x, dense), **close(torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_embedding_fullgraph(backend):
    w, dense = build(None, 5, PATTERNS["mixed"], 32, torch.bfloat16)
    ids = torch.tensor([[5 * R - 1, 0, 3], [7, 7, 2 * R]])
    compiled = torch.compile(F.embedding, fullgraph=True, backend=backend)(ids, w)
    assert torch.equal(compiled, dense[ids])


# -------------------------------------------------------------- unsupported
@pytest.mark.parametrize("op, name", [
    (lambda w: w + 1, "aten.add"),
    (lambda w: w.sum(), "aten.sum"),
    (lambda w: w.t(), "aten.t"),
    (lambda w: w * w, "aten.mul"),
])
def test_unsupported_ops_name_the_op(op, name):
    w, _ = build(None, 1, (4,), 32, torch.float32)
    with pytest.raises(NotImplementedError, match=name.replace(".", r"\.")):
        op(w)


def test_bool_mask_and_slices_not_supported():
    w, _ = build(3, 1, (4,), 32, torch.float32)
    with pytest.raises(NotImplementedError, match="boolean-mask"):
        w[torch.tensor([True, False, True])]
    with pytest.raises(NotImplementedError, match="aten.slice"):
        w[0:2]


# ----------------------------------------------------------------- storage
def test_nbytes_counts_real_bytes_2bit_g64_bf16():
    E, n_seg, N, Kd = 4, 2, 2 * R, K
    w, _ = build(E, n_seg, (2,), 64, torch.bfloat16)
    weights = E * N * Kd
    slot = E * n_seg * 3 * 4  # int32 [n_slices, 3]
    expected = weights * 2 // 8 + weights // 64 * 2 + slot  # codes + bf16 scales + slot table
    assert w.nbytes_packed() == expected
    assert w.nbytes_packed() == sum(t.numel() * t.element_size() for t in inner_tensors(w).values())
    bits_per_weight = 8 * w.nbytes_packed() / weights
    assert 2.25 < bits_per_weight < 2.25 + 8 * slot / weights + 1e-12


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_take_exactly_bits(bits):
    w, _ = build(3, 1, (bits,), 32, torch.bfloat16, symmetric=False)
    q = getattr(w, f"q{bits}")
    assert q.dtype == torch.uint8 and q.numel() * 8 == 3 * R * K * bits
    assert getattr(w, f"z{bits}").numel() == 3 * R * K // 32


def test_mixed_storage_by_width():
    w, _ = build(5, 2, PATTERNS["mixed"], 64, torch.bfloat16)  # 10 slices: 2,3,16,4,8,2,3,16,4,8
    assert w.present_bits == (2, 3, 4, 8, 16)
    for b in (2, 3, 4, 8):
        assert getattr(w, f"q{b}").shape == (2, R, K * b // 8)
    assert w.d16.shape == (2, R, K)
    codes = sum(2 * R * K * b / 8 for b in (2, 3, 4, 8))
    scales = 8 * R * (K // 64) * 2
    assert w.nbytes_packed() == codes + scales + 2 * R * K * 2 + 10 * 12
    assert "slices by bits={2: 2, 3: 2, 4: 2, 8: 2, 16: 2}" in repr(w)
