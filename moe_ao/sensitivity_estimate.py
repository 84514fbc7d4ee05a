"""Estimated sensitivities: each unit's output KL to second order, from one forward and one backward pass.

The measured table (:mod:`moe_ao.sensitivity`) runs the rest of the model once per unit
and width. This module estimates the same quantity, the mean per-token
KL(p_float || p_{u at b bits}) of quantizing unit u alone, from the float model's
gradients. For a weight change ΔW the KL's gradient at ΔW = 0 is zero and its Hessian
is the Fisher information of the model's own predictive distribution, so

    KL_t ≈ ½ E_{ŷ ~ p_t}[(⟨∇_W log p_t(ŷ), ΔW⟩)²]                       per position t.

Per calibration window n, with a label ŷ_t sampled from the float model at every
position, the scalar s_n = ⟨ΔW, ∇_W Σ_t log p_t(ŷ_t)⟩ has E[s_n²] = Σ_t E[⟨∇_W log p_t, ΔW⟩²]
(the labels are independent given the text, so cross-position terms have mean zero), and

    est[u][b] = Σ_n mean over samples of s_n² / (2 · windows · L),

with ΔW = W - Q_b(W) the unit's own quantization error (GPTQ from the float layer's
Hessians, exactly the candidates the measured table uses, or RTN). A routed expert's
gradient only flows from the tokens routed to it, scaled by their routing weights, so
its token share is part of the estimate, not a separate factor.

Passes: (1) layer by layer forward over the calibration windows, storing each layer's
input and collecting GPTQ Hessians, then the candidates at every width; (2) the head's
gradient for the sampled labels, then the layers in reverse order, each recomputing its
forward on its stored inputs with autograd to give its input gradient and, per window,
its weight gradient, dotted with every candidate error. Each layer is loaded once per
pass (``layer_scope``), so a streamed model works too.

What it does not see (where it fails):

- higher-order terms: a 2-bit error can be large enough that the KL is no longer
  quadratic in ΔW; the estimate then ranks widths of one unit worse than units of one
  width (measured by ``benchmarks/bench_sensitivity_estimate.py``);
- routing flips: top-k routing is piecewise constant, so a weight change that moves a
  token to other experts downstream is invisible to the gradient;
- sampling noise: with S samples per window over N windows, the estimate's relative
  standard deviation is about sqrt(2 / (N·S)) (18 % at 64 windows and one sample), the
  same draw for every width and unit, so ratios between them are steadier;
- like the measured table it scores each unit alone: summing assumes additive effects.

Distributed: under torch.distributed every rank takes the gradients of every
world-size-th window; the per-window terms are gathered and summed in window order, so
the table equals one process's. With GPTQ candidates every rank runs pass 1 on all
windows (the Hessians need them); with RTN candidates only on its own.

Memory: the layer inputs of the estimated windows at every layer (windows x L x d floats
x layers), each layer's candidates as codes, and one layer's working copy.

Shapes: L tokens per window, d hidden size, V vocabulary, B widths, R x K a unit's weight.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from moe_ao.discovery import decoder_layers, unit_weight
from moe_ao.discovery import units as model_units
from moe_ao.distributed import gather_dict, mine, world
from moe_ao.plans import QuantSpec
from moe_ao.primitives import QuantizedWeight, check_finite, scale_dtype_for
from moe_ao.progress import Progress
from moe_ao.quant.batched import quantize_units
from moe_ao.quant.layerwise import LayerInputs, capture_inputs, layer_scope, run_layer
from moe_ao.quant.observers import LayerObserver
from moe_ao.sensitivity import (
    Head,
    _check_args,
    _local,
    _Quantize,
    check_head,
    default_compute_dtype,
    embedding_inputs,
    head_kl_sums,
)
from moe_ao.unit import Unit

logger = logging.getLogger(__name__)

ESTIMATOR = "fisher-sampled"


def _unit_slice(t: torch.Tensor, u: Unit) -> torch.Tensor:
    """The rows of a parameter-shaped tensor (a weight or its gradient) that are unit u."""
    return t[u.expert][u.rows[0]: u.rows[1]] if u.fused else t


def _working_copy(model: nn.Module, i: int, dtype: torch.dtype) -> nn.Module:
    with layer_scope(model, i):
        layer = copy.deepcopy(decoder_layers(model)[1][i]).to(dtype)
    for p in layer.parameters():
        p.requires_grad_(False)
    return layer


def _candidates(layer: nn.Module, lp: str, units: list[Unit], layer_units: list[Unit], inputs: LayerInputs,
                bits: Sequence[int], group_sizes: dict[str, int], symmetric: bool, scale_dtype: torch.dtype,
                gptq: bool) -> tuple[LayerInputs, dict[str, dict[int, QuantizedWeight]], dict[str, str]]:
    """Runs the float layer once (observing GPTQ Hessians) and, for GPTQ, quantizes its units at
    every width. RTN candidates depend on the weights alone: they are not kept from this pass but
    made again, identically, in the backward pass (:func:`_quantized_at`), so memory holds one
    layer's candidates, not the model's (~4 bytes per weight for four widths).

    Returns (the next layer's inputs, unit -> width -> codes (GPTQ only), units whose GPTQ fell back)."""
    wanted = {u.name for u in units} if gptq else set()
    with LayerObserver(lp, layer, layer_units, wanted) as obs:
        outputs = run_layer(layer, inputs)
    for u in units:
        check_finite(unit_weight(layer, _local(u, lp)).detach(), u.name)
    if not gptq:
        return outputs, {}, {}
    hessians, fallbacks = {}, {}
    for u in units:
        H, fallback, _ = obs.hessian_or_fallback(u, u.shape[1])
        if fallback:
            fallbacks[u.name] = fallback
        if H is not None:
            hessians[u.name] = H
    return outputs, _quantized_at(layer, lp, units, bits, group_sizes, symmetric, scale_dtype, hessians), fallbacks


def _quantized_at(layer: nn.Module, lp: str, units: list[Unit], bits: Sequence[int], group_sizes: dict[str, int],
                  symmetric: bool, scale_dtype: torch.dtype,
                  hessians: dict[str, torch.Tensor]) -> dict[str, dict[int, QuantizedWeight]]:
    """unit -> width -> its codes: GPTQ where ``hessians`` has the unit, RTN otherwise."""
    weights = {u.name: unit_weight(layer, _local(u, lp)).detach() for u in units}
    cands: dict[str, dict[int, QuantizedWeight]] = defaultdict(dict)
    for b in bits:
        specs = {u.name: QuantSpec(b, group_sizes[u.name], symmetric) for u in units}
        results, _ = quantize_units(weights, specs, hessians, scale_dtype)
        for name, q in results.items():
            cands[name][b] = q
    return dict(cands)


def _head_grads(head: Head, ids: list[torch.Tensor], final: LayerInputs, samples: int, seed: int,
                windows: list[int]) -> list[list[torch.Tensor]]:
    """Per window and sample, ∂ Σ_t log p_t(ŷ_t) / ∂ (final hidden states) [1, L, d], ŷ_t ~ p_t
    (window n's labels drawn from its own generator, so they do not depend on who draws them)."""
    out = []
    for n, w, h in zip(windows, ids, final.hidden):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + n)
        with torch.enable_grad():
            x = h.detach().requires_grad_(True)
            logp = torch.log_softmax(head.forward(w, x), dim=-1)  # [1, L, V]
            flat = logp.reshape(-1, logp.shape[-1])
            per_sample = []
            for s in range(samples):
                y = torch.multinomial(flat.detach().exp().float().cpu(), 1, generator=gen).to(flat.device)  # [L, 1]
                (g,) = torch.autograd.grad(flat.gather(1, y).sum(), x, retain_graph=s < samples - 1)
                per_sample.append(g)
        out.append(per_sample)
    return out


def _layer_backward(layer: nn.Module, lp: str, units: list[Unit], cands: dict[str, dict[int, QuantizedWeight]],
                    bits: Sequence[int], inputs: LayerInputs, grads: list[list[torch.Tensor]], need_input: bool,
                    windows: list[int], acc: dict[str, torch.Tensor]) -> None:
    """Recomputes the layer per window, replaces ``grads`` by its input gradients (if ``need_input``)
    and adds each window's squared directional derivatives ⟨ΔW_b, ∇_W⟩² to ``acc[unit][window]`` [B]."""
    local = {u.name: _local(u, lp) for u in units}
    params = sorted({local[u.name].param for u in units})
    named = dict(layer.named_parameters())
    for p in params:
        named[p].requires_grad_(True)
    deltas = {}
    for u in units:
        W = unit_weight(layer, local[u.name]).detach()
        deltas[u.name] = torch.stack([W - cands[u.name][b].dequantize(W.dtype) for b in bits])  # [B, R, K]
    for n, (h, kw) in enumerate(inputs):  # n: position in this rank's share, windows[n]: the window
        with torch.enable_grad():
            x = h.detach().requires_grad_(need_input)
            out = layer(x, **kw)
            out = out[0] if isinstance(out, tuple) else out
            targets = ([x] if need_input else []) + [named[p] for p in params]
            for s, g_out in enumerate(grads[n]):
                got = torch.autograd.grad(out, targets, grad_outputs=g_out, retain_graph=s < len(grads[n]) - 1,
                                          allow_unused=True)
                if need_input:
                    grads[n][s] = got[0]
                by_param = dict(zip(params, got[1:] if need_input else got))
                for u in units:
                    g = by_param[local[u.name].param]
                    if g is not None:  # None: no token reached this parameter (an unused expert bank)
                        G = _unit_slice(g, u)  # [R, K]
                        acc[u.name][windows[n]] += ((deltas[u.name] * G).sum((-2, -1)).double()) ** 2
    for p in params:
        named[p].requires_grad_(False)


def _embedding_terms(model: nn.Module, u: Unit, ids: torch.Tensor, float_inputs: LayerInputs,
                     grads: list[list[torch.Tensor]], quant: _Quantize, dtype: torch.dtype, windows: list[int],
                     acc: torch.Tensor) -> None:
    """An embedding's squared directional derivatives: per window n and width b, the change
    Δh of layer 0's inputs when the embedding alone is quantized at b bits, dotted with
    their gradients ``grads[n]``, squared, into ``acc[windows[n], b]``."""
    col = {b: j for j, b in enumerate(quant.bits)}

    def add(b: int, inputs: LayerInputs) -> None:
        for n, (h, h_float) in enumerate(zip(inputs.hidden, float_inputs.hidden)):
            for g in grads[n]:
                acc[windows[n], col[b]] += float(((h - h_float) * g).sum(dtype=torch.float64)) ** 2

    embedding_inputs(model, u, ids, 1, quant, dtype, add)


def _sum_over_ranks(acc: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every rank's [n_win, B] rows added up (each row is non-zero on one rank only: exact)."""
    rank, size = world()
    if size == 1:
        return acc
    parts = gather_dict({f"{rank}:{k}": v for k, v in acc.items()}, "KL sensitivity estimates")
    return {k: sum((parts[f"{r}:{k}"] for r in range(size)), torch.zeros_like(v)) for k, v in acc.items()}


@torch.no_grad()
def estimate_kl_sensitivities(
    model: nn.Module,
    calibration: torch.Tensor,
    units: Sequence[Unit],
    group_sizes: dict[str, int],
    bits: Sequence[int] = (2, 3, 4, 8),
    *,
    symmetric: bool = True,
    quantizer: str = "gptq",
    windows: int | None = None,
    samples: int = 1,
    seed: int = 0,
    compute_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> tuple[dict[str, dict[int, float]], dict[str, Any]]:
    """Per unit and width, the second-order estimate of the calibration KL of quantizing that unit alone.

    Args:
        model: the float model (not changed; may be streamed from its checkpoint).
        calibration: int64 [n, L] token windows. GPTQ's Hessians use all of them; the
            gradients the first ``windows``.
        units: the units to estimate: decoder-layer linears (not routers), an untied lm_head,
            whose KL is measured exactly instead (RTN, on the windows' final hidden states), and
            an untied input embedding (RTN; its change of layer 0's inputs dotted with their
            gradients).
        group_sizes: unit name -> group size.
        bits: widths to estimate.
        symmetric: quantization symmetry.
        quantizer: ``gptq`` (candidates as in :func:`moe_ao.sensitivity.kl_sensitivities`)
            or ``rtn``.
        windows: calibration windows the gradients are taken on (default: all).
        samples: sampled label sequences per window (noise falls as 1/sqrt(windows·samples);
            each costs one more backward pass).
        seed: seed of the label sampling.
        compute_dtype: dtype of the working copies (default: float32 for 16-bit models on
            CPU, else the model's dtype).
        progress: show a progress bar.

    Returns:
        ({unit name: {bits: estimated KL}} with every value >= 0, meta: estimator, quantizer,
        windows, samples, tokens, dtype, fallbacks).

    Raises:
        ValueError: as :func:`moe_ao.sensitivity.kl_sensitivities`, or ``samples`` / ``windows``
            not positive ints.
    """
    _check_args(calibration, units, group_sizes, quantizer, 1, model.config)
    check_head(model, units)
    for name, v in (("samples", samples), ("windows", 1 if windows is None else windows)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r}; allowed: a positive int")
    param = next(model.parameters())
    if compute_dtype is None:
        compute_dtype = default_compute_dtype(param)
    scale_dtype = scale_dtype_for(param.dtype)
    prefix, layers = decoder_layers(model)
    n_win = calibration.shape[0] if windows is None else min(windows, calibration.shape[0])
    todo: dict[int, list[Unit]] = defaultdict(list)
    for u in units:
        todo[u.layer].append(u)
    layer_units: dict[int, list[Unit]] = defaultdict(list)
    for u in model_units(model):  # the observer needs every unit of a layer, routers included
        if u.layer is not None:
            layer_units[u.layer].append(u)
    bar = Progress(2 * len(layers), "KL sensitivity estimate", progress)
    # Pass 1: forward, one window per chunk (the backward needs each window's own weight gradient).
    # GPTQ's Hessians need every calibration window; RTN candidates only the windows this rank
    # takes the gradients of (under torch.distributed every world-size-th one).
    ours = mine(range(n_win))
    run = list(range(calibration.shape[0])) if quantizer == "gptq" else ours  # the windows pass 1 runs
    at = {n: j for j, n in enumerate(run)}  # window -> its position in the pass's inputs
    inputs = capture_inputs(model, calibration[run], batch_size=1).to(compute_dtype)
    stored: list[LayerInputs] = []
    cands: dict[str, dict[int, QuantizedWeight]] = {}
    fallbacks: dict[str, str] = {}
    for i in range(len(layers)):
        stored.append(LayerInputs([inputs.hidden[at[n]] for n in ours], [inputs.kwargs[at[n]] for n in ours]))
        layer = _working_copy(model, i, compute_dtype)
        lp = f"{prefix}.{i}"
        if todo.get(i):
            inputs, c, fb = _candidates(layer, lp, todo[i], layer_units[i], inputs, bits, group_sizes, symmetric,
                                        scale_dtype, quantizer == "gptq")
            cands |= c
            fallbacks |= fb
        else:
            inputs = run_layer(layer, inputs)
        bar.update()
    head = Head(model, compute_dtype)
    ids = [calibration[n: n + 1].to(param.device) for n in ours]
    final = [inputs.hidden[at[n]] for n in ours]
    # Per unit, window and width [n_win, B]: rows of other ranks' windows stay 0, so the gathered
    # sum is exact and summed in window order. lm_head is not estimated: its KL is measured exactly
    # (summed per window) on the final hidden states.
    acc = {u.name: torch.zeros(n_win, len(bits), dtype=torch.float64) for u in units}
    quant = _Quantize(tuple(bits), group_sizes, symmetric, scale_dtype)
    heads = [u for u in todo.get(None, []) if u.kind == "lm_head"]
    for name, sums in head_kl_sums(head, ids, final, heads, quant).items():
        acc[name][ours] = sums
    grads = _head_grads(head, ids, LayerInputs(final, []), samples, seed, ours)
    del inputs, final
    embeds = [u for u in todo.get(None, []) if u.kind == "embedding"]
    # Pass 2: backward, last layer first: the squared derivatives.
    for i in reversed(range(len(layers))):
        if todo.get(i) or i > 0 or embeds:
            layer = _working_copy(model, i, compute_dtype)
            lp = f"{prefix}.{i}"
            layer_cands = cands if quantizer == "gptq" else _quantized_at(
                layer, lp, todo.get(i, []), bits, group_sizes, symmetric, scale_dtype, {})  # RTN: made again here
            _layer_backward(layer, lp, todo.get(i, []), layer_cands, bits, stored[i], grads, i > 0 or bool(embeds),
                            ours, acc)
            for u in todo.get(i, []):
                cands.pop(u.name, None)  # this layer is done: its GPTQ candidates are not needed again
        if i == 0:
            for u in embeds:  # grads now holds layer 0's input gradients
                _embedding_terms(model, u, calibration[ours], stored[0], grads, quant, compute_dtype, ours, acc[u.name])
        stored[i] = None  # type: ignore[call-overload]
        bar.update()
    bar.close()
    acc = _sum_over_ranks(acc)
    tokens = n_win * calibration.shape[1]
    table = {u.name: {b: max(0.0, float(v)) / (tokens if u.kind == "lm_head" else 2 * samples * tokens)
                      for b, v in zip(bits, acc[u.name].sum(0))} for u in units}
    meta = {"estimator": ESTIMATOR, "quantizer": quantizer, "windows": n_win, "samples": samples,
            "tokens": tokens, "seed": seed, "dtype": str(compute_dtype).split(".")[-1], "fallbacks": len(fallbacks)}
    return table, meta
