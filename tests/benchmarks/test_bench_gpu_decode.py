"""Smoke run of benchmarks/bench_gpu_decode.py on CPU, its Triton kernels in the interpreter.

No GPU here: this only proves the script runs end to end and writes its report, so that a
session lent a GPU can run it as is. Its timings mean nothing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter (set by conftest)")
def test_gpu_benchmark_smoke_run_on_cpu(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_gpu_decode

    out = tmp_path / "gpu.md"
    lines = bench_gpu_decode.main(["--device", "cpu", "--small", "--reps", "1", "--warmup", "0", "--out", str(out)])
    assert torch.is_grad_enabled()  # the script leaves the process as it found it
    text = out.read_text()
    assert text == "\n".join(lines) + "\n"
    for row in ("| moe_ao 3-bit (g32) |", "| moe_ao mixed 2.5-bit compiled |", "| bf16 compiled (grouped_mm) |"):
        assert row in text
    sys.modules.pop("bench_gpu_decode", None)
