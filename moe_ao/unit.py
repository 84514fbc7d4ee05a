"""Unit: the record of one logical linear map, and its kinds. Imports only moe_ao.choices.

It sits at the bottom of the stack so that both name-based discovery
(``moe_ao.discovery``) and the dataflow pass (``moe_ao.passes``) can produce units
without importing each other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from moe_ao.choices import Choice

__all__ = ["KINDS", "LAYOUTS", "Kind", "Unit", "layer_index"]


class Kind(Choice):
    """What a unit is in the model."""

    ATTENTION = "attention"
    ROUTER = "router"
    EXPERT = "expert"
    SHARED_EXPERT = "shared_expert"
    DENSE_MLP = "dense_mlp"
    EMBEDDING = "embedding"
    LM_HEAD = "lm_head"


KINDS = tuple(k.value for k in Kind)

# How a fused experts parameter stores one expert's [out, in] weight. E experts, N out rows
# (gate rows then up rows where there are two segments), K in features.
LAYOUTS = {
    "rows": "[E, N, K]: expert e's rows (transformers' default)",
    "cols": "[E, K, N]: transposed (is_transposed: gpt-oss, Aria, Llama 4)",
    "cols_interleaved": "[E, K, N], gate and up columns interleaved (gpt-oss: gate = [..., ::2], up = [..., 1::2])",
    "flat_rows": "[E*N, K]: experts stacked along rows of a 2D parameter (DBRX w1, v1)",
    "flat_cols": "[E*K, N]: experts stacked, each transposed (DBRX w2)",
}
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class Unit:
    """One logical linear map ``y = x Wᵀ``, W of shape (out_features, in_features).

    Attributes:
        name: logical name, e.g. ``model.layers.3.mlp.experts.5.down_proj``.
        kind: a :class:`Kind` (strings are converted; an unknown kind is a ValueError).
        layer: decoder layer index, or None outside decoder layers.
        expert: routed-expert index, or None.
        proj: projection name (``gate_proj``, ``q_proj``, ``weight`` for routers, ...).
        shape: (out_features, in_features).
        param: FQN of the parameter that stores the weight.
        fused: True when ``param`` is a 3D fused experts tensor.
        rows: (start, stop) rows of this unit inside the stored 2D weight
            (for fused tensors: inside ``param[expert]``).
        segment: index of the row segment inside a fused weight (gate=0, up=1).
        layout: how the float parameter stores the unit's [out, in] weight (see LAYOUTS);
            a packed (quantized) parameter is always ``"rows"``: [E, out, in], [gate; up].
    """

    name: str
    kind: Kind
    layer: int | None
    expert: int | None
    proj: str
    shape: tuple[int, int]
    param: str
    fused: bool = False
    rows: tuple[int, int] | None = None
    segment: int = 0
    layout: str = "rows"

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", Kind.parse(self.kind, f"{self.name}: kind"))
        if self.layout not in LAYOUTS:
            raise ValueError(f"{self.name}: layout {self.layout!r}; allowed: {sorted(LAYOUTS)}")

    @property
    def numel(self) -> int:
        """Number of weights of this unit."""
        return self.shape[0] * self.shape[1]


def layer_index(name: str) -> int | None:
    """The decoder-layer index in a module name (``model.layers.3.mlp`` -> 3)."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None
