"""Calibration windows from local text (moe_ao.calibration)."""

from __future__ import annotations

import pytest
import torch

from moe_ao.calibration import load_calibration, load_eval_tokens, resolve_text


class CharTokenizer:
    """A byte-level stand-in for a Hugging Face tokenizer (ids 0..255)."""

    def __init__(self, extra: int = 0) -> None:
        self.size = 256 + extra

    def __len__(self) -> int:
        return self.size

    def __call__(self, text, add_special_tokens=False, **kwargs):
        return {"input_ids": list(text.encode())}


class Cfg:
    vocab_size = 256
    max_position_embeddings = 64


def test_windows_are_seeded_slices_of_the_text(tmp_path):
    gen = torch.Generator().manual_seed(0)
    text = "".join(chr(97 + int(i)) for i in torch.randint(0, 26, (1000,), generator=gen))
    f = tmp_path / "t.txt"
    f.write_text(text)
    a = load_calibration(str(f), CharTokenizer(), n_samples=5, seq_len=16, seed=3, model_config=Cfg())
    b = load_calibration(str(f), CharTokenizer(), n_samples=5, seq_len=16, seed=3)
    c = load_calibration(str(f), CharTokenizer(), n_samples=5, seq_len=16, seed=4)
    assert a.shape == (5, 16) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    all_windows = torch.tensor(list(text.encode())).unfold(0, 16, 1)  # [985, 16]
    for row in a:  # every window is a contiguous slice of the token stream
        assert (all_windows == row).all(-1).any()


def test_named_sources_resolve_and_test_split_is_held_out():
    assert "Shakespeare" in resolve_text("tinyshakespeare") or len(resolve_text("tinyshakespeare")) > 1000
    with pytest.raises(ValueError, match="held out"):
        load_calibration("wikitext2-test", CharTokenizer(), 2, 8)
    assert load_eval_tokens(CharTokenizer(), max_tokens=100).numel() == 100


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"source": "no/such/file.txt"}, "no such file"),
        ({"seq_len": 65, "model_config": Cfg()}, "max_position_embeddings"),
        ({"tokenizer": CharTokenizer(extra=10), "model_config": Cfg()}, "vocab_size"),
        ({"n_samples": 0}, "positive"),
        ({"seq_len": 10_000}, "fewer than seq_len"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, kwargs, match):
    f = tmp_path / "t.txt"
    f.write_text("hello world " * 100)
    args = {"source": str(f), "tokenizer": CharTokenizer(), "n_samples": 2, "seq_len": 8} | kwargs
    with pytest.raises(ValueError, match=match):
        load_calibration(**args)


def test_empty_file_is_rejected(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        load_calibration(str(f), CharTokenizer(), 2, 8)
