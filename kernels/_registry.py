"""Registers moe_ao's kernel ops with the dispatcher, at the lowest per-call overhead.

``torch.library.custom_op`` wraps an op in autograd and argument handling that cost, per
call, ~20 us for one tensor argument and ~55 us for the packed ops' list of 13 optional
buffers (measured on the CI-class CPU): more than the decode GEMV of a small expert
takes. The kernels serve inference only (their callers route anything that needs a
gradient to the differentiable reference), so they are defined with
``torch.library.Library`` directly, ~2 us a call, and stay visible to torch.compile and
export through a registered fake implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

_LIB = torch.library.Library("moe_ao", "FRAGMENT")  # the registrations live as long as this object


def define(schema: str, impl: Callable, fake: Callable, devices: Sequence[str] = ("CPU",)) -> None:
    """Defines ``moe_ao::<schema>`` with ``impl`` for each dispatch key in ``devices`` and ``fake`` for tracing."""
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    for device in devices:
        _LIB.impl(name, impl, device)
    torch.library.register_fake(f"moe_ao::{name}", fake, lib=_LIB)
