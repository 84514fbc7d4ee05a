"""Shared test helpers: ``tests/`` on sys.path (for ``import archs``) and the float64 RTN reference.

The reference is written here, independently of ``moe_ao.primitives``, from the
scheme its docstring defines: W ≈ (q - z) * s per (row, group of columns), scales rounded
to their storage dtype before codes are chosen; symmetric: z = 2**(bits-1),
s = 2 max|W| / (2**bits - 1); asymmetric: the range [min(W, 0), max(W, 0)] over
2**bits codes, z = round(-min / s). A group with zero range gets s = 1.

Ties: in the symmetric scheme a group's -max|W| sits on the rounding tie between two
codes by construction (W/s = -(2**bits - 1) / 2). Which way a tie goes is decided by
the last bit of s and of the division, so it depends on the precision the division is
done in. Where the exact value to round is within ``TIE_TOL`` of a half-integer, the
reference follows ``guide`` (the codes under test) when given, and counts the tie;
both choices are round-to-nearest up to that tolerance.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # The Triton kernels run in Triton's interpreter on CPU tensors. Triton reads the flag when
    # it is first imported (it jits triton.language's own helpers then), so set it before
    # anything imports Triton; a GPU machine runs the same tests on the real kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

TIE_TOL = 1e-5  # float32 division is off by at most ~1e-7 relative on values <= 2**8


@dataclass
class RefQuant:
    """Float64 reference RTN of W [..., R, K]; scale/zero [..., R, G]; codes int64 [..., R, K]."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    deq: torch.Tensor
    ties: int


def reference_rtn(
    W: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    scale_dtype: torch.dtype,
    guide: torch.Tensor | None = None,
) -> RefQuant:
    """Round-to-nearest group quantization computed in float64 (see module docstring)."""
    W64 = W.detach().to(torch.float64)
    *lead, R, K = W64.shape
    Wg = W64.reshape(*lead, R, K // group_size, group_size)  # [..., R, G, g]
    maxq = 2**bits - 1
    if symmetric:
        amax = Wg.abs().amax(-1)
        scale = torch.where(amax > 0, amax * 2 / maxq, torch.ones_like(amax))
        scale = scale.to(scale_dtype).to(torch.float64)
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        lo = Wg.amin(-1).clamp(max=0)
        hi = Wg.amax(-1).clamp(min=0)
        span = hi - lo
        scale = torch.where(span > 0, span / maxq, torch.ones_like(span))
        scale = scale.to(scale_dtype).to(torch.float64)
        zero = torch.round(-lo / scale).clamp(0, maxq)
    v = Wg / scale.unsqueeze(-1)  # the value to round, [..., R, G, g]
    codes = (torch.round(v) + zero.unsqueeze(-1)).clamp(0, maxq)
    ties = 0
    if guide is not None:
        g = guide.to(torch.float64).reshape(codes.shape)
        near_tie = ((v - v.floor()) - 0.5).abs() < TIE_TOL
        cands = [
            (torch.floor(v) + zero.unsqueeze(-1)).clamp(0, maxq),
            (torch.ceil(v) + zero.unsqueeze(-1)).clamp(0, maxq),
        ]
        follow = near_tie & ((g == cands[0]) | (g == cands[1])) & (g != codes)
        ties = int(follow.sum())
        codes = torch.where(follow, g, codes)
    deq = (codes - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
    return RefQuant(
        codes=codes.reshape(W64.shape).to(torch.int64),
        scale=scale,
        zero=zero,
        deq=deq.reshape(W64.shape),
        ties=ties,
    )


@pytest.fixture
def ref_rtn():
    """The float64 reference quantizer (a function; see :func:`reference_rtn`)."""
    return reference_rtn


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Every tensor here is tiny: on a shared machine, OpenMP spin-waits of a second thread
    cost far more than they save (5-8x slower model forwards with 2 threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed_and_reset_dynamo():
    """Each test starts from the same global seed and a clean Dynamo cache."""
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()
