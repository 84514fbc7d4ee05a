"""What a serving engine can hold, as a constraint on plans.

moe_ao stores a width per expert and per gate/up half; engines store less:

- **vLLM** (compressed-tensors ``pack-quantized``, WNA16): one scheme per MoE layer (it
  reads expert 0's gate/up/down schemes, refuses layers whose projections differ, and
  builds one packed 3D weight per layer); q/k/v share one fused linear, and so do the
  gate and up projections of a dense or shared MLP; widths 4 and 8 (2 and 3 for experts
  only through the optional Humming MoE backend: ``serving="vllm-humming"``); group
  sizes 32, 64, 128 or one per channel (group = in_features); symmetric codes.
- **llama.cpp** (GGUF): one ggml type per tensor, and ``ffn_{gate,up,down}_exps`` are
  one 3D tensor per layer, so a layer's experts share a type per projection; 4/8-bit
  symmetric codes map exactly onto Q4_0/Q8_0 (blocks of 32, so group sizes must be
  multiples of 32); 2/3-bit go through Q2_K/Q3_K (a requantization). Its output head
  (``output.weight``) may be quantized like any linear (llama.cpp's own quantizers store it
  as Q6_K); vLLM keeps it in float.

Units a constraint ties together must share one spec (bits, group size, symmetry);
:func:`check_plan` refuses a plan that breaks this, naming the layer, and the planner
uses :func:`tie_groups` so that the knapsack optimises only over plans the engine runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from moe_ao.plans import FLOAT_BITS, Plan
from moe_ao.unit import Unit

QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


def _vllm_tie(u: Unit) -> str | None:
    if u.kind == "expert":
        return f"layer {u.layer} routed experts (vLLM: one scheme per MoE layer)"
    if u.kind == "attention" and u.proj in QKV:
        return f"layer {u.layer} attention q/k/v (vLLM: one fused qkv_proj)"
    if u.kind in ("shared_expert", "dense_mlp") and u.proj in GATE_UP:
        return f"layer {u.layer} {u.kind} gate/up (vLLM: one fused gate_up_proj)"
    return None


def _llama_cpp_tie(u: Unit) -> str | None:
    if u.kind == "expert":
        return f"layer {u.layer} experts {u.proj} (llama.cpp: one ffn_*_exps tensor, one type)"
    return None


@dataclass(frozen=True)
class ServingTarget:
    """An engine's constraint.

    Attributes:
        name: the ``serving=`` value.
        expert_widths: quantized widths allowed for routed experts.
        linear_widths: quantized widths allowed for every other planned linear.
        group_sizes: allowed group sizes (``None``: any multiple of ``group_multiple``);
            a group of in_features (one scale per channel) is always allowed.
        group_multiple: group sizes must be multiples of this.
        symmetric_only: asymmetric codes are refused.
        tie: unit -> key; units with the same key must share one spec (None: free).
        engine: a one-line description for messages.
        float_kinds: unit kinds the engine keeps in float.
    """

    name: str
    expert_widths: tuple[int, ...]
    linear_widths: tuple[int, ...]
    group_sizes: tuple[int, ...] | None
    group_multiple: int
    symmetric_only: bool
    tie: Callable[[Unit], str | None]
    engine: str
    float_kinds: tuple[str, ...] = ("router", "embedding", "lm_head")

    def widths(self, unit: Unit) -> tuple[int, ...]:
        """Quantized widths allowed for ``unit`` (none for the kinds the engine keeps in float)."""
        if unit.kind in self.float_kinds:
            return ()
        return self.expert_widths if unit.kind == "expert" else self.linear_widths

    def group_ok(self, unit: Unit, group_size: int) -> bool:
        """Whether ``group_size`` is one the engine runs for ``unit``."""
        if group_size == unit.shape[1]:
            return True
        if group_size % self.group_multiple:
            return False
        return self.group_sizes is None or group_size in self.group_sizes


TARGETS: dict[str, ServingTarget] = {t.name: t for t in (
    ServingTarget("vllm", (4, 8), (4, 8), (32, 64, 128), 32, True, _vllm_tie,
                  "vLLM (compressed-tensors WNA16, Marlin)"),
    ServingTarget("vllm-humming", (2, 3, 4, 8), (4, 8), (32, 64, 128), 32, True, _vllm_tie,
                  "vLLM with --moe-backend humming (2/3-bit MoE)"),
    ServingTarget("llama.cpp", (2, 3, 4, 8), (2, 3, 4, 8), None, 32, True, _llama_cpp_tie,
                  "llama.cpp (GGUF: Q2_K/Q3_K/Q4_0/Q8_0, one type per tensor)", ("router",)),
)}


def get_target(name: str) -> ServingTarget:
    """The named target.

    Raises:
        ValueError: unknown name (lists the allowed ones).
    """
    if name not in TARGETS:
        raise ValueError(f"serving={name!r} is not known; allowed: {sorted(TARGETS)}")
    return TARGETS[name]


def tie_groups(units: Iterable[Unit], target: ServingTarget) -> list[list[Unit]]:
    """The units in groups that must share one spec (singletons for free units), model order."""
    groups: dict[str, list[Unit]] = {}
    out: list[list[Unit]] = []
    for u in units:
        key = target.tie(u)
        if key is None:
            out.append([u])
        elif key in groups:
            groups[key].append(u)
        else:
            groups[key] = [u]
            out.append(groups[key])
    return out


def check_plan(plan: Plan, units: Iterable[Unit], target: ServingTarget) -> None:
    """Raises ValueError naming the first layer or unit the engine cannot hold.

    Args:
        plan: the plan.
        units: the model's units.
        target: the engine's constraint.

    Raises:
        ValueError: a width, group size or asymmetric spec the engine does not run, a
            quantized router, or tied units with different specs.
    """
    planned = [u for u in units if u.name in plan and plan[u.name].quantized]
    for u in planned:
        spec = plan[u.name]
        if u.kind in target.float_kinds:
            raise ValueError(f"{u.name}: {target.engine} keeps {u.kind}s unquantized; plan it at {FLOAT_BITS} bits")
        if spec.bits not in target.widths(u):
            raise ValueError(f"{u.name}: {spec.bits}-bit {u.kind} is not supported by {target.engine};"
                             f" allowed: {target.widths(u)} (or {FLOAT_BITS})")
        if not target.group_ok(u, spec.group_size):
            allowed = target.group_sizes or f"multiples of {target.group_multiple}"
            raise ValueError(f"{u.name}: group_size={spec.group_size} is not supported by {target.engine};"
                             f" allowed: {allowed} or in_features={u.shape[1]} (per channel)")
        if target.symmetric_only and not spec.symmetric:
            raise ValueError(f"{u.name}: asymmetric codes are not supported by {target.engine}; use symmetric=True")
    for group in tie_groups([u for u in units if u.name in plan], target):
        specs = {plan[u.name] for u in group}
        if len(specs) > 1:
            key = target.tie(group[0])
            shown = sorted({f"{s.bits}-bit g{s.group_size}{'' if s.symmetric else ' asym'}" for s in specs})
            raise ValueError(f"{key}: its units must share one spec, the plan gives {shown}"
                             f" (e.g. {group[0].name}: {plan[group[0].name]}); plan with serving={target.name!r}")


def lift(bits: Mapping[str, int], units: Iterable[Unit], target: ServingTarget) -> dict[str, int]:
    """Raises each tied group to its widest member, and each width to the next one allowed.

    Used for rule-based plans (the knapsack optimises over tied groups directly).
    """
    out = dict(bits)
    for group in tie_groups([u for u in units if u.name in bits], target):
        want = max(out[u.name] for u in group)
        if want < FLOAT_BITS:
            allowed = [w for u in group for w in target.widths(u)]
            fits = [w for w in sorted(set(allowed)) if w >= want and all(w in target.widths(u) for u in group)]
            want = fits[0] if fits else FLOAT_BITS
        for u in group:
            out[u.name] = want
    return out
