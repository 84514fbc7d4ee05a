"""A transformers model built without allocating its weights: parameters on the meta device.

Loading a checkpoint into a model built the usual way first allocates (and randomly
initialises) every float weight, which for a quantized MoE is several times the memory
the packed model needs. ``meta_model`` builds the model on the meta device instead and
rebuilds its non-persistent buffers (rotary tables: never stored in checkpoints) with
the model's own initialisation, as ``from_pretrained`` does; the loader then assigns
the stored tensors. Imports nothing from moe_ao.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["causal_lm_class", "meta_model", "rebuild_buffers"]


def rebuild_buffers(model: nn.Module) -> None:
    """Materializes every non-persistent buffer on the CPU, filled by the model's ``_init_weights``."""
    owners = {}
    for name, buf in model.named_non_persistent_buffers():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        owner.register_buffer(attr, torch.empty_like(buf, device="cpu"), persistent=False)
        owners[owner_name] = owner
    for owner in owners.values():
        model._init_weights(owner)  # what from_pretrained does: e.g. recomputes rotary inv_freq


def causal_lm_class(config: Any) -> type[nn.Module]:
    """The causal-LM class for ``config``: AutoModelForCausalLM's mapping, or, for architectures it
    does not map (Mistral 4's config has no causal-LM entry in transformers 5.24), the class its
    ``config.architectures`` names.

    Raises:
        ValueError: neither gives a class.
    """
    import transformers
    from transformers import AutoModelForCausalLM

    mapping = AutoModelForCausalLM._model_mapping
    if type(config) in mapping:
        return mapping[type(config)]
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls
    raise ValueError(f"{type(config).__name__}: AutoModelForCausalLM does not map it and config.architectures "
                     f"{getattr(config, 'architectures', None)} names no transformers class")


def meta_model(config: Any, dtype: torch.dtype | None = None) -> nn.Module:
    """``causal_lm_class(config)._from_config(config)`` with its parameters on the meta device.

    Args:
        config: a transformers config.
        dtype: the model's dtype (default: the config's).

    Returns:
        The model in eval mode: real non-persistent buffers, meta parameters and
        persistent buffers (to be assigned from a checkpoint).
    """
    with torch.device("meta"):
        model = causal_lm_class(config)._from_config(config, dtype=dtype or config.dtype)
    rebuild_buffers(model)
    return model.eval()
