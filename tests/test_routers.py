"""Routers with a score-correction bias (DeepSeek-V3's ``e_score_correction_bias``, issue 16).

The bias only steers which experts are chosen (the routing weights come from the
unbiased sigmoid scores). It is a buffer of the router, not a unit: it stays in float
through quantize_, save_quantized and load_quantized, and the quantized router still
applies it. A large bias on two experts makes every token choose exactly them, which
shows that the bias is read after quantization and after reload.
"""

from __future__ import annotations

import copy

import moe_archs
import torch
from test_architectures import fake_quant_reference

import moe_ao
from moe_ao.tensors.packed import PackedWeight

FAVOURED = (3, 5)


def _chosen(model: torch.nn.Module, ids: torch.Tensor) -> set[int]:
    experts = model.model.layers[1].mlp.experts
    seen: list[torch.Tensor] = []
    handle = experts.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    return set(torch.cat([s.reshape(-1) for s in seen]).tolist())


def test_score_correction_bias_survives_quantization_and_reload(tmp_path):
    model = moe_archs.build("deepseek_v3")
    router = model.model.layers[1].mlp.gate
    ids = torch.randint(2, moe_archs.VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    assert len(_chosen(model, ids)) > 2  # without the bias the tokens spread over the experts
    with torch.no_grad():
        router.e_score_correction_bias[list(FAVOURED)] = 10.0  # sigmoid scores are < 1: these two always win
    found = moe_ao.units(model)
    assert [u.name for u in found if u.kind == "router"] == ["model.layers.1.mlp.gate"]
    plan = moe_ao.Plan({u.name: 4 for u in found if u.kind == "expert"}
                       | {u.name: 8 for u in found if u.kind == "router"}, group_size=16)
    float_model = copy.deepcopy(model)
    moe_ao.quantize_(model, plan)
    assert isinstance(router.weight, PackedWeight)
    assert type(router.e_score_correction_bias) is torch.Tensor
    assert _chosen(model, ids) == set(FAVOURED)
    ref = fake_quant_reference(float_model, model, [u for u in found if u.name in plan])
    with torch.no_grad():
        got, want = model(ids).logits.double(), ref(ids).logits.double()
    assert ((got - want).norm() / want.norm()).item() < 2e-3
    moe_ao.save_quantized(model, tmp_path / "q")
    loaded = moe_ao.load_quantized(tmp_path / "q")
    assert torch.equal(loaded.model.layers[1].mlp.gate.e_score_correction_bias, router.e_score_correction_bias)
    assert _chosen(loaded, ids) == set(FAVOURED)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
