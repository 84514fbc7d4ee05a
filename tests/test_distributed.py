"""torch.distributed (gloo, 2 processes on CPU) gives what one process gives, and a dead rank fails fast."""

from __future__ import annotations

import os
import pathlib
import signal
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


def _launch(mode: str, out: pathlib.Path, world: int, timeout_s: float = 120,
            extra: tuple[str, ...] = ()) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for rank in range(world):
        env = os.environ | {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                            "MOE_AO_DIST_TIMEOUT": str(timeout_s), "CUDA_VISIBLE_DEVICES": ""}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), mode, str(out), *extra], env=env,
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


def _one_and_two_ranks(mode: str, tmp_path: pathlib.Path) -> tuple[dict, dict, dict]:
    """Runs ``mode`` on 1 rank, then on 2; returns what the 1 rank and each of the 2 ranks saved."""
    one, two = tmp_path / "one", tmp_path / "two"
    for rc, text in _wait(_launch(mode, one, 1), 600) + _wait(_launch(mode, two, 2), 600):
        assert rc == 0, text[-3000:]
    a = torch.load(f"{one}.0.pt", weights_only=False)
    b0, b1 = (torch.load(f"{two}.{r}.pt", weights_only=False) for r in (0, 1))
    return a, b0, b1


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path):
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    for rc, text in _wait(_launch("equal", one, 1), 600) + _wait(_launch("equal", two, 2), 600):
        assert rc == 0, text[-3000:]
    a, b = torch.load(one, weights_only=False), torch.load(two, weights_only=False)
    assert (a["world"], b["world"]) == (1, 2)
    assert a["table"] == b["table"]  # every KL bit for bit
    assert a["estimate"] == b["estimate"]  # windows split over the ranks, summed in window order
    assert a["estimate_rtn"] == b["estimate_rtn"]  # the forward pass split too
    assert a["table"]["lm_head"] and a["estimate_rtn"]["lm_head"] == a["estimate"]["lm_head"]
    assert a["tensors"].keys() == b["tensors"].keys()
    packed = [k for k in a["tensors"] if "experts" in k or "self_attn" in k]
    assert packed
    for k, t in a["tensors"].items():
        assert torch.equal(t, b["tensors"][k]), k  # bit-identical codes, scales and float weights


@pytest.mark.slow
def test_split_calibration_sums_the_statistics_of_half_the_batches(tmp_path):
    """With split_calibration each of 2 ranks runs half the calibration batches, and each phase's
    Hessians, token and routing counts are summed over the ranks: layer 0's statistics equal one
    process's up to float32 summation order. GPTQ's error feedback turns a rare different rounding
    into different later codes, so the codes are another GPTQ solution of the same quality."""
    a, b0, b1 = _one_and_two_ranks("split", tmp_path)
    assert (a["world"], b0["world"]) == (1, 2)
    assert b0["batches"] == b1["batches"] == a["batches"] // 2  # the forwards are divided
    assert a["routing"][0] == b0["routing"][0] == b1["routing"][0]
    layer0 = {k: n for k, n in a["tokens"].items() if ".layers.0." in k}
    assert layer0 and layer0 == {k: b0["tokens"][k] for k in layer0}
    assert a["hessians"].keys() == b0["hessians"].keys() and a["hessians"]
    first = [k for k in a["hessians"] if k.startswith("model.layers.0:0:")]  # before any code differs
    assert first
    for k, h in a["hessians"].items():
        assert torch.equal(b0["hessians"][k], b1["hessians"][k]), k  # one all-reduce: the same bits on both
        rel = ((b0["hessians"][k] - h).norm() / h.norm()).item()
        assert rel < (1e-5 if k in first else 0.1), f"{k}: summed Hessian vs one process's, rel. {rel:.2e}"
    for k in a["tensors"]:
        assert torch.equal(b0["tensors"][k], b1["tensors"][k]), k  # every rank holds the same weights
    assert abs(b0["kl"] / a["kl"] - 1) < 0.1, (a["kl"], b0["kl"])


@pytest.mark.slow
def test_profile_splits_its_batches_and_equals_one_process(tmp_path):
    """Each of 2 ranks profiles half the calibration batches; routing counts, router entropy and the
    block predictor's sampled rows equal one process's bit for bit, Hessians up to summation order."""
    a, b0, b1 = _one_and_two_ranks("profile", tmp_path)
    assert (a["world"], b0["world"]) == (1, 2)
    assert a["batches"] == 2 * b0["batches"] == 2 * b1["batches"]  # 4 batches per layer, 2 per rank
    pa, pb = a["profile"], b0["profile"]
    assert pa.routing_counts.keys() == pb.routing_counts.keys() and pa.routing_counts
    for i, counts in pa.routing_counts.items():
        assert torch.equal(counts, pb.routing_counts[i]) and torch.equal(counts, b1["profile"].routing_counts[i])
    assert pa.router_entropy.keys() == pb.router_entropy.keys()
    for i, h in pa.router_entropy.items():
        assert abs(h - pb.router_entropy[i]) <= 1e-12 * abs(h), i
    for i in pa.block_cos:
        assert pa.block_cos[i].shape == (24,)
        assert torch.equal(pa.block_cos[i], pb.block_cos[i]), i
        assert torch.equal(pa.block_inputs[i], pb.block_inputs[i]), i
    assert pa.hessians.keys() == pb.hessians.keys() and len(pa.hessians) > 10
    for k, h in pa.hessians.items():
        assert torch.equal(pb.hessians[k], b1["profile"].hessians[k]), k
        assert ((pb.hessians[k] - h).norm() / h.norm()).item() < 1e-5, k


@pytest.mark.slow
def test_killed_split_run_resumes_to_the_uninterrupted_checkpoint(tmp_path):
    """2 ranks, streamed GPTQ with the calibration split: SIGKILL both after a few layers, start them
    again, and the checkpoint is byte for byte the uninterrupted 2-rank run's (rank 0's resume state
    holds every rank's hidden states; each rank takes its share back)."""
    from stream.test_resume import config, files, finished_layers

    from moe_ao.stream import write_random_checkpoint

    src = write_random_checkpoint(config(layers=6), tmp_path / "src")
    ids = tmp_path / "ids.pt"
    torch.save(torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0)), ids)
    extra = (str(src), str(ids))
    for rc, text in _wait(_launch("stream", tmp_path / "ref", 2, extra=extra), 600):
        assert rc == 0, text[-3000:]
    procs = _launch("stream", tmp_path / "out", 2, extra=extra)
    deadline = time.monotonic() + 600
    while finished_layers(tmp_path, "out") < 2 and all(p.poll() is None for p in procs) \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    done = finished_layers(tmp_path, "out")
    assert 2 <= done < 5 and not (tmp_path / "out").exists()
    results = _wait(_launch("stream", tmp_path / "out", 2, extra=extra), 600)
    for rc, text in results:
        assert rc == 0, text[-3000:]
    assert f"resuming after layer {done}" in results[0][1]
    assert files(tmp_path / "out") == files(tmp_path / "ref")


def test_a_dead_rank_makes_the_other_fail_with_a_clear_error(tmp_path):
    out = tmp_path / "error.txt"
    t = time.monotonic()
    results = _wait(_launch("die", out, 2, timeout_s=20), 120)
    assert results[1][0] == 3
    assert time.monotonic() - t < 100  # failed, not hung
    text = out.read_text()
    assert text.startswith("DistributedError: rank 0: gathering the test's tensors from 2 ranks failed"), text
