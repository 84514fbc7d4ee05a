"""Calibration batches from local text (or a user's ``datasets`` dataset).

Nothing is fetched: sources are local text files, the text that ships in the repo's
``data/`` folder (by short name), or a ``datasets.Dataset`` the caller already has.
Samples are seeded random windows of ``seq_len`` tokens from the tokenized text.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

# Short names for the text shipped in data/ (see data/README.md for licences).
# WikiText-2 test is held out for evaluation and deliberately has no calibration name.
NAMED_SOURCES = {
    "wikitext2-valid": "wikitext-2/valid.txt",
    "tinyshakespeare": "tinyshakespeare/input.txt",
}
EVAL_SOURCES = {"wikitext2-test": "wikitext-2/test.txt"}


def data_dir() -> Path:
    """The repo's data/ folder (override with MOE_AO_DATA)."""
    return Path(os.environ.get("MOE_AO_DATA", Path(__file__).resolve().parents[1] / "data"))


def resolve_text(source: str, allow_eval: bool = False) -> str:
    """Reads a named source or a text file path.

    Raises:
        ValueError: unknown name / missing file, naming the allowed names.
    """
    names = NAMED_SOURCES | (EVAL_SOURCES if allow_eval else {})
    if source in names:
        path = data_dir() / names[source]
    elif source in EVAL_SOURCES:
        raise ValueError(f"{source!r} is held out for evaluation; calibrate on one of {sorted(NAMED_SOURCES)}")
    else:
        path = Path(source)
    if not path.is_file():
        raise ValueError(f"calibration source {source!r}: no such file ({path}); named sources: {sorted(names)}")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"calibration source {source!r} ({path}) is empty")
    return text


def check_token_ids(ids: Any, model_config: Any | None = None, what: str = "calibration") -> None:
    """The one check of calibration token ids, shared by every data-driven step.

    Args:
        ids: int64 [n_samples, seq_len] token ids.
        model_config: the model's config; when given, ids must lie in [0, vocab_size).
        what: the name used in the error.

    Raises:
        ValueError: not a non-empty int64 2-D tensor, or an id out of the vocabulary's range.
    """
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.numel() == 0 or ids.dtype != torch.long:
        got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{what} must be non-empty int64 [n_samples, seq_len] token ids "
                         f"(moe_ao.calibration.load_calibration); got {got}")
    lo, hi = int(ids.min()), int(ids.max())
    vocab = getattr(model_config, "vocab_size", None)
    if lo < 0 or (vocab is not None and hi >= vocab):
        bad = lo if lo < 0 else hi
        raise ValueError(f"{what} holds token id {bad}; allowed: 0 <= id < vocab_size={vocab}")


def _check_tokenizer(tokenizer: Any, model_config: Any | None) -> None:
    if model_config is None:
        return
    vocab = getattr(model_config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab}; wrong tokenizer?"
        )


def load_calibration(
    source: str | Any,
    tokenizer: Any,
    n_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    model_config: Any | None = None,
) -> torch.Tensor:
    """Tokenized calibration windows.

    Args:
        source: a named source (``wikitext2-valid``, ``tinyshakespeare``), a text file
            path, or a ``datasets.Dataset`` with a ``text`` column.
        tokenizer: a Hugging Face tokenizer.
        n_samples: number of windows.
        seq_len: tokens per window.
        seed: window sampling seed.
        model_config: when given, checks seq_len and the tokenizer's vocabulary fit it.

    Returns:
        int64 [n_samples, seq_len].

    Raises:
        ValueError: empty source, seq_len beyond the model's context, text shorter than
            one window, a tokenizer larger than the model's vocabulary, bad counts.
    """
    if n_samples <= 0 or seq_len <= 0:
        raise ValueError(f"n_samples={n_samples} and seq_len={seq_len} must be positive")
    max_pos = getattr(model_config, "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_position_embeddings={max_pos}")
    _check_tokenizer(tokenizer, model_config)
    if isinstance(source, str):
        text = resolve_text(source)
    else:
        if "text" not in getattr(source, "column_names", []):
            raise ValueError(f"dataset {source!r} needs a 'text' column")
        text = "\n".join(t for t in source["text"] if t)
        if not text.strip():
            raise ValueError("calibration dataset has no text")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    if ids.numel() < seq_len + 1:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n_samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def load_eval_tokens(tokenizer: Any, source: str = "wikitext2-test", max_tokens: int | None = None) -> torch.Tensor:
    """The held-out evaluation text as one token stream (int64 [N])."""
    ids = torch.tensor(
        tokenizer(resolve_text(source, allow_eval=True), add_special_tokens=False, verbose=False)["input_ids"]
    )
    return ids if max_tokens is None else ids[:max_tokens]
