"""Acceptance for the two most used MoE layouts moe_ao had to learn (issue 16).

gpt-oss: transposed banks [E, H, 2I] / [E, I, H] with gate and up columns interleaved,
expert biases (kept in float, added after the packed matmul) and a clamped swiglu.
Llama 4: transposed banks without an ``is_transposed`` flag, an experts module of its own
(not dispatched through transformers' ExpertsInterface), top-1 sigmoid routing and a
shared expert. Both are repacked to [E, out, in] at quantize time.

Each, built tiny with random weights and quantized at 8 bits (experts and attention):
- matches the float model run in float64 (rel. error < 2%);
- matches the float64 fake-quant reference (the dequantized weights written back through
  the float layout, run by transformers' own code) to float32 rounding: no weight is misread;
- compiles with ``fullgraph=True`` (a graph break is an error) and gives the eager logits.
"""

from __future__ import annotations

import copy

import moe_archs
import pytest
import torch
from test_architectures import fake_quant_reference

import moe_ao

CASES = {
    "gpt_oss": {},  # 8 experts top-2, swiglu limit 7.0 (its config default)
    "llama4": {"num_experts_per_tok": 1},  # Llama 4's own top-1 routing
}
# Seed 1 for gpt-oss: with seed 0 a top-k near-tie in the random router flips under any
# perturbation (8-bit attention alone, experts left in float, already gives 13% error), a
# property of that random model, not of the experts path (the fake-quant check is exact).
SEEDS = {"gpt_oss": 1, "llama4": 0}


def _quantized(arch: str):
    model = moe_archs.build(arch, seed=SEEDS[arch], **CASES[arch])
    found = moe_ao.units(model)
    plan = moe_ao.Plan({u.name: 8 for u in found if u.kind in ("expert", "attention")}, group_size=16)
    float_model = copy.deepcopy(model)
    moe_ao.quantize_(model, plan)
    return float_model, model, [u for u in found if u.name in plan]


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    return request.param, *_quantized(request.param)


def _ids() -> torch.Tensor:
    return torch.randint(2, moe_archs.VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


def _float64(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy run by transformers' eager experts loop (grouped_mm has no float64)."""
    ref = copy.deepcopy(model).double()
    if hasattr(ref, "set_experts_implementation") and hasattr(ref.config, "_experts_implementation"):
        ref.set_experts_implementation("eager")
    return ref


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def test_layout_read_as_the_model_multiplies(case):
    arch, float_model, model, planned = case
    experts = next(m for n, m in model.named_modules() if n.endswith((".mlp.experts", ".feed_forward.experts")))
    cfg = model.config
    # repacked to [E, 2I, H] and [E, H, I] (the float banks are [E, H, 2I] and [E, I, H])
    assert experts.gate_up_proj.shape == (8, 2 * cfg.intermediate_size, cfg.hidden_size)
    assert experts.down_proj.shape == (8, cfg.hidden_size, cfg.intermediate_size)
    layouts = {u.layout for u in planned if u.kind == "expert"}
    assert layouts == ({"cols_interleaved", "cols"} if arch == "gpt_oss" else {"cols"})


def test_8bit_matches_float64(case):
    arch, float_model, model, planned = case
    ids = _ids()
    with torch.no_grad():
        want = _float64(float_model)(ids).logits
        fake = _float64(fake_quant_reference(float_model, model, planned))(ids).logits
        got = model(ids).logits
    rel = _rel(got, want)
    print(f"{arch}: 8-bit rel. error vs float64 {rel:.4f}")
    assert rel < 0.02, f"{arch}: 8-bit rel. error {rel:.4f} vs the float64 model"
    assert _rel(got, fake) < 1e-4, f"{arch}: packed path vs fake-quant reference {_rel(got, fake):.3g}"


def test_compiles_without_graph_breaks(case):
    arch, _, model, _ = case
    ids = _ids()
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(ids, use_cache=False).logits
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(ids, use_cache=False).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
