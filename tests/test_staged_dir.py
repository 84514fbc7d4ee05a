"""moe_ao.staged_dir: whole-or-nothing directory writes, cleanup of what interrupted saves left.

The kill test saves a checkpoint of tens of MB over an existing one in a forked child
and SIGKILLs it at random moments; the target must always load as the complete old or
the complete new checkpoint.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

import moe_ao
from moe_ao.plans import Plan
from moe_ao.staged_dir import STAGING_TAG, StagedDir, _host, check_target, clean_stale


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _staging(parent: Path, name: str, host: str, pid: int) -> Path:
    d = parent / f".{name}.{STAGING_TAG}-{host}-{pid}-abc123"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"x" * 1000)
    return d


def test_stale_staging_of_dead_process_is_removed_others_are_reported(tmp_path, caplog):
    dead = _staging(tmp_path, "c", _host(), _dead_pid())
    live = _staging(tmp_path, "c", _host(), os.getpid())
    remote = _staging(tmp_path, "c", "otherhost", 12345)
    unrelated = _staging(tmp_path, "d", _host(), _dead_pid())  # another target's
    legacy = tmp_path / ".c.tmp-k2j3h4"
    legacy.mkdir()
    user = tmp_path / ".c.backup"
    user.mkdir()
    with caplog.at_level(logging.WARNING):
        assert clean_stale(tmp_path / "c") == [dead]
    assert not dead.exists() and live.exists() and remote.exists() and unrelated.exists()
    assert legacy.exists() and user.exists()
    text = caplog.text
    assert f"removed {dead}" in text and f"left {live} alone" in text and f"left {remote} alone" in text
    assert f"{legacy}" in text and "older moe_ao" in text and str(user) not in text


def test_failed_write_discards_staging_and_keeps_target(tmp_path):
    target = tmp_path / "c"
    target.mkdir()
    with pytest.raises(RuntimeError, match="boom"):
        with StagedDir(target, overwrite=True, owned_files=lambda p: set()) as stage:
            (stage.path / "a").write_text("new")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == [target] and list(target.iterdir()) == []


def test_exchange_replaces_owned_tree_whole(tmp_path):
    target = tmp_path / "c"
    target.mkdir()
    (target / "old.bin").write_text("old")
    with StagedDir(target, overwrite=True, owned_files=lambda p: {"old.bin"}) as stage:
        (stage.path / "new.bin").write_text("new")
        assert stage.commit() == target.resolve()
    assert [p.name for p in target.iterdir()] == ["new.bin"] and list(tmp_path.iterdir()) == [target]


def test_target_changed_during_write_is_rechecked(tmp_path):
    target = tmp_path / "c"
    with StagedDir(target, overwrite=True, owned_files=lambda p: set()) as stage:
        target.mkdir()
        (target / "user.txt").write_text("appeared meanwhile")
        with pytest.raises(ValueError, match=r"user\.txt.*did not write"):
            stage.commit()
    assert (target / "user.txt").read_text() == "appeared meanwhile" and list(tmp_path.iterdir()) == [target]


def test_symlinked_target_replaces_the_real_directory(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    with StagedDir(link, overwrite=False, owned_files=lambda p: None) as stage:
        (stage.path / "f").write_text("x")
        stage.commit()
    assert link.is_symlink() and (real / "f").read_text() == "x"


def test_dangling_symlink_is_refused(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="dangling"):
        check_target(tmp_path / "link", True, lambda p: None)


# ------------------------------------------------------------------------ kill test
def _model(seed: int) -> torch.nn.Module:
    """~26 MB of packed 8-bit experts: hidden 256, 8 experts of 3 x 256 x 2048, 2 layers."""
    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=128, hidden_size=256, intermediate_size=2048, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=64, tie_word_embeddings=False)
    model = MixtralForCausalLM(cfg).eval()
    units = moe_ao.units(model)
    return moe_ao.quantize_(model, Plan({u.name: 8 for u in units if u.kind == "expert"}, group_size=64))


def _save_forever(model: torch.nn.Module, target: Path) -> None:
    torch.set_num_threads(1)
    while True:
        moe_ao.save_quantized(model, target, overwrite=True)


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model(torch.arange(8).view(1, 8)).logits


def test_sigkill_at_random_moments_never_breaks_the_checkpoint(tmp_path):
    old, new = _model(0), _model(1)
    target = tmp_path / "c"
    t = time.perf_counter()
    moe_ao.save_quantized(old, target)
    save_s = time.perf_counter() - t
    size_mb = sum(p.stat().st_size for p in target.iterdir()) / 1e6
    assert size_mb > 20, size_mb
    ref = {"old": _logits(old), "new": _logits(new)}
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(0)
    seen = set()
    for _ in range(24):
        child = ctx.Process(target=_save_forever, args=(new, target))
        child.start()
        time.sleep(rng.uniform(0.0, 2.5 * save_s))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        loaded = _logits(moe_ao.load_quantized(target))  # verified: digests and structure
        which = [k for k, v in ref.items() if torch.equal(loaded, v)]
        assert len(which) == 1, "the target is neither the complete old nor the complete new checkpoint"
        seen.add(which[0])
        moe_ao.save_quantized(old, target, overwrite=True)  # a later save works and cleans up
        assert [p.name for p in tmp_path.iterdir()] == ["c"]
    assert "new" in seen  # some kills landed after the exchange
