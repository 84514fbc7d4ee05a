"""Scorers: numbers per unit or per expert, which the planner turns into plans.

- :func:`outlier_score`: the paper's linear-weight outlier score (+LinearOSP), no data.
- :func:`token_share`: how often calibration tokens were routed to an expert.
- :func:`sensitivity_table`: per unit and bit width, the layer-output error a
  round-to-nearest quantization would cause (the budget optimizer's scalable proxy).
- :func:`measure_sensitivities`: per unit and bit width, the measured model-output KL
  divergence of quantizing that unit alone (:mod:`moe_ao.sensitivity`; the budget
  optimizer's most faithful input, at a forward pass per unit and width).
- :func:`estimate_sensitivities`: the same table estimated to second order from one
  forward and one backward pass (:mod:`moe_ao.sensitivity_estimate`).

Shapes: W is [out, in] = [R, K]; H is the unit's input second moment [K, K].
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from moe_ao.discovery import as_units
from moe_ao.planner.context import PLANNED_KINDS, check_bits, group_sizes
from moe_ao.primitives import rtn_quantize
from moe_ao.profile_stats import Profile
from moe_ao.sensitivity import kl_sensitivities
from moe_ao.sensitivity_estimate import estimate_kl_sensitivities
from moe_ao.unit import Unit

logger = logging.getLogger(__name__)

HESSIAN_MODES = ("full", "diag")


def outlier_score(W: torch.Tensor) -> float:
    """The paper's outlier score of one linear weight.

    ``score(W) = max_j (max_i |W_ij| / mean_i |W_ij|)`` over input columns j of the
    [out, in] weight, i.e. ``(W.abs().amax(0) / W.abs().mean(0)).max()``, computed in
    float64. An all-zero column has no outlier: its ratio counts as 0, not NaN.

    Args:
        W: weight [R, K].

    Returns:
        The score (>= 1 for any weight with a non-zero column).
    """
    assert W.ndim == 2, f"{W.shape=}"
    A = W.detach().to(torch.float64).abs()  # [R, K]
    mean = A.mean(0)  # [K]
    ratio = torch.where(mean > 0, A.amax(0) / mean.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return float(ratio.max())


def token_share(stats: Profile, layer: int, expert: int) -> float:
    """Fraction of calibration tokens routed to ``expert`` of ``layer``.

    Uses ``routing_counts / tokens`` when the profile knows its token count (an expert
    chosen by every token scores 1), else the expert's share of top-k selections.
    """
    counts = stats.routing_counts[layer]
    if not 0 <= expert < counts.numel():
        raise ValueError(
            f"expert {expert} is out of range for stats.routing_counts[{layer}] of {counts.numel()} experts"
        )
    if stats.tokens > 0:
        return min(1.0, float(counts[expert]) / stats.tokens)
    return float(stats.expert_frequency(layer)[expert])


def rtn_error(W: torch.Tensor, bits: int, group_size: int, symmetric: bool = True) -> torch.Tensor:
    """W - Q(W) in float64 for round-to-nearest Q with the model's scale dtype."""
    scale_dtype = W.dtype if W.dtype in (torch.bfloat16, torch.float16) else torch.float32
    q = rtn_quantize(W.detach(), bits, group_size, symmetric, scale_dtype=scale_dtype)
    return W.detach().to(torch.float64) - q.dequantize(torch.float64)


def weighted_error(E: torch.Tensor, H: torch.Tensor | None, mode: str = "full") -> float:
    """tr(E H Eᵀ) (``full``), Σ_ij E_ij² H_jj (``diag``), or ||E||²_F when H is None.

    Args:
        E: error [R, K], float64.
        H: input second moment [K, K] or None.
        mode: ``full`` or ``diag``; ``diag`` costs O(RK) instead of O(RK²).
    """
    if H is None:
        return float((E * E).sum())
    H = H.to(device=E.device, dtype=torch.float64)
    assert H.shape == (E.shape[1], E.shape[1]), f"{H.shape=} {E.shape=}"
    if mode == "diag":
        return float(((E * E) * H.diagonal()).sum())
    return float(((E @ H) * E).sum())


def sensitivity_table(
    weights: dict[str, torch.Tensor],
    units: Sequence[Unit],
    stats: Profile | None,
    group_sizes: dict[str, int],
    bits: Sequence[int] = (2, 3, 4, 8),
    symmetric: bool = True,
    hessian: str = "full",
    scale_by_frequency: bool = True,
) -> tuple[dict[str, dict[int, float]], dict[str, int]]:
    """Per unit and bit width, the proxy loss of quantizing that unit alone.

    The proxy is the layer-output error ``tr((W-Q(W)) H (W-Q(W))ᵀ)`` with H the unit's
    mean input second moment (``stats.hessians``); a unit without a Hessian falls back
    to ``||W-Q(W)||²_F``, which equals the proxy for white inputs (H = I) but ignores
    the input scale, so mixing the two ranks fallback units only roughly (the count is
    returned and logged). With ``scale_by_frequency`` a routed expert's loss is
    multiplied by its token share: expert Hessians average over routed tokens only, so
    without the factor a rarely used expert would weigh as much as attention, which
    sees every token.

    Args:
        weights: unit name -> weight [R, K].
        units: the units to score.
        stats: profile with hessians / routing counts, or None (all fallback, no scaling).
        group_sizes: unit name -> group size.
        bits: widths to score.
        symmetric: quantization symmetry.
        hessian: ``full`` or ``diag`` (see :func:`weighted_error`).
        scale_by_frequency: multiply expert losses by their token share.

    Returns:
        ({unit name: {bits: loss}}, {"fallback_units": n, "frequency_scaled_units": m}).

    Raises:
        ValueError: unknown hessian mode.
    """
    if hessian not in HESSIAN_MODES:
        raise ValueError(f"hessian={hessian!r}; allowed: {HESSIAN_MODES}")
    hessians = stats.hessians if stats is not None else {}
    counts = stats.routing_counts if stats is not None else {}
    table: dict[str, dict[int, float]] = {}
    fallback = scaled = 0
    for u in units:
        W, H = weights[u.name], hessians.get(u.name)
        fallback += H is None
        factor = 1.0
        if scale_by_frequency and u.kind == "expert" and u.layer in counts:
            factor = token_share(stats, u.layer, u.expert)
            scaled += 1
        table[u.name] = {
            b: factor * weighted_error(rtn_error(W, b, group_sizes[u.name], symmetric), H, hessian) for b in bits
        }
    if fallback:
        logger.info("sensitivity: %d of %d units have no Hessian; using ||W-Q(W)||²", fallback, len(units))
    return table, {"fallback_units": fallback, "frequency_scaled_units": scaled}


def measure_sensitivities(
    model: nn.Module,
    calibration: torch.Tensor,
    stats: Profile | None = None,
    *,
    group_size: int | str = 128,
    symmetric: bool = True,
    bits: Sequence[int] = (2, 3, 4, 8),
    kinds: Sequence[str] = PLANNED_KINDS,
    quantizer: str = "gptq",
    kl_windows: int = 16,
    batch_size: int = 8,
    progress: bool = True,
) -> Profile:
    """Measures every planned unit's KL sensitivity and stores it in a Profile.

    See :func:`moe_ao.sensitivity.kl_sensitivities` for what is measured and its cost.
    The knapsack optimizer then uses the table (``sensitivity="auto"`` or ``"kl"``)
    for plans with the same group sizes and symmetry.

    Args:
        model: the float model (not changed).
        calibration: int64 [n, L] windows: GPTQ's Hessians see all, the KL the first
            ``kl_windows``.
        stats: a Profile to add the table to (default: a new one).
        group_size: as for :func:`moe_ao.planner.plan` (an int or ``"auto"``).
        symmetric: quantization symmetry.
        bits: widths to measure.
        kinds: unit kinds to measure (routers never are).
        quantizer: ``gptq`` or ``rtn``.
        kl_windows: windows the KL is measured on.
        batch_size: windows per forward.
        progress: show a progress bar.

    Returns:
        ``stats`` (or the new Profile) with ``sensitivities`` and ``sensitivity_setup`` set.

    Raises:
        ValueError: no unit of ``kinds``, a group size not dividing some unit, bad
            widths, or :func:`~moe_ao.sensitivity.kl_sensitivities`' own errors.
    """
    widths, units, sizes = _setup(model, kinds, bits, group_size)
    table, meta = kl_sensitivities(model, calibration, units, sizes, widths, symmetric=symmetric,
                                   quantizer=quantizer, kl_windows=kl_windows, batch_size=batch_size,
                                   progress=progress)
    stats = stats if stats is not None else _new_profile(calibration)
    stats.sensitivities = table
    stats.sensitivity_setup = meta | {"symmetric": symmetric, "bits": widths, "group_sizes": sizes}
    return stats


def _planned_units(model: nn.Module, kinds: Sequence[str]) -> list[Unit]:
    units = [u for u in as_units(model) if u.kind in kinds and u.kind != "router"]
    if not units:
        raise ValueError(f"the model has no units of kinds {list(kinds)} to measure")
    return units


def _setup(model: nn.Module, kinds: Sequence[str], bits: Sequence[int],
           group_size: int | str) -> tuple[list[int], list[Unit], dict[str, int]]:
    """(widths, planned units, their group sizes) of a sensitivity table, all checked."""
    widths = sorted({check_bits(b) for b in bits})
    units = _planned_units(model, kinds)
    return widths, units, group_sizes(units, group_size)


def _new_profile(calibration: torch.Tensor) -> Profile:
    return Profile(tokens=int(calibration.numel()), meta={"n_samples": calibration.shape[0],
                                                          "seq_len": calibration.shape[1]})


def estimate_sensitivities(
    model: nn.Module,
    calibration: torch.Tensor,
    stats: Profile | None = None,
    *,
    group_size: int | str = 128,
    symmetric: bool = True,
    bits: Sequence[int] = (2, 3, 4, 8),
    kinds: Sequence[str] = PLANNED_KINDS,
    quantizer: str = "gptq",
    windows: int | None = None,
    samples: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> Profile:
    """Estimates every planned unit's KL sensitivity in two passes and stores it in a Profile.

    See :mod:`moe_ao.sensitivity_estimate` for what is estimated, its cost and where it
    fails. The knapsack optimizer uses the table with ``sensitivity="estimate"``, or
    ``"auto"`` when the Profile holds no measured table.

    Args:
        model: the float model (not changed; may be streamed).
        calibration: int64 [n, L] windows: GPTQ's Hessians see all, the gradients the
            first ``windows`` (default: all).
        stats: a Profile to add the table to (default: a new one).
        group_size: as for :func:`moe_ao.planner.plan` (an int or ``"auto"``).
        symmetric: quantization symmetry.
        bits: widths to estimate.
        kinds: unit kinds to estimate (routers never are).
        quantizer: ``gptq`` or ``rtn``.
        windows: windows the gradients are taken on.
        samples: sampled label sequences per window.
        seed: label sampling seed.
        progress: show a progress bar.

    Returns:
        ``stats`` (or the new Profile) with ``sensitivity_estimates`` and ``estimate_setup`` set.

    Raises:
        ValueError: as :func:`measure_sensitivities`, or bad ``windows`` / ``samples``.
    """
    widths, units, sizes = _setup(model, kinds, bits, group_size)
    table, meta = estimate_kl_sensitivities(model, calibration, units, sizes, widths, symmetric=symmetric,
                                            quantizer=quantizer, windows=windows, samples=samples, seed=seed,
                                            progress=progress)
    stats = stats if stats is not None else _new_profile(calibration)
    stats.sensitivity_estimates = table
    stats.estimate_setup = meta | {"symmetric": symmetric, "bits": widths, "group_sizes": sizes}
    return stats
