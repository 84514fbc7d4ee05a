"""CPU kernels that read PackedWeight buffers directly, for decode, batches and prompts.

Legend: M rows of x, K in features, N out features, S routed (token, expert) pairs,
E experts, R rows per slice, n_b slices stored at b bits.

Decode is memory bound: one token reads every selected weight once. Dequantizing to
16 bits first (what Inductor does for ``x @ dequant(W)``; it does not fuse the unpacking
into the matmul) writes and re-reads the weight at 16 bits, so it is slower than plain
bf16. The C++ kernel in ``csrc/packed_gemv.cpp`` instead streams the packed codes once,

    y_r = sum_g s_rg * (sum_{j in g} q_rj x_j  -  z_rg * sum_{j in g} x_j),

and serves any number of rows: it groups the rows of x by expert, so each routed slice
is read once per call, and per slice takes one of two paths (``csrc/packed_driver.h``):

- GEMV passes: each packed row is unpacked once per pass of 4 x rows, in fp32, or on AVX2
  in integers: int16 x (16-bit x at 2/3/4/8 bits, groups of 64/128; ``int16_path``) or
  int8 x (W+A8 plans, 2/3/4 bits; ``int8_path``) times the codes, exact int32 sums per
  group;
- a tiled GEMM (``csrc/packed_gemm.h``): a tile of 64 rows x 512 codes decoded once to
  fp32 and multiplied with every x row of the slice, for many rows outside the integer
  paths (switch-over measured: ``default_gemm_min_rows``).

Two ops expose it (schemas and fakes from ``moe_ao.kernels._registry``, CPU
implementations in ``csrc/packed_ops.cpp``), each with a plain-PyTorch reference beside
it (dequantize + matmul; for banks, one expert at a time):

- ``moe_ao::packed_linear``: x [M, K] times a 2D PackedWeight [N, K] -> [M, N];
- ``moe_ao::packed_experts_linear``: x [S, K], row s times expert ids[s] of a 3D
  PackedWeight [E, N, K] -> [S, N]; slices may mix 2/3/4/8/16 bits.

Both take ``act_bits`` (the weight's): 8 rounds x per token to int8 first, exactly as
``moe_ao.kernels.activations.quantize_activations``, which the references call.

Ops cannot take the tensor subclass, so the wrappers pass its inner buffers. The
wrappers use the kernel for CPU inference (see ``kernel_ok``); when a gradient is needed,
and whenever ``MOE_AO_DISABLE_CPP=1``, they return the reference.

The kernel itself is plain C with no torch headers; ``packed_ops.cpp`` checks the
buffers and registers the ops with the dispatcher in C++: a call on a 192-wide linear
takes ~20 us in all, ~5 us of it dispatch, where a Python implementation took ~76 us
(more than a small expert's GEMV). The first call of an op in a process loads the
library (a Python fallback registered for the ops does that), and the first use on a
machine compiles it, in about 20 s, with ``-O3 -march=native -fopenmp``, into
``~/.cache/moe_ao/cpp``; later processes reuse the build.
Its OpenMP runtime is torch's own (same soname, already loaded), and it runs on
``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_ao.kernels._registry import buffers_of, define_packed_ops, device_and_dtype
from moe_ao.kernels.activations import quantize_activations

if TYPE_CHECKING:  # typing only: kernels sit below tensors and never import them at runtime
    from moe_ao.tensors.packed import PackedWeight

__all__ = [
    "DISABLE_ENV",
    "default_gemm_min_rows",
    "gemm_min_rows",
    "int8_path",
    "int16_path",
    "kernel_ok",
    "packed_experts_linear",
    "packed_experts_linear_reference",
    "packed_linear",
    "packed_linear_reference",
    "vector_lanes",
]

DISABLE_ENV = "MOE_AO_DISABLE_CPP"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the kernel takes for x and the scales
_CSRC = Path(__file__).parent / "csrc"
_SOURCES = [_CSRC / "packed_gemv.cpp", _CSRC / "packed_ops.cpp"]  # the kernel (plain C), its torch ops
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17"]


# ------------------------------------------------------------------------------ build
def _build_dir() -> Path:
    """~/.cache/moe_ao/cpp/<torch version, machine, hash of CPU flags and sources>: -march=native is per CPU."""
    flags = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), flags)
    # The sources are hashed too: torch's loader rebuilds on a changed .cpp but not on a changed header.
    sources = b"".join(p.read_bytes() for p in sorted(_CSRC.glob("*.[ch]*")))
    tag = hashlib.blake2b(f"{platform.machine()} {flags} {_CFLAGS}".encode() + sources, digest_size=6).hexdigest()
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "moe_ao" / "cpp" / f"torch{torch.__version__}-{platform.machine()}-{tag}"


@functools.cache
def _load() -> ctypes.CDLL:
    """Compiles (first use per machine) and loads the C++ library; cached per process.

    Loading registers its CPU kernels for ``moe_ao::packed_linear`` and
    ``moe_ao::packed_experts_linear`` with the dispatcher. Returns the library, whose
    plain C functions (``moe_ao_integer_path``, ...) are called through ctypes.

    Raises:
        RuntimeError: the compiler failed or is missing.
    """
    from torch.utils.cpp_extension import load

    build_dir = _build_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        path = load(name="moe_ao_packed_gemv", sources=[str(p) for p in _SOURCES], extra_cflags=_CFLAGS,
                    extra_ldflags=["-fopenmp"], build_directory=str(build_dir), is_python_module=False)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        raise RuntimeError(
            f"moe_ao: compiling the CPU kernel {', '.join(map(str, _SOURCES))} failed. It needs a C++17 compiler "
            f"(g++) and ninja; set {DISABLE_ENV}=1 to use the plain PyTorch path instead. Compiler output:\n{e}"
        ) from e
    torch.ops.load_library(path)
    lib = ctypes.CDLL(path)
    lib.moe_ao_integer_path.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64]
    lib.moe_ao_integer_path.restype = ctypes.c_int
    lib.moe_ao_set_gemm_min_rows.argtypes = [ctypes.c_int]
    lib.moe_ao_set_gemm_min_rows.restype = ctypes.c_int
    lib.moe_ao_lanes.restype = ctypes.c_int
    lib.moe_ao_gemm_min_rows.restype = ctypes.c_int
    return lib


def int16_path(bits: int, group_size: int) -> bool:
    """Whether the built kernel takes its integer path for bf16/fp16 x at ``bits`` and
    ``group_size``: x is then rounded to 16-bit fixed point per group (at most 2^-16 of the
    group's max |x|, below a 16-bit x's own precision; see ``csrc/packed_gemv_int16.h``).
    True on AVX2 CPUs without AVX-512 for 2, 3, 4 and 8 bits at groups of 32 (for rows of a
    multiple of 64 weights), 64 and 128; fp32 x always gets exact fp32 arithmetic.

    Args:
        bits: code width of a slice (16: a float slice).
        group_size: its quantization group size.

    Returns:
        True where the integer path serves such slices.

    Raises:
        RuntimeError: the kernel failed to compile.
    """
    return bits != 16 and bool(_load().moe_ao_integer_path(16, bits, group_size))


def int8_path(bits: int, group_size: int) -> bool:
    """Whether the built kernel multiplies ``bits``-bit codes with int8 activations in
    vpmaddubsw (W+A8 weights, act_bits = 8): on AVX2 builds for 2, 3 and 4 bits at group
    sizes of 32 (for rows of a multiple of 64 weights) and multiples of 64; elsewhere W+A8
    rounds x to int8 the same way and multiplies in fp32 (or, at 8 bits, on the int16 path).

    Raises:
        RuntimeError: the kernel failed to compile.
    """
    return bits != 16 and bool(_load().moe_ao_integer_path(8, bits, group_size))


# ------------------------------------------------------------------------- the ops
def _first_call(x: Tensor, ids: Tensor | None, *args) -> Tensor:
    """The ops' fallback until the C++ library is loaded: loads it (its CPU kernels then take
    precedence over this one) and dispatches the call again."""
    if x.device.type != "cpu":
        raise NotImplementedError(f"moe_ao::packed_linear and packed_experts_linear serve CPU tensors, got x on "
                                  f"{x.device}; on CUDA the wrappers call the moe_ao::triton_ ops")
    _load()
    if not torch._C._dispatch_has_kernel_for_dispatch_key("moe_ao::packed_linear", "CPU"):
        raise RuntimeError(f"moe_ao: the library built in {_build_dir()} registered no CPU kernels; delete that "
                           f"folder to rebuild it")
    if ids is None:
        return torch.ops.moe_ao.packed_linear.default(x, *args)
    return torch.ops.moe_ao.packed_experts_linear.default(x, ids, *args)


define_packed_ops("", _first_call, ("CompositeExplicitAutograd",))


# ----------------------------------------------------------------- public wrappers
def _disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "") not in ("", "0")


def kernel_ok(x: Tensor, w: PackedWeight) -> bool:
    """Whether the CPU kernel serves ``x`` times ``w`` (else use the reference), for any rows of x.

    Static properties only (device, dtype, shapes, grad mode), so a compiled model
    specialises on them without graph breaks. The kernel is inference only: with autograd
    recording a grad of x, the differentiable reference runs instead.
    """
    # Cheapest checks first: this runs on every decode call of every packed linear.
    if not (x.device.type == "cpu" and x.numel() > 0 and x.dtype in _DTYPES
            and x.shape[-1] == w.logical_shape[-1] and not (x.requires_grad and torch.is_grad_enabled())):
        return False
    w_device, w_dtype = device_and_dtype(w)
    return w_device == "cpu" and w_dtype in _DTYPES and not _disabled()


@contextlib.contextmanager
def gemm_min_rows(rows: int) -> Iterator[None]:
    """Within the ``with``, every slice with at least ``rows`` x rows routed to it takes the
    tiled GEMM, the others the GEMV passes, instead of the measured defaults (see
    ``csrc/packed_gemv.cpp``); for tests and benchmarks that compare both paths.

    Args:
        rows: the switch-over (1: the GEMM for every slice; a huge number: the GEMV passes
            wherever they can serve a slice).
    """
    old = _load().moe_ao_set_gemm_min_rows(rows)
    try:
        yield
    finally:
        _load().moe_ao_set_gemm_min_rows(old)


def default_gemm_min_rows() -> int:
    """Rows per slice from which slices outside the integer path take the tiled GEMM by default."""
    return int(_load().moe_ao_gemm_min_rows())


def vector_lanes() -> int:
    """fp32 lanes of the built kernel's vectors: 8 (AVX2, NEON) or 16 (AVX-512)."""
    return int(_load().moe_ao_lanes())


def packed_linear_reference(x: Tensor, w: PackedWeight) -> Tensor:
    """Plain PyTorch: x [..., K] @ dequantize(w [N, K]).T -> [..., N] (activations quantized
    first when ``w.act_bits`` asks for it)."""
    return F.linear(quantize_activations(x, w.act_bits), w.dequantize(x.dtype))


def packed_linear(x: Tensor, w: PackedWeight) -> Tensor:
    """x [..., K] times a 2D PackedWeight [N, K] -> [..., N], in x's dtype.

    Uses the CPU kernel (any number of rows), or the reference where ``kernel_ok`` says no.
    """
    assert len(w.logical_shape) == 2, f"{w.logical_shape=}"
    N, K = w.logical_shape
    x2 = x.reshape(-1, x.shape[-1])  # [M, K]
    if not kernel_ok(x2, w):
        return packed_linear_reference(x, w)
    out = torch.ops.moe_ao.packed_linear.default(x2, w.slot, N, w.n_seg, w.group_size, buffers_of(w), w.act_bits or 0)
    return out.reshape(*x.shape[:-1], N)


def packed_experts_linear_reference(x: Tensor, w: PackedWeight, ids: Tensor) -> Tensor:
    """Plain PyTorch: row s of x [S, K] times the dequantized expert ids[s] of w [E, N, K] -> [S, N].

    Never more than one expert's dense weight at a time once S > E: decode (S <= E) gathers
    the S selected experts and runs a bmm; in eager, rows are grouped by expert and each
    expert is dequantized and multiplied with its rows; compiled code cannot group by data,
    so it multiplies every expert with every row and keeps the routed ones (E times the
    FLOPs: a fallback for gradients and devices without a kernel, not a fast path).
    """
    E, N, _ = w.logical_shape
    x = quantize_activations(x, w.act_bits)
    if x.shape[0] <= E:
        return torch.bmm(w.dequantize_experts(ids).to(x.dtype), x.unsqueeze(-1)).squeeze(-1)
    out = x.new_zeros(x.shape[0], N)
    if torch.compiler.is_compiling():
        for e in range(E):
            y = F.linear(x, w.dequantize_experts(torch.tensor(e, device=ids.device)).to(x.dtype))  # [S, N]
            out = torch.where((ids == e).unsqueeze(-1), y, out)
        return out
    order = torch.argsort(ids, stable=True)
    start = 0
    for e, count in enumerate(torch.bincount(ids, minlength=E).tolist()):
        if count:
            rows = order[start:start + count]
            W_e = w.dequantize_experts(torch.tensor(e, device=ids.device)).to(x.dtype)  # [N, K]
            out = out.index_copy(0, rows, F.linear(x[rows], W_e))
        start += count
    return out


def packed_experts_linear(x: Tensor, w: PackedWeight, ids: Tensor) -> Tensor:
    """Row s of x [S, K] times expert ids[s] of a 3D PackedWeight [E, N, K] -> [S, N].

    Uses the CPU kernel for any S (it groups rows by expert and reads each routed slice
    once), or the reference where ``kernel_ok`` says no.
    """
    assert len(w.logical_shape) == 3 and x.dim() == 2 and ids.shape == x.shape[:1], (
        f"{w.logical_shape=} {x.shape=} {ids.shape=}"
    )
    if not kernel_ok(x, w):
        return packed_experts_linear_reference(x, w, ids)
    return torch.ops.moe_ao.packed_experts_linear.default(x, ids, w.slot, w.logical_shape[1], w.n_seg,
                                                          w.group_size, buffers_of(w), w.act_bits or 0)
