"""One layer-wise pass over calibration text that fills a :class:`Profile`.

Per decoder layer: routing counts and router entropy, the per-token cosine
similarity between the block's input and output hidden states plus a sample of the
inputs (for the block-importance predictor), and optionally every unit's input
Hessian (for the planner's Hessian-weighted sensitivity). The model is not changed.

Distributed: under torch.distributed (``torchrun``) rank r runs calibration batches
r, r + N, ... only. Routing counts, router entropy and Hessians are summed over the
ranks after each layer (one all-reduce each), and the block predictor's sampled rows
are gathered in batch order, so every rank ends with the same profile. It equals one
process's bit for bit except the Hessians, whose float32 sums are added in another
order (relative difference ~1e-7).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_ao.calibration import check_token_ids
from moe_ao.discovery import decoder_layers, units
from moe_ao.distributed import gather_objects, mine, world
from moe_ao.profile_stats import Profile
from moe_ao.progress import progress as show_progress
from moe_ao.quant.layerwise import LayerInputs, capture_inputs, layer_scope, run_layer
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
    split_calibration: bool = True,
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
        split_calibration: under torch.distributed, each rank runs its share of the batches
            (see the module docstring); False runs every batch on every rank.
        progress: show a progress bar.

    Returns:
        The filled Profile.

    Raises:
        ValueError: fewer calibration batches than ranks to split them over.
    """
    check_token_ids(calibration, getattr(model, "config", None))
    prefix, layers = decoder_layers(model)
    all_units = units(model)
    out = Profile(tokens=int(calibration.numel()), meta={"n_samples": calibration.shape[0],
                                                          "seq_len": calibration.shape[1], "seed": seed})
    gen = torch.Generator().manual_seed(seed)
    batches = calibration.split(batch_size)
    rows = [w.numel() for w in batches]  # tokens per batch, in batch order
    split = split_calibration and world()[1] > 1
    if split and len(rows) < world()[1]:
        raise ValueError(f"profile: {len(rows)} calibration batches of {batch_size} windows cannot be split over "
                         f"{world()[1]} ranks; lower batch_size or add windows")
    ours = mine(range(len(rows))) if split else list(range(len(rows)))  # the batch numbers this rank runs
    inputs = capture_inputs(model, torch.cat([batches[c] for c in ours]), batch_size)
    for i in show_progress(range(len(layers)), "profile layers", progress):
        layer_units = [u for u in all_units if u.layer == i]
        wanted = {u.name for u in layer_units if u.kind != "router"} if hessians else set()
        with layer_scope(model, i), LayerObserver(f"{prefix}.{i}", layers[i], layer_units, wanted) as obs:
            outputs = run_layer(layers[i], inputs)
        if split:
            obs.sum_over_ranks(f"{prefix}.{i} (profile)")
        if obs.routing_counts is not None:
            out.routing_counts[i] = obs.routing_counts.cpu()
        entropy = obs.router_entropy()
        if entropy is not None:
            out.router_entropy[i] = entropy
        keep = torch.randperm(sum(rows), generator=gen)[:max_block_tokens].sort().values
        x, y = _sampled_rows(inputs, outputs, keep, rows, ours, split)
        out.block_cos[i] = F.cosine_similarity(x, y, dim=-1).cpu()
        out.block_inputs[i] = x.to(torch.float16).cpu()
        for u in layer_units:
            if u.name in wanted:
                out.hessians[u.name] = obs.hessian(u)[0].cpu()
        inputs = outputs
    return out


def _sampled_rows(inputs: LayerInputs, outputs: LayerInputs, keep: torch.Tensor, rows: list[int], ours: list[int],
                  split: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's input and output rows at token positions ``keep`` (sorted, over all batches).

    ``rows`` is every batch's token count and ``ours`` the batches this rank ran; with
    ``split`` each rank's rows are gathered and put back in batch order.
    """
    start = [0]
    for n in rows:
        start.append(start[-1] + n)
    picked: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    for c, h_in, h_out in zip(ours, inputs.hidden, outputs.hidden):
        local = keep[(keep >= start[c]) & (keep < start[c + 1])] - start[c]
        picked.append((c, h_in.reshape(-1, h_in.shape[-1])[local].float().cpu(),
                       h_out.reshape(-1, h_out.shape[-1])[local].float().cpu()))
    if split:
        picked = sorted((p for part in gather_objects(picked, "the block predictor's sampled rows") for p in part),
                        key=lambda p: p[0])
    return torch.cat([p[1] for p in picked]), torch.cat([p[2] for p in picked])
