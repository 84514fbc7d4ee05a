"""What every planning rule sees: the planned units, their base bits and the data.

A *base* says which unit kinds a plan covers and at which bits they start; rules then
only ever raise units above it. Two named bases cover the paper:

- ``experts-low``: routed experts 2-bit, attention / shared experts / dense MLP 4-bit
  (the starting point of the expert heuristics: frequency, blocks, linear type,
  outlier scorer, block predictor);
- ``uniform-low``: every planned kind 2-bit (the starting point of the paper's
  attention-vs-FFN experiment and of DeepSeek's ``uniform 2 -> +Attn -> +Attn+Shared``
  ladder, so those rules have something to raise).

Routers, embeddings and lm_head are not planned (they stay float) unless a base given
as a mapping names them.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from moe_ao.discovery import unit_weight
from moe_ao.plans import ALLOWED_BITS
from moe_ao.profile_stats import Profile
from moe_ao.unit import KINDS, Unit

PLANNED_KINDS = ("attention", "expert", "shared_expert", "dense_mlp")
FFN_KINDS = ("expert", "shared_expert", "dense_mlp")
BASES: dict[str, dict[str, int]] = {
    "experts-low": {"attention": 4, "expert": 2, "shared_expert": 4, "dense_mlp": 4},
    "uniform-low": {"attention": 2, "expert": 2, "shared_expert": 2, "dense_mlp": 2},
}
# group_size="auto": the largest of these dividing a unit's in_features. 128 first
# because it is the paper's (and GPTQ's) Mixtral setting; 32 is the smallest the packed
# kernels are tuned for.
AUTO_GROUP_SIZES = (128, 64, 32)
QUANT_BITS = tuple(b for b in ALLOWED_BITS if b < 16)


def check_bits(bits: int, what: str = "bits") -> int:
    """Returns ``bits`` if it is a quantized width, else raises ValueError naming it."""
    if isinstance(bits, bool) or bits not in QUANT_BITS:
        raise ValueError(f"{what}={bits!r} is not supported; allowed: {QUANT_BITS}")
    return int(bits)


def resolve_base(base: str | Mapping[str, int]) -> dict[str, int]:
    """Kind -> starting bits, from a base name or an explicit mapping.

    Raises:
        ValueError: unknown base name, unknown kind, or unsupported bits.
    """
    if isinstance(base, str):
        if base not in BASES:
            raise ValueError(f"base={base!r} is not known; allowed: {sorted(BASES)} or a mapping kind -> bits")
        return dict(BASES[base])
    out: dict[str, int] = {}
    for kind, bits in base.items():
        if kind not in KINDS:
            raise ValueError(f"base names kind {kind!r}; allowed kinds: {KINDS}")
        if isinstance(bits, bool) or bits not in ALLOWED_BITS:
            raise ValueError(f"base[{kind!r}]={bits!r} is not supported; allowed: {ALLOWED_BITS}")
        out[kind] = int(bits)
    if not out:
        raise ValueError("base is empty: name at least one kind to plan")
    return out


def group_sizes(units: list[Unit], group_size: int | str) -> dict[str, int]:
    """Group size per unit.

    Args:
        units: the planned units.
        group_size: a positive int that must divide every unit's in_features, or
            ``"auto"``: per unit, the largest of AUTO_GROUP_SIZES dividing in_features.

    Raises:
        ValueError: a unit whose in_features the group size does not divide (named,
            with the sizes that would work).
    """
    if group_size == "auto":
        out = {}
        for u in units:
            fits = [g for g in AUTO_GROUP_SIZES if u.shape[1] % g == 0]
            if not fits:
                raise ValueError(f"{u.name}: none of {AUTO_GROUP_SIZES} divides in_features={u.shape[1]}")
            out[u.name] = fits[0]
        return out
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size={group_size!r}; allowed: a positive int or 'auto'")
    for u in units:
        if u.shape[1] % group_size:
            fits = [g for g in AUTO_GROUP_SIZES if u.shape[1] % g == 0]
            raise ValueError(
                f"{u.name}: group_size={group_size} does not divide in_features={u.shape[1]};"
                f" allowed here: {fits or [u.shape[1]]}, or group_size='auto'"
            )
    return {u.name: group_size for u in units}


@dataclass
class Context:
    """The planned units and everything a rule may read.

    Attributes:
        units: planned units, in model order.
        base: unit name -> starting bits.
        model: the model (for rules that read weights), or None.
        stats: calibration statistics, or None.
        seed: seed for the random controls and the block predictor.
        group_sizes: unit name -> group size.
        symmetric: symmetric quantization (for sensitivity measurements).
    """

    units: list[Unit]
    base: dict[str, int]
    model: nn.Module | None = None
    stats: Profile | None = None
    seed: int = 0
    group_sizes: dict[str, int] = field(default_factory=dict)
    symmetric: bool = True
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def of_kind(self, *kinds: str) -> list[Unit]:
        """Planned units of the given kinds, in model order."""
        return [u for u in self.units if u.kind in kinds]

    def by_layer(self, *kinds: str) -> dict[int, tuple[str, ...]]:
        """Layer -> names of the planned units of ``kinds`` in it (layers ascending)."""
        out: dict[int, list[str]] = {}
        for u in self.of_kind(*kinds):
            if u.layer is not None:
                out.setdefault(u.layer, []).append(u.name)
        return {layer: tuple(out[layer]) for layer in sorted(out)}

    def experts(self) -> Mapping[tuple[int, int], tuple[str, ...]]:
        """(layer, expert) -> the names of that routed expert's planned linears (read-only)."""
        if "experts" not in self._cache:  # rules look experts up one by one: build the index once
            out: dict[tuple[int, int], list[str]] = {}
            for u in self.of_kind("expert"):
                out.setdefault((u.layer, u.expert), []).append(u.name)
            self._cache["experts"] = {key: tuple(out[key]) for key in sorted(out)}
        return MappingProxyType(self._cache["experts"])

    def moe_layers(self) -> list[int]:
        """Layers holding planned routed experts, ascending."""
        return sorted({layer for layer, _ in self.experts()})

    def weight(self, unit: Unit) -> torch.Tensor:
        """The unit's weight [out, in].

        Raises:
            ValueError: the context has no model (only a unit list was given).
        """
        if self.model is None:
            raise ValueError(f"{unit.name}: this strategy reads weights; pass the model, not a unit list")
        w = unit_weight(self.model, unit)
        if w.is_meta:
            raise ValueError(f"{unit.name}: this strategy reads weights, and the model's are still in its checkpoint "
                             f"(streamed); load the model in memory, or use a strategy that needs only a profile")
        return w

    def require(self, *fields: str) -> Profile:
        """The Profile, checked to hold the named statistics for every MoE layer.

        Raises:
            ValueError: no Profile, or one missing a field or some layers of it.
        """
        if self.stats is None:
            raise ValueError(
                f"this strategy needs a Profile with {list(fields)}; pass stats=moe_ao.profiling.profile(...)"
            )
        layers = self.moe_layers()
        for name in fields:
            have = getattr(self.stats, name)
            missing = [layer for layer in layers if layer not in have]
            if missing:
                raise ValueError(f"stats.{name} lacks MoE layers {missing}; it has {sorted(have)}")
        return self.stats

    def rng(self, salt: str) -> random.Random:
        """A seeded generator, independent per ``salt`` so controls do not share draws."""
        return random.Random(f"{self.seed}:{salt}")


def bound_params(
    fn: Callable[..., Any], params: Mapping[str, Any], what: str, skip: tuple[str, ...] = ()
) -> dict[str, Any]:
    """All keyword parameters of ``fn`` (after the context, minus ``skip``), given ones over defaults.

    Raises:
        ValueError: a parameter ``fn`` does not take (names the allowed ones).
    """
    sig = inspect.signature(fn)
    allowed = [
        n for n in list(sig.parameters)[1:]
        if sig.parameters[n].kind is not inspect.Parameter.VAR_KEYWORD and n not in skip
    ]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"{what} does not take {unknown}; allowed parameters: {allowed}")
    return {n: params.get(n, sig.parameters[n].default) for n in allowed}
