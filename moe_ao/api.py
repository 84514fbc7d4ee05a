"""``quantize_``: apply a Plan to a model, all or nothing.

Every planned unit is quantized into a new tensor before the model changes; only
when all of them succeeded are the parameters swapped in. A failure anywhere
(validation, NaN weights, a quantizer error) leaves the model exactly as it was.

Quantizers are pluggable: RTN here; GPTQ supplies its own codes and scales per unit
through the same ``QuantizedWeight`` record, and the same packer
(``moe_ao.quant.assemble``) stores both, one parameter (GPTQ: one layer) at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler

from moe_ao import experts as experts_impl
from moe_ao.discovery import unit_weight, units
from moe_ao.plans import Plan, QuantSpec
from moe_ao.primitives import QuantizedWeight, check_finite, rtn_quantize, scale_dtype_for
from moe_ao.quant.assemble import pack_param, record_units, units_by_param
from moe_ao.quant.configs import GPTQConfig, Method, QuantizerConfig, RTNConfig, make_config
from moe_ao.tensors.packed import PackedWeight
from moe_ao.unit import Unit

logger = logging.getLogger(__name__)

PLAN_ATTR = "_moe_ao_plan"
REPORT_ATTR = "_moe_ao_report"


@dataclass
class QuantizationReport:
    """What ``quantize_`` did, unit by unit.

    Attributes:
        method: quantizer name.
        quantized: unit name -> {bits, kind, rel_error} for quantized units.
        kept: unit name -> reason, for units left in floating point.
        extra: quantizer-specific records (e.g. GPTQ fallbacks, tokens per expert).
    """

    method: str
    quantized: dict[str, dict[str, Any]] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "quantized": self.quantized, "kept": self.kept, "extra": self.extra}


def rtn_unit(W: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest quantization of one unit's weight W [out, in] by its spec."""
    q = rtn_quantize(W, spec.bits, spec.group_size, spec.symmetric, scale_dtype=scale_dtype_for(W.dtype))
    return replace(q, act_bits=spec.act_bits)


def _check_ties(model: nn.Module, plan: Plan, all_units: list[Unit]) -> None:
    """Tied weights (an input embedding shared with the head) are quantized once, as one
    tensor: a planned unit whose weight another parameter name shares needs the unit of that
    name planned at the same spec, else ValueError naming both."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    by_param = {u.param: u for u in all_units if not u.fused}
    for u in all_units:
        if u.name in plan and plan[u.name].quantized:
            for other in names.get(id(model.get_parameter(u.param)), []):
                twin = by_param.get(other)
                if other == u.param or (twin is not None and twin.name in plan and plan[twin.name] == plan[u.name]):
                    continue
                hint = (f"plan {twin.name} at the same spec (the shared weight is quantized once) or untie it"
                        if twin is not None else "untie it before quantizing")
                raise ValueError(f"{u.name}: its weight is tied to {other}; {hint}")


def swap_in(model: nn.Module, new: Mapping[str, torch.Tensor]) -> None:
    """Replaces parameters by FQN; all Parameters are made before the first swap."""
    made: dict[int, nn.Parameter] = {}  # one Parameter per tensor: tied names stay tied
    params = {fqn: t if isinstance(t, nn.Parameter) else made.setdefault(id(t), nn.Parameter(t, requires_grad=False))
              for fqn, t in new.items()}
    for fqn, param in params.items():
        owner_name, _, attr = fqn.rpartition(".")
        setattr(model.get_submodule(owner_name), attr, param)


def apply_packed(
    model: nn.Module, plan: Plan, new: Mapping[str, PackedWeight], report: QuantizationReport
) -> nn.Module:
    """Swaps packed tensors in, selects the experts implementation, records plan + report.

    All or nothing: if any step fails, the original parameters and experts
    implementation are put back before the error propagates.
    """
    old_params = {fqn: model.get_parameter(fqn) for fqn in new}
    old_impls = [(c, c._experts_implementation) for c in _configs(model) if hasattr(c, "_experts_implementation")]
    try:
        swap_in(model, new)
        if any(p.ndim == 3 for p in new.values()):
            experts_impl.select(model)
        setattr(model, PLAN_ATTR, plan)
        setattr(model, REPORT_ATTR, report)
    except BaseException:
        swap_in(model, old_params)
        for config, impl in old_impls:
            config._experts_implementation = impl
        for attr in (PLAN_ATTR, REPORT_ATTR):
            model.__dict__.pop(attr, None)
        raise
    logger.info("quantized %d units into %d tensors", len(report.quantized), len(new))
    return model


def _configs(model: nn.Module) -> list[Any]:
    """Every distinct config object reachable from the model's modules."""
    seen: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None:
            seen.setdefault(id(config), config)
    return list(seen.values())


def rtn_packed(
    model: nn.Module, plan: Plan, planned: list[Unit], all_units: list[Unit], report: QuantizationReport,
    params: set[str] | None = None,
) -> dict[str, PackedWeight]:
    """RTN, one parameter at a time (only one parameter's unpacked codes alive); ``params``
    limits it to those parameter FQNs (a streamed model's loaded layer)."""
    planned_names = {u.name for u in planned}
    new = {}
    packed_as: dict[int, tuple[str, QuantizedWeight, float]] = {}  # tensor id -> (FQN, codes, error) packed
    for fqn, param_units in units_by_param(all_units).items():
        if params is not None and fqn not in params:
            continue
        todo = [u for u in param_units if u.name in planned_names]
        if not todo:
            continue
        tied = packed_as.get(id(model.get_parameter(fqn)))
        if tied is not None:  # a name of a tensor packed already (_check_ties made sure the specs agree)
            new[fqn] = new[tied[0]]
            record_units(report, todo, {u.name: tied[1] for u in todo}, {u.name: tied[2] for u in todo})
            continue
        results = {}
        for u in todo:
            W = unit_weight(model, u).detach()
            check_finite(W, u.name)
            results[u.name] = rtn_unit(W, plan[u.name])
        new[fqn], errors = pack_param(model, fqn, param_units, results)
        record_units(report, todo, results, errors)
        if len(todo) == 1 and not todo[0].fused:
            packed_as[id(model.get_parameter(fqn))] = (fqn, results[todo[0].name], errors[todo[0].name])
    return new


def quantize_(
    model: nn.Module,
    plan: Plan,
    config: QuantizerConfig | str | None = None,
    *,
    method: str | Method | None = None,
    calibration: Any = None,
    **options: Any,
) -> nn.Module:
    """Quantizes ``model`` in place according to ``plan`` and returns it.

    Args:
        model: a transformers MoE causal LM (any layout :func:`moe_ao.units` knows).
        plan: unit name -> spec; units not named stay as they are.
        config: ``RTNConfig()`` (the default) or ``GPTQConfig(calibration=ids, ...)``;
            a method name is accepted too.
        method: the method by name (``"rtn"``, ``"gptq"``), with its options as keywords;
            the same as passing the config it builds (``moe_ao.quant.configs.make_config``).
        calibration: calibration token batches, for ``method="gptq"``.
        **options: the method's options by name (e.g. ``act_order=False``).

    Returns:
        The same model object, quantized.

    Raises:
        ValueError: the plan does not fit the model or quantizes nothing, a weight is not
            finite, the model is already quantized, or the method or an option is unknown.
            The model is unchanged.
        TypeError: ``plan`` is not a Plan, or ``config`` is not a quantizer config.
    """
    config = resolve_config(config, method, calibration, options)
    all_units, planned, report = prepare(model, plan, config)
    if isinstance(config, GPTQConfig):
        from moe_ao.quant.gptq_driver import gptq_packed  # the calibration machinery: only when asked for

        new = gptq_packed(model, plan, planned, all_units, config, report)
        # lm_head / embeddings: no decoder-layer inputs to calibrate on; RTN, listed in the report
        new |= rtn_packed(model, plan, [u for u in planned if u.layer is None], all_units, report)
    else:
        new = rtn_packed(model, plan, planned, all_units, report)
    return apply_packed(model, plan, new, report)


def prepare(model: nn.Module, plan: Plan, config: QuantizerConfig) -> tuple[list[Unit], list[Unit], QuantizationReport]:
    """The checks every quantization runs before touching a weight.

    Returns:
        (every unit, the planned ones, a report listing the units kept in float).

    Raises:
        TypeError: ``plan`` is not a Plan.
        ValueError: the model is already quantized, the plan does not fit it, a planned
            weight is tied to another, or the plan quantizes nothing.
    """
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a moe_ao.Plan, got {type(plan).__name__}")
    if getattr(model, PLAN_ATTR, None) is not None:
        raise ValueError("model is already quantized by moe_ao; load the float model again to re-quantize")
    all_units = units(model)
    plan.validate(all_units)
    _check_ties(model, plan, all_units)
    planned = [u for u in all_units if u.name in plan and plan[u.name].quantized]
    if not planned:
        raise ValueError(f"the plan quantizes none of the model's {len(all_units)} units ({len(plan)} entries, none "
                         f"below 16 bits): nothing to do; name units with bits in (2, 3, 4, 8)")
    report = QuantizationReport(config.method.value)
    for u in all_units:
        if u.name not in plan:
            report.kept[u.name] = "not in plan"
        elif not plan[u.name].quantized:
            report.kept[u.name] = "planned at 16 bits"
    for name, why in getattr(all_units, "kept", {}).items():
        report.kept[name] = why  # modules of no unit kind (SSM / linear-attention mixers, ...)
    return all_units, planned, report


def resolve_config(config: Any, method: Any, calibration: Any, options: dict[str, Any]) -> QuantizerConfig:
    """The one config object behind quantize_'s typed and keyword forms."""
    if isinstance(config, (RTNConfig, GPTQConfig)):
        if method is not None or calibration is not None or options:
            raise ValueError("pass either a config object or method=/calibration=/options, not both")
        return config
    if config is not None and not isinstance(config, str):
        raise TypeError(f"config must be RTNConfig, GPTQConfig or a method name, got {type(config).__name__}")
    if config is not None and method is not None:
        raise ValueError(f"method given twice: {config!r} and method={method!r}")
    if calibration is not None:
        options = {**options, "calibration": calibration}
    return make_config(config or method or Method.RTN, **options)


def quantized_plan(model: nn.Module) -> Plan | None:
    """The plan a model was quantized with, or None."""
    return getattr(model, PLAN_ATTR, None)


def quantization_report(model: nn.Module) -> QuantizationReport | None:
    """The report of the last ``quantize_`` on this model, or None."""
    return getattr(model, REPORT_ATTR, None)


@dataclass
class MoEPlanConfig(AOBaseConfig):
    """torchao config wrapping a moe_ao Plan and the quantizer to apply it with.

    torchao's ``quantize_`` hands its handler one module at a time and, by default,
    only ``nn.Linear`` modules; fused experts are not Linears. Pass
    ``filter_fn=moe_ao.whole_model`` so the handler sees the root model::

        torchao.quantization.quantize_(model, MoEPlanConfig(plan, GPTQConfig(calibration=ids)),
                                       filter_fn=moe_ao.whole_model)

    Attributes:
        plan: the plan.
        quantizer: ``RTNConfig()`` (default) or a ``GPTQConfig``.
    """

    plan: Plan
    quantizer: QuantizerConfig = field(default_factory=RTNConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.quantizer, (RTNConfig, GPTQConfig)):
            raise TypeError(f"MoEPlanConfig.quantizer must be RTNConfig or GPTQConfig, got "
                            f"{type(self.quantizer).__name__}")


def whole_model(module: nn.Module, fqn: str) -> bool:
    """torchao filter selecting only the root module (fqn == "")."""
    return fqn == ""


@register_quantize_module_handler(MoEPlanConfig)
def _moe_plan_handler(module: nn.Module, config: MoEPlanConfig) -> nn.Module:
    return quantize_(module, config.plan, config.quantizer)
