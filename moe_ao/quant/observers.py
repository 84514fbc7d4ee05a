"""Observers: statistics of one decoder layer, gathered with forward hooks.

Shapes: T tokens in a chunk, k = top-k, E experts, K in features of a unit.

- Hessians ``H = Σ x xᵀ`` of each requested unit's inputs. A routed expert's Hessian
  sees only the tokens routed to it (optionally weighted by the routing weight). For
  fused experts the inputs of ``down_proj`` are recomputed per expert from the
  module's current gate/up weights, so GPTQ's true-sequential order holds.
- Routing counts (top-k selections per expert) and the router's mean softmax entropy.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from moe_ao.unit import Unit


def _module_path(param_fqn: str, layer_prefix: str) -> str:
    return param_fqn[len(layer_prefix) + 1 :].rpartition(".")[0]


def _down_input(mod: nn.Module, e: int, xe: torch.Tensor) -> torch.Tensor:
    """What expert ``e``'s down_proj multiplies for inputs ``xe`` [T_e, H] ([T_e, I], float32), computed
    from the module's current float banks in their own layout: [E, out, in] or transposed
    ([E, in, out]: gpt-oss, Aria, Llama 4), gpt-oss's interleaved columns, clamped swiglu and
    biases through the module's own ``_apply_gate``; DBRX's flat ``w1`` / ``v1`` [E*I, H]."""
    if hasattr(mod, "mlp") and hasattr(mod.mlp, "w1"):  # DBRX
        I = mod.ffn_hidden_size
        w1, v1 = (w[e * I:(e + 1) * I].float() for w in (mod.mlp.w1, mod.mlp.v1))
        return mod.mlp.activation_fn(xe @ w1.T) * (xe @ v1.T)
    if type(mod).__name__ == "Llama4TextExperts":  # [E, H, 2I], gate then up columns
        gate, up = (xe @ mod.gate_up_proj[e].float()).chunk(2, dim=-1)
        return up * mod.act_fn(gate)
    has_gate = getattr(mod, "has_gate", hasattr(mod, "gate_up_proj"))
    w = (mod.gate_up_proj if has_gate else mod.up_proj)[e].float()
    h = xe @ w if getattr(mod, "is_transposed", False) else xe @ w.T  # the module's own column order
    if getattr(mod, "has_bias", False):
        h = h + (mod.gate_up_proj_bias if has_gate else mod.up_proj_bias)[e].float()
    return mod._apply_gate(h) if has_gate else mod.act_fn(h)


class LayerObserver:
    """Hooks one decoder layer and accumulates statistics while it runs.

    Args:
        layer_prefix: FQN of the layer (``model.layers.3``).
        layer: the layer module (possibly a working copy).
        layer_units: the layer's units.
        hessian_units: names of units whose input Hessians to collect.
        weight_by_routing: weight each routed token's contribution by its routing weight.
    """

    def __init__(
        self,
        layer_prefix: str,
        layer: nn.Module,
        layer_units: Iterable[Unit],
        hessian_units: Iterable[str] = (),
        weight_by_routing: bool = False,
    ) -> None:
        self.layer_prefix, self.layer = layer_prefix, layer
        self.units = {u.name: u for u in layer_units}
        self.wanted = set(hessian_units)
        self.weight_by_routing = weight_by_routing
        self.H: dict[str, torch.Tensor] = {}  # module path -> Σ xxᵀ [K, K] or [E, K, K]
        self.n: dict[str, torch.Tensor] = {}  # module path -> tokens (scalar or [E])
        self.routing_counts: torch.Tensor | None = None  # [E]
        self.entropy_sum, self.entropy_tokens = 0.0, 0
        self._handles: list = []
        self._fused: set[str] = set()  # paths of fused experts modules

    # ----------------------------------------------------------------- hooks
    def __enter__(self) -> LayerObserver:
        by_module: dict[str, list[Unit]] = defaultdict(list)
        for u in self.units.values():
            by_module[_module_path(u.param, self.layer_prefix)].append(u)
        for path, us in by_module.items():
            u0 = us[0]
            if u0.fused:
                self._fused.add(path)  # the experts module holding the fused params
            elif u0.kind == "router":
                if u0.shape[0] > 1:  # a 1-row gate (Qwen2-MoE's shared_expert_gate) routes nothing
                    module = self.layer.get_submodule(path)
                    self._handles.append(module.register_forward_pre_hook(self._router_hook(u0)))
                    self._handles.append(module.register_forward_hook(self._router_out_hook(u0)))
            elif any(u.name in self.wanted for u in us):
                module = self.layer.get_submodule(path)
                self._handles.append(module.register_forward_pre_hook(self._linear_hook(path)))
        try:
            self._hook_fused(by_module)
        except BaseException:
            self.__exit__()  # a refused bank (NotImplementedError) leaves no hook behind
            raise
        return self

    def _hook_fused(self, by_module: dict[str, list[Unit]]) -> None:
        """One pre-hook per fused experts module, chosen by how that module is called."""
        for path in sorted(self._fused):
            module = self.layer.get_submodule(path)
            us = by_module[path]
            if us[0].kind == "shared_expert":  # 3D shared banks (Inkling): every token through each
                hook = self._shared_banks_hook(path, us)
            elif isinstance(getattr(module, "weight", None), torch.Tensor):  # one bank per module (JetMoE)
                hook = self._parallel_bank_hook(path, us)
            elif type(module).__name__ == "Llama4TextExperts":  # every expert on its own copy of the tokens
                hook = self._copies_hook(path, us)
            else:
                if not hasattr(module, "num_experts") and path.endswith(".mlp"):  # DBRX: banks in experts.mlp
                    module = self.layer.get_submodule(path.rpartition(".")[0])
                hook = self._experts_hook(path, us)
            self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _add(self, key: str, H: torch.Tensor, n: torch.Tensor | int) -> None:
        if key in self.H:
            self.H[key] += H
            self.n[key] += n
        else:
            self.H[key], self.n[key] = H, torch.as_tensor(n).clone()

    def _linear_hook(self, path: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()  # [T, K]
            self._add(path, x.T @ x, x.shape[0])

        return hook

    def _router_hook(self, unit: Unit):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            logp = F.log_softmax(F.linear(x, module.weight.float()), dim=-1)  # [T, E]
            self.entropy_sum += float(-(logp.exp() * logp).sum(-1).sum())
            self.entropy_tokens += x.shape[0]

        return hook

    def _router_out_hook(self, unit: Unit):
        def hook(module: nn.Module, args: tuple, out) -> None:
            if self._fused:
                return  # fused experts count routing from their own inputs
            outs = out if isinstance(out, tuple) else (out,)
            idx = next((t for t in outs if isinstance(t, torch.Tensor) and not t.is_floating_point()), None)
            if idx is not None:
                self._count(idx, unit.shape[0])

        return hook

    def _count(self, top_k_index: torch.Tensor, E: int) -> None:
        self._add_counts(torch.bincount(top_k_index.reshape(-1).long(), minlength=E)[:E])

    def _add_counts(self, counts: torch.Tensor) -> None:
        """Adds routed tokens per expert ([E])."""
        self.routing_counts = counts if self.routing_counts is None else self.routing_counts + counts

    def _wants(self, us: list[Unit]) -> tuple[bool, bool, int]:
        """(gate/up Hessians wanted, down Hessians wanted, down_proj's in_features) of a bank's units."""
        want_up = any(u.proj != "down_proj" and u.name in self.wanted for u in us)
        want_down = any(u.proj == "down_proj" and u.name in self.wanted for u in us)
        return want_up, want_down, next((u.shape[1] for u in us if u.proj == "down_proj"), 0)

    def _experts_hook(self, path: str, us: list[Unit]):
        """An experts module called as ``(hidden_states, top_k_index, top_k_weights)``; ``path`` is the
        module holding the banks (DBRX's ``experts.mlp``: the hook sits on its parent)."""
        want_up, want_down, I = self._wants(us)

        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden, top_k_index, top_k_weights = (list(args) + list(kwargs.values()))[:3]  # gpt-oss names
            # them router_indices / routing_weights; every experts forward takes them in this order
            E = mod.num_experts
            self._count(top_k_index, E)
            if want_up or want_down:
                x = hidden.reshape(-1, hidden.shape[-1]).float()
                self._bank_hessians(path, mod, self._routed_rows(x, top_k_index, top_k_weights, E), x,
                                    want_up, want_down, I)

        return hook

    def _copies_hook(self, path: str, us: list[Unit]):
        """Llama 4's experts: called with ``[E*T, H]``, expert e's block of T rows being the tokens times
        their routing score (0 where not routed). The scores are already in the inputs, so the
        Hessians are of what the expert sees; ``weight_by_routing`` adds nothing here."""
        want_up, want_down, I = self._wants(us)

        @torch.no_grad()
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            E = mod.num_experts
            x = hidden.reshape(E, -1, hidden.shape[-1]).float()  # [E, T, H]
            routed = x.ne(0).any(-1)  # [E, T]
            self._add_counts(routed.sum(-1))
            if want_up or want_down:
                rows = ((e, x[e][routed[e]], None) for e in range(E))
                self._bank_hessians(path, mod, rows, x, want_up, want_down, I)

        return hook

    def _parallel_bank_hook(self, path: str, us: list[Unit]):
        """A bank module called as ``(inputs [S, K] sorted by expert, expert_size)`` (JetMoE's
        JetMoeParallelExperts): expert e's Hessian from its own block of rows; the up bank counts routing."""
        down = us[0].proj == "down_proj"
        want = any(u.name in self.wanted for u in us)
        if want and self.weight_by_routing:
            raise NotImplementedError(f"{self.layer_prefix}.{path}: weight_by_routing needs the routing weights, "
                                      f"which {path} is not given (it sees expert-sorted rows only)")

        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            inputs, expert_size = (list(args) + [kwargs.get(n) for n in ("inputs", "expert_size")[len(args):]])[:2]
            E = mod.weight.shape[0]
            counts = torch.as_tensor(expert_size, dtype=torch.long)
            if not down:
                self._add_counts(counts)
            if not want:
                return
            x = inputs.float()
            H = x.new_zeros(E, x.shape[-1], x.shape[-1])
            for e, xe in enumerate(x.split(list(expert_size))):
                H[e] = xe.T @ xe
            self._add(f"{path}:{'down' if down else 'up'}", H, counts)

        return hook

    def _shared_banks_hook(self, path: str, us: list[Unit]):
        """Shared experts in 3D banks ``gate_proj`` / ``up_proj`` [S, I, H], ``down_proj`` [S, H, I],
        called as ``(hidden_states, gammas [..., S])`` (Inkling): every token reaches each of them."""
        want_up, want_down, _ = self._wants(us)

        @torch.no_grad()
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden, gammas = (list(args) + [kwargs.get(n) for n in ("hidden_states", "gammas")[len(args):]])[:2]
            x = hidden.reshape(-1, hidden.shape[-1]).float()  # [T, H]
            S, T = mod.gate_proj.shape[0], x.shape[0]
            n = torch.full((S,), T, dtype=torch.long)
            if want_up:
                self._add(f"{path}:up", (x.T @ x).expand(S, -1, -1).clone(), n)
            if want_down:
                g = gammas.reshape(T, S).float()
                h = torch.stack([mod.act_fn(x @ mod.gate_proj[s].float().T) * (x @ mod.up_proj[s].float().T)
                                 * g[:, s:s + 1] for s in range(S)])  # [S, T, I]: down_proj's inputs
                self._add(f"{path}:down", h.transpose(1, 2) @ h, n)

        return hook

    def _routed_rows(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, E: int):
        """Per expert hit by ``top_k_index``: (e, its tokens' rows of x, the sqrt routing-weight scale
        with ``weight_by_routing`` else None)."""
        for e in range(E):
            hit = top_k_index == e  # [T, k]
            rows = hit.any(-1)
            if not rows.any():
                continue
            scale = None
            if self.weight_by_routing:
                scale = (top_k_weights[rows] * hit[rows]).sum(-1, keepdim=True).float().sqrt()
            yield e, x[rows], scale

    @torch.no_grad()
    def _bank_hessians(self, path, mod, rows, x: torch.Tensor, want_up: bool, want_down: bool, I: int) -> None:
        """Adds Σ xxᵀ per expert of the bank at ``path`` from ``rows``: (e, inputs [T_e, K], scale or None),
        taken from ``x`` (float32, [..., K]); down_proj's inputs are recomputed from the module's current
        gate/up weights."""
        E, K = mod.num_experts, x.shape[-1]
        H_up = x.new_zeros(E, K, K) if want_up else None
        H_down = x.new_zeros(E, I, I) if want_down else None
        n = torch.zeros(E, dtype=torch.long)
        for e, xe, scale in rows:
            n[e] = xe.shape[0]
            xs = xe * scale if scale is not None else xe
            if want_up:
                H_up[e] = xs.T @ xs
            if want_down:
                h = _down_input(mod, e, xe)
                hs = h * scale if scale is not None else h
                H_down[e] = hs.T @ hs
        if want_up:
            self._add(f"{path}:up", H_up, n)
        if want_down:
            self._add(f"{path}:down", H_down, n)

    def sum_over_ranks(self, what: str) -> None:
        """Under torch.distributed with the calibration split over ranks: every statistic becomes
        the sum over ranks (one all-reduce each; the same bits on every rank).

        Raises:
            DistributedError: a collective failed, or the ranks gathered different statistics.
        """
        from moe_ao.distributed import DistributedError, gather_objects, sum_over_ranks, world

        if world()[1] == 1:
            return
        keys = sorted(self.H)
        everyone = gather_objects((keys, self.routing_counts is not None), f"the statistics kept for {what}")
        if any(k != everyone[0] for k in everyone):
            raise DistributedError(f"{what}: the ranks observed different statistics {everyone}; every rank "
                                   f"needs at least one calibration batch")
        for k in keys:
            self.H[k] = sum_over_ranks(self.H[k], f"Hessians of {what}")
            self.n[k] = sum_over_ranks(self.n[k], f"token counts of {what}")
        if self.routing_counts is not None:
            self.routing_counts = sum_over_ranks(self.routing_counts, f"routing counts of {what}")
        totals = sum_over_ranks(torch.tensor([self.entropy_sum, float(self.entropy_tokens)], dtype=torch.float64),
                                f"router entropy of {what}")
        self.entropy_sum, self.entropy_tokens = float(totals[0]), int(totals[1])

    # --------------------------------------------------------------- results
    def hessian(self, unit: Unit) -> tuple[torch.Tensor, int]:
        """Mean xxᵀ [K, K] over the unit's inputs and how many tokens it saw."""
        path = _module_path(unit.param, self.layer_prefix)
        if unit.fused:
            key = f"{path}:{'down' if unit.proj == 'down_proj' else 'up'}"
            H, n = self.H[key][unit.expert], int(self.n[key][unit.expert])
        else:
            H, n = self.H[path], int(self.n[path])
        return H / max(n, 1), n

    def pooled_hessian(self, unit: Unit) -> tuple[torch.Tensor, int]:
        """The mean xxᵀ over every token of the unit's experts bank (rare-expert fallback)."""
        path = _module_path(unit.param, self.layer_prefix)
        key = f"{path}:{'down' if unit.proj == 'down_proj' else 'up'}"
        n = int(self.n[key].sum())
        return self.H[key].sum(0) / max(n, 1), n

    def hessian_or_fallback(self, unit: Unit, min_tokens: int) -> tuple[torch.Tensor | None, str | None, int]:
        """The unit's mean Hessian, or its rare-expert fallback.

        An expert that saw fewer than ``min_tokens`` tokens (below its in_features, xxᵀ
        cannot have full rank and GPTQ would overfit the few it saw) gets its bank's
        pooled Hessian; if even that saw fewer, None (quantize it with RTN).

        Returns:
            (H or None for RTN, None / "pooled" / "rtn", tokens the unit saw).

        Raises:
            ValueError: the Hessian is not finite (names the unit).
        """
        H, n = self.hessian(unit)
        fallback = None
        if n < min_tokens:
            H, fallback = None, "rtn"
            if unit.fused:
                pooled, total = self.pooled_hessian(unit)
                if total >= min_tokens:
                    H, fallback = pooled, "pooled"
        if H is not None and not torch.isfinite(H).all():
            raise ValueError(
                f"{unit.name}: its input Hessian has {(~torch.isfinite(H)).sum().item()} NaN/Inf values "
                f"(the layer's inputs overflowed or a module before it is not finite)"
            )
        return H, fallback, n

    def router_entropy(self) -> float | None:
        return self.entropy_sum / self.entropy_tokens if self.entropy_tokens else None
