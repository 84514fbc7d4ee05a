"""``AutoModelForCausalLM.from_pretrained`` on a moe_ao checkpoint: a registered quantizer.

transformers 5 looks ``config.json``'s ``quantization_config["quant_method"]`` up in its
registry of quantizers; third-party methods enter it through
``transformers.quantizers.register_quantization_config`` / ``register_quantizer``, and
there is no entry-point discovery, so ``import moe_ao`` calls :func:`register`.

How a load goes (``MoeAoHfQuantizer``):

1. before the weights: read ``moe_ao.json`` beside the checkpoint file (the same
   checks as :func:`moe_ao.load_quantized`), and tell the loader to expect the packed
   buffers (``<fqn>::q4`` ...) without reporting them as unexpected;
2. transformers loads every plain tensor as usual (dtype casts, devices, ties); a packed
   parameter's key holds its slot table, whose shape differs from the weight's, which
   :meth:`param_needs_quantization` tells the loader to accept;
3. after the weights: :func:`moe_ao.packed_state.rebuild_packed` rebuilds every packed
   tensor from the file, each goes to the device its slot table was put on, and the
   plan, the report and moe_ao's experts implementation are attached, exactly as
   ``load_quantized`` does: the logits are bit-identical.

Without ``import moe_ao``, transformers warns that it does not know ``moe_ao`` and then
fails on those size mismatches, rather than returning randomly initialised weights.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from moe_ao import experts as experts_impl
from moe_ao.api import PLAN_ATTR, REPORT_ATTR, QuantizationReport, swap_in
from moe_ao.checkpoint import SINGLE_FILE
from moe_ao.checkpoint_load import check_files, check_headers, check_plan, read_headers, read_meta
from moe_ao.discovery import units
from moe_ao.hub_files import CONFIG_FORMAT, CONFIG_VERSION, QUANT_METHOD
from moe_ao.packed_state import INNER_KEY_PATTERN, rebuild_packed
from moe_ao.plans import Plan
from moe_ao.tensors.packed import PackedWeight

logger = logging.getLogger(__name__)


class MoeAoConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a moe_ao checkpoint (see :mod:`moe_ao.hub_files`).

    Args:
        plan: the plan in its JSON dict form.
        format: checkpoint format name.
        version: checkpoint format version.
        **kwargs: other keys of the JSON entry, kept as attributes.
    """

    def __init__(self, plan: dict[str, Any] | None = None, format: str = CONFIG_FORMAT,
                 version: int = CONFIG_VERSION, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.plan = plan
        self.format = format
        self.version = version
        for key, value in kwargs.items():
            if key != "quant_method":
                setattr(self, key, value)


class MoeAoHfQuantizer(HfQuantizer):
    """Loads pre-quantized moe_ao checkpoints (it does not quantize float models)."""

    requires_calibration = True  # pre-quantized checkpoints only

    def __init__(self, quantization_config: MoeAoConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.checkpoint: Path | None = None
        self.meta: dict[str, Any] = {}
        self.files: list[str] = []
        self.dtype: torch.dtype | None = None
        self.units: list = []

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        self.dtype = dtype  # packed scales follow it when it differs from the checkpoint's
        return dtype

    def _process_model_before_weight_loading(self, model: torch.nn.Module, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> None:
        if not checkpoint_files:
            raise ValueError("moe_ao checkpoints load from their directory (model.safetensors + moe_ao.json);"
                             " got no checkpoint files (a state_dict?)")
        self.files = [str(f) for f in checkpoint_files]
        self.checkpoint = Path(self.files[0]).parent
        # The same checks as load_quantized, before a weight is read: moe_ao.json, every file's
        # sha256, and the stored tensors against the model (names, shapes, dtypes).
        self.meta = read_meta(self.checkpoint, verify=True)
        check_files(self.checkpoint, self.meta, verify=True)
        weights = self.meta.get("weights", [SINGLE_FILE])
        check_headers(self.checkpoint, self.meta, model, read_headers(self.checkpoint, weights))
        self.units = units(model)  # while the parameters still have their logical shapes
        ignore = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or set()
        model._keys_to_ignore_on_load_unexpected = set(ignore) | {INNER_KEY_PATTERN}

    def param_needs_quantization(self, model: torch.nn.Module, param_name: str, **kwargs: Any) -> bool:
        return param_name in self.meta.get("packed", {})

    def _process_model_after_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        new = self._rebuild()
        for fqn, w in new.items():
            loaded = model.get_parameter(fqn)  # the slot table, where the loader placed it
            target_dtype = self.dtype if self.dtype is not None and self.dtype != w.dtype else None
            if loaded.device != w.device or target_dtype is not None:
                new[fqn] = w.to(loaded.device, dtype=target_dtype or w.dtype)
        swap_in(model, new)
        if self.meta.get("tied"):
            model.tie_weights()  # a packed tied embedding: the head shares the swapped-in tensor again
        if any(t.ndim == 3 for t in new.values()):
            experts_impl.select(model)
        plan = Plan.from_json(str(self.checkpoint / "plan.json"))
        check_plan(self.checkpoint, plan, self.units, new, self.meta.get("tied"))
        setattr(model, PLAN_ATTR, plan)
        if self.meta.get("report"):
            setattr(model, REPORT_ATTR, QuantizationReport(**self.meta["report"]))
        return model

    def _rebuild(self) -> dict[str, PackedWeight]:
        """Every packed tensor, read from the checkpoint's safetensors file(s)."""
        handles = [safe_open(f, "pt", device="cpu") for f in self.files if f.endswith(".safetensors")]
        where = {key: h for h in handles for key in h.keys()}

        def get(key: str) -> torch.Tensor | None:
            return where[key].get_tensor(key) if key in where else None

        return rebuild_packed(get, self.meta, str(self.checkpoint), legacy=self.meta["version"] == 1)

    def _dequantize(self, model: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
        dense = {n: p.dequantize(dtype) for n, p in model.named_parameters() if isinstance(p, PackedWeight)}
        swap_in(model, dense)
        for attr in (PLAN_ATTR, REPORT_ATTR):
            if hasattr(model, attr):
                delattr(model, attr)
        return model

    def is_serializable(self, **kwargs: Any) -> bool:
        logger.warning("save a moe_ao model with moe_ao.save_quantized(model, dir), not save_pretrained")
        return False

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def register() -> None:
    """Registers ``quant_method="moe_ao"`` with transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(MoeAoConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(MoeAoHfQuantizer)
