"""Sequential, MoE-aware GPTQ over a whole model, driven by a Plan.

Layer l+1 is calibrated on the outputs of the already quantized layer l. Within a
layer the order is "true sequential", as in the paper: q/k/v, then the projections
fed by them, then o_proj, then gate+up of all experts (and shared/dense MLPs), then
all down projections; each phase re-runs the layer so its Hessians see the inputs the
quantized earlier phases produce.

The work happens on a deep copy of each layer, into which the dequantized results are
written; the model itself is only changed by ``quantize_`` once every unit succeeded.

Rare experts: an expert with fewer than ``min_tokens`` routed tokens (default: its
in_features, below which xxᵀ cannot have full rank and GPTQ overfits the few tokens
it saw) is quantized with its layer's pooled Hessian (all tokens that entered the
experts bank); if even that has fewer tokens, with RTN. Each fallback is listed in the
report. A weight column is never zeroed.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from moe_ao.calibration import check_token_ids
from moe_ao.plans import Plan
from moe_ao.quant.assemble import pack_param, record_units, units_by_param
from moe_ao.quant.gptq import gptq_quantize
from moe_ao.quant.layerwise import LayerInputs, capture_inputs, run_layer
from moe_ao.quant.observers import LayerObserver
from moe_ao.quant.primitives import QuantizedWeight, check_finite, check_finite_params, rtn_quantize, scale_dtype_for
from moe_ao.tensors.packed import PackedWeight
from moe_ao.units import Unit, decoder_layers, unit_weight

logger = logging.getLogger(__name__)

# Phases of true-sequential GPTQ, by projection name; names not listed run in the
# attention tail phase (o_proj and friends) or the MLP phases by kind.
PHASES = (
    ("q_proj", "k_proj", "v_proj", "q_a_proj", "kv_a_proj_with_mqa", "qkv_proj", "query_key_value"),
    ("q_b_proj", "kv_b_proj"),
    ("o_proj", "out_proj", "dense"),
    ("gate_proj", "up_proj"),
    ("down_proj",),
)


def _phase(u: Unit) -> int:
    for i, names in enumerate(PHASES):
        if u.proj in names:
            return i
    return 2 if u.kind == "attention" else 3


def _write_back(layer: nn.Module, prefix: str, u: Unit, q: QuantizedWeight) -> None:
    """Writes the dequantized unit into the working copy (fake quantization)."""
    local = u.param[len(prefix) + 1 :]
    W = unit_weight(layer, Unit(**{**u.__dict__, "param": local}))
    with torch.no_grad():
        W.copy_(q.dequantize(W.dtype))


def hessian_for(obs: LayerObserver, u: Unit, min_tokens: int) -> tuple[torch.Tensor | None, str | None, int]:
    """The unit's mean Hessian, or its rare-expert fallback (see the module doc).

    Returns:
        (H or None for RTN, None / "pooled" / "rtn", tokens the unit saw).
    """
    H, n = obs.hessian(u)
    if n >= min_tokens:
        return H, None, n
    if u.fused:
        H, pooled = obs.pooled_hessian(u)
        if pooled >= min_tokens:
            return H, "pooled", n
    return None, "rtn", n


def _quantize_phase(
    layer: nn.Module, prefix: str, obs: LayerObserver, units: list[Unit], plan: Plan,
    opts: dict[str, Any], results: dict[str, QuantizedWeight], record: dict[str, Any],
) -> None:
    # Batch units that share (shape, spec): e.g. all gate/up slices of the experts at one width.
    batches: dict[tuple, list[tuple[Unit, torch.Tensor]]] = defaultdict(list)
    for u in units:
        spec = plan[u.name]
        W = unit_weight(layer, Unit(**{**u.__dict__, "param": u.param[len(prefix) + 1 :]})).detach()
        check_finite(W, u.name)
        min_tokens = opts["min_tokens"] or u.shape[1]
        H, fallback, n = hessian_for(obs, u, min_tokens)
        if H is not None and not torch.isfinite(H).all():
            raise ValueError(f"{u.name}: its input Hessian has {(~torch.isfinite(H)).sum().item()} NaN/Inf values "
                             f"(the layer's inputs overflowed or a module before it is not finite)")
        record["tokens"][u.name] = n
        if fallback:
            record["fallbacks"][u.name] = fallback
        if H is None:
            results[u.name] = rtn_quantize(W, spec.bits, spec.group_size, spec.symmetric, scale_dtype_for(opts["dtype"]))
            continue
        batches[(tuple(W.shape), spec)].append((u, W, H))
    for (_, spec), items in batches.items():
        Ws = torch.stack([w for _, w, _ in items])  # [B, R, K]
        Hs = torch.stack([h for _, _, h in items])  # [B, K, K]
        q, stats = gptq_quantize(
            Ws, Hs, bits=spec.bits, group_size=spec.group_size, symmetric=spec.symmetric,
            scale_dtype=scale_dtype_for(opts["dtype"]), damp=opts["damp"], blocksize=opts["blocksize"],
            act_order=opts["act_order"],
        )
        for i, (u, _, _) in enumerate(items):
            results[u.name] = QuantizedWeight(
                q.codes[i], q.scale[i], None if q.zero is None else q.zero[i], q.bits, q.group_size
            )
            record["loss"][u.name] = float(stats.loss[i])
    for u in units:
        _write_back(layer, prefix, u, results[u.name])


def gptq_packed(
    model: nn.Module,
    plan: Plan,
    planned: list[Unit],
    all_units: list[Unit],
    calibration: torch.Tensor | None,
    report: Any,
    *,
    damp: float = 0.01,
    blocksize: int = 128,
    act_order: bool = True,
    min_tokens: int | None = None,
    weight_by_routing: bool = False,
    batch_size: int = 8,
    compute_dtype: torch.dtype | None = None,
    true_sequential: bool = True,
    progress: bool = True,
) -> dict[str, PackedWeight]:
    """GPTQ-quantized, packed parameters for every planned unit, without changing ``model``.

    Each layer's parameters are packed as soon as the layer is done, so unpacked codes
    of only one layer are alive at a time.

    Args:
        model: the float model.
        plan: the validated plan.
        planned: units to quantize (bits < 16).
        all_units: every unit of the model (as ``moe_ao.units`` returned them; not
            recomputed here, since discovery may run a graph capture).
        calibration: int64 [n, L] token windows (see moe_ao.calibration).
        report: QuantizationReport; per-unit errors go to ``report.quantized``, and
            tokens, fallbacks and GPTQ losses to ``report.extra``.
        damp: GPTQ dampening (fraction of mean diag H).
        blocksize: GPTQ lazy-batch block.
        act_order: GPTQ act-order with static groups (default; the paper ran Mixtral
            without it). Measured on both embedded models it cut KL by 1.4-1.6x at equal
            cost, and it is what llm-compressor does by default.
        min_tokens: tokens below which an expert falls back (default: in_features).
        weight_by_routing: weight expert Hessians by routing weights.
        batch_size: calibration windows per forward.
        compute_dtype: dtype of the layer-wise calibration forward passes (default:
            float32 on CPU, the model's dtype elsewhere).
        true_sequential: quantize a layer in the paper's phases, each re-running the
            layer (default); False collects all of a layer's Hessians in one pass.
        progress: show a progress bar.

    Returns:
        parameter FQN -> PackedWeight.

    Raises:
        ValueError: missing or empty calibration data.
    """
    if calibration is None:
        raise ValueError("method='gptq' needs calibration: int64 [n_samples, seq_len] token ids (moe_ao.load_calibration)")
    check_token_ids(calibration, model.config)
    check_finite_params(model)
    stored = next(model.parameters()).dtype
    # bf16/fp16 arithmetic is slow on most CPUs (no native units), and GPTQ's Hessians
    # want float32 anyway: calibrate CPU models in float32, GPU models in their dtype.
    device = next(model.parameters()).device
    compute_dtype = compute_dtype or (torch.float32 if device.type == "cpu" else stored)
    opts = dict(damp=damp, blocksize=blocksize, act_order=act_order, min_tokens=min_tokens, dtype=stored)
    prefix_list, layers = decoder_layers(model)
    by_layer: dict[int, list[Unit]] = defaultdict(list)
    for u in planned:
        if u.layer is None:
            raise ValueError(f"{u.name}: GPTQ quantizes decoder-layer units only; plan it for method='rtn'")
        by_layer[u.layer].append(u)
    record: dict[str, Any] = {"tokens": {}, "fallbacks": {}, "loss": {}, "routing_counts": {}}
    packed: dict[str, PackedWeight] = {}
    inputs: LayerInputs = capture_inputs(model, calibration, batch_size).to(compute_dtype)
    all_layer_units: dict[int, list[Unit]] = defaultdict(list)
    for u in all_units:
        if u.layer is not None:
            all_layer_units[u.layer].append(u)
    for i in tqdm(range(len(layers)), desc="gptq layers", disable=not progress):
        results: dict[str, QuantizedWeight] = {}
        prefix = f"{prefix_list}.{i}"
        work = copy.deepcopy(layers[i]).to(compute_dtype)
        phase_of = _phase if true_sequential else (lambda u: 0)
        units_i = by_layer.get(i, [])
        for phase in sorted({phase_of(u) for u in units_i}):
            phase_units = [u for u in units_i if phase_of(u) == phase]
            with LayerObserver(prefix, work, all_layer_units[i], {u.name for u in phase_units},
                               weight_by_routing) as obs:
                run_layer(work, inputs)
            _quantize_phase(work, prefix, obs, phase_units, plan, opts, results, record)
            if obs.routing_counts is not None:
                record["routing_counts"][i] = obs.routing_counts.tolist()
        inputs = run_layer(work, inputs)
        del work
        for fqn, param_units in units_by_param(all_layer_units[i]).items():
            todo = [u for u in param_units if u.name in results]
            if todo:
                packed[fqn], errors = pack_param(model, fqn, param_units, results)
                record_units(report, todo, results, errors)
    report.extra.update(record)
    if record["fallbacks"]:
        logger.warning("GPTQ fell back for %d rare units (see report.extra['fallbacks'])", len(record["fallbacks"]))
    return packed
