"""A byte-level BPE tokenizer (``tokenizers``) as GGUF's ``gpt2`` tokenizer metadata.

llama.cpp's ``gpt2`` vocabulary is the byte-level BPE of GPT-2: tokens in their
byte-to-unicode spelling (``Ġthe``), merges as ``"left right"`` strings in rank order,
one type per token (normal, or control for special added tokens), and a pre-tokenizer
name; ``gpt-2`` is the GPT-2 split regex that ``tokenizers``' ``ByteLevel(use_regex=True)``
applies. Ids beyond the tokenizer's vocabulary (a model's padded embedding) are
written as unused tokens.
"""

from __future__ import annotations

import json
from typing import Any


def _backend_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        raise ValueError(f"GGUF export needs a fast (tokenizers) tokenizer; got {type(tokenizer).__name__}")
    return json.loads(backend.to_str())


def _check_byte_level(data: dict[str, Any]) -> None:
    model, pre = data["model"], data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    byte_level = [p for p in steps if p.get("type") == "ByteLevel"]
    if model.get("type") != "BPE" or not byte_level or not byte_level[0].get("use_regex", True) or len(steps) != 1:
        raise ValueError(f"GGUF export supports byte-level BPE tokenizers with GPT-2's split (ByteLevel, use_regex);"
                         f" got model {model.get('type')!r}, pre-tokenizer {[p.get('type') for p in steps]}")


def vocab_lists(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, GGUF token types, merges) for ``vocab_size`` ids.

    Raises:
        ValueError: not a byte-level BPE with GPT-2's split, or ids missing below the
            tokenizer's size.
    """
    from gguf import TokenType

    data = _backend_json(tokenizer)
    _check_byte_level(data)
    tokens: dict[int, str] = {i: t for t, i in data["model"]["vocab"].items()}
    types = {i: int(TokenType.NORMAL) for i in tokens}
    for added in data.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = int(TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED)
    size = max(vocab_size, max(tokens) + 1)
    missing = [i for i in range(max(tokens) + 1) if i not in tokens]
    if missing:
        raise ValueError(f"tokenizer has no token for ids {missing[:5]}")
    names = [tokens.get(i, f"[PAD{i}]") for i in range(size)]
    kinds = [types.get(i, int(TokenType.UNUSED)) for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    return names, kinds, merges


def add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """Writes the tokenizer's metadata (model ``gpt2``, pre ``gpt-2``, tokens, merges, special ids)."""
    tokens, types, merges = vocab_lists(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            add(int(value))
    probe = tokenizer("a")["input_ids"] if callable(tokenizer) else []
    writer.add_add_bos_token(bool(probe) and probe[0] == getattr(tokenizer, "bos_token_id", None)
                             and len(probe) > 1)
    writer.add_add_eos_token(False)
