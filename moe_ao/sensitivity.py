"""Measured sensitivities: the output KL divergence of quantizing one unit alone.

For every requested unit u and width b, u's weight is replaced by its quantized version
(GPTQ from the float model's own Hessians, or RTN) while every other weight stays
float, and the model's next-token distribution on calibration text is compared with
the float model's:

    s[u][b] = mean over tokens t of KL(p_float(. | t) || p_{u at b bits}(. | t)).

This is the budget optimizer's most faithful input. A layer-local proxy such as
tr((W - Q) H (W - Q)ᵀ) cannot tell that an error in layer 0's q_proj moves the output
a hundred times more than the same error in layer 6's: the measured KL does, so units
of every kind and depth are ranked on one scale. Summing single-unit KLs assumes the
units' effects add, which holds to first order for small, independent errors.

Cost: per (unit, width) one forward of the layers from u's own onwards over the
measured tokens, about ``n_units * n_widths * n_layers / 2`` layer forwards in all,
plus one pass over every calibration window per layer for GPTQ's Hessians. On the
embedded 7-layer models (196 / 337 units, widths {2, 3, 4, 8}, 16 x 256 tokens) that
is 3-6 minutes per model on two idle CPU cores (tiny-mixtral: 346 s). The Hessian proxy
(:func:`moe_ao.planner.scorers.sensitivity_table`) costs one profiling pass and is the
scalable choice for models with thousands of experts.

Distributed: under torch.distributed (``torchrun``) each rank measures every
world-size-th unit of each layer and the tables are gathered, identical to one process's.

Precision: 16-bit models run in float32 on CPU (GPUs keep the model's dtype), as the
rounding noise of a 16-bit forward would swamp the KL of one 4- or 8-bit unit. Memory:
a copy of the decoder layers in that dtype, the hidden states of the calibration set at
one layer, and the reference distribution (measured tokens x vocabulary floats).

Shapes: b windows per chunk, L tokens per window, V vocabulary, d hidden size.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moe_ao.calibration import check_token_ids
from moe_ao.discovery import decoder_layers, unit_weight
from moe_ao.discovery import units as model_units
from moe_ao.distributed import gather_dict, mine
from moe_ao.plans import QuantSpec
from moe_ao.primitives import check_finite, scale_dtype_for
from moe_ao.progress import Progress
from moe_ao.quant.batched import quantize_units
from moe_ao.quant.configs import Method
from moe_ao.quant.layerwise import LayerInputs, capture_inputs, run_layer
from moe_ao.quant.observers import LayerObserver
from moe_ao.unit import Unit

logger = logging.getLogger(__name__)

QUANTIZERS = tuple(m.value for m in Method)
OUTSIDE_KINDS = ("lm_head", "embedding")  # the units outside the decoder layers that are measured
HEAD_ELEMENTS = 2**21  # logits per head evaluation (8 MB of float32): see _pieces


class _Feed(nn.Module):
    """Stands in for a decoder layer: returns ``hidden`` when set, else its input."""

    def __init__(self, like: nn.Module) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None
        for attr in ("attention_type", "layer_idx"):  # read by some models' layer loops
            if hasattr(like, attr):
                setattr(self, attr, getattr(like, attr))

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states if self.hidden is None else self.hidden


class Head:
    """The model after its decoder layers (final norm, lm_head), from hidden states to logits.

    A copy of the model whose decoder layers are pass-through stand-ins, the first of
    which emits the given hidden states: the model's own forward code (norm, head,
    logit soft-capping, ...) then maps them to logits, whatever the architecture.

    Args:
        model: the causal LM (not changed).
        dtype: dtype of the copy.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        list_name, layers = decoder_layers(model)
        parent_name, _, attr = list_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, nn.ModuleList(_Feed(layer) for layer in layers))
        try:
            self.shell = copy.deepcopy(model).to(dtype)
        finally:
            setattr(parent, attr, layers)
        self._feed = decoder_layers(self.shell)[1][0]
        self.vocab = int(model.config.vocab_size)

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [b, L, V] for the final hidden states [b, L, d] of token ids [b, L],
        in float32 or wider (float64 stays float64)."""
        return self.forward(ids, hidden)

    def forward(self, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """:meth:`logits` under the caller's grad mode (differentiable in ``hidden``)."""
        self._feed.hidden = hidden
        try:
            z = self.shell(ids.to(hidden.device), use_cache=False).logits
        finally:
            self._feed.hidden = None
        return z.to(torch.promote_types(z.dtype, torch.float32))


class _Reference:
    """The float model's distribution on the measured chunks, and KL(float || other).

    With p = softmax(z_ref) and the other model's logits z = z_ref + δ, per token

        KL(p || softmax(z)) = log(Σ_v p_v e^δ_v) - Σ_v p_v δ_v,

    an exact identity whose terms are small where the models agree: an unchanged model
    gives exactly 0, and a tiny change is not lost in the rounding of two log-softmaxes
    of size ~10 (float32 rounds those at ~1e-6, more than a single 8-bit unit's KL).
    p is renormalised by its float64 sum s0, since in float32 Σ_v p_v is 1 only to ~1e-7.
    """

    def __init__(self, head: Head, chunks: list[torch.Tensor], final: LayerInputs) -> None:
        self.head, self.chunks = head, chunks
        self.logits: list[torch.Tensor] = []  # per piece z_ref [b, L, V]
        self.probs: list[torch.Tensor] = []  # per piece p [b, L, V]
        self.mass: list[torch.Tensor] = []  # per piece s0 = Σ_v p [b, L], float64
        for ids, h in _pieces(self.chunks, final.hidden, self.head.vocab):
            z = head.logits(ids, h)
            p = torch.softmax(z, dim=-1)
            self.logits.append(z)
            self.probs.append(p)
            self.mass.append(p.sum(-1, dtype=torch.float64))
        self.tokens = sum(ids.numel() for ids in chunks)

    def kl(self, final: LayerInputs) -> float:
        """Mean per-token KL(float || model whose last hidden states are ``final``), >= 0."""
        total = 0.0
        pieces = _pieces(self.chunks, final.hidden, self.head.vocab)
        for z_ref, p, s0, (ids, h) in zip(self.logits, self.probs, self.mass, pieces):
            total += _kl_sum(z_ref, p, s0, self.head.logits(ids, h))
        return max(0.0, total / self.tokens)  # float64 rounding can leave an ~0 KL a hair below zero


def _pieces(chunks: Sequence[torch.Tensor], hidden: Sequence[torch.Tensor],
            vocab: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, hidden) in pieces of about HEAD_ELEMENTS logits: the [b, L, V] temporaries of a
    whole chunk would exceed malloc's mmap threshold and fault in fresh pages on every
    measurement (measured on tiny-mixtral: 70% of the time in the kernel, 1.7x slower)."""
    for ids, h in zip(chunks, hidden):
        step = max(1, HEAD_ELEMENTS // (ids.shape[1] * vocab))
        yield from zip(ids.split(step), h.split(step))


def _kl_sum(z_ref: torch.Tensor, p: torch.Tensor, s0: torch.Tensor, z: torch.Tensor) -> float:
    """Σ over tokens of KL(softmax(z_ref) || softmax(z)) by the identity in :class:`_Reference`."""
    d = z - z_ref  # δ [b, L, V]
    m = d.amax(-1, keepdim=True)  # log Σ p e^δ = m + log Σ p e^(δ-m): no overflow
    s1 = (p * torch.exp(d - m)).sum(-1, dtype=torch.float64)
    s2 = (p * d).sum(-1, dtype=torch.float64)
    return float((m.squeeze(-1).double() + torch.log(s1 / s0) - s2 / s0).sum())


def head_kls(head: Head, chunks: Sequence[torch.Tensor], final: Sequence[torch.Tensor], units: Sequence[Unit],
             quant: _Quantize) -> dict[str, dict[int, float]]:
    """Per lm_head unit and width, the mean per-token KL of quantizing the head alone.

    The head is quantized with RTN, as ``quantize_`` does outside the decoder layers, and
    evaluated on the float model's final hidden states ``final`` of the token ids
    ``chunks``, piece by piece (no [n, L, V] logits are kept).
    """
    tokens = sum(ids.numel() for ids in chunks)
    return {name: {b: max(0.0, float(v) / tokens) for b, v in zip(quant.bits, sums.sum(0))}
            for name, sums in head_kl_sums(head, chunks, final, units, quant).items()}


def head_kl_sums(head: Head, chunks: Sequence[torch.Tensor], final: Sequence[torch.Tensor], units: Sequence[Unit],
                 quant: _Quantize) -> dict[str, torch.Tensor]:
    """:func:`head_kls` before the mean: per unit, the KL summed over each chunk's tokens,
    float64 [chunks, widths]."""
    table: dict[str, torch.Tensor] = {}
    for u in units:
        view = unit_weight(head.shell, u)
        saved = view.detach().clone()
        check_finite(saved, u.name)
        cands = [_candidates({u.name: saved}, [u], {}, b, quant)[u.name] for b in quant.bits]
        sums = torch.zeros(len(chunks), len(quant.bits), dtype=torch.float64)
        try:
            for c, (ids_chunk, h_chunk) in enumerate(zip(chunks, final)):
                for ids, h in _pieces([ids_chunk], [h_chunk], head.vocab):
                    view.copy_(saved)
                    z_ref = head.logits(ids, h)
                    p = torch.softmax(z_ref, dim=-1)
                    s0 = p.sum(-1, dtype=torch.float64)
                    for j, W in enumerate(cands):
                        view.copy_(W)
                        sums[c, j] += _kl_sum(z_ref, p, s0, head.logits(ids, h))
        finally:
            view.copy_(saved)
        table[u.name] = sums
    return table


def check_head(model: nn.Module, units: Sequence[Unit]) -> None:
    """Raises ValueError when an lm_head or embedding unit's weight is tied to the other
    (``quantize_`` quantizes such a pair only as one tensor, so neither has a KL alone)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = emb is not None and head is not None and head.weight is emb.weight
    for u in units:
        if tied and u.kind in ("lm_head", "embedding"):
            other = "input embedding" if u.kind == "lm_head" else "output head"
            raise ValueError(f"{u.name}: its weight is tied to the {other}; one unit of the pair has no KL of "
                             f"its own: untie it (or leave {u.kind} out of the planned kinds) to measure it")


def embedding_inputs(model: nn.Module, u: Unit, ids: torch.Tensor, batch_size: int, quant: _Quantize,
                     dtype: torch.dtype, use: Callable[[int, LayerInputs], None]) -> None:
    """Per width b, ``use(b, inputs)`` with layer 0's inputs on the windows ``ids`` while the
    embedding unit u alone is quantized at b bits (RTN, as ``quantize_`` quantizes it), through
    the model's own embedding code (scaling, positions); the model's weight is restored after."""
    view = unit_weight(model, u)
    saved = view.detach().clone()
    check_finite(saved, u.name)
    try:
        for b in quant.bits:
            view.copy_(_candidates({u.name: saved}, [u], {}, b, quant)[u.name])
            use(b, capture_inputs(model, ids, batch_size).to(dtype))
    finally:
        view.copy_(saved)


def embedding_kls(model: nn.Module, work: Sequence[nn.Module], measured: torch.Tensor, batch_size: int,
                  units: Sequence[Unit], ref: _Reference, quant: _Quantize,
                  dtype: torch.dtype) -> dict[str, dict[int, float]]:
    """Per embedding unit and width, the mean per-token KL of quantizing the embedding alone:
    the float layers and head run on the inputs it gives layer 0."""
    table: dict[str, dict[int, float]] = {}
    for u in units:
        def put(b: int, inputs: LayerInputs, row: dict[int, float] = table.setdefault(u.name, {})) -> None:
            row[b] = ref.kl(_tail(work, 0, inputs))

        embedding_inputs(model, u, measured, batch_size, quant, dtype, put)
    return table


def _tail(layers: Sequence[nn.Module], start: int, inputs: LayerInputs) -> LayerInputs:
    for layer in layers[start:]:
        inputs = run_layer(layer, inputs)
    return inputs


def _local(u: Unit, prefix: str) -> Unit:
    """The unit with its parameter named relative to its decoder layer."""
    return Unit(**{**u.__dict__, "param": u.param[len(prefix) + 1 :]})


def _hessians(
    layer: nn.Module, prefix: str, units: list[Unit], layer_units: list[Unit], inputs: LayerInputs
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Each unit's GPTQ Hessian on the float layer, with the GPTQ driver's rare-expert fallbacks."""
    with LayerObserver(prefix, layer, layer_units, {u.name for u in units}) as obs:
        run_layer(layer, inputs)
    hessians, fallbacks = {}, {}
    for u in units:
        H, fallback, _ = obs.hessian_or_fallback(u, u.shape[1])
        if fallback:
            fallbacks[u.name] = fallback
        if H is not None:
            hessians[u.name] = H
    return hessians, fallbacks


@dataclass(frozen=True)
class _Quantize:
    """How the candidates are quantized: widths, per-unit group sizes, symmetry, scale dtype."""

    bits: Sequence[int]
    group_sizes: dict[str, int]
    symmetric: bool
    scale_dtype: torch.dtype


def _candidates(
    weights: dict[str, torch.Tensor], units: list[Unit], hessians: dict[str, torch.Tensor], bits: int,
    quant: _Quantize,
) -> dict[str, torch.Tensor]:
    """unit -> its weight quantized at ``bits`` and dequantized [R, K]: GPTQ where it has a Hessian, else RTN."""
    specs = {u.name: QuantSpec(bits, quant.group_sizes[u.name], quant.symmetric) for u in units}
    results, _ = quantize_units({u.name: weights[u.name] for u in units}, specs, hessians, quant.scale_dtype)
    return {name: q.dequantize(weights[name].dtype) for name, q in results.items()}


@contextmanager
def _swapped(layer: nn.Module, u: Unit, prefix: str, W: torch.Tensor) -> Iterator[None]:
    view = unit_weight(layer, _local(u, prefix))
    saved = view.detach().clone()
    with torch.no_grad():
        view.copy_(W)
    try:
        yield
    finally:
        with torch.no_grad():
            view.copy_(saved)


def _layer_kls(work: Sequence[nn.Module], i: int, lp: str, units: list[Unit], layer_units: list[Unit],
               inputs: LayerInputs, hess_inputs: LayerInputs | None, ref: _Reference, quant: _Quantize,
               table: dict[str, dict[int, float]], bar: Progress) -> dict[str, str]:
    """Fills ``table`` with the KL of each of layer i's ``units`` quantized alone at each width
    (GPTQ from the Hessians of ``hess_inputs``, or RTN without them), the layer's other
    weights and all other layers left float. Returns the units whose GPTQ fell back."""
    layer = work[i]
    weights = {u.name: unit_weight(layer, _local(u, lp)).detach().clone() for u in units}
    for u in units:
        check_finite(weights[u.name], u.name)
    hessians: dict[str, torch.Tensor] = {}
    fallbacks: dict[str, str] = {}
    if hess_inputs is not None:
        hessians, fallbacks = _hessians(layer, lp, units, layer_units, hess_inputs)
    ours = mine(units)  # under torch.distributed each rank measures every world-size-th unit
    for b in quant.bits:
        cands = _candidates(weights, ours, hessians, b, quant)
        for u in ours:
            with _swapped(layer, u, lp, cands[u.name]):
                table.setdefault(u.name, {})[b] = ref.kl(_tail(work, i, inputs))
            bar.update()
    return fallbacks


def _check_args(calibration: torch.Tensor, units: Sequence[Unit], group_sizes: dict[str, int], quantizer: str,
                kl_windows: int, model_config: Any) -> None:
    Method.parse(quantizer, "quantizer")
    check_token_ids(calibration, model_config)
    if isinstance(kl_windows, bool) or not isinstance(kl_windows, int) or kl_windows < 1:
        raise ValueError(f"kl_windows={kl_windows!r}; allowed: a positive int")
    bad = [u.name for u in units if (u.layer is None and u.kind not in OUTSIDE_KINDS) or u.kind == "router"]
    if bad:
        raise ValueError(f"KL sensitivities are measured for decoder-layer linears, lm_head and embeddings only; "
                         f"got routers or other units outside the decoder layers: {bad[:3]}")
    missing = [u.name for u in units if u.name not in group_sizes]
    if missing:
        raise ValueError(f"group_sizes lacks {len(missing)} units, e.g. {missing[:3]}")


def default_compute_dtype(param: torch.Tensor) -> torch.dtype:
    """float32 for 16-bit weights on CPU (slow and lossy there), else the weights' dtype."""
    low = param.dtype in (torch.bfloat16, torch.float16) and param.device.type == "cpu"
    return torch.float32 if low else param.dtype


@torch.no_grad()
def kl_sensitivities(
    model: nn.Module,
    calibration: torch.Tensor,
    units: Sequence[Unit],
    group_sizes: dict[str, int],
    bits: Sequence[int] = (2, 3, 4, 8),
    *,
    symmetric: bool = True,
    quantizer: str = "gptq",
    kl_windows: int = 16,
    batch_size: int = 8,
    compute_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> tuple[dict[str, dict[int, float]], dict[str, Any]]:
    """Per unit and width, the calibration KL of quantizing that unit alone.

    Args:
        model: the float model (not changed).
        calibration: int64 [n, L] token windows. GPTQ's Hessians use all of them; the
            KL is measured on the first ``kl_windows``.
        units: the units to measure: decoder-layer linears (not routers), an untied lm_head
            (RTN, as ``quantize_`` quantizes it, on the float model's final hidden states) and
            an untied input embedding (RTN; every float layer runs on what it gives layer 0).
        group_sizes: unit name -> group size.
        bits: widths to measure.
        symmetric: quantization symmetry.
        quantizer: ``gptq`` (act-order, one pass from the float model's Hessians;
            experts with fewer routed tokens than in_features use their layer's pooled
            Hessian, then RTN, as the GPTQ driver does) or ``rtn``.
        kl_windows: calibration windows the KL is measured on (cost is linear in it).
        batch_size: windows per forward.
        compute_dtype: forward dtype (default: float32 for 16-bit models on CPU, else
            the model's dtype).
        progress: show a progress bar.

    Returns:
        ({unit name: {bits: KL}} with every KL >= 0, meta: quantizer, measured tokens,
        dtype, and the number of units whose GPTQ fell back to RTN).

    Raises:
        ValueError: an unknown quantizer, bad calibration or kl_windows, a router, a
            tied lm_head or embedding, a unit without a group size, or NaN/Inf
            weights (naming the unit).
    """
    _check_args(calibration, units, group_sizes, quantizer, kl_windows, model.config)
    check_head(model, units)
    param = next(model.parameters())
    if compute_dtype is None:
        compute_dtype = default_compute_dtype(param)
    scale_dtype = scale_dtype_for(param.dtype)
    prefix, layers = decoder_layers(model)
    work = [copy.deepcopy(layer).to(compute_dtype) for layer in layers]
    measured = calibration[:kl_windows]
    chunks = [c.to(param.device) for c in measured.split(batch_size)]
    inputs = capture_inputs(model, measured, batch_size).to(compute_dtype)
    hess_inputs = capture_inputs(model, calibration, batch_size).to(compute_dtype) if quantizer == "gptq" else None
    ref = _Reference(Head(model, compute_dtype), chunks, _tail(work, 0, inputs))
    todo: dict[int, list[Unit]] = defaultdict(list)
    for u in units:
        todo[u.layer].append(u)
    layer_units: dict[int, list[Unit]] = defaultdict(list)
    for u in model_units(model):  # the observer needs every unit of a layer, routers included
        if u.layer is not None:
            layer_units[u.layer].append(u)
    table: dict[str, dict[int, float]] = {}
    fallbacks: dict[str, str] = {}
    bar = Progress(len(units) * len(bits), "KL sensitivities", progress)
    quant = _Quantize(tuple(bits), group_sizes, symmetric, scale_dtype)
    for i, layer in enumerate(work):
        if todo.get(i):
            fallbacks |= _layer_kls(work, i, f"{prefix}.{i}", todo[i], layer_units[i], inputs, hess_inputs, ref,
                                    quant, table, bar)
        inputs = run_layer(layer, inputs)
        if hess_inputs is not None:
            hess_inputs = run_layer(layer, hess_inputs)
    heads = mine([u for u in todo.get(None, []) if u.kind == "lm_head"])  # after the float layers
    table |= head_kls(ref.head, chunks, inputs.hidden, heads, quant)
    embeds = mine([u for u in todo.get(None, []) if u.kind == "embedding"])  # through every float layer
    table |= embedding_kls(model, work, measured, batch_size, embeds, ref, quant, compute_dtype)
    bar.update((len(heads) + len(embeds)) * len(bits))
    bar.close()
    table = gather_dict(table, "KL sensitivities")
    if fallbacks:
        logger.info("KL sensitivities: GPTQ fell back for %d rare units", len(fallbacks))
    meta = {"quantizer": quantizer, "kl_tokens": int(measured.numel()), "dtype": str(compute_dtype).split(".")[-1],
            "fallbacks": len(fallbacks)}
    return {u.name: table[u.name] for u in units}, meta
