"""Capture a causal LM as one ATen graph, with its routed experts in traceable form.

Why a traceable experts implementation: transformers 5 fused experts run, by default
(``config._experts_implementation == "eager"``), a Python loop over the experts hit by
the batch (``one_hot(...).sum().nonzero()``, then ``torch.where`` per expert). That loop
is data dependent: ``torch.export`` fails on it (``GuardOnDataDependentSymNode`` on
the ``nonzero`` count), and a tracer that followed it would record only the experts
this one example hit, as per-expert slices rather than the bank. Under an implementation
that touches the bank only through indexing by the top-k ids (transformers'
``batched_mm``: ``bank[ids]`` + ``bmm``; moe_ao's: the same for decode, ``grouped_mm``
over sorted tokens for prefill) the graph is static and every routed weight is visibly
selected by the router's top-k. The implementation is
switched on the live model inside a ``with`` and restored after: no copy of the weights.
The default is transformers' ``batched_mm``, so this lowest layer needs nothing from
``moe_ao.experts`` (which sits on the tensors layer); callers that have registered
moe_ao's implementation may pass ``implementation="moe_ao"``: the roles found are the same.

Export runs non-strict (``torch.export.export(..., strict=False)``) under ``no_grad``,
so parameters stay graph inputs named by their FQN (``graph_signature``) and the
``aten.linear``/``aten.softmax`` ops are kept, not decomposed.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)

TRACEABLE_EXPERTS = "batched_mm"  # transformers' built-in; "moe_ao" once registered also works
EXAMPLE_TOKENS = 8  # enough tokens for every expert path; the graph does not depend on it


@contextlib.contextmanager
def experts_implementation(model: nn.Module, implementation: str) -> Iterator[None]:
    """Sets ``config._experts_implementation`` on every config of ``model``, restores it after."""
    saved: dict[int, tuple[object, object]] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_experts_implementation") and id(config) not in saved:
            saved[id(config)] = (config, config._experts_implementation)
    try:
        for config, _ in saved.values():
            config._experts_implementation = implementation
        yield
    finally:
        for config, value in saved.values():
            config._experts_implementation = value


def default_input_ids(model: nn.Module, tokens: int = EXAMPLE_TOKENS) -> torch.Tensor:
    """``[1, tokens]`` token ids valid for ``model``'s input embedding.

    Raises:
        ValueError: the vocabulary size cannot be found (pass example ids instead).
    """
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(emb, nn.Embedding):
        embs = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        emb = embs[0] if len(embs) == 1 else None
    if emb is None:
        raise ValueError(
            f"{type(model).__name__}: no single nn.Embedding to size example token ids; pass example_inputs "
            f"(what its forward takes, e.g. moe_ao.units(model, example_inputs=(hidden_states,)))"
        )
    device = emb.weight.device
    return (torch.arange(tokens, device=device) % emb.num_embeddings).reshape(1, tokens)


ExampleInputs = torch.Tensor | tuple | list | dict


def capture(
    model: nn.Module,
    example_inputs: ExampleInputs | None = None,
    *,
    implementation: str = TRACEABLE_EXPERTS,
) -> torch.export.ExportedProgram:
    """Exports ``model(*args, **kwargs)`` to one ATen graph under a traceable experts implementation.

    Args:
        model: a causal LM taking token ids, or any module (transformers or plain ``nn.Module``).
        example_inputs: what the forward is called with: a tensor (``[batch, seq]`` ids, or
            whatever the one positional input is), a tuple / list of positional inputs, or a
            dict of keyword inputs; default: :func:`default_input_ids`.
        implementation: experts implementation to trace fused experts with.

    Returns:
        The exported program; parameters are placeholders named in its graph signature.

    Raises:
        ValueError: the model could not be exported (the cause is chained), or
            ``example_inputs`` is of another type.
    """
    if example_inputs is None:
        args, kwargs = (default_input_ids(model),), {}
    elif isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    elif isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    else:
        raise ValueError(f"example_inputs: a tensor, a tuple / list of positional inputs or a dict of keyword "
                         f"inputs; got {type(example_inputs).__name__}")
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs.setdefault("use_cache", False)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), experts_implementation(model, implementation):
            return torch.export.export(model, args, kwargs, strict=False)
    except Exception as err:  # export raises many types (user errors, guards, unsupported ops)
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(
            f"{type(model).__name__}: graph capture under experts implementation "
            f"{implementation!r} failed: {type(err).__name__}: {first}"
        ) from err
    finally:
        model.train(was_training)
