"""Embedded trained tiny MoE language models.

Quantization effects are invisible on random weights, so ``moe_ao`` ships two
small MoE LMs trained on real text (WikiText-2 valid + Tiny Shakespeare; see
``data/README.md``), each ~11.5 MB in bf16:

* ``tiny-mixtral``: ``MixtralForCausalLM``, 8 experts, top-2.
* ``tiny-qwen2-moe``: ``Qwen2MoeForCausalLM``, DeepSeek-MoE style: 16
  fine-grained routed experts (top-4), a gated shared expert, dense layer 0.

They are regenerated deterministically by ``benchmarks/train_tiny_moe.py``
(numbers in ``benchmarks/results/train_tiny_moe.md``). Hold WikiText-2 *test*
out: evaluate on it, never calibrate on it.

Example::

    from moe_ao import models

    model, tokenizer = models.load("tiny-qwen2-moe")
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["available", "load", "path"]

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"


def available() -> list[str]:
    """Names of the embedded models.

    Returns:
        Sorted names of the checkpoint directories shipped with the package.
    """
    if not CHECKPOINTS.is_dir():
        return []
    return sorted(p.name for p in CHECKPOINTS.iterdir() if (p / "config.json").is_file())


def path(name: str) -> Path:
    """Directory of an embedded model.

    Args:
        name: An embedded model name, e.g. ``"tiny-mixtral"``.

    Returns:
        The checkpoint directory (loadable with ``from_pretrained``).

    Raises:
        ValueError: If ``name`` is not an embedded model.
    """
    names = available()
    if name not in names:
        raise ValueError(f"unknown embedded model {name!r}; available: {', '.join(names) or 'none'}")
    return CHECKPOINTS / name


def resolve(name_or_path: str | Path) -> Path:
    """The checkpoint directory of an embedded model name or a local directory.

    Raises:
        ValueError: If ``name_or_path`` is neither an embedded name nor an existing directory.
    """
    local = Path(name_or_path)
    return local if local.is_dir() else path(str(name_or_path))


def load(name_or_path: str | Path, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.nn.Module, object]:
    """Loads a model and its tokenizer, offline, in eval mode.

    Args:
        name_or_path: An embedded model name (see :func:`available`) or a local
            Hugging Face checkpoint directory.
        dtype: Parameter dtype. The embedded checkpoints are stored in bf16;
            ``torch.float32`` upcasts them exactly.

    Returns:
        ``(model, tokenizer)``: a ``*ForCausalLM`` in eval mode and its
        ``PreTrainedTokenizerFast``.

    Raises:
        ValueError: If ``name_or_path`` is neither an embedded name nor an
            existing directory.
    """
    # Deferred: importing transformers takes seconds and the rest of the
    # package must stay importable without paying for it.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = resolve(name_or_path)
    # local_files_only: never reach for the Hub, even if the name looks like a repo id.
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(ckpt, local_files_only=True)
    return model.eval(), tokenizer
