"""The embedded trained models load offline and are what they claim to be."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from moe_ao import models

TEST_TEXT = Path(__file__).resolve().parents[2] / "data" / "wikitext-2" / "test.txt"


@pytest.fixture(scope="module")
def loaded() -> dict:
    return {name: models.load(name) for name in ("tiny-mixtral", "tiny-qwen2-moe")}


def test_available_and_unknown_name() -> None:
    assert {"tiny-mixtral", "tiny-qwen2-moe"} <= set(models.available())
    assert (models.path("tiny-mixtral") / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="tiny-mixtral"):
        models.load("no-such-model")


def test_load_local_directory() -> None:
    model, _ = models.load(models.path("tiny-mixtral"), dtype=torch.float32)
    assert next(model.parameters()).dtype == torch.float32
    assert not model.training


def test_mixtral_architecture(loaded: dict) -> None:
    model, _ = loaded["tiny-mixtral"]
    cfg = model.config
    assert cfg.model_type == "mixtral"
    assert (cfg.num_local_experts, cfg.num_experts_per_tok) == (8, 2)
    assert cfg.num_hidden_layers >= 6
    assert next(model.parameters()).dtype == torch.bfloat16
    assert not model.training


def test_qwen2_moe_architecture(loaded: dict) -> None:
    model, _ = loaded["tiny-qwen2-moe"]
    cfg = model.config
    assert cfg.model_type == "qwen2_moe"
    assert (cfg.num_experts, cfg.num_experts_per_tok) == (16, 4)
    assert cfg.num_hidden_layers >= 6
    layers = model.model.layers
    # DeepSeek-MoE style: dense first layer, every other layer routed + shared expert.
    assert cfg.mlp_only_layers == [0] and not hasattr(layers[0].mlp, "experts")
    for layer in layers[1:]:
        assert layer.mlp.experts.gate_up_proj.shape[0] == 16
        assert hasattr(layer.mlp, "shared_expert") and hasattr(layer.mlp, "shared_expert_gate")


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-qwen2-moe"])
def test_tokenizer_matches_and_model_is_trained(loaded: dict, name: str) -> None:
    model, tok = loaded[name]
    assert len(tok) == model.config.vocab_size
    assert tok.eos_token_id == model.config.eos_token_id
    assert tok.pad_token_id == model.config.pad_token_id
    # A short held-out passage: a random model scores ~vocab size (4096).
    text = TEST_TEXT.read_text(encoding="utf-8")[20_000:22_000]
    ids = tok(text, return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.float().item()
    assert math.exp(loss) < 200
