"""llama.cpp loads moe_ao's GGUF exports and agrees with moe_ao (slow; needs llama-cpp-python).

llama-cpp-python is not a moe_ao dependency (it builds llama.cpp from source): the test
runs where it is importable, or where MOE_AO_LLAMA_CPP_PYTHON names a python that has it,
and skips otherwise.
"""

from __future__ import annotations

import pytest
import torch

import moe_ao
from moe_ao import models
from moe_ao.calibration import load_eval_tokens
from moe_ao.eval.metrics import eval_windows
from moe_ao.export import export
from moe_ao.export.verify import PYTHON_ENV, kl_per_token, llama_cpp_python, llama_cpp_run
from moe_ao.kernels.cpu_packed import DISABLE_ENV

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(llama_cpp_python() is None,
                       reason=f"llama_cpp is not importable (pip install llama-cpp-python, or set {PYTHON_ENV})"),
]
pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'moe_ao[export]')")


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-qwen2-moe"])
def test_all_q4_0_q8_0_export_matches_moe_ao(name, tmp_path, monkeypatch):
    """llama.cpp's logits on the export agree with moe_ao's about as closely as moe_ao's two
    own implementations (the C++ kernel and the dequantize-then-matmul reference) agree: the
    trained models turn bf16 rounding into KL ~1e-3, and llama.cpp also rounds activations
    to 8 bits. A wrong code, scale or row order costs orders of magnitude more."""
    model, tok = models.load(name)
    plan = moe_ao.plan(model, "uniform", bits=4, group_size=32, serving="llama.cpp",
                       base={"attention": 4, "expert": 4, "shared_expert": 4, "dense_mlp": 4, "embedding": 4,
                             "lm_head": 4})  # uniform: every kind the base names, at 4 bits
    moe_ao.quantize_(model, plan)
    # the input embedding and head (tied in these models: one tensor) too: Q4_0 token_embd and output
    assert {plan[u.name].bits for u in moe_ao.units(model) if u.kind in ("embedding", "lm_head")} == {4}
    path = export(model, tmp_path / "m.gguf", format="gguf", tokenizer=tok)
    windows = eval_windows(load_eval_tokens(tok), 128, 4)  # held-out WikiText-2 test
    got = llama_cpp_run(path, windows, gen=(8, 16))
    with torch.no_grad():
        ref = model(windows).logits.float()
        with monkeypatch.context() as m:
            m.setenv(DISABLE_ENV, "1")
            floor = kl_per_token(ref, model(windows).logits.float()).mean().item()
    kl = kl_per_token(ref, got["logits"]).mean().item()
    assert kl < 1e-3 + 2 * floor, f"KL(moe_ao || llama.cpp) = {kl}; moe_ao kernel vs its reference: {floor}"
    assert got["greedy"].shape == (4, 8)
    with torch.no_grad():
        mine = model.generate(windows[:, :16], max_new_tokens=8, do_sample=False)[:, 16:]
    assert (mine == got["greedy"]).float().mean() >= 0.5  # near-ties may flip on a tiny model
