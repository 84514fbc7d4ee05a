"""Layer-by-layer execution over calibration batches.

Calibration activations are propagated one decoder layer at a time: the inputs of
layer 0 are captured once (embedding output plus the keyword arguments the model
passes its layers: masks, rotary embeddings), then each layer is run on the
previous layer's outputs. Peak memory is one layer's weights and statistics plus
the hidden states of the calibration set, flat in the number of layers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moe_ao.discovery import decoder_layers

STREAM_ATTR = "_moe_ao_stream"  # set by moe_ao.stream.StreamedModel on the model it streams


def layer_scope(model: nn.Module, i: int) -> contextlib.AbstractContextManager:
    """``with layer_scope(model, i):`` decoder layer i holds real weights inside the block.

    A no-op for a model in memory; a model streamed from its checkpoint
    (``moe_ao.stream.StreamedModel``) loads the layer from its files and frees it after.
    """
    stream = getattr(model, STREAM_ATTR, None)
    return stream.layer(i) if stream is not None else contextlib.nullcontext()


class _StopForward(Exception):
    """Raised by the capture hook to end the forward pass after layer 0's inputs."""


@dataclass
class LayerInputs:
    """Hidden states and layer kwargs of the calibration set, chunk by chunk.

    Attributes:
        hidden: per chunk, [b, L, d] hidden states entering the current layer.
        kwargs: per chunk, the keyword arguments the model passes to every layer.
    """

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        return iter(zip(self.hidden, self.kwargs))

    def to(self, dtype: torch.dtype) -> LayerInputs:
        """Casts hidden states and floating-point kwargs (rotary tables, masks) to ``dtype``."""

        def cast(v: Any) -> Any:
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                return v.to(dtype)
            if isinstance(v, tuple):
                return tuple(cast(x) for x in v)
            return v

        return LayerInputs(
            [h.to(dtype) for h in self.hidden], [{k: cast(v) for k, v in kw.items()} for kw in self.kwargs]
        )

    @property
    def tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


@torch.no_grad()
def capture_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8) -> LayerInputs:
    """Runs the model up to layer 0 on every chunk and records that layer's inputs.

    Args:
        model: the causal LM.
        input_ids: int64 [n, L] calibration windows.
        batch_size: windows per forward.

    Returns:
        The inputs of layer 0.
    """
    _, layers = decoder_layers(model)
    hidden: list[torch.Tensor] = []
    kwargs: list[dict[str, Any]] = []

    def hook(module: nn.Module, args: tuple, kw: dict) -> None:
        hidden.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for chunk in input_ids.split(batch_size):
            try:
                model(chunk.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return LayerInputs(hidden, kwargs)


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs) -> LayerInputs:
    """Runs one decoder layer on every chunk; returns the next layer's inputs."""
    outs = []
    for h, kw in inputs:
        out = layer(h, **kw)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return LayerInputs(outs, inputs.kwargs)
