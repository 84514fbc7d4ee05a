"""One layer-wise pass over calibration text that fills a :class:`Profile`.

Per decoder layer: routing counts and router entropy, the per-token cosine
similarity between the block's input and output hidden states plus a sample of the
inputs (for the block-importance predictor), and optionally every unit's input
Hessian (for the planner's Hessian-weighted sensitivity). The model is not changed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_ao.calibration import check_token_ids
from moe_ao.discovery import decoder_layers, units
from moe_ao.profile_stats import Profile
from moe_ao.progress import progress as show_progress
from moe_ao.quant.layerwise import capture_inputs, layer_scope, run_layer
from moe_ao.quant.observers import LayerObserver


@torch.no_grad()
def profile(
    model: nn.Module,
    calibration: torch.Tensor,
    *,
    hessians: bool = False,
    max_block_tokens: int = 8192,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> Profile:
    """Profiles ``model`` on calibration windows.

    Args:
        model: the float model.
        calibration: int64 [n, L] token windows.
        hessians: also collect each quantizable unit's input Hessian (costs memory
            Σ K² per layer while that layer runs; kept for all units afterwards).
        max_block_tokens: tokens per layer kept for the block predictor (seeded sample).
        batch_size: windows per forward.
        seed: sampling seed.
        progress: show a progress bar.

    Returns:
        The filled Profile.
    """
    check_token_ids(calibration, getattr(model, "config", None))
    prefix, layers = decoder_layers(model)
    all_units = units(model)
    out = Profile(tokens=int(calibration.numel()), meta={"n_samples": calibration.shape[0],
                                                          "seq_len": calibration.shape[1], "seed": seed})
    gen = torch.Generator().manual_seed(seed)
    inputs = capture_inputs(model, calibration, batch_size)
    for i in show_progress(range(len(layers)), "profile layers", progress):
        layer_units = [u for u in all_units if u.layer == i]
        wanted = {u.name for u in layer_units if u.kind != "router"} if hessians else set()
        with layer_scope(model, i), LayerObserver(f"{prefix}.{i}", layers[i], layer_units, wanted) as obs:
            outputs = run_layer(layers[i], inputs)
        if obs.routing_counts is not None:
            out.routing_counts[i] = obs.routing_counts.cpu()
        entropy = obs.router_entropy()
        if entropy is not None:
            out.router_entropy[i] = entropy
        x = torch.cat([h.reshape(-1, h.shape[-1]) for h in inputs.hidden]).float()  # [N, d]
        y = torch.cat([h.reshape(-1, h.shape[-1]) for h in outputs.hidden]).float()
        keep = torch.randperm(x.shape[0], generator=gen)[:max_block_tokens].sort().values
        out.block_cos[i] = F.cosine_similarity(x[keep], y[keep], dim=-1).cpu()
        out.block_inputs[i] = x[keep].to(torch.float16).cpu()
        for u in layer_units:
            if u.name in wanted:
                out.hessians[u.name] = obs.hessian(u)[0].cpu()
        inputs = outputs
    return out
