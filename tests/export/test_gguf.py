"""GGUF export (moe_ao.export.gguf): names, types, and a read-back with gguf's own dequantizer."""

from __future__ import annotations

import archs
import pytest
import torch
from transformers import OlmoeConfig, Qwen3MoeConfig

import moe_ao
from moe_ao import models
from moe_ao.export import export
from moe_ao.export.gguf import ARCHS
from moe_ao.export.gguf_tensors import qk_permutation
from moe_ao.export.layout import unit_codes
from moe_ao.plans import Plan

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'moe_ao[export]')")


def tiny(kind: str):
    """A tiny seeded model of each exported architecture, and its tokenizer."""
    _, tok = models.load("tiny-mixtral")
    common = dict(vocab_size=len(tok), hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, num_hidden_layers=2, tie_word_embeddings=False)
    if kind == "mixtral":
        model = archs.build("mixtral")
        config = archs.MixtralConfig(**common | {"vocab_size": len(tok)}, intermediate_size=64, num_local_experts=4,
                                     num_experts_per_tok=2)
        model = archs.AutoModelForCausalLM.from_config(config)
    elif kind == "qwen2_moe":
        model = archs.AutoModelForCausalLM.from_config(archs.Qwen2MoeConfig(
            **common, intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
            num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0], norm_topk_prob=False))
    elif kind == "qwen3_moe":
        model = archs.AutoModelForCausalLM.from_config(Qwen3MoeConfig(
            **common, intermediate_size=64, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
            norm_topk_prob=True, head_dim=16))
    else:
        model = archs.AutoModelForCausalLM.from_config(OlmoeConfig(
            **common, intermediate_size=32, num_experts=4, num_experts_per_tok=2))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.1)
    return model.to(torch.bfloat16).eval(), tok


def llama_plan(model, expert_bits=4, attn_bits=8, group_size=32) -> Plan:
    return Plan({u.name: expert_bits if u.kind == "expert" else attn_bits
                 for u in moe_ao.units(model) if u.kind in ("expert", "attention", "shared_expert", "dense_mlp")},
                group_size=group_size)


def read(path):
    reader = gguf.GGUFReader(str(path))
    return reader, {t.name: t for t in reader.tensors}


def dequantized(t) -> torch.Tensor:
    """A tensor as gguf's own dequantizer gives it, in numpy order ([E, N, K] / [N, K])."""
    from gguf.quants import dequantize

    return torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()


def fp16_scaled(c):
    """Unit codes with their scales rounded to fp16, as Q4_0/Q8_0 store them."""
    return c.__class__(**{**c.__dict__, "scale": c.scale.to(torch.float16).float()})


@pytest.mark.parametrize("kind", sorted(ARCHS))
def test_names_and_types_are_llama_cpps(kind, tmp_path):
    model, tok = tiny(kind)
    moe_ao.quantize_(model, llama_plan(model))
    reader, tensors = read(export(model, tmp_path / "m.gguf", format="gguf", tokenizer=tok))
    arch = gguf.MODEL_ARCH_NAMES
    arch_id = next(a for a, n in arch.items() if n == ARCHS[kind].arch)
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch_id]}
    for name in tensors:
        base = name.rsplit(".", 1)[0]
        assert any(base == a.format(bid=i) for a in allowed for i in range(2)) or base in allowed, name
    assert tensors["blk.1.ffn_gate_exps.weight"].tensor_type.name == "Q4_0"
    assert tensors["blk.1.attn_q.weight"].tensor_type.name == "Q8_0"
    assert tensors["blk.1.attn_norm.weight"].tensor_type.name == "F32"
    assert reader.get_field("general.architecture").contents() == ARCHS[kind].arch
    assert reader.get_field("tokenizer.ggml.model").contents() == "gpt2"
    assert reader.get_field("tokenizer.ggml.pre").contents() == "gpt-2"
    assert len(reader.get_field("tokenizer.ggml.tokens").contents()) == model.config.vocab_size


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64])
def test_q4_0_q8_0_read_back_equal_moe_ao_weights(bits, group_size, tmp_path):
    """gguf's dequantizer on the file gives moe_ao's weights, up to the fp16 rounding of the scales."""
    model, tok = tiny("mixtral")
    moe_ao.quantize_(model, llama_plan(model, bits, bits, group_size))
    _, tensors = read(export(model, tmp_path / "m.gguf", format="gguf", tokenizer=tok))
    for u in moe_ao.units(model):
        if u.kind == "expert":
            got = dequantized(tensors[f"blk.{u.layer}.ffn_{u.proj[:-5]}_exps.weight"])[u.expert]
        elif u.kind == "attention":
            got = dequantized(tensors[f"blk.{u.layer}.attn_{dict(o_proj='output').get(u.proj, u.proj[0])}.weight"])
            if u.proj in ("q_proj", "k_proj"):  # llama's rotary row order
                heads = model.config.num_attention_heads if u.proj == "q_proj" else model.config.num_key_value_heads
                got = got[torch.argsort(qk_permutation(u.shape[0], heads))]
        else:
            continue
        c = unit_codes(model, u)
        assert torch.equal(got, fp16_scaled(c).dequantize().float()), u.name
        torch.testing.assert_close(got, c.dequantize().float(), rtol=2**-8, atol=0)  # moe_ao rounds w to bf16


@pytest.mark.parametrize("kind,gguf_name", [("lm_head", "output.weight"), ("embedding", "token_embd.weight")])
def test_quantized_head_and_embedding_hold_moe_aos_codes(kind, gguf_name, tmp_path):
    """A 4-bit lm_head or input embedding (untied in these random models) is written as a
    Q4_0 tensor (output.weight, token_embd.weight) holding moe_ao's codes."""
    model, tok = tiny("olmoe")
    plan = llama_plan(model, 4, 4)
    unit = next(u for u in moe_ao.units(model) if u.kind == kind)
    moe_ao.quantize_(model, Plan({**{n: plan[n].bits for n in plan}, unit.name: 4}, group_size=32))
    _, tensors = read(export(model, tmp_path / "m.gguf", format="gguf", tokenizer=tok))
    assert tensors[gguf_name].tensor_type.name == "Q4_0"
    assert torch.equal(dequantized(tensors[gguf_name]), fp16_scaled(unit_codes(model, unit)).dequantize().float())
    other = "token_embd.weight" if kind == "lm_head" else "output.weight"
    assert tensors[other].tensor_type.name not in ("Q4_0", "Q8_0", "Q2_K", "Q3_K")  # the other stays float


def test_k_quants_where_rows_allow_and_q4_0_where_not(tmp_path):
    model, tok = tiny("olmoe")  # hidden 64: no row is a multiple of 256
    moe_ao.quantize_(model, llama_plan(model, 2, 3))
    _, tensors = read(export(model, tmp_path / "m.gguf", format="gguf", tokenizer=tok))
    assert tensors["blk.0.ffn_up_exps.weight"].tensor_type.name == "Q4_0"  # 2-bit codes, held exactly
    for u in moe_ao.units(model):
        if u.kind == "expert" and u.proj == "up_proj":
            got = dequantized(tensors[f"blk.{u.layer}.ffn_up_exps.weight"])[u.expert]
            torch.testing.assert_close(got, unit_codes(model, u).dequantize().float(), rtol=2**-8, atol=0)


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K"])
def test_k_quant_packers_decode_with_gguf(qtype):
    from gguf.quants import dequantize

    from moe_ao.export.gguf_quants import quantize_q2_k, quantize_q3_k

    w = torch.randn(8, 512, generator=torch.Generator().manual_seed(0)) * 0.02
    blocks = (quantize_q2_k if qtype == "Q2_K" else quantize_q3_k)(w)
    got = torch.from_numpy(dequantize(blocks.numpy(), getattr(gguf.GGMLQuantizationType, qtype)).copy())
    rel = ((got - w) ** 2).mean() / (w**2).mean()
    assert rel < {"Q2_K": 0.12, "Q3_K": 0.03}[qtype]  # Gaussian weights: ~0.09 / ~0.02


def test_llama_cpp_constraint_refusal_names_the_tensor(tmp_path):
    model, tok = tiny("mixtral")
    units = moe_ao.units(model)
    plan = Plan({u.name: (8 if u.expert == 0 else 4) if u.proj == "down_proj" else 4
                 for u in units if u.kind == "expert"}, group_size=32)
    moe_ao.quantize_(model, plan)
    with pytest.raises(ValueError, match=r"layer 0 experts down_proj.*one ffn_\*_exps tensor"):
        export(model, tmp_path / "m.gguf", format="gguf", tokenizer=tok)
    assert not (tmp_path / "m.gguf").exists()


def test_dense_layer_becomes_identical_experts(tmp_path):
    """qwen2moe in llama.cpp has no dense layers: layer 0 is written as E scaled copies behind a zero router."""
    model, tok = tiny("qwen2_moe")
    moe_ao.quantize_(model, llama_plan(model))
    _, tensors = read(export(model, tmp_path / "m.gguf", format="gguf", tokenizer=tok))
    E, k = model.config.num_experts, model.config.num_experts_per_tok
    down = dequantized(tensors["blk.0.ffn_down_exps.weight"])  # [E, H, F]
    dense = model.model.layers[0].mlp.down_proj.weight.dequantize().float()
    for e in range(E):
        torch.testing.assert_close(down[e, :, : dense.shape[1]], dense * E / k, rtol=2**-8, atol=0)
    assert not down[:, :, dense.shape[1]:].any()  # zero padding
    assert not dequantized(tensors["blk.0.ffn_gate_inp.weight"]).any()
    moe_width = model.config.moe_intermediate_size
    up1 = dequantized(tensors["blk.1.ffn_up_exps.weight"])
    assert not up1[:, moe_width:].any() and up1[:, :moe_width].any()
