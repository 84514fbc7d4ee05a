"""Quantized input embeddings and heads, untied and tied: quantize_, save/load, from_pretrained.

An untied embedding is quantized like any unit: its rows dequantize to the float64
reference RTN's. A tied embedding and head (tie_word_embeddings) share one tensor, so they
are quantized once, only when the plan gives both the same spec; the tie survives saving,
loading and from_pretrained, and the checkpoint stores the codes once.
"""

from __future__ import annotations

import archs
import pytest
import torch
from safetensors import safe_open
from test_api import assert_untouched, input_ids, logits, reference_model, snapshot
from transformers import AutoModelForCausalLM

import moe_ao
from moe_ao.plans import Plan
from moe_ao.tensors.packed import PackedWeight


def outside(model) -> tuple:
    us = moe_ao.units(model)
    return next(u for u in us if u.kind == "embedding"), next(u for u in us if u.kind == "lm_head")


def tied_model():
    model = archs.build("mixtral")
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_untied_embedding_matches_reference(arch, ref_rtn):
    model = archs.build(arch)
    emb, head = outside(model)
    attn = [u for u in moe_ao.units(model) if u.kind == "attention"]
    plan = Plan({emb.name: 4, head.name: 8, **{u.name: 8 for u in attn}}, group_size=32)
    moe_ao.quantize_(model, plan)
    assert isinstance(model.get_input_embeddings().weight, PackedWeight)
    assert moe_ao.quantization_report(model).quantized[emb.name]["kind"] == "embedding"
    ref, _ = reference_model(arch, plan, ref_rtn)
    ids = input_ids()
    assert torch.equal(model.get_input_embeddings()(ids), ref.get_input_embeddings()(ids))
    torch.testing.assert_close(logits(model, ids), logits(ref, ids), rtol=1e-5, atol=2e-5)
    assert (logits(archs.build(arch), ids) - logits(model, ids)).abs().max() > 1e-3  # the embedding changed


@pytest.mark.parametrize("specs", [{"embedding": 4}, {"lm_head": 4}, {"embedding": 4, "lm_head": 8}],
                         ids=["embedding-only", "head-only", "different-bits"])
def test_tied_units_need_one_spec_and_leave_the_model_untouched(specs):
    model = tied_model()
    units = dict(zip(("embedding", "lm_head"), outside(model)))
    snap, impl = snapshot(model), model.config._experts_implementation
    planned = units[next(iter(specs))]
    twin = units["lm_head" if planned.kind == "embedding" else "embedding"]
    with pytest.raises(ValueError, match=rf"{planned.name}: its weight is tied to {twin.param}; plan {twin.name} "
                                         r"at the same spec"):
        moe_ao.quantize_(model, Plan({units[k].name: b for k, b in specs.items()}, group_size=32))
    assert_untouched(model, snap, impl)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_tied_pair_is_one_tensor_through_save_load_and_from_pretrained(tmp_path):
    model = tied_model()
    emb, head = outside(model)
    plan = Plan({emb.name: 4, head.name: 4}, group_size=32)
    moe_ao.quantize_(model, plan)
    w = model.get_input_embeddings().weight
    assert isinstance(w, PackedWeight) and model.lm_head.weight is w
    report = moe_ao.quantization_report(model).quantized
    assert report[emb.name] == {**report[head.name], "kind": "embedding"}
    ids = input_ids()
    want = logits(model, ids)
    out = moe_ao.save_quantized(model, tmp_path / "q")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not any(k.startswith("lm_head") for k in keys)  # stored once, under the embedding
    assert any(k.startswith("model.embed_tokens.weight") for k in keys)
    for loaded in (moe_ao.load_quantized(out), AutoModelForCausalLM.from_pretrained(out, device_map="cpu")):
        assert isinstance(loaded.lm_head.weight, PackedWeight)
        assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
        assert torch.equal(logits(loaded, ids), want)
