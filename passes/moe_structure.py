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
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.fx import Node

from moe_ao.passes.capture import TRACEABLE_EXPERTS, capture
from moe_ao.passes.dataflow import (
    ATTENTION_OPS, PROBABILITY_OPS, Flow, combined_with, gathered_by, is_transparent, iter_calls, op_name, root,
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


class _Analysis:
    """One pass over one exported program (state shared by the steps below)."""

    def __init__(self, program: torch.export.ExportedProgram, model: nn.Module,
                 routing_ops: tuple[str, ...] = ROUTING_OPS) -> None:
        self.model, self.routing_ops = model, set(routing_ops)
        sig = program.graph_signature
        graph = program.graph
        fqn_of = dict(sig.inputs_to_parameters)
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        consts = [n for n in placeholders if n.name in sig.inputs_to_buffers
                  or n.name in sig.inputs_to_lifted_tensor_constants
                  or (n.name in fqn_of and not is_weight_placeholder(n, fqn_of))]
        self.flow = Flow(graph, consts)
        self.params = {n: fqn_of[n.name] for n in placeholders if is_weight_placeholder(n, fqn_of)}
        self.uses, unused = weight_uses(self.flow, self.params)
        names: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
        self.aliases = {a: n for n in names.values() if len(n) > 1 for a in n}  # tied weights
        used = {a for u in self.uses for a in self.aliases.get(u.param, [u.param])}
        self.unused = unused - used
        self.weight_nodes = set(self.params)
        self.by_node = {u.node: u for u in self.uses}
        self.role: dict[Node, str] = {}  # consumer node -> kind
        self.counters: Counter = Counter()

    # -- attention ------------------------------------------------------------------
    def attention_cores(self) -> list[tuple[list[Node], Node]]:
        """(nodes whose inputs are q/k/v, output) of every attention core, in graph order."""
        flow, cores = self.flow, []
        for n in iter_calls(flow.graph, ATTENTION_OPS):
            cores.append(([n], n))
        for s in iter_calls(flow.graph, {"softmax", "_softmax"}):
            before = [m for m in flow.past(s)[1] if self._is_act_matmul(m)]
            after = [m for m in flow.future(s)[1] if self._is_act_matmul(m)]
            if before and after:  # scores = q @ k^T -> softmax -> @ v
                cores.append(([before[-1], after[0]], after[0]))
        return sorted(cores, key=lambda c: flow.order[c[1]])

    def _is_act_matmul(self, node: Node) -> bool:
        return op_name(node) in ("matmul", "bmm", "mm") and node not in self.by_node

    def attention(self, cores) -> dict[Node, int]:
        """Marks attention linears; returns consumer node -> index of the core it feeds."""
        flow, pre = self.flow, {}
        for i, (starts, _) in enumerate(cores):
            for start in starts:
                for end in flow.past(start)[1]:
                    if end in self.by_node and end not in self.role:
                        pre[end] = i
        changed = True
        while changed:  # projections that only feed attention projections (MLA's q_a_proj)
            changed = False
            for u in self._free():
                if u.node in pre:
                    continue
                ends = [e for e in flow.future(u.node)[1] if e.op != "output"]
                if ends and all(e in pre for e in ends) and len({pre[e] for e in ends}) == 1:
                    pre[u.node] = pre[ends[0]]
                    changed = True
        outputs = {out for _, out in cores}
        for node in pre:
            self.role[node] = "attention"
        for u in self._free():
            values = u.activations(flow, self.weight_nodes)
            if any(a in outputs or any(e in outputs for e in flow.past(a)[1]) for a in values):
                self.role[u.node] = "attention"  # fed by a core: the output projection
        return pre

    # -- routers --------------------------------------------------------------------
    def routers(self) -> dict[Node, set[Node]]:
        """Router consumer node -> its signals."""
        found = {}
        for u in self._free():
            if not u.is_matmul or not any(op_name(n) in self.routing_ops for n in self.flow.future(u.node)[0]):
                continue
            sig = self.flow.signals(u.node)
            names = {op_name(n) for n in sig}
            if names & self.routing_ops and names & PROBABILITY_OPS:
                found[u.node] = sig
                self.role[u.node] = "router"
        return found

    # -- routed / shared ------------------------------------------------------------
    def routed_by(self, chain: Chain, sig: set[Node]) -> tuple[bool, int | None]:
        """(touches the router's signals, expert index read off a routing-matrix column)."""
        flow = self.flow
        for use, _ in chain.members:
            if any(g in sig for g in use.gathers):
                return True, None  # bank[ids]
            if any(a in sig or gathered_by(flow, a, sig) for a in use.activations(flow, self.weight_nodes)):
                return True, None  # grouped-mm offsets, tokens gathered by a routing permutation
        weight = combined_with(flow, chain.members[-1][0].node, sig)  # out * w, out[perm] = ...
        return weight is not None, None if weight is None else _column(weight)

    def _free(self) -> list[WeightUse]:
        return [u for u in self.uses if u.node not in self.role]

    # -- putting it together ----------------------------------------------------------
    def run(self) -> MoEStructure:
        self._check_uses()
        cores = self.attention_cores()
        pre = self.attention(cores)
        routers = self.routers()
        for u in self._free():
            if u.is_embedding:
                self.role[u.node] = "embedding"
        chains = find_chains(self.flow, [u for u in self._free() if u.is_matmul], self.weight_nodes,
                             lambda fqn: f"{fqn} in {_owner(self.model, fqn)}")
        # A router's input: shared experts and their gate read the same tensor.
        inputs = {r: {root(a) for a in self.by_node[r].activations(self.flow, self.weight_nodes)} for r in routers}
        self._place(chains, routers, inputs)
        self._lone_linears(set().union(*inputs.values()))
        positions = [self.flow.order[out] for _, out in cores]

        def layer(use: WeightUse) -> int | None:
            if self.role[use.node] in ("embedding", "lm_head"):
                return None
            if not positions:
                return layer_index(use.param)
            if use.node in pre:
                return pre[use.node]
            i = bisect.bisect_left(positions, self.flow.order[use.node]) - 1
            return i if i >= 0 else None

        units, roles = self._units(chains, layer)
        c = self.counters
        c["attention_cores"] = len(cores)
        c["routers"] = len(routers)
        c["routed_banks"] = len({ch.router for ch in chains if ch.kind == "expert"})
        for kind, key in (("attention", "attention_linears"), ("expert", "routed_weights"),
                          ("shared_expert", "shared_linears"), ("dense_mlp", "dense_linears"),
                          ("embedding", "embeddings"), ("lm_head", "lm_heads")):
            c[key] = sum(1 for k in roles.values() if k == kind)
        c["units"] = len(units)
        return MoEStructure(units, Counter({k: c[k] for k in COUNTERS}), roles)

    def _check_uses(self) -> None:
        if self.unused:
            names = ", ".join(f"{f} in {_owner(self.model, f)}" for f in sorted(self.unused))
            raise ValueError(f"{names}: never used in the captured graph; its role cannot be inferred")
        for u in self.uses:
            if not (u.is_matmul or u.is_embedding):
                raise ValueError(f"{u.param} in {_owner(self.model, u.param)}: consumed by {u.node.target}, "
                                 f"not by a matmul or embedding; role not understood")
            if u.transposed:
                raise ValueError(f"{u.param} in {_owner(self.model, u.param)}: used as [in, out] "
                                 f"(contracted on its out axis by {u.node.target}); units need [out, in] weights")

    def _place(self, chains: list[Chain], routers: dict[Node, set[Node]], inputs: dict[Node, set[Node]]) -> None:
        """Routed (by the nearest router before it), shared or dense, for every chain."""
        flow = self.flow
        unnumbered: dict[Node, int] = Counter()
        for chain in chains:
            first = flow.order[chain.members[0][0].node]
            before = [r for r in sorted(routers, key=flow.order.__getitem__, reverse=True) if flow.order[r] < first]
            for r in before:
                hit, expert = self.routed_by(chain, routers[r])
                if hit:
                    chain.kind, chain.router, chain.expert = "expert", r, expert
                    break
            else:
                roots = {root(a) for u, _ in chain.members[:-1] for a in u.activations(flow, self.weight_nodes)}
                near = sorted(routers, key=lambda r: abs(flow.order[r] - first))
                chain.router = next((r for r in near if inputs[r] & roots), None)
                chain.kind = "shared_expert" if chain.router is not None else "dense_mlp"
            for use, _ in chain.members:
                self.role[use.node] = chain.kind
                if chain.kind != "expert" and self.model.get_parameter(use.param).ndim != 2:
                    raise ValueError(f"{use.param} in {_owner(self.model, use.param)}: a 3D weight outside "
                                     f"any routed path; expected a routed experts bank")
        for chain in chains:  # experts with no routing-matrix column: number them in graph order
            if chain.kind == "expert" and chain.expert is None and self.model.get_parameter(
                    chain.members[0][0].param).ndim == 2:
                chain.expert = unnumbered[chain.router]
                unnumbered[chain.router] += 1

    def _lone_linears(self, router_inputs: set[Node]) -> None:
        """Shared-expert gates and the lm_head; anything else left over is an error."""
        for u in self._free():
            roots = {root(a) for a in u.activations(self.flow, self.weight_nodes)}
            seen, ends = self.flow.future(u.node)
            if roots & router_inputs and any(op_name(n) == "sigmoid" for n in seen):
                self.role[u.node] = "router"
                self.counters["shared_gates"] += 1
            elif any(e.op == "output" for e in ends):
                self.role[u.node] = "lm_head"
            else:
                raise ValueError(
                    f"{u.param} in {_owner(self.model, u.param)}: a linear that is not attention, router, "
                    f"routed/shared expert, dense MLP, embedding or lm_head by dataflow; role not understood")

    def _units(self, chains: list[Chain], layer) -> tuple[list[Unit], dict[str, str]]:
        """Units in graph order (a chain's units where its first projection runs)."""
        model, blocks = self.model, []
        in_chain = {u.node: ch for ch in chains for u, _ in ch.members}
        for use in self.uses:
            kind, fqn = self.role[use.node], use.param
            if use.node in in_chain:
                chain = in_chain[use.node]
                if chain.members[0][0] is use:
                    blocks.append((self.flow.order[use.node], self._chain_units(chain, layer(use))))
                continue
            if fqn in self.aliases:  # tied embedding and lm_head: each named by its own module
                fqn = _alias_for(model, self.aliases[fqn], embedding=kind == "embedding")
            name = _lin_name(fqn)
            proj = name.rsplit(".", 1)[-1] if kind == "attention" else "weight"
            shape = tuple(model.get_parameter(fqn).shape)
            blocks.append((self.flow.order[use.node], [Unit(name, kind, layer(use), None, proj, shape, fqn)]))
        units = [u for _, block in sorted(blocks, key=lambda b: b[0]) for u in block]
        # Role names are per parent module; two MLPs under one parent keep their own paths.
        params_of = {}
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

    def _chain_units(self, chain: Chain, layer: int | None) -> list[Unit]:
        model = self.model
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
            segs = gate_up_rows(self.flow, use) if role == "gate_up_proj" else [(role, 0, N)]
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
    return _Analysis(program, model, routing_ops).run()


def find_moe_structure(
    model: nn.Module,
    example_input_ids: torch.Tensor | None = None,
    *,
    implementation: str = TRACEABLE_EXPERTS,
    routing_ops: tuple[str, ...] = ROUTING_OPS,
) -> MoEStructure:
    """Captures ``model`` and finds its MoE structure by dataflow.

    Args:
        model: a causal LM taking token ids.
        example_input_ids: ``[batch, seq]`` ids to trace with (default: a few tokens).
        implementation: traceable experts implementation for fused transformers experts.
        routing_ops: ops that select experts (``topk``; add e.g. ``argmax`` for top-1 routers).

    Returns:
        The units, per-category counters and parameter roles.

    Raises:
        ValueError: capture failed, or a weight's role could not be inferred.
    """
    program = capture(model, example_input_ids, implementation=implementation)
    structure = analyze(program, model, routing_ops=routing_ops)
    logger.info("%s: %s", type(model).__name__, dict(structure.counters))
    return structure


def find_moe_units(model: nn.Module, example_input_ids: torch.Tensor | None = None, **kwargs) -> list[Unit]:
    """The units of ``model`` found by dataflow (see :func:`find_moe_structure`)."""
    return find_moe_structure(model, example_input_ids, **kwargs).units


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
