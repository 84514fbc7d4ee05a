"""Find the MoE structure of a model by dataflow in its captured graph, not by names.

The model is exported whole (``capture.py`` says why under a traceable experts
implementation). Every parameter of two or more dimensions is followed to the op that
consumes it (``weight_uses.py``), and each use is given a role from what surrounds it:

- attention core: ``scaled_dot_product_attention``, or matmul -> softmax -> matmul on
  activations. Its linears are those that feed q/k/v through pointwise ops (plus the
  linears that feed only those, e.g. MLA's ``q_a_proj``), and those fed by its output.
- router: a linear whose output, through ops that see nothing but its logits and
  constants, reaches a softmax/sigmoid and a top-k. Those ops are the router's
  *signals* (probabilities, top-k ids and weights, sort permutations, group offsets,
  dense routing matrices).
- MLP chain: a down projection D and the one or two projections whose outputs reach
  only D (gate: through a nonlinearity; up: not; fused gate_up: its output is split in
  two halves, the one through the nonlinearity is the gate).
- routed experts: a chain that touches the signals of a router: weights gathered by
  expert ids (``bank[ids]``), tokens gathered by a routing permutation, grouped-mm
  offsets, or its output scaled/scattered by routing weights before joining other
  branches (DeepSeek-MoE's dense routing matrix: ``expert(x) * dense[:, e]``, which
  also gives the expert index e).
- shared experts: a chain not routed that reads the same tensor as a router (it runs
  on every token beside the routed path). A single linear on that tensor feeding a
  sigmoid is the shared experts' gate (kind ``router``, as in ``moe_ao.units``).
- dense MLP: any other chain. Embedding: ``aten.embedding``. lm_head: a lone linear
  whose output is the graph output.

Decoder layers are counted by dataflow too: a node belongs to the layer of the last
attention core before it (attention input projections to the core they feed); a graph
without attention falls back to the layer number in the parameter's FQN.

Roles never come from names or from ``nn_module_stack`` provenance (that would bring
the names back); module paths only name the units, as ``moe_ao.units`` does: the module
path for attention and routers, ``<parent>.<role>`` for MLP projections (so ``w1`` is
``gate_proj``), ``<bank owner>.<e>.<role>`` for fused 3D banks, gate rows then up rows.
"""

from __future__ import annotations

import bisect
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.fx import Node

from moe_ao.passes.capture import TRACEABLE_EXPERTS, ExampleInputs, capture
from moe_ao.passes.dataflow import (
    ATTENTION_OPS,
    Flow,
    combined_with,
    gathered_by,
    is_transparent,
    iter_calls,
    op_name,
    root,
    router_signals,
)
from moe_ao.passes.mlp_chains import Chain, find_chains, gate_up_rows
from moe_ao.passes.weight_uses import WeightUse, is_weight_placeholder, weight_uses
from moe_ao.unit import Unit, layer_index

logger = logging.getLogger(__name__)

ROUTING_OPS = ("topk",)
COUNTERS = ("attention_cores", "attention_linears", "routers", "shared_gates", "routed_banks",
            "routed_weights", "shared_linears", "dense_linears", "embeddings", "lm_heads", "units")


@dataclass
class MoEStructure:
    """What the graph pass found.

    Attributes:
        units: the units, as ``moe_ao.units`` lists them (model order).
        counters: per-category counts (``routers``, ``routed_banks``: MoE blocks with
            routed experts, ``routed_weights``: parameters holding routed experts, ...).
        roles: parameter FQN -> kind.
    """

    units: list[Unit]
    counters: Counter = field(default_factory=Counter)
    roles: dict[str, str] = field(default_factory=dict)


def _lin_name(fqn: str) -> str:
    return fqn[: -len(".weight")] if fqn.endswith(".weight") else fqn


def _owner(model: nn.Module, fqn: str) -> str:
    path = fqn.rsplit(".", 1)[0] if "." in fqn else ""
    module = model.get_submodule(path)
    return f"{path or '<root>'} ({type(module).__name__})"


@dataclass
class _Program:
    """What every step reads: one exported program's dataflow and its weight uses (never mutated)."""

    model: nn.Module
    flow: Flow
    uses: list[WeightUse]
    by_node: dict[Node, WeightUse]
    weight_nodes: set[Node]
    aliases: dict[str, list[str]]  # tied weights: each name -> all its names
    unused: set[str]

    @classmethod
    def of(cls, program: torch.export.ExportedProgram, model: nn.Module) -> _Program:
        sig, graph = program.graph_signature, program.graph
        fqn_of = dict(sig.inputs_to_parameters)
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        consts = [n for n in placeholders if n.name in sig.inputs_to_buffers
                  or n.name in sig.inputs_to_lifted_tensor_constants
                  or (n.name in fqn_of and not is_weight_placeholder(n, fqn_of))]
        flow = Flow(graph, consts)
        params = {n: fqn_of[n.name] for n in placeholders if is_weight_placeholder(n, fqn_of)}
        uses, unused = weight_uses(flow, params)
        names: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
        aliases = {a: n for n in names.values() if len(n) > 1 for a in n}
        used = {a for u in uses for a in aliases.get(u.param, [u.param])}
        return cls(model, flow, uses, {u.node: u for u in uses}, set(params), aliases, unused - used)

    def free(self, taken: Mapping[Node, str]) -> list[WeightUse]:
        """Uses not given a role yet."""
        return [u for u in self.uses if u.node not in taken]

    def activations(self, use: WeightUse) -> list[Node]:
        return use.activations(self.flow, self.weight_nodes)


@dataclass
class _Attention:
    """Attention cores and their linears.

    Attributes:
        cores: (nodes whose inputs are q/k/v, output) per core, in graph order.
        inputs: consumer node of an input projection -> index of the core it feeds.
        outputs: consumer nodes of output projections (fed by a core).
    """

    cores: list[tuple[list[Node], Node]]
    inputs: dict[Node, int]
    outputs: set[Node]


def check_uses(g: _Program) -> None:
    """Every weight is used, by a matmul or an embedding, as [out, in]."""
    if g.unused:
        names = ", ".join(f"{f} in {_owner(g.model, f)}" for f in sorted(g.unused))
        raise ValueError(f"{names}: never used in the captured graph; its role cannot be inferred")
    for u in g.uses:
        if not (u.is_matmul or u.is_embedding):
            raise ValueError(f"{u.param} in {_owner(g.model, u.param)}: consumed by {u.node.target}, "
                             f"not by a matmul or embedding; role not understood")
        if u.transposed:
            raise ValueError(f"{u.param} in {_owner(g.model, u.param)}: used as [in, out] "
                             f"(contracted on its out axis by {u.node.target}); units need [out, in] weights")


def find_attention(g: _Program) -> _Attention:
    """Attention cores (SDPA, or matmul -> softmax -> matmul on activations) and the linears around them."""
    flow = g.flow

    def act_matmul(node: Node) -> bool:
        return op_name(node) in ("matmul", "bmm", "mm") and node not in g.by_node

    cores = [([n], n) for n in iter_calls(flow.graph, ATTENTION_OPS)]
    for s in iter_calls(flow.graph, {"softmax", "_softmax"}):
        before = [m for m in flow.past(s).ends if act_matmul(m)]
        after = [m for m in flow.future(s).ends if act_matmul(m)]
        if before and after:  # scores = q @ k^T -> softmax -> @ v
            cores.append(([before[-1], after[0]], after[0]))
    cores.sort(key=lambda c: flow.order[c[1]])
    inputs: dict[Node, int] = {}
    for i, (starts, _) in enumerate(cores):
        for start in starts:
            for end in flow.past(start).ends:
                if end in g.by_node:
                    inputs.setdefault(end, i)
    changed = True
    while changed:  # projections that only feed attention projections (MLA's q_a_proj)
        changed = False
        for u in g.free(inputs):
            ends = [e for e in flow.future(u.node).ends if e.op != "output"]
            if ends and all(e in inputs for e in ends) and len({inputs[e] for e in ends}) == 1:
                inputs[u.node] = inputs[ends[0]]
                changed = True
    core_outputs = {out for _, out in cores}
    outputs = {u.node for u in g.free(inputs)
               if any(a in core_outputs or any(e in core_outputs for e in flow.past(a).ends)
                      for a in g.activations(u))}
    return _Attention(cores, inputs, outputs)


def find_routers(g: _Program, taken: Mapping[Node, str], routing_ops: set[str]) -> dict[Node, set[Node]]:
    """Router consumer node -> its routing signals, among the uses not taken yet."""
    found = {}
    for u in g.free(taken):
        if u.is_matmul:
            sig = router_signals(g.flow, u.node, routing_ops)
            if sig is not None:
                found[u.node] = sig
    return found


def routed_by(g: _Program, chain: Chain, sig: set[Node]) -> tuple[bool, int | None]:
    """(chain touches the router's signals, expert index read off a routing-matrix column)."""
    flow = g.flow
    for use, _ in chain.members:
        if any(x in sig for x in use.gathers):
            return True, None  # bank[ids]
        if any(a in sig or gathered_by(flow, a, sig) for a in g.activations(use)):
            return True, None  # grouped-mm offsets, tokens gathered by a routing permutation
    weight = combined_with(flow, chain.members[-1][0].node, sig)  # out * w, out[perm] = ...
    return weight is not None, None if weight is None else _column(weight)


def place_chains(g: _Program, chains: list[Chain], routers: dict[Node, set[Node]],
                 router_inputs: dict[Node, set[Node]]) -> dict[Node, str]:
    """Sets each chain's kind (routed by the nearest router before it, shared, or dense) and
    expert index; returns consumer node -> kind for the chains' uses."""
    flow, model = g.flow, g.model
    roles: dict[Node, str] = {}
    for chain in chains:
        first = flow.order[chain.members[0][0].node]
        before = [r for r in sorted(routers, key=flow.order.__getitem__, reverse=True) if flow.order[r] < first]
        for r in before:
            hit, expert = routed_by(g, chain, routers[r])
            if hit:
                chain.kind, chain.router, chain.expert = "expert", r, expert
                break
        else:
            roots = {root(a) for u, _ in chain.members[:-1] for a in g.activations(u)}
            near = sorted(routers, key=lambda r: abs(flow.order[r] - first))
            chain.router = next((r for r in near if router_inputs[r] & roots), None)
            chain.kind = "shared_expert" if chain.router is not None else "dense_mlp"
        for use, _ in chain.members:
            roles[use.node] = chain.kind
            if chain.kind != "expert" and model.get_parameter(use.param).ndim != 2:
                raise ValueError(f"{use.param} in {_owner(model, use.param)}: a 3D weight outside "
                                 f"any routed path; expected a routed experts bank")
    unnumbered: Counter = Counter()
    for chain in chains:  # experts with no routing-matrix column: number them in graph order
        if chain.kind == "expert" and chain.expert is None and model.get_parameter(
                chain.members[0][0].param).ndim == 2:
            chain.expert = unnumbered[chain.router]
            unnumbered[chain.router] += 1
    return roles


def lone_linears(g: _Program, taken: Mapping[Node, str], router_inputs: set[Node]) -> dict[Node, str]:
    """Shared-expert gates (kind router) and the lm_head; anything else left over is an error."""
    roles = {}
    for u in g.free(taken):
        roots = {root(a) for a in g.activations(u)}
        reach = g.flow.future(u.node)
        if roots & router_inputs and any(op_name(n) == "sigmoid" for n in reach.seen):
            roles[u.node] = "shared_gate"
        elif any(e.op == "output" for e in reach.ends):
            roles[u.node] = "lm_head"
        else:
            raise ValueError(
                f"{u.param} in {_owner(g.model, u.param)}: a linear that is not attention, router, "
                f"routed/shared expert, dense MLP, embedding or lm_head by dataflow; role not understood")
    return roles


def _layer_of(g: _Program, attention: _Attention, role: Mapping[Node, str]):
    """use -> decoder layer: that of the last attention core before it (inputs: the core they feed)."""
    positions = [g.flow.order[out] for _, out in attention.cores]

    def layer(use: WeightUse) -> int | None:
        if role[use.node] in ("embedding", "lm_head"):
            return None
        if not positions:
            return layer_index(use.param)
        if use.node in attention.inputs:
            return attention.inputs[use.node]
        i = bisect.bisect_left(positions, g.flow.order[use.node]) - 1
        return i if i >= 0 else None

    return layer


def _count(attention: _Attention, routers: dict, chains: list[Chain], role: Mapping[Node, str],
           kinds: Mapping[str, str], units: list[Unit]) -> Counter:
    c: Counter = Counter(attention_cores=len(attention.cores), routers=len(routers), units=len(units),
                         shared_gates=sum(1 for k in role.values() if k == "shared_gate"))
    c["routed_banks"] = len({ch.router for ch in chains if ch.kind == "expert"})
    for kind, key in (("attention", "attention_linears"), ("expert", "routed_weights"),
                      ("shared_expert", "shared_linears"), ("dense_mlp", "dense_linears"),
                      ("embedding", "embeddings"), ("lm_head", "lm_heads")):
        c[key] = sum(1 for k in kinds.values() if k == kind)
    return Counter({k: c[k] for k in COUNTERS})


def _run(program: torch.export.ExportedProgram, model: nn.Module, routing_ops: set[str]) -> MoEStructure:
    """The steps in their order; each takes the roles found before it and returns its own."""
    g = _Program.of(program, model)
    check_uses(g)
    attention = find_attention(g)
    role: dict[Node, str] = dict.fromkeys([*attention.inputs, *attention.outputs], "attention")
    routers = find_routers(g, role, routing_ops)
    role |= dict.fromkeys(routers, "router")
    role |= {u.node: "embedding" for u in g.free(role) if u.is_embedding}
    chains = find_chains(g.flow, [u for u in g.free(role) if u.is_matmul], g.weight_nodes,
                         lambda fqn: f"{fqn} in {_owner(model, fqn)}")
    # A router's input: shared experts and their gate read the same tensor.
    router_inputs = {r: {root(a) for a in g.activations(g.by_node[r])} for r in routers}
    role |= place_chains(g, chains, routers, router_inputs)
    role |= lone_linears(g, role, set().union(*router_inputs.values()))
    units, kinds = _units(g, chains, role, _layer_of(g, attention, role))
    return MoEStructure(units, _count(attention, routers, chains, role, kinds, units), kinds)


def _units(g: _Program, chains: list[Chain], role: Mapping[Node, str], layer) -> tuple[list[Unit], dict[str, str]]:
    """Units in graph order (a chain's units where its first projection runs)."""
    model, blocks = g.model, []
    in_chain = {u.node: ch for ch in chains for u, _ in ch.members}
    for use in g.uses:
        kind, fqn = role[use.node], use.param
        kind = "router" if kind == "shared_gate" else kind
        if use.node in in_chain:
            chain = in_chain[use.node]
            if chain.members[0][0] is use:
                blocks.append((g.flow.order[use.node], _chain_units(g, chain, layer(use))))
            continue
        if fqn in g.aliases:  # tied embedding and lm_head: each named by its own module
            fqn = _alias_for(model, g.aliases[fqn], embedding=kind == "embedding")
        name = _lin_name(fqn)
        proj = name.rsplit(".", 1)[-1] if kind == "attention" else "weight"
        shape = tuple(model.get_parameter(fqn).shape)
        blocks.append((g.flow.order[use.node], [Unit(name, kind, layer(use), None, proj, shape, fqn)]))
    units = [u for _, block in sorted(blocks, key=lambda b: b[0]) for u in block]
    # Role names are per parent module; two MLPs under one parent keep their own paths.
    params_of: dict[str, set[str]] = {}
    for u in units:
        params_of.setdefault(u.name, set()).add(u.param)
    units = [replace(u, name=_lin_name(u.param)) if len(params_of[u.name]) > 1 and not u.fused else u
             for u in units]
    seen: dict[str, Unit] = {}
    for unit in units:
        if seen.setdefault(unit.name, unit) != unit:
            raise ValueError(f"{unit.name}: found twice by dataflow, as {seen[unit.name]} and as {unit}")
    units = list(seen.values())
    return units, {u.param: u.kind for u in units}


def _chain_units(g: _Program, chain: Chain, layer: int | None) -> list[Unit]:
    model = g.model
    fused = model.get_parameter(chain.members[0][0].param).ndim == 3
    if not fused:
        out = []
        for use, role in chain.members:
            shape = tuple(model.get_parameter(use.param).shape)
            parent = _lin_name(use.param).rsplit(".", 1)[0]
            out.append(Unit(f"{parent}.{role}", chain.kind, layer, chain.expert, role, shape, use.param))
        return out
    segments = []
    for use, role in chain.members:
        E, N, K = model.get_parameter(use.param).shape
        segs = gate_up_rows(g.flow, use) if role == "gate_up_proj" else [(role, 0, N)]
        segments.append((use.param, K, segs))
    out = []
    for e in range(E):
        for fqn, K, segs in segments:
            owner = fqn.rsplit(".", 1)[0]
            for i, (proj, r0, r1) in enumerate(segs):
                out.append(Unit(f"{owner}.{e}.{proj}", "expert", layer, e, proj, (r1 - r0, K), fqn,
                                fused=True, rows=(r0, r1), segment=i))
    return out


def _alias_for(model: nn.Module, aliases: list[str], embedding: bool) -> str:
    """The alias owned by an nn.Embedding for an embedding use, by anything else otherwise."""
    owned = [a for a in aliases
             if isinstance(model.get_submodule(a.rsplit(".", 1)[0] if "." in a else ""), nn.Embedding) == embedding]
    return owned[0] if owned else aliases[0]


def analyze(program: torch.export.ExportedProgram, model: nn.Module, *,
            routing_ops: tuple[str, ...] = ROUTING_OPS) -> MoEStructure:
    """Roles of every weight of ``model`` from its exported ``program`` (see module docstring).

    Raises:
        ValueError: a weight is unused, used by a non-matmul op, stored [in, out], or in
            a structure not understood; the message names its parameter and module.
    """
    return _run(program, model, set(routing_ops))


def find_moe_structure(
    model: nn.Module,
    example_inputs: ExampleInputs | None = None,
    *,
    implementation: str = TRACEABLE_EXPERTS,
    routing_ops: tuple[str, ...] = ROUTING_OPS,
) -> MoEStructure:
    """Captures ``model`` and finds its MoE structure by dataflow.

    Args:
        model: a causal LM taking token ids, or any module with ``example_inputs``.
        example_inputs: what to call the forward with (see :func:`capture`; default: a few token ids).
        implementation: traceable experts implementation for fused transformers experts.
        routing_ops: ops that select experts (``topk``; add e.g. ``argmax`` for top-1 routers).

    Returns:
        The units, per-category counters and parameter roles.

    Raises:
        ValueError: capture failed, or a weight's role could not be inferred.
    """
    program = capture(model, example_inputs, implementation=implementation)
    structure = analyze(program, model, routing_ops=routing_ops)
    logger.info("%s: %s", type(model).__name__, dict(structure.counters))
    return structure


def find_moe_units(model: nn.Module, example_inputs: ExampleInputs | None = None, **kwargs) -> list[Unit]:
    """The units of ``model`` found by dataflow (see :func:`find_moe_structure`)."""
    return find_moe_structure(model, example_inputs, **kwargs).units


def _column(node: Node) -> int | None:
    """Expert e of ``dense[:, e:e+1]`` / ``dense[:, e]`` / ``ids == e``, behind casts and views."""
    while node.op == "call_function":
        name = op_name(node)
        if name == "slice" and len(node.args) >= 4 and node.args[3] - node.args[2] == 1:
            return int(node.args[2])
        if name == "select":
            return int(node.args[2])
        if name == "eq" and isinstance(node.args[1], int):
            return node.args[1]
        if not (is_transparent(node) and node.args and isinstance(node.args[0], Node)):
            return None
        node = node.args[0]
    return None
