"""Export a moe_ao-quantized model to the formats serving engines load.

``moe_ao.export(model, out, format=...)``:

- ``"compressed-tensors"``: a directory in compressed-tensors' ``pack-quantized`` layout
  (vLLM, SGLang; transformers loads it with ``compressed-tensors`` installed);
  see :mod:`moe_ao.export.compressed_tensors`;
- ``"gguf"``: one ``.gguf`` file for llama.cpp (and ollama, LM Studio); see
  :mod:`moe_ao.export.gguf`.

Each engine holds less than moe_ao (a width per expert and per gate/up half): plans
made with ``moe_ao.plan(..., serving="vllm" | "llama.cpp")`` fit them, and an export
of a plan that does not fit is refused with the layer named.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

FORMATS = ("compressed-tensors", "gguf")


def export(model: nn.Module, out: str | Path, format: str, tokenizer: Any = None, **options: Any) -> Path:
    """Writes ``model`` (quantized by moe_ao) in a serving engine's format.

    Args:
        model: a model quantized by :func:`moe_ao.quantize_` or loaded with its plan.
        out: output directory (compressed-tensors) or ``.gguf`` file (gguf).
        format: one of FORMATS.
        tokenizer: the model's tokenizer (saved beside it; GGUF embeds its vocabulary).
        **options: format options (compressed-tensors: ``humming``; gguf: ``name``).

    Returns:
        The path written.

    Raises:
        ValueError: unknown format, an unquantized model, or a plan the engine cannot
            hold (names the layer).
        ImportError: ``format="gguf"`` without the ``gguf`` package.
    """
    if format == "compressed-tensors":
        from moe_ao.export.compressed_tensors import export_compressed_tensors

        return export_compressed_tensors(model, out, tokenizer, **options)
    if format == "gguf":
        from moe_ao.export.gguf import export_gguf

        return export_gguf(model, out, tokenizer, **options)
    raise ValueError(f"format={format!r} is not supported; allowed: {FORMATS}")


__all__ = ["FORMATS", "export"]
