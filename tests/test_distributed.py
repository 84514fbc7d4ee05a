"""torch.distributed (gloo, 2 processes on CPU) gives what one process gives, and a dead rank fails fast."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest
import torch

WORKER = pathlib.Path(__file__).with_name("dist_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode: str, out: pathlib.Path, world: int, timeout_s: float = 120) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for rank in range(world):
        env = os.environ | {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                            "MOE_AO_DIST_TIMEOUT": str(timeout_s), "CUDA_VISIBLE_DEVICES": ""}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), mode, str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def _wait(procs: list[subprocess.Popen], limit: float) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("a rank hung") from None
        out.append((p.returncode, text))
    return out


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path):
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    for rc, text in _wait(_launch("equal", one, 1), 600) + _wait(_launch("equal", two, 2), 600):
        assert rc == 0, text[-3000:]
    a, b = torch.load(one, weights_only=False), torch.load(two, weights_only=False)
    assert (a["world"], b["world"]) == (1, 2)
    assert a["table"] == b["table"]  # every KL bit for bit
    assert a["estimate"] == b["estimate"]  # windows split over the ranks, summed in window order
    assert a["tensors"].keys() == b["tensors"].keys()
    packed = [k for k in a["tensors"] if "experts" in k or "self_attn" in k]
    assert packed
    for k, t in a["tensors"].items():
        assert torch.equal(t, b["tensors"][k]), k  # bit-identical codes, scales and float weights


def test_a_dead_rank_makes_the_other_fail_with_a_clear_error(tmp_path):
    out = tmp_path / "error.txt"
    t = time.monotonic()
    results = _wait(_launch("die", out, 2, timeout_s=20), 120)
    assert results[1][0] == 3
    assert time.monotonic() - t < 100  # failed, not hung
    text = out.read_text()
    assert text.startswith("DistributedError: rank 0: gathering the test's tensors from 2 ranks failed"), text
