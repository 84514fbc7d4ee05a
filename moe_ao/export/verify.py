"""Checking an export against moe_ao: llama.cpp's next-token distribution vs moe_ao's.

llama-cpp-python builds llama.cpp from source and is not a dependency of moe_ao. It is
used from this process when importable, else from the interpreter named by ``python=``
or the ``MOE_AO_LLAMA_CPP_PYTHON`` environment variable (a virtualenv that has it), by
running :mod:`moe_ao.export.llama_cpp_runner` there.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

RUNNER = Path(__file__).with_name("llama_cpp_runner.py")
PYTHON_ENV = "MOE_AO_LLAMA_CPP_PYTHON"


def llama_cpp_python() -> str | None:
    """The interpreter that can import llama_cpp: this one, the env var's, or None."""
    if importlib.util.find_spec("llama_cpp") is not None:
        return sys.executable
    return os.environ.get(PYTHON_ENV) or None


def llama_cpp_run(gguf_path: str | Path, windows: torch.Tensor, gen: tuple[int, int] = (0, 0),
                  python: str | None = None, threads: int = 1) -> dict[str, torch.Tensor]:
    """llama.cpp's logits [n, L, V] on ``windows`` [n, L] (and ``gen=(G, P)`` greedy tokens).

    Raises:
        ImportError: no interpreter with llama-cpp-python (names the package and the env var).
        RuntimeError: the runner failed (its stderr is in the message).
    """
    python = python or llama_cpp_python()
    if python is None:
        raise ImportError(f"llama-cpp-python is not importable; pip install llama-cpp-python, or set {PYTHON_ENV}"
                          " to the python of a virtualenv that has it")
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(inp, windows=windows.numpy().astype(np.int64), gen=np.asarray(gen))
        proc = subprocess.run([python, str(RUNNER), str(gguf_path), str(inp), str(out), str(threads)],
                              capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"llama.cpp runner failed ({python}): {proc.stderr[-2000:]}")
        data = np.load(out)
        return {k: torch.from_numpy(data[k].copy()) for k in data.files}


def kl_per_token(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(ref) || softmax(logits)) per position, float64 [...]."""
    ref_lp = F.log_softmax(ref_logits.double(), -1)
    lp = F.log_softmax(logits.double(), -1)
    return (ref_lp.exp() * (ref_lp - lp)).sum(-1)
