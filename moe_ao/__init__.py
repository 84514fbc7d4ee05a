"""moe_ao: mixed-precision post-training quantization for Mixture-of-Experts LLMs.

Typical use::

    units = moe_ao.units(model)
    plan = moe_ao.Plan({u.name: 2 for u in units if u.kind == "expert"}, group_size=64)
    # or let the planner choose: moe_ao.plan(model, "knapsack", budget_bits=2.5, stats=profile)
    model = moe_ao.quantize_(model, plan)              # RTN; or moe_ao.GPTQConfig(calibration=ids)
    moe_ao.save_quantized(model, "out/")
"""

__version__ = "0.1.0"  # before the imports: moe_ao.stream writes it into checkpoints

from moe_ao import calibration, models, planner, profiling  # noqa: F401  (submodules the README uses)
from moe_ao.api import MoEPlanConfig, QuantizationReport, quantization_report, quantize_, quantized_plan, whole_model
from moe_ao.checkpoint import load_quantized, save_quantized
from moe_ao.discovery import units
from moe_ao.export import export
from moe_ao.hf_quantizer import register as _register_hf_quantizer
from moe_ao.planner import plan
from moe_ao.plans import Plan, QuantSpec
from moe_ao.quant.configs import GPTQConfig, RTNConfig
from moe_ao.report import memory_report
from moe_ao.stream import quantize_pretrained
from moe_ao.tensors.packed import PackedWeight
from moe_ao.unit import Kind, Unit

__all__ = [
    "GPTQConfig",
    "Kind",
    "MoEPlanConfig",
    "PackedWeight",
    "Plan",
    "QuantSpec",
    "QuantizationReport",
    "RTNConfig",
    "Unit",
    "export",
    "load_quantized",
    "memory_report",
    "plan",
    "quantization_report",
    "quantize_",
    "quantize_pretrained",
    "quantized_plan",
    "save_quantized",
    "units",
    "whole_model",
]

# transformers finds third-party quantization methods only in its registry (no entry
# points): registering here is what makes from_pretrained load moe_ao checkpoints.
_register_hf_quantizer()
