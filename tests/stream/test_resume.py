"""Streamed runs in subprocesses: SIGKILL at a random layer then the same command again gives the
uninterrupted run's checkpoint, byte for byte; peak RSS stays far below the checkpoint's size."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import MixtralConfig

from moe_ao.stream import write_random_checkpoint

RUN = r"""
import json, sys, time, torch
torch.set_num_threads(1)
import moe_ao
from moe_ao.stream import StreamedModel, quantize_pretrained

def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) // 1024

def job(src, out, method):
    units = moe_ao.units(StreamedModel(src).model)
    plan = moe_ao.Plan({u.name: (2, 4)[(u.expert or 0) % 2] for u in units if u.kind == "expert"}, group_size=64)
    kw = {"calibration": torch.load(sys.argv[5]), "progress": False} if method == "gptq" else {}
    quantize_pretrained(src, plan, out, method=method, **kw)

src, out, method, warm = sys.argv[1:5]
if warm != "-":  # the same code paths once on a 1-layer model: their memory is not the checkpoint's
    job(warm, out + ".warm", method)
    open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM, the peak RSS
base = status("VmRSS")
job(src, out, method)
print(json.dumps({"base_mib": base, "peak_mib": status("VmHWM")}))
"""


def config(layers: int, hidden: int = 64, experts: int = 4) -> MixtralConfig:
    return MixtralConfig(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts,
                         num_experts_per_tok=2, max_position_embeddings=128, tie_word_embeddings=False)


def run(tmp_path, src, out, method, warm="-"):
    ids = tmp_path / "ids.pt"
    if not ids.exists():
        torch.save(torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0)), ids)
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", RUN, str(src), str(out), method, str(warm), str(ids)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finished_layers(tmp_path, name) -> int:
    for d in tmp_path.glob(f".{name}.moe_ao-resume-*"):
        p = d / "progress.json"
        if p.is_file():
            try:
                return json.loads(p.read_text())["done"]
            except ValueError:
                pass
    return -1


def files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_sigkill_then_same_command_gives_the_same_checkpoint(tmp_path, method):
    src = write_random_checkpoint(config(layers=8), tmp_path / "src")
    ref = run(tmp_path, src, tmp_path / "ref", method)
    assert ref.wait(timeout=600) == 0, ref.stderr.read()
    kill_after = random.Random(method).randrange(0, 6)
    child = run(tmp_path, src, tmp_path / "out", method)
    deadline = time.monotonic() + 600
    while finished_layers(tmp_path, "out") < kill_after and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    done = finished_layers(tmp_path, "out")
    assert kill_after <= done < 7 and not (tmp_path / "out").exists()
    again = run(tmp_path, src, tmp_path / "out", method)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    assert f"resuming after layer {done}" in err  # finished layers were not redone
    assert files(tmp_path / "out") == files(tmp_path / "ref")
    assert not list(tmp_path.glob(".out.moe_ao-resume-*"))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_peak_rss_is_far_below_the_checkpoint(tmp_path_factory, method):
    """410 MB of bf16 in 64 layers: the streamed run's peak RSS grows by under 40% of it."""
    root = tmp_path_factory.getbasetemp() / "stream_rss"
    src, warm = root / "src", root / "warm"
    if not src.exists():
        write_random_checkpoint(config(layers=64, hidden=256, experts=8), src)
        write_random_checkpoint(config(layers=1, hidden=256, experts=8), warm)
    size_mib = sum(p.stat().st_size for p in src.iterdir()) / 2**20
    out = tmp_path_factory.mktemp(method)
    child = run(out, src, out / "q", method, warm)
    stdout, err = child.communicate(timeout=900)
    assert child.returncode == 0, err
    rss = json.loads(stdout.strip().splitlines()[-1])
    growth = rss["peak_mib"] - rss["base_mib"]
    assert growth < 0.4 * size_mib, f"peak RSS grew by {growth} MiB for a {size_mib:.0f} MiB checkpoint"
