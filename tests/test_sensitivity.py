"""Measured KL sensitivities against a float64 whole-model reference."""

from __future__ import annotations

import copy

import archs
import pytest
import torch
import torch.nn.functional as F

from moe_ao.discovery import decoder_layers, unit_weight, units
from moe_ao.primitives import rtn_quantize
from moe_ao.quant.gptq import gptq_quantize
from moe_ao.sensitivity import Head, kl_sensitivities
from moe_ao.sensitivity_estimate import estimate_kl_sensitivities

SEQ = 16


def _f64(arch: str) -> torch.nn.Module:
    model = archs.build(arch, torch.float64)
    model.config._experts_implementation = "eager"  # torch._grouped_mm has no float64 kernel
    return model


def _calib(model: torch.nn.Module, n: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (n, SEQ), generator=g)


def _pick(model: torch.nn.Module) -> list:
    """One unit of each planned kind the model has (the first of each)."""
    seen, out = set(), []
    for u in units(model):
        if u.kind in ("attention", "expert", "shared_expert", "dense_mlp") and u.kind not in seen:
            seen.add(u.kind)
            out.append(u)
    return out


@torch.no_grad()
def _reference_kl(model: torch.nn.Module, unit, W: torch.Tensor, ids: torch.Tensor) -> float:
    """Whole-model float64 forward with ``unit``'s weight replaced by W: mean KL per token."""
    ref = F.log_softmax(model(ids, use_cache=False).logits.double(), -1)
    changed = copy.deepcopy(model)
    unit_weight(changed, unit).copy_(W)
    out = F.log_softmax(changed(ids, use_cache=False).logits.double(), -1)
    return float(F.kl_div(out, ref, log_target=True, reduction="sum")) / ids.numel()


@pytest.mark.parametrize("arch", archs.ARCHS)
def test_head_gives_the_models_logits(arch):
    model = _f64(arch)
    ids = _calib(model, 2)
    captured = []
    _, layers = decoder_layers(model)
    handle = layers[-1].register_forward_hook(
        lambda m, a, out: captured.append(out[0] if isinstance(out, tuple) else out)
    )
    want = model(ids, use_cache=False).logits
    handle.remove()
    head = Head(model, torch.float64)
    torch.testing.assert_close(head.logits(ids, captured[0]), want, rtol=0, atol=1e-12)
    assert len(decoder_layers(model)[1]) == model.config.num_hidden_layers  # the model got its layers back


@pytest.mark.parametrize("arch", archs.ARCHS)
def test_rtn_kl_matches_float64_whole_model_reference(arch):
    model = _f64(arch)
    ids = _calib(model)
    picked = _pick(model)
    sizes = {u.name: 32 for u in picked}
    table, meta = kl_sensitivities(model, ids, picked, sizes, (2, 4), quantizer="rtn", progress=False)
    assert meta["quantizer"] == "rtn" and meta["kl_tokens"] == ids.numel() and meta["dtype"] == "float64"
    for u in picked:
        W = unit_weight(model, u)
        for b in (2, 4):
            deq = rtn_quantize(W, b, 32, True, torch.float32).dequantize(torch.float64)  # RTN's own tests check it
            want = _reference_kl(model, u, deq, ids)
            assert table[u.name][b] == pytest.approx(want, rel=1e-6, abs=1e-12), (u.name, b)
        assert table[u.name][2] > 0 and table[u.name][4] > 0, u.name


def test_gptq_kl_uses_gptq_on_the_units_float_hessian():
    model = _f64("mixtral")
    ids = _calib(model, 6)
    u = next(u for u in units(model) if u.proj == "q_proj" and u.layer == 1)
    xs = []
    handle = model.get_submodule(u.param[: -len(".weight")]).register_forward_pre_hook(lambda m, a: xs.append(a[0]))
    with torch.no_grad():
        model(ids, use_cache=False)
    handle.remove()
    X = torch.cat(xs).reshape(-1, u.shape[1])
    H = X.T @ X / X.shape[0]
    q, _ = gptq_quantize(unit_weight(model, u), H, bits=3, group_size=32, scale_dtype=torch.float32, act_order=True)
    want = _reference_kl(model, u, q.dequantize(torch.float64), ids[:2])
    table, meta = kl_sensitivities(model, ids, [u], {u.name: 32}, (3,), kl_windows=2, progress=False)
    assert meta["quantizer"] == "gptq" and meta["kl_tokens"] == 2 * SEQ  # Hessian from all 6 windows, KL on 2
    assert table[u.name][3] == pytest.approx(want, rel=1e-6)


def test_model_is_unchanged_and_results_are_deterministic():
    model = archs.build("qwen2_moe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _calib(model)
    picked = _pick(model)
    sizes = {u.name: 32 for u in picked}
    first, _ = kl_sensitivities(model, ids, picked, sizes, (2, 8), progress=False)
    second, _ = kl_sensitivities(model, ids, picked, sizes, (2, 8), progress=False)
    assert first == second
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(v >= 0 for d in first.values() for v in d.values())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"quantizer": "awq"}, "quantizer='awq'"),
        ({"kl_windows": 0}, "kl_windows=0"),
        ({"calibration": torch.zeros(2, 4)}, "int64"),
        ({"router": True}, "decoder-layer linears, lm_head and embeddings only"),
        ({"group_sizes": {}}, "group_sizes lacks 1 units"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, match):
    model = archs.build("mixtral")
    kind = "router" if kwargs.pop("router", False) else "attention"
    picked = [next(u for u in units(model) if u.kind == kind)]
    args = {"calibration": _calib(model), "group_sizes": {u.name: 32 for u in picked}} | kwargs
    with pytest.raises(ValueError, match=match):
        kl_sensitivities(model, args.pop("calibration"), picked, args.pop("group_sizes"), progress=False, **args)


def test_head_pieces_give_the_same_kl(monkeypatch):
    """The head runs in pieces of about HEAD_ELEMENTS logits; one window per piece matches whole chunks."""
    from moe_ao import sensitivity

    model = _f64("mixtral")
    ids = _calib(model)
    picked = _pick(model)
    sizes = {u.name: 32 for u in picked}
    whole, _ = kl_sensitivities(model, ids, picked, sizes, (2,), quantizer="rtn", progress=False)
    monkeypatch.setattr(sensitivity, "HEAD_ELEMENTS", 1)  # every piece one window
    pieces, _ = kl_sensitivities(model, ids, picked, sizes, (2,), quantizer="rtn", progress=False)
    for name in whole:
        assert pieces[name][2] == pytest.approx(whole[name][2], rel=1e-12)


@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_lm_head_kl_is_its_rtn_alone_and_the_estimate_measures_it(quantizer):
    """lm_head is priced by the KL of RTN (what quantize_ does outside the layers), with either
    quantizer for the layers; the estimate measures it exactly on its windows."""
    model = _f64("mixtral")
    ids = _calib(model)
    head = next(u for u in units(model) if u.kind == "lm_head")
    attn = next(u for u in units(model) if u.kind == "attention")
    sizes = {head.name: 32, attn.name: 32}
    table, _ = kl_sensitivities(model, ids, [attn, head], sizes, (2, 4), quantizer=quantizer, progress=False)
    est, _ = estimate_kl_sensitivities(model, ids, [attn, head], sizes, (2, 4), quantizer=quantizer, progress=False)
    for b in (2, 4):
        deq = rtn_quantize(unit_weight(model, head), b, 32, True, torch.float32).dequantize(torch.float64)
        want = _reference_kl(model, head, deq, ids)
        assert want > 0
        assert table[head.name][b] == pytest.approx(want, rel=1e-6), b
        assert est[head.name][b] == pytest.approx(want, rel=1e-6), b
    assert table[head.name][2] > table[head.name][4]
    assert set(est[attn.name]) == {2, 4}


@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_embedding_kl_is_its_rtn_alone(quantizer):
    """The input embedding is priced by the KL of RTN (what quantize_ does outside the layers),
    every float layer running on the inputs it gives layer 0; the model is restored after."""
    model = _f64("mixtral")
    ids = _calib(model)
    emb = next(u for u in units(model) if u.kind == "embedding")
    attn = next(u for u in units(model) if u.kind == "attention")
    before = unit_weight(model, emb).clone()
    sizes = {emb.name: 32, attn.name: 32}
    table, _ = kl_sensitivities(model, ids, [attn, emb], sizes, (2, 4), quantizer=quantizer, progress=False)
    assert torch.equal(unit_weight(model, emb), before)
    for b in (2, 4):
        deq = rtn_quantize(before, b, 32, True, torch.float32).dequantize(torch.float64)
        want = _reference_kl(model, emb, deq, ids)
        assert want > 0
        assert table[emb.name][b] == pytest.approx(want, rel=1e-6), b
    assert table[emb.name][2] > table[emb.name][4]


@pytest.mark.parametrize("kind,other", [("lm_head", "input embedding"), ("embedding", "output head")])
def test_a_tied_head_or_embedding_is_refused_by_name(kind, other):
    model = archs.build("mixtral")
    model.lm_head.weight = model.model.embed_tokens.weight
    unit = next(u for u in units(model) if u.kind == kind)
    for measure in (kl_sensitivities, estimate_kl_sensitivities):
        with pytest.raises(ValueError, match=f"{unit.name}: its weight is tied to the {other}"):
            measure(model, _calib(model), [unit], {unit.name: 32}, (4,), progress=False)
