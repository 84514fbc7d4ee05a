"""Decode-time CPU kernels that read PackedWeight buffers directly.

Legend: M rows of x, K in features, N out features, S routed (token, expert) pairs,
E experts, R rows per slice, n_b slices stored at b bits.

Decode is memory bound: one token reads every selected weight once. Dequantizing to
16 bits first (what Inductor does for ``x @ dequant(W)``; it does not fuse the unpacking
into the matmul) writes and re-reads the weight at 16 bits, so it is slower than plain
bf16. The C++ kernel in ``csrc/packed_gemv.cpp`` instead streams the packed codes once,

    y_r = sum_g s_rg * (sum_{j in g} q_rj x_j  -  z_rg * sum_{j in g} x_j),

in fp32 (on AVX2 CPUs, for 16-bit x at 2/3/4/8 bits, in int16 x int16 -> int32 per group:
see ``int16_path``), parallel over output rows. Two ops expose it (schemas and fakes from
``moe_ao.kernels._registry``, CPU implementations in ``csrc/packed_ops.cpp``), each with
a plain-PyTorch reference beside it (dequantize + matmul):

- ``moe_ao::packed_linear``: x [M, K] times a 2D PackedWeight [N, K] -> [M, N];
- ``moe_ao::packed_experts_linear``: x [S, K], row s times expert ids[s] of a 3D
  PackedWeight [E, N, K] -> [S, N]; slices may mix 2/3/4/8/16 bits.

Ops cannot take the tensor subclass, so the wrappers pass its inner buffers. The
wrappers use the kernel only for CPU inference with few rows of x (see ``kernel_ok``);
otherwise, and whenever ``MOE_AO_DISABLE_CPP=1``, they return the reference.

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

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_ao.kernels._registry import buffers_of, define_packed_ops, device_and_dtype

if TYPE_CHECKING:  # typing only: kernels sit below tensors and never import them at runtime
    from moe_ao.tensors.packed import PackedWeight

__all__ = [
    "DISABLE_ENV",
    "MAX_KERNEL_ROWS",
    "int16_path",
    "kernel_ok",
    "packed_experts_linear",
    "packed_experts_linear_reference",
    "packed_linear",
    "packed_linear_reference",
]

DISABLE_ENV = "MOE_AO_DISABLE_CPP"
# Rows of x (per expert, on average) up to which the wrappers use the kernel. Its cost grows
# linearly in M (4096x4096 4-bit, one thread: 0.9 ms at M = 1, 8.3 ms at 16, 33 ms at 64),
# while dequantize + matmul costs about the same for any small M (260 ms eager; 24-56 ms
# compiled, on 2 threads), so they cross near M = 64 against compiled code. Prefill
# (hundreds of rows) belongs to dequantize + GEMM; 16 covers decode with a margin.
MAX_KERNEL_ROWS = 16
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the kernel takes for x and the scales
_CODES_PER_WORD = {2: 16, 3: 8, 4: 8, 8: 4}  # codes per 32-bit lane word in the kernel
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
    plain C functions (``moe_ao_int16_path``) are called through ctypes.

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
    lib.moe_ao_int16_path.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.moe_ao_int16_path.restype = ctypes.c_int
    return lib


def int16_path(bits: int, group_size: int) -> bool:
    """Whether the built kernel takes its integer path for bf16/fp16 x at ``bits`` and
    ``group_size``: x is then rounded to 16-bit fixed point per group (at most 2^-16 of the
    group's max |x|, below a 16-bit x's own precision; see ``csrc/packed_gemv_int16.h``).
    True on AVX2 CPUs without AVX-512 for 2, 3, 4 and 8 bits at groups of 64 and 128; fp32 x
    always gets exact fp32 arithmetic.

    Args:
        bits: code width of a slice (16: a float slice).
        group_size: its quantization group size.

    Returns:
        True where the integer path serves such slices.

    Raises:
        RuntimeError: the kernel failed to compile.
    """
    return bits != 16 and bool(_load().moe_ao_int16_path(bits, group_size))


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


def kernel_ok(x: Tensor, w: PackedWeight, rows: int) -> bool:
    """Whether the CPU kernel serves ``x`` times ``w`` (else use the reference).

    Static properties only (device, dtype, shapes, grad mode), so a compiled model
    specialises on them without graph breaks. The kernel is inference only: with autograd
    recording a grad of x, the differentiable reference runs instead.
    """
    # Cheapest checks first: this runs on every decode call of every packed linear.
    if not (x.device.type == "cpu" and 1 <= rows <= MAX_KERNEL_ROWS and x.dtype in _DTYPES
            and x.shape[-1] == w.logical_shape[-1] and not (x.requires_grad and torch.is_grad_enabled())):
        return False
    w_device, w_dtype = device_and_dtype(w)
    return (
        w_device == "cpu"
        and w_dtype in _DTYPES
        and (w.group_size % 16 == 0  # a multiple of every width's codes per word
             or all(w.group_size % _CODES_PER_WORD[b] == 0 for b in set(w.slice_bits) if b != 16))
        and not _disabled()
    )


def packed_linear_reference(x: Tensor, w: PackedWeight) -> Tensor:
    """Plain PyTorch: x [..., K] @ dequantize(w [N, K]).T -> [..., N]."""
    return F.linear(x, w.dequantize(x.dtype))


def packed_linear(x: Tensor, w: PackedWeight) -> Tensor:
    """x [..., K] times a 2D PackedWeight [N, K] -> [..., N], in x's dtype.

    Uses the CPU kernel for few rows (decode), the reference otherwise.
    """
    assert len(w.logical_shape) == 2, f"{w.logical_shape=}"
    N, K = w.logical_shape
    x2 = x.reshape(-1, x.shape[-1])  # [M, K]
    if not kernel_ok(x2, w, x2.shape[0]):
        return packed_linear_reference(x, w)
    out = torch.ops.moe_ao.packed_linear.default(x2, w.slot, N, w.n_seg, w.group_size, buffers_of(w))
    return out.reshape(*x.shape[:-1], N)


def packed_experts_linear_reference(x: Tensor, w: PackedWeight, ids: Tensor) -> Tensor:
    """Plain PyTorch: dequantize experts ids of w [E, N, K], then bmm with x [S, K] -> [S, N]."""
    return torch.bmm(w.dequantize_experts(ids).to(x.dtype), x.unsqueeze(-1)).squeeze(-1)


def packed_experts_linear(x: Tensor, w: PackedWeight, ids: Tensor) -> Tensor:
    """Row s of x [S, K] times expert ids[s] of a 3D PackedWeight [E, N, K] -> [S, N].

    Uses the CPU kernel while rows per expert are few on average (S <= 16 E: decode),
    the reference otherwise.
    """
    assert len(w.logical_shape) == 3 and x.dim() == 2 and ids.shape == x.shape[:1], (
        f"{w.logical_shape=} {x.shape=} {ids.shape=}"
    )
    E, N, K = w.logical_shape
    if not kernel_ok(x, w, -(-x.shape[0] // E)):
        return packed_experts_linear_reference(x, w, ids)
    return torch.ops.moe_ao.packed_experts_linear.default(x, ids, w.slot, N, w.n_seg, w.group_size, buffers_of(w))
