"""Profile: calibration statistics of an MoE model, gathered in one layer-wise pass.

Filled by :func:`moe_ao.profiling.profile` (and by GPTQ's sequential pass); read by the
planner's data-driven heuristics and sensitivity scorers. Plain tensors keyed by the
decoder-layer index, so a profile saves to one ``torch.save`` file and is cheap to pass
around. Shapes: E experts of that layer, n sampled tokens, d hidden size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Profile:
    """Per-layer statistics from calibration text.

    Attributes:
        routing_counts: layer -> int64 [E], top-k selections per expert (the paper's
            frequency statistic).
        router_entropy: layer -> mean entropy (nats) of the router's softmax.
        block_cos: layer -> float32 [n], per-token cosine similarity between the
            decoder block's input and output hidden states.
        block_inputs: layer -> float16 [n, d], the block's sampled input hidden states
            (what the block-importance predictor trains on).
        hessians: unit name -> float32 [K, K], mean of x xᵀ over the unit's inputs
            (experts: over routed tokens only). Optional: only when asked for.
        sensitivities: unit name -> {bits: KL}, the measured output KL divergence of
            quantizing that unit alone (:func:`moe_ao.planner.measure_sensitivities`).
            Optional: the budget optimizer's best input.
        sensitivity_setup: how ``sensitivities`` were measured (quantizer, per-unit
            group sizes, symmetry, widths, tokens), checked against a plan's settings.
        sensitivity_estimates: unit name -> {bits: KL}, the same table estimated to second
            order from one forward and backward pass
            (:func:`moe_ao.planner.estimate_sensitivities`); kept beside the measured one so
            a profile can hold both and ``sensitivity="auto"`` can prefer the measured.
        estimate_setup: how ``sensitivity_estimates`` were taken (as ``sensitivity_setup``).
        tokens: number of calibration tokens seen.
        meta: provenance (source, n_samples, seq_len, seed).
    """

    routing_counts: dict[int, torch.Tensor] = field(default_factory=dict)
    router_entropy: dict[int, float] = field(default_factory=dict)
    block_cos: dict[int, torch.Tensor] = field(default_factory=dict)
    block_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)
    sensitivities: dict[str, dict[int, float]] = field(default_factory=dict)
    sensitivity_setup: dict[str, Any] = field(default_factory=dict)
    sensitivity_estimates: dict[str, dict[int, float]] = field(default_factory=dict)
    estimate_setup: dict[str, Any] = field(default_factory=dict)
    tokens: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    # Results derived from the fields above (trained block predictors), kept for the
    # Profile's lifetime and never saved: planning several budgets trains them once.
    _memo: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    def expert_frequency(self, layer: int) -> torch.Tensor:
        """Share of top-k selections per expert of ``layer`` (sums to 1)."""
        counts = self.routing_counts[layer].double()
        return counts / counts.sum().clamp_min(1)

    def memo(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()``, remembered under ``key`` for this Profile's lifetime (never saved).

        Args:
            key: hashable; it must determine the result together with the Profile's data.
            compute: called once per key.

        Returns:
            The remembered or newly computed result.
        """
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def save(self, path: str) -> None:
        torch.save({k: v for k, v in self.__dict__.items() if k != "_memo"}, path)

    @classmethod
    def load(cls, path: str) -> Profile:
        return cls(**torch.load(path, weights_only=True))
