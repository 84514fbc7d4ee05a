"""A transformers model built on the meta device whose weights come in one layer at a time.

``StreamedModel(path)`` builds the model from its config without allocating a weight
(parameters on the meta device), then

- ``load_rest()`` brings in everything outside the decoder layers (embeddings, final
  norm, head: loaded once and kept; a large vocabulary costs what it costs, e.g. 2 x
  0.6 GB for Qwen1.5-MoE's untied embeddings and head);
- ``load_layer(i)`` / ``release_layer(i)`` bring decoder layer i in from the
  memory-mapped shards and put it back on the meta device (its memory freed).

Loading goes through transformers' own conversion mapping (the one ``from_pretrained``
uses), applied to just that layer's tensors, so per-expert on-disk weights become the
fused 3-D parameters exactly as ``from_pretrained`` makes them. Non-persistent buffers
(rotary tables) are rebuilt by the model's own initialisation. Before anything is read,
``preflight()`` runs every layer's conversion on meta tensors of the stored shapes: a
missing tensor or one of the wrong shape is a named error before any output exists.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from moe_ao.discovery import decoder_layers
from moe_ao.quant.layerwise import STREAM_ATTR
from moe_ao.skeleton import meta_model
from moe_ao.stream.source import CheckpointSource, SourceError

__all__ = ["STREAM_ATTR", "StreamedModel"]

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """transformers' per-call "Loading weights" bar, off: it would print once per layer."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


class StreamedModel:
    """A causal LM whose decoder layers are loaded on demand from a checkpoint directory.

    Args:
        path: a local HF checkpoint (config.json + safetensors).
        dtype: the dtype to build the model in (default: the config's).

    Attributes:
        model: the transformers model (its layers on the meta device until loaded).
        source: the checkpoint's tensors.

    Raises:
        SourceError: the checkpoint's files are missing or inconsistent.
    """

    def __init__(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        from transformers import AutoConfig

        self.source = CheckpointSource(path)
        self.config = AutoConfig.from_pretrained(path)
        self.dtype = dtype or getattr(self.config, "dtype", None) or torch.float32
        if isinstance(self.dtype, str):
            self.dtype = getattr(torch, self.dtype)
        self.model = meta_model(self.config, self.dtype)
        self.prefix, self.layers = decoder_layers(self.model)
        self.groups = self.source.groups()
        self.loaded: set[int] = set()
        setattr(self.model, STREAM_ATTR, self)
        _fix_mmap_threshold()

    # ------------------------------------------------------------------ loading
    def _mapping(self) -> list[Any]:
        from transformers.conversion_mapping import get_model_conversion_mapping

        return get_model_conversion_mapping(self.model)

    def _convert(self, tensors: dict[str, Any], device: str, model: nn.Module | None = None) -> Any:
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        model = model or self.model
        config = LoadStateDictConfig(weight_mapping=self._mapping(), dtype=self.dtype, device_map={"": device})
        with _quiet_loading():
            info, _ = convert_and_load_state_dict_in_model(model, tensors, config)
        return info

    def keys_of(self, layer: int | None) -> set[str]:
        """The model's state-dict keys inside decoder layer ``layer`` (None: outside every layer)."""
        inside = f"{self.prefix}."
        if layer is not None:
            return {k for k in self.model.state_dict() if k.startswith(f"{inside}{layer}.")}
        return {k for k in self.model.state_dict() if not k.startswith(inside)}

    def _check(self, info: Any, layer: int | None) -> None:
        where = f"layer {layer}" if layer is not None else "outside the decoder layers"
        if info.conversion_errors:
            key, err = next(iter(info.conversion_errors.items()))
            raise SourceError(f"{self.source.path}: {where}: {key} cannot be built from the stored tensors: "
                              f"{str(err).strip().splitlines()[-1]}")
        if info.mismatched_keys:
            raise SourceError(f"{self.source.path}: {where}: tensors of the wrong shape for "
                              f"{sorted(info.mismatched_keys)[:3]}")
        tied = set(getattr(self.model, "all_tied_weights_keys", {}) or {})
        missing = sorted((set(info.missing_keys) & self.keys_of(layer)) - tied - self._non_persistent())
        if missing:
            raise SourceError(f"{self.source.path}: {where}: the checkpoint lacks {missing[:3]}"
                              f"{' ...' if len(missing) > 3 else ''}")

    def _non_persistent(self) -> set[str]:
        return {k for k, _ in self.model.named_non_persistent_buffers()}

    def preflight(self) -> None:
        """Runs every group's conversion on meta tensors of the stored shapes (reads no data).

        Raises:
            SourceError: a tensor the model needs is missing, or has a shape its
                conversion or the model does not accept; names the layer and tensor.
        """
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            probe = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype)
        saved, self.model = self.model, probe
        try:
            for layer, keys in sorted(self.groups.items(), key=lambda kv: (kv[0] is not None, kv[0] or 0)):
                if layer is not None and layer >= len(self.layers):
                    continue  # e.g. DeepSeek-V3's multi-token-prediction layer: transformers ignores it too
                metas = {k: torch.empty(self.source.shapes[k][0], dtype=_DTYPES.get(self.source.shapes[k][1],
                                        self.dtype), device="meta") for k in keys}
                self._check(self._convert(metas, "meta", probe), layer)
            for i in range(len(self.layers)):
                if i not in self.groups:
                    raise SourceError(f"{self.source.path}: the checkpoint holds no tensor of layer {i}")
        finally:
            self.model = saved

    def load_rest(self) -> None:
        """Loads everything outside the decoder layers (embeddings, final norm, head) and ties weights."""
        with self.source.slices(self.groups.get(None, [])) as tensors:
            self._check(self._convert(tensors, "cpu"), None)
        self.model.tie_weights()

    def load_layer(self, i: int) -> nn.Module:
        """Decoder layer i with its real weights (read from the memory-mapped shards)."""
        if i not in self.loaded:
            with self.source.slices(self.groups.get(i, [])) as tensors:
                self._check(self._convert(tensors, "cpu"), i)
            self.loaded.add(i)
        return self.layers[i]

    def release_layer(self, i: int) -> None:
        """Puts layer i back on the meta device, freeing its weights."""
        self.layers[i].to("meta")
        self.loaded.discard(i)
        _trim_heap()


    @contextlib.contextmanager
    def layer(self, i: int) -> Iterator[nn.Module]:
        """``with streamed.layer(i) as layer:`` the layer is loaded inside the block only."""
        layer = self.load_layer(i)
        try:
            yield layer
        finally:
            self.release_layer(i)


def _trim_heap() -> None:
    """Returns freed heap memory to the system (glibc). A layer's tensors are mostly a few MB each:
    glibc serves such sizes from its heap once its adaptive mmap threshold has grown, and keeps
    the freed memory, so without a trim the RSS of a streamed run grew by ~25 MB per layer."""
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    trim(ctypes.c_size_t(0))


MMAP_THRESHOLD = 512 * 2**10


def _fix_mmap_threshold() -> None:
    """Makes glibc serve every allocation of 512 KiB or more with its own mmap, for the rest of the process.

    glibc's default threshold adapts upwards (to 32 MiB) as large blocks are freed, after
    which a streamed run's many few-MB temporaries come from the heap, and the heap's
    fragments pile up layer after layer: on a 410 MB, 64-layer checkpoint the peak RSS of
    streamed GPTQ grew by 162 MB with the adaptive threshold and by 101 MB with it fixed.
    A process-wide setting, made only by streamed runs (a no-op where glibc is absent).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(ctypes.c_int(-3), ctypes.c_int(MMAP_THRESHOLD))  # M_MMAP_THRESHOLD
