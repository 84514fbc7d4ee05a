"""Every MoE architecture of the installed transformers through the whole chain.

For each architecture ``tests/moe_archs.py`` finds (a ``*ForCausalLM`` with routed
experts), built tiny from its own config class: units -> quantize_ (experts 2-bit,
attention 4-bit, RTN) -> forward -> torch.compile (a sample) -> save_quantized /
load_quantized -> generate.

The forward is checked against a reference that shares no code with moe_ao's experts
path: a float copy of the model whose planned weights are overwritten, through their own
stored layout, with the dequantized weights, and run by transformers' own (eager) code.
A misread layout (a transposed bank read as [out, in], gate and up swapped) makes the
two disagree. Architectures that cannot work must fail with the named error in
``EXPECTED_ERRORS``, never silently.

``PYTHONPATH=. python tests/test_architectures.py`` prints the README coverage table
(PYTHONPATH so that this checkout's moe_ao is the one imported).
"""

from __future__ import annotations

import copy
import sys
import warnings

import moe_archs
import pytest
import torch

import moe_ao
from moe_ao.discovery import unit_weight
from moe_ao.tensors.packed import PackedWeight

ARCHS = moe_archs.moe_architectures()
GROUP = 16
# Compiled on a sample only (each compile costs 10-40 s on 2 cores); gpt-oss and Llama 4
# are compiled with fullgraph=True in test_gpt_oss_llama4.py.
COMPILED = ("dbrx", "aria")  # a custom-forward bank (DBRX) and a transposed one (Aria)
REL_TOL = 2e-3  # float32 kernels vs float32 dense matmuls: ~1e-5; a misread weight gives O(1)

# Architecture -> (error type, regex it must match): what cannot work, and why.
EXPECTED_ERRORS: dict[str, tuple[type[Exception], str]] = {
    "doge": (NotImplementedError, r"model\.layers\.0\.mlp: DogeCDMoE holds routed experts as nn\.Embedding"),
}


def _plan(found: list) -> moe_ao.Plan:
    return moe_ao.Plan({u.name: 2 for u in found if u.kind == "expert"}
                       | {u.name: 4 for u in found if u.kind == "attention"}, group_size=GROUP)


def _ids() -> torch.Tensor:
    return torch.randint(2, moe_archs.VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))


def fake_quant_reference(float_model: torch.nn.Module, quantized: torch.nn.Module, planned: list) -> torch.nn.Module:
    """The float model with each planned unit's weight replaced by its dequantized value, written
    through the float layout (transposed, interleaved, flat...); transformers' own code runs it."""
    ref = copy.deepcopy(float_model)
    with torch.no_grad():
        for u in planned:
            w = unit_weight(quantized, u)  # a 2D packed weight itself, or an expert's dequantized slice
            unit_weight(ref, u).copy_(w.dequantize() if isinstance(w, PackedWeight) else w)
    return ref


def run_chain(arch: str, tmp_path, compile_it: bool) -> dict:
    """The whole chain; returns what it measured. Raises on the first failure."""
    model = moe_archs.build(arch)
    found = moe_ao.units(model)
    kinds = {u.kind for u in found}
    assert {"expert", "router"} <= kinds, f"{arch}: no routed experts/router found: {sorted(kinds)}"
    plan = _plan(found)
    planned = [u for u in found if u.name in plan]
    float_model = copy.deepcopy(model)
    moe_ao.quantize_(model, plan)
    report = moe_ao.quantization_report(model)
    for name in found.kept:  # kept modules are listed and untouched
        assert name in report.kept
        for p in model.get_submodule(name).parameters():
            assert type(p) is torch.nn.Parameter and not isinstance(p.data, PackedWeight)
    ids = _ids()
    ref = fake_quant_reference(float_model, model, planned)
    with torch.no_grad():
        want = ref(ids).logits.double()
        got = model(ids).logits
    assert torch.isfinite(got).all()
    rel = ((got.double() - want).norm() / want.norm()).item()
    assert rel < REL_TOL, f"{arch}: quantized forward vs fake-quant reference rel. error {rel:.3g}"
    if compile_it:
        torch._dynamo.reset()
        compiled = torch.compile(model)
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids).logits, got, rtol=1e-4, atol=1e-4)
    moe_ao.save_quantized(model, tmp_path / "q")
    loaded = moe_ao.load_quantized(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, got), f"{arch}: reloaded logits differ"
    gen = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    out = loaded.generate(ids[:1], **gen)
    assert out.shape == (1, ids.shape[1] + 3)
    assert torch.equal(out, model.generate(ids[:1], **gen))
    return {"rel": rel, "kept": sorted({why.split(":")[0] for why in found.kept.values()}),
            "experts": sum(u.kind == "expert" for u in found)}


@pytest.mark.parametrize("arch", ARCHS)
def test_architecture_chain(arch, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if arch in EXPECTED_ERRORS:
            error, message = EXPECTED_ERRORS[arch]
            with pytest.raises(error, match=message):
                moe_ao.units(moe_archs.build(arch))
            return
        run_chain(arch, tmp_path, compile_it=arch in COMPILED)


def test_enumeration_covers_the_known_architectures():
    # A sample that must be found: if transformers renames them, the enumeration is wrong, not the models.
    assert {"gpt_oss", "llama4", "qwen3_next", "qwen3_5_moe", "dbrx", "jamba", "mixtral", "granitemoe"} <= set(ARCHS)
    assert len(ARCHS) >= 55 and "bamba" not in ARCHS


def main() -> None:
    """Prints the README table: architecture | what works / the named reason it does not."""
    import tempfile
    from pathlib import Path

    print("| architecture | result |\n|---|---|")
    for arch in ARCHS:
        if arch in EXPECTED_ERRORS:
            try:
                moe_ao.units(moe_archs.build(arch))
                text = "unexpectedly passes units()"
            except Exception as e:  # noqa: BLE001 - the table reports whatever it is
                text = f"`{type(e).__name__}`: {str(e).split(';')[0][:160]}"
            print(f"| {arch} | {text} |")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            try:
                r = run_chain(arch, Path(tmp), compile_it=False)
                kept = f"; kept in float: {', '.join(r['kept'])}" if r["kept"] else ""
                print(f"| {arch} | whole chain ({r['experts']} expert units){kept} |")
            except Exception as e:  # noqa: BLE001
                print(f"| {arch} | FAILS: `{type(e).__name__}`: {str(e)[:160]} |")


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    print(f"<!-- moe_ao from {moe_ao.__file__} -->", file=sys.stderr)
    main()
