"""Bit packing (moe_ao.tensors.packing): property tests with hypothesis."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_ao.tensors.packing import pack_codes, packed_size, unpack_codes

# Derandomized: the same examples on every run, so CI failures reproduce locally.
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)


@st.composite
def codes_case(draw, bits=st.integers(1, 8)):
    b = draw(bits)
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=3))
    K = draw(st.integers(1, 70))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**b, (*lead, K), generator=g, dtype=torch.int64).to(torch.uint8)
    return b, codes


@SETTINGS
@given(codes_case())
def test_pack_unpack_identity_any_width(case):
    bits, codes = case
    packed = pack_codes(codes, bits)
    K = codes.shape[-1]
    assert packed.dtype == torch.uint8
    assert packed.shape == (*codes.shape[:-1], math.ceil(K / 8) * bits)
    assert packed.shape[-1] == packed_size(K, bits)
    out = unpack_codes(packed, bits, K)
    assert out.dtype == torch.uint8 and torch.equal(out, codes)


@SETTINGS
@given(codes_case(bits=st.sampled_from([2, 3, 4, 8])))
def test_pack_unpack_identity_supported_widths(case):
    bits, codes = case
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, codes.shape[-1]), codes)


@SETTINGS
@given(st.integers(1, 8), st.integers(1, 1000))
def test_packed_size_is_bits_per_code(bits, K):
    """ceil(K/8) runs of `bits` bytes: 3-bit codes take 3 bits, not 4."""
    assert packed_size(K, bits) == math.ceil(K / 8) * bits
    if K % 8 == 0:
        assert packed_size(K, bits) * 8 == K * bits


@SETTINGS
@given(st.integers(1, 7), st.integers(0, 7), st.integers(1, 40))
def test_single_code_sits_at_its_bit_offset(bits, j, runs):
    """Code j of a run occupies bits [bits*j, bits*(j+1)) of the run's little-endian word."""
    K = 8 * runs
    code = 2**bits - 1
    codes = torch.zeros(K, dtype=torch.uint8)
    pos = 8 * (runs - 1) + j  # in the last run
    codes[pos] = code
    packed = pack_codes(codes, bits)
    word = sum(int(v) << (8 * i) for i, v in enumerate(packed[-bits:].tolist()))
    assert word == code << (bits * j)
    assert int(packed[: -bits].sum()) == 0


def test_known_layouts():
    # 2 bits: little-endian within a byte
    assert pack_codes(torch.tensor([1, 2, 3, 0, 0, 0, 0, 3], dtype=torch.uint8), 2).tolist() == [
        1 | 2 << 2 | 3 << 4, 3 << 6]
    # 4 bits: low nibble first
    assert pack_codes(torch.tensor([0xA, 0x5, 1, 2, 3, 4, 5, 6], dtype=torch.uint8), 4).tolist() == [
        0x5A, 0x21, 0x43, 0x65]
    # 3 bits: 8 codes in 3 bytes
    codes = torch.arange(8, dtype=torch.uint8)
    word = sum(c << (3 * j) for j, c in enumerate(range(8)))
    assert pack_codes(codes, 3).tolist() == [word & 0xFF, (word >> 8) & 0xFF, word >> 16]
    # 8 bits: identity
    assert pack_codes(codes, 8).tolist() == list(range(8))


def test_padding_is_zero_and_trimmed():
    codes = torch.full((2, 5), 3, dtype=torch.uint8)
    packed = pack_codes(codes, 2)
    assert packed.shape == (2, 2)
    assert packed[:, 1].tolist() == [3, 3]  # codes 4 at bits 0-1, padding zeros above
    assert unpack_codes(packed, 2, 5).shape == (2, 5)


def test_unpack_checks_size():
    with pytest.raises(AssertionError, match="packed.shape"):
        unpack_codes(torch.zeros(4, dtype=torch.uint8), 3, 8)
