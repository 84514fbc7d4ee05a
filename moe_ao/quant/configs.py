"""One typed, validated config per quantizer, and the names of methods.

``quantize_(model, plan, GPTQConfig(calibration=ids))`` is the typed form;
``quantize_(model, plan, method="gptq", calibration=ids, act_order=False)`` builds the
same config from keywords (:func:`make_config`), so both forms check the same things in
the same place. ``MoEPlanConfig`` carries one of these to torchao's ``quantize_``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from moe_ao.choices import Choice

__all__ = ["GPTQConfig", "Method", "QuantizerConfig", "RTNConfig", "make_config"]


class Method(Choice):
    """Quantization methods."""

    RTN = "rtn"
    GPTQ = "gptq"


@dataclass(frozen=True)
class RTNConfig:
    """Round to nearest with min-max group scales: no data, no options."""

    method: ClassVar[Method] = Method.RTN


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"GPTQConfig: {name}={value!r}; allowed: {allowed}")


@dataclass(frozen=True, eq=False)
class GPTQConfig:
    """Sequential, MoE-aware GPTQ (see ``moe_ao.quant.gptq_driver``).

    Attributes:
        calibration: int64 [n_samples, seq_len] token ids (moe_ao.calibration.load_calibration).
        damp: dampening, a fraction of H's mean diagonal added to it.
        blocksize: columns per lazy-batch block.
        act_order: columns in decreasing Hessian diagonal, with static groups (default;
            cut KL 1.4-1.6x on both embedded models; llm-compressor's default too).
        min_tokens: routed tokens below which an expert falls back to its layer's pooled
            Hessian, then to RTN (default: the unit's in_features).
        weight_by_routing: weight each expert's Hessian by its routing weights.
        batch_size: calibration windows per forward.
        compute_dtype: dtype of the calibration forwards (default: float32 on CPU, the
            model's dtype elsewhere).
        true_sequential: the paper's phases within a layer (default), or one pass.
        progress: show progress (a bar in a terminal, one line per stage otherwise).
        split_calibration: under torch.distributed, each rank runs only every
            world-size-th calibration batch and the Hessians and routing counts are
            summed over the ranks (all-reduce). Divides the calibration forwards by
            the ranks; the sums are then in another order than one process's, so codes
            can differ from a single-process run in rare roundings (without it, they are
            bit-identical). No effect in one process.

    Raises:
        ValueError: a field of the wrong type or out of range, naming it.
    """

    calibration: torch.Tensor
    damp: float = 0.01
    blocksize: int = 128
    act_order: bool = True
    min_tokens: int | None = None
    weight_by_routing: bool = False
    batch_size: int = 8
    compute_dtype: torch.dtype | None = None
    true_sequential: bool = True
    progress: bool = True
    split_calibration: bool = False
    method: ClassVar[Method] = Method.GPTQ

    def __post_init__(self) -> None:
        c = self.calibration
        _check(isinstance(c, torch.Tensor) and c.dtype == torch.long and c.ndim == 2 and c.numel() > 0,
               "calibration", type(c).__name__ if not isinstance(c, torch.Tensor) else f"{c.dtype} {tuple(c.shape)}",
               "non-empty int64 [n_samples, seq_len] token ids (moe_ao.calibration.load_calibration)")
        _check(isinstance(self.damp, (int, float)) and not isinstance(self.damp, bool) and 0 <= self.damp < 1,
               "damp", self.damp, "a float in [0, 1)")
        for name in ("blocksize", "batch_size"):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name, v, "an int >= 1")
        m = self.min_tokens
        _check(m is None or (isinstance(m, int) and not isinstance(m, bool) and m >= 0), "min_tokens", m,
               "None or an int >= 0")
        for name in ("act_order", "weight_by_routing", "true_sequential", "progress", "split_calibration"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name), "True or False")
        d = self.compute_dtype
        _check(d is None or (isinstance(d, torch.dtype) and d.is_floating_point), "compute_dtype", d,
               "None or a floating torch.dtype")


QuantizerConfig = RTNConfig | GPTQConfig
_CONFIGS: dict[Method, type] = {Method.RTN: RTNConfig, Method.GPTQ: GPTQConfig}


def make_config(method: str | Method, **options: Any) -> QuantizerConfig:
    """The config for a method named by string, from keyword options.

    Raises:
        ValueError: an unknown method, an option the method does not take (naming the
            ones it does), or an invalid value.
    """
    cls = _CONFIGS[Method.parse(method, "method")]
    allowed = [f.name for f in fields(cls)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"method {Method(method).value!r} takes no option(s) {unknown}; allowed: {allowed}")
    if cls is GPTQConfig and options.get("calibration") is None:
        raise ValueError("method='gptq' needs calibration: int64 [n_samples, seq_len] token ids "
                         "(moe_ao.calibration.load_calibration)")
    return cls(**options)
