"""from_pretrained on moe_ao checkpoints (moe_ao.hf_quantizer): bit-identical to load_quantized."""

from __future__ import annotations

import json

import archs
import pytest
import torch
from test_checkpoint import mixed_plan  # the same mixed plan as the load_quantized tests
from transformers import AutoModelForCausalLM
from transformers.quantizers import auto as hf_auto

import moe_ao
from moe_ao.hub_files import QUANT_METHOD
from moe_ao.plans import Plan
from moe_ao.tensors.packed import PackedWeight


def saved(arch: str, tmp_path, dtype=torch.bfloat16):
    model = archs.build(arch, dtype)
    moe_ao.quantize_(model, mixed_plan(moe_ao.units(model)))  # mixed widths, 16-bit expert, asymmetric
    return model, moe_ao.save_quantized(model, tmp_path / arch)


IDS = torch.randint(0, archs.VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(IDS).logits


@pytest.mark.parametrize("arch", archs.ARCHS)
def test_from_pretrained_equals_load_quantized(arch, tmp_path):
    model, out = saved(arch, tmp_path)
    ref = moe_ao.load_quantized(out)
    hf = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert type(hf) is type(ref) and not hf.training and hf.dtype == torch.bfloat16
    assert moe_ao.quantized_plan(hf) == moe_ao.quantized_plan(model)
    assert moe_ao.quantization_report(hf).quantized == moe_ao.quantization_report(model).quantized
    assert hf.config._experts_implementation == ref.config._experts_implementation
    mine, theirs = dict(ref.named_parameters()), dict(hf.named_parameters())
    assert mine.keys() == theirs.keys()
    for name, p in mine.items():
        q = theirs[name]
        assert type(q) is type(p) and q.dtype == p.dtype and q.device.type == "cpu", name
        if isinstance(p, PackedWeight):
            assert q.__tensor_flatten__() == p.__tensor_flatten__(), name
    assert torch.equal(logits(hf), logits(ref))
    assert torch.equal(logits(hf), logits(model))


def test_dtype_is_honoured(tmp_path):
    _, out = saved("mixtral", tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    packed = [p for p in hf.parameters() if isinstance(p, PackedWeight)]
    assert packed and all(p.dtype == torch.float32 for p in packed)
    assert all(p.dtype == torch.float32 for p in hf.parameters())
    ref = moe_ao.load_quantized(out).to(torch.float32)  # bf16 scales and weights upcast exactly
    assert torch.equal(logits(hf), logits(ref))


def test_checkpoint_is_a_hub_repo(tmp_path):
    model, out = saved("qwen2_moe", tmp_path)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == QUANT_METHOD and Plan.from_dict(config["plan"]) == moe_ao.quantized_plan(model)
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "import moe_ao" in card
    assert "| layer | attention |" in card  # the plan summary


def test_without_moe_ao_loading_fails_loudly(tmp_path, monkeypatch):
    """transformers skips an unknown quant_method; the packed slot tables then fail its shape check."""
    _, out = saved("mixtral", tmp_path)
    monkeypatch.delitem(hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, QUANT_METHOD)
    monkeypatch.delitem(hf_auto.AUTO_QUANTIZER_MAPPING, QUANT_METHOD)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(out)


def test_missing_packed_buffer_is_named(tmp_path):
    _, out = saved("mixtral", tmp_path)
    meta = json.loads((out / "moe_ao.json").read_text())
    meta["packed"]["model.layers.0.mlp.experts.down_proj"]["inner"].append("q5")
    (out / "moe_ao.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"moe_ao\.json: its content does not match its sha256"):
        AutoModelForCausalLM.from_pretrained(out)  # the same verification as load_quantized
    meta["sha256"] = moe_ao.checkpoint.meta_digest(meta)  # a consistent edit: the structure checks name it
    (out / "moe_ao.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"lack \['model\.layers\.0\.mlp\.experts\.down_proj::q5'\]"):
        AutoModelForCausalLM.from_pretrained(out)


def test_save_pretrained_points_to_save_quantized(tmp_path):
    _, out = saved("mixtral", tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(out)
    with pytest.raises(ValueError, match="not serializable"):
        hf.save_pretrained(tmp_path / "again")
    again = moe_ao.save_quantized(hf, tmp_path / "again")
    assert torch.equal(logits(moe_ao.load_quantized(again)), logits(hf))


def test_dequantize(tmp_path):
    _, out = saved("qwen2_moe", tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(out)
    ref = logits(hf)
    hf.dequantize()
    assert not any(isinstance(p, PackedWeight) for p in hf.parameters())
    torch.testing.assert_close(logits(hf), ref, atol=0.07, rtol=0.02)  # prefill dequantizes too: same weights


@pytest.mark.slow
def test_lm_eval_hflm_loads_the_directory(tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'moe_ao[eval]')")
    from lm_eval.models.huggingface import HFLM

    from moe_ao import models
    from moe_ao.eval.harness import local_task

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = models.load("tiny-mixtral")
    units = moe_ao.units(model)
    moe_ao.quantize_(model, Plan({u.name: 4 for u in units if u.kind == "expert"}, group_size=32))
    out = moe_ao.save_quantized(model, tmp_path / "q", tokenizer=tok)
    lm = HFLM(pretrained=str(out), batch_size=8, device="cpu")
    assert isinstance(lm.model.model.layers[0].mlp.experts.gate_up_proj, PackedWeight)
    res = lm_eval.simple_evaluate(model=lm, tasks=[local_task()], limit=16, bootstrap_iters=0)
    assert 0.0 <= res["results"]["wikitext2_nextsent"]["acc,none"] <= 1.0
