"""compressed-tensors export (moe_ao.export.compressed_tensors): layout, exact codes, transformers reload."""

from __future__ import annotations

import json
import re

import archs
import pytest
import torch
from transformers import AutoModelForCausalLM

import moe_ao
from moe_ao.discovery import unit_weight
from moe_ao.export import export
from moe_ao.export.compressed_tensors import compressed_state, pack_rows_int32
from moe_ao.export.layout import unit_codes
from moe_ao.plans import Plan

ct = pytest.importorskip("compressed_tensors",
                         reason="compressed-tensors is not installed (pip install 'moe_ao[export]')")
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32  # noqa: E402


def plan_for(model, expert_bits=lambda layer: 4, group_size=32, symmetric=True) -> Plan:
    entries = {}
    for u in moe_ao.units(model):
        if u.kind == "expert":
            entries[u.name] = {"bits": expert_bits(u.layer), "group_size": group_size, "symmetric": symmetric}
        elif u.kind in ("attention", "shared_expert", "dense_mlp"):
            entries[u.name] = {"bits": 8, "group_size": u.shape[1], "symmetric": symmetric}  # per channel
    return Plan(entries, group_size=group_size)


def exported(arch, tmp_path, **kw):
    model = archs.build(arch, torch.bfloat16)
    moe_ao.quantize_(model, plan_for(model, **kw))
    return model, export(model, tmp_path / "ct", format="compressed-tensors")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("K", [32, 64, 96, 40])
def test_word_packing_matches_compressed_tensors(bits, K):
    codes = torch.randint(0, 2**bits, (5, K), generator=torch.Generator().manual_seed(bits * K), dtype=torch.uint8)
    signed = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
    assert torch.equal(pack_rows_int32(codes, bits), pack_to_int32(signed, bits))
    assert torch.equal(unpack_from_int32(pack_rows_int32(codes, bits), bits, torch.Size([5, K])), signed)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_tensors_decompress_to_moe_ao_weights(arch, symmetric, tmp_path):
    """Each module's tensors, decompressed by compressed-tensors with its group's scheme, equal moe_ao's."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    model = archs.build(arch, torch.bfloat16)
    moe_ao.quantize_(model, plan_for(model, expert_bits=lambda layer: (4, 8)[layer % 2], symmetric=symmetric))
    flat, config = compressed_state(model)  # asymmetric: the layout, though vLLM is served symmetric only
    modules = {k.removesuffix(".weight_packed") for k in flat if k.endswith(".weight_packed")}
    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    checked = 0
    for u in moe_ao.units(model):
        if u.name not in moe_ao.quantized_plan(model):
            continue
        c = unit_codes(model, u)
        module = next(m for m in modules if _matches(m, u))
        group = next(g for g in config["config_groups"].values()
                     if any(re.match(t.removeprefix("re:"), module) for t in g["targets"]))
        scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"])
        state = {k.removeprefix(module + "."): v for k, v in flat.items() if k.startswith(module + ".weight")}
        dense = compressor.decompress(dict(state), scheme)["weight"]
        assert torch.equal(dense.to(c.scale.dtype), c.dequantize()), u.name
        checked += 1
    assert checked > 10


def _matches(module: str, unit) -> bool:
    layer = f"layers.{unit.layer}."
    proj = {"gate_proj": ("gate_proj", "w1"), "up_proj": ("up_proj", "w3"), "down_proj": ("down_proj", "w2")}
    names = proj.get(unit.proj, (unit.proj,))
    expert = f"experts.{unit.expert}." if unit.expert is not None else None
    shared = ("shared_expert" in module) == (unit.kind == "shared_expert")
    kind_ok = (expert is not None and expert in module) or (expert is None and "experts." not in module and shared)
    return layer in module and kind_ok and module.rsplit(".", 1)[1] in names


def test_config_groups_and_ignore(tmp_path):
    model, out = exported("qwen2_moe", tmp_path, expert_bits=lambda layer: (4, 8)[layer % 2])
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    schemes = {(g["weights"]["num_bits"], g["weights"]["strategy"], g["weights"]["group_size"])
               for g in config["config_groups"].values()}
    # experts at group 32; attention and dense per channel: in_features 64 / 128 are themselves group sizes
    assert schemes == {(4, "group", 32), (8, "group", 32), (8, "group", 64), (8, "group", 128)}
    assert "lm_head" in config["ignore"] and any(i.endswith("mlp.gate") for i in config["ignore"])
    assert any(i.endswith("shared_expert_gate") for i in config["ignore"])
    flat_keys = set(json.loads((out / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (out / "model.safetensors").read_bytes()[:8], "little")]))
    assert "model.layers.1.mlp.experts.3.down_proj.weight_packed" in flat_keys
    assert "model.layers.1.mlp.experts.3.down_proj.weight_shape" in flat_keys


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_transformers_reloads_within_bf16_rounding(arch, tmp_path):
    model, out = exported(arch, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, archs.VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loaded(ids)  # linears decompress on the first forward
    for u in moe_ao.units(model):
        if u.name in moe_ao.quantized_plan(model):
            assert torch.equal(unit_weight(loaded, u), unit_codes(model, u).dequantize()), u.name
    # Its twin: moe_ao's checkpoint loaded by transformers and dequantized, the same dense
    # bf16 weights in the same modules, so the logits agree within one bf16 step (moe_ao's
    # packed kernels round differently; tests/kernels holds them to float64 references).
    moe_ao.save_quantized(model, tmp_path / "q")
    twin = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    twin.dequantize()
    with torch.no_grad():
        a, b = twin(ids).logits, loaded(ids).logits
        packed = model(ids).logits.float()
    step = 2.0 ** (torch.floor(torch.log2(b.float().abs().max())) - 7)  # one bf16 step at the largest logit
    assert (a.float() - b.float()).abs().max() <= step  # the two experts implementations sum in other orders
    assert (packed - b.float()).abs().max() <= 0.05 * b.float().abs().max()  # and moe_ao's kernels agree


def test_plan_vllm_cannot_run_is_refused_naming_the_layer(tmp_path):
    model = archs.build("mixtral", torch.bfloat16)
    units = moe_ao.units(model)
    plan = Plan({u.name: (8 if u.expert == 0 else 4) for u in units if u.kind == "expert" and u.layer == 1}
                | {u.name: 4 for u in units if u.kind == "expert" and u.layer == 0}, group_size=32)
    moe_ao.quantize_(model, plan)
    with pytest.raises(ValueError, match=r"layer 1 routed experts.*one scheme per MoE layer"):
        export(model, tmp_path / "x", format="compressed-tensors")
    assert not (tmp_path / "x").exists()


def test_two_bit_experts_need_humming(tmp_path):
    model = archs.build("mixtral", torch.bfloat16)
    moe_ao.quantize_(model, Plan({u.name: 2 for u in moe_ao.units(model) if u.kind == "expert"}, group_size=32))
    with pytest.raises(ValueError, match=r"2-bit expert.*allowed: \(4, 8\)"):
        export(model, tmp_path / "x", format="compressed-tensors")
    assert (export(model, tmp_path / "y", format="compressed-tensors", humming=True) / "config.json").is_file()


def test_unknown_format_and_unquantized_model(tmp_path):
    with pytest.raises(ValueError, match=r"format='onnx'.*compressed-tensors"):
        export(archs.build("mixtral"), tmp_path / "x", format="onnx")
    with pytest.raises(ValueError, match="not quantized"):
        export(archs.build("mixtral"), tmp_path / "x", format="compressed-tensors")


def test_a_from_pretrained_model_exports_the_same(tmp_path):
    """A model loaded by from_pretrained (moe_ao's quantizer) exports the very same tensors."""
    model = archs.build("qwen2_moe", torch.bfloat16)
    moe_ao.quantize_(model, plan_for(model))
    loaded = AutoModelForCausalLM.from_pretrained(moe_ao.save_quantized(model, tmp_path / "q"))
    (mine, config), (theirs, config2) = compressed_state(model), compressed_state(loaded)
    assert config == config2 and mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
