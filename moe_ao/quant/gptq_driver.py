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

Distributed: under torch.distributed (``torchrun``) each phase's units (a layer's
experts, mostly) are split round-robin over the ranks: each solves its own and the
codes are gathered, so every rank writes the same quantized weights back and the next
phase sees them. By default every rank runs every calibration forward, and the codes
are bit-identical to one process's. With ``split_calibration`` rank r runs only
batches r, r + N, ... (and carries only their hidden states from layer to layer); the
Hessians, token and routing counts of each phase are summed over the ranks with one
all-reduce each (``LayerObserver.sum_over_ranks``: every rank gets the same bits).
That divides the forwards, the bulk of GPTQ's time, by N, at the price of exact
equality: a Hessian summed as (rank 0's batches) + (rank 1's) differs from the
sequential sum in float32 rounding (~1e-7 relative), which can flip a rounding, and
GPTQ's error feedback carries a flip into the later codes of its row: the result is
another solution of the same quality. The resume state holds every rank's hidden
states, in batch order.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from typing import Any

import torch
from torch import nn

from moe_ao.calibration import check_token_ids
from moe_ao.discovery import decoder_layers, unit_weight
from moe_ao.distributed import gather_dict, gather_objects, mine, world
from moe_ao.plans import Plan
from moe_ao.primitives import QuantizedWeight, check_finite, check_finite_params, scale_dtype_for
from moe_ao.progress import progress
from moe_ao.quant.assemble import pack_param, record_units, units_by_param
from moe_ao.quant.batched import quantize_units
from moe_ao.quant.configs import GPTQConfig
from moe_ao.quant.layerwise import LayerInputs, capture_inputs, run_layer
from moe_ao.quant.observers import LayerObserver
from moe_ao.tensors.packed import PackedWeight
from moe_ao.unit import Unit

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


def _quantize_phase(
    layer: nn.Module, prefix: str, obs: LayerObserver, units: list[Unit], plan: Plan, config: GPTQConfig,
    stored: torch.dtype, results: dict[str, QuantizedWeight], record: dict[str, Any],
) -> None:
    weights, hessians = {}, {}
    for u in units:
        W = unit_weight(layer, Unit(**{**u.__dict__, "param": u.param[len(prefix) + 1 :]})).detach()
        check_finite(W, u.name)
        H, fallback, n = obs.hessian_or_fallback(u, config.min_tokens or u.shape[1])
        record["tokens"][u.name] = n
        if fallback:
            record["fallbacks"][u.name] = fallback
        weights[u.name] = W
        if H is not None:
            hessians[u.name] = H
    ours = {u.name for u in mine(units)}  # under torch.distributed each rank solves every world-size-th unit
    quantized, losses = quantize_units({n: W for n, W in weights.items() if n in ours},
                                       {u.name: plan[u.name] for u in units}, hessians,
                                       scale_dtype_for(stored), damp=config.damp, blocksize=config.blocksize,
                                       act_order=config.act_order)
    results.update(gather_dict(quantized, f"GPTQ codes of {prefix}"))
    record["loss"].update(gather_dict(losses, f"GPTQ losses of {prefix}"))
    for u in units:
        _write_back(layer, prefix, u, results[u.name])


class LayerwiseGPTQ:
    """GPTQ over a model's decoder layers, one :meth:`layer` call per layer.

    ``gptq_packed`` runs every layer in a row; a streaming caller runs them one by one,
    writing each layer's packed tensors out and checkpointing the calibration state
    (:meth:`state`) so a killed run can resume after its last finished layer.

    Args:
        model: the float model (its decoder layers must hold real weights when their
            :meth:`layer` runs; the embeddings when :meth:`first_inputs` runs).
        plan: the validated plan.
        planned: units to quantize (bits < 16).
        all_units: every unit of the model (as ``moe_ao.units`` returned them).
        config: the calibration and GPTQ options.
        report: QuantizationReport; per-unit errors go to ``report.quantized``, and
            tokens, fallbacks and GPTQ losses to ``report.extra`` (by :meth:`finish`).

    Raises:
        ValueError: token ids outside the vocabulary.
    """

    def __init__(self, model: nn.Module, plan: Plan, planned: list[Unit], all_units: list[Unit],
                 config: GPTQConfig, report: Any) -> None:
        check_token_ids(config.calibration, model.config)
        self.model, self.plan, self.config, self.report = model, plan, config, report
        self.prefix, self.layers = decoder_layers(model)
        first = next(p for p in model.parameters() if p.is_floating_point())
        self.stored = first.dtype
        # bf16/fp16 arithmetic is slow on most CPUs (no native units), and GPTQ's Hessians
        # want float32 anyway: calibrate CPU models in float32, GPU models in their dtype.
        on_cpu = first.device.type in ("cpu", "meta")
        self.compute_dtype = config.compute_dtype or (torch.float32 if on_cpu else self.stored)
        self.by_layer: dict[int, list[Unit]] = defaultdict(list)
        # Planned units outside the decoder layers (lm_head, embeddings) have no layer inputs to
        # calibrate on here: the caller quantizes them with RTN (report.extra["rtn_outside_layers"]).
        self.outside = [u.name for u in planned if u.layer is None]
        for u in planned:
            if u.layer is not None:
                self.by_layer[u.layer].append(u)
        self.layer_units: dict[int, list[Unit]] = defaultdict(list)
        for u in all_units:
            if u.layer is not None:
                self.layer_units[u.layer].append(u)
        self.record: dict[str, Any] = {"tokens": {}, "fallbacks": {}, "loss": {}, "routing_counts": {}}

    @property
    def split(self) -> bool:
        """True when this rank calibrates on its share of the batches only."""
        return self.config.split_calibration and world()[1] > 1

    def first_inputs(self) -> LayerInputs:
        """The calibration set's inputs of layer 0 (this rank's batches with ``split_calibration``),
        in the compute dtype.

        Raises:
            ValueError: fewer calibration batches than ranks to split them over.
        """
        inputs = capture_inputs(self.model, self.config.calibration, self.config.batch_size).to(self.compute_dtype)
        return self.own(inputs)

    def own(self, inputs: LayerInputs) -> LayerInputs:
        """This rank's share of the whole set's ``inputs`` (batches rank, rank + N, ...), or all of them."""
        if not self.split:
            return inputs
        size = world()[1]
        if len(inputs.hidden) < size:
            raise ValueError(f"split_calibration: {len(inputs.hidden)} calibration batches of {self.config.batch_size}"
                             f" windows cannot be split over {size} ranks; lower batch_size or add windows")
        return LayerInputs(mine(inputs.hidden), mine(inputs.kwargs))

    def whole(self, inputs: LayerInputs) -> LayerInputs:
        """Every rank's share put back together in batch order (for the resume state), or ``inputs``."""
        if not self.split:
            return inputs
        parts = gather_objects((inputs.hidden, inputs.kwargs), "the calibration hidden states")
        size, n = len(parts), sum(len(h) for h, _ in parts)
        return LayerInputs([parts[c % size][0][c // size] for c in range(n)],
                           [parts[c % size][1][c // size] for c in range(n)])

    def layer(self, i: int, inputs: LayerInputs) -> tuple[dict[str, PackedWeight], LayerInputs]:
        """Quantizes layer i on ``inputs``; returns its packed parameters and layer i+1's inputs.

        Raises:
            ValueError: a non-finite weight in the layer, or a non-finite Hessian (named).
        """
        prefix = f"{self.prefix}.{i}"
        check_finite_params(self.layers[i], prefix)
        results: dict[str, QuantizedWeight] = {}
        work = copy.deepcopy(self.layers[i]).to(self.compute_dtype)
        phase_of = _phase if self.config.true_sequential else (lambda u: 0)
        units_i = self.by_layer.get(i, [])
        for phase in sorted({phase_of(u) for u in units_i}):
            phase_units = [u for u in units_i if phase_of(u) == phase]
            with LayerObserver(prefix, work, self.layer_units[i], {u.name for u in phase_units},
                               self.config.weight_by_routing) as obs:
                run_layer(work, inputs)
            if self.split:
                obs.sum_over_ranks(f"{prefix} phase {phase}")
            _quantize_phase(work, prefix, obs, phase_units, self.plan, self.config, self.stored, results, self.record)
            if obs.routing_counts is not None:
                self.record["routing_counts"][i] = obs.routing_counts.tolist()
        inputs = run_layer(work, inputs)
        del work
        packed = {}
        for fqn, param_units in units_by_param(self.layer_units[i]).items():
            todo = [u for u in param_units if u.name in results]
            if todo:
                packed[fqn], errors = pack_param(self.model, fqn, param_units, results)
                record_units(self.report, todo, results, errors)
        return packed, inputs

    def finish(self) -> None:
        """Puts the run's records (tokens, fallbacks, losses, routing counts) into the report."""
        self.report.extra.update(self.record)
        if self.outside:
            self.report.extra["rtn_outside_layers"] = list(self.outside)
        if self.record["fallbacks"]:
            logger.warning("GPTQ fell back for %d rare units (see report.extra['fallbacks'])",
                           len(self.record["fallbacks"]))


def gptq_packed(
    model: nn.Module,
    plan: Plan,
    planned: list[Unit],
    all_units: list[Unit],
    config: GPTQConfig,
    report: Any,
) -> dict[str, PackedWeight]:
    """GPTQ-quantized, packed parameters for every planned unit, without changing ``model``.

    Each layer's parameters are packed as soon as the layer is done, so unpacked codes
    of only one layer are alive at a time. Arguments as for :class:`LayerwiseGPTQ`.

    Returns:
        parameter FQN -> PackedWeight.

    Planned units outside the decoder layers (lm_head, embeddings) are left to the caller
    (``quantize_`` quantizes them with RTN).

    Raises:
        ValueError: token ids outside the vocabulary or a non-finite parameter.
    """
    check_finite_params(model)  # one NaN anywhere poisons the Hessians of every layer after it
    run = LayerwiseGPTQ(model, plan, planned, all_units, config, report)
    inputs = run.first_inputs()
    packed: dict[str, PackedWeight] = {}
    for i in progress(range(len(run.layers)), "gptq layers", config.progress):
        new, inputs = run.layer(i, inputs)
        packed |= new
    run.finish()
    return packed
