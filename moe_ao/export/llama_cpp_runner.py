"""Next-token logits and greedy tokens from llama.cpp (llama-cpp-python) for a GGUF file.

Run by :mod:`moe_ao.export.verify`, in this process or, where llama-cpp-python lives in
its own virtualenv, as ``python llama_cpp_runner.py MODEL.gguf WINDOWS.npy OUT.npz THREADS``
with that environment's interpreter. It imports nothing but numpy and llama_cpp.

Writes ``logits`` float32 [n, L, V] (one forward of each window) and ``greedy`` int
[n, G] (G greedy tokens after each window's first P tokens, ``G, P`` from the file's
``gen`` entry).
"""

from __future__ import annotations

import sys

import numpy as np


def run(model_path: str, windows: np.ndarray, threads: int = 1, gen: tuple[int, int] = (0, 0)) -> dict:
    """Logits of every window (and greedy continuations) from llama.cpp."""
    from llama_cpp import Llama

    n, L = windows.shape
    llm = Llama(model_path=model_path, n_ctx=max(L, sum(gen)) + 8, n_batch=L, logits_all=True, n_threads=threads,
                verbose=False, seed=0)
    logits = np.empty((n, L, llm.n_vocab()), dtype=np.float32)
    greedy = []
    for i, row in enumerate(windows):
        llm.reset()
        llm.eval([int(t) for t in row])
        logits[i] = np.asarray(llm.scores[:L], dtype=np.float32)
        if gen[0]:
            llm.reset()
            out = []
            for tok in llm.generate([int(t) for t in row[: gen[1]]], temp=0.0, top_k=1):
                out.append(tok)
                if len(out) == gen[0]:
                    break
            greedy.append(out)
    return {"logits": logits, "greedy": np.asarray(greedy, dtype=np.int64).reshape(n if gen[0] else 0, gen[0])}


if __name__ == "__main__":
    path, windows_file, out_file, n_threads = sys.argv[1:5]
    data = np.load(windows_file)
    result = run(path, data["windows"], int(n_threads), tuple(int(v) for v in data["gen"]))
    np.savez(out_file, **result)
