"""Fixtures for the planner tests: tiny seeded models and hand-made Profiles."""

from __future__ import annotations

import functools
import pathlib
import sys

import pytest
import torch

TESTS = str(pathlib.Path(__file__).resolve().parents[1])
if TESTS not in sys.path:  # archs.py lives in tests/
    sys.path.insert(0, TESTS)

import archs  # noqa: E402

from moe_ao.discovery import units  # noqa: E402
from moe_ao.profile_stats import Profile  # noqa: E402


@functools.cache
def _model(arch: str) -> torch.nn.Module:
    return archs.build(arch)


@pytest.fixture
def model():
    """model(arch) -> the seeded tiny model of ``arch`` (built once per session; do not mutate)."""
    return _model


def make_profile(model: torch.nn.Module, counts: dict[int, list[int]] | None = None, n: int = 64,
                 cos: dict[int, float] | None = None, seed: int = 0) -> Profile:
    """A Profile for ``model``'s MoE layers.

    Routing counts default to a random permutation of 10, 20, ... per layer; block inputs
    have a constant first feature (like real hidden states, a non-zero mean) and the
    cosines are ``cos[layer] + 0.05 * (a linear function of the input)``.
    """
    g = torch.Generator().manual_seed(seed)
    us = units(model)
    layers = sorted({u.layer for u in us if u.kind == "expert"})
    n_experts = {l: len({u.expert for u in us if u.kind == "expert" and u.layer == l}) for l in layers}
    d = model.config.hidden_size
    prof = Profile(tokens=1000)
    for i, layer in enumerate(layers):
        E = n_experts[layer]
        c = counts[layer] if counts else (torch.randperm(E, generator=g) + 1) * 10
        prof.routing_counts[layer] = torch.as_tensor(c, dtype=torch.int64)
        x = torch.randn(n, d, generator=g)
        x[:, 0] = 1.0
        w = torch.randn(d, generator=g)
        w[0] = 0
        base = cos[layer] if cos else 0.5 + 0.1 * i
        prof.block_inputs[layer] = x.half()
        prof.block_cos[layer] = (base + 0.05 * (x @ w) / w.norm()).clamp(-1, 1)
    return prof


@pytest.fixture
def profile():
    """profile(model, counts=None, n=64, cos=None, seed=0) -> a hand-made Profile."""
    return make_profile
