"""save_quantized / load_quantized: bit-identical round trips, atomic writes, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import archs
import pytest
import torch
from safetensors import safe_open

import moe_ao
from moe_ao import checkpoint as ckpt
from moe_ao.plans import Plan
from moe_ao.tensors.packed import PackedWeight

FILES = {"model.safetensors", "plan.json", "moe_ao.json", "config.json", "README.md"}


def mixed_plan(units) -> Plan:
    """Mixed widths inside fused tensors, a 16-bit expert, an asymmetric attention unit."""
    entries = {}
    for u in units:
        if u.kind == "expert":
            entries[u.name] = 16 if u.expert == 1 else (2, 3, 4, 8)[(u.expert + u.segment) % 4]
        elif u.kind in ("shared_expert", "dense_mlp"):
            entries[u.name] = 4
        elif u.kind == "attention":
            entries[u.name] = {"bits": 3, "symmetric": False} if u.layer == 0 else 8
    return Plan(entries, group_size=32, meta={"strategy": "test"})


def quantized(arch: str, dtype=torch.float32):
    model = archs.build(arch, dtype)
    plan = mixed_plan(moe_ao.units(model))
    return moe_ao.quantize_(model, plan), plan


def ids() -> torch.Tensor:
    return torch.randint(0, archs.VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(ids()).logits


def dir_state(path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("arch", archs.ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_round_trip_bit_identical(arch, dtype, tmp_path):
    model, plan = quantized(arch, dtype)
    out = moe_ao.save_quantized(model, tmp_path / "ckpt")
    assert out == tmp_path / "ckpt"
    assert FILES <= {p.name for p in out.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp dirs left over
    loaded = moe_ao.load_quantized(out)
    assert type(loaded) is type(model) and not loaded.training
    assert moe_ao.quantized_plan(loaded) == plan and moe_ao.quantized_plan(loaded).meta == plan.meta
    assert moe_ao.quantization_report(loaded).quantized == moe_ao.quantization_report(model).quantized
    assert loaded.config._experts_implementation == model.config._experts_implementation
    # Every tensor comes back with its type, dtype and (dequantized) values.
    mine, theirs = dict(model.named_parameters()), dict(loaded.named_parameters())
    assert mine.keys() == theirs.keys()
    for name, p in mine.items():
        q = theirs[name]
        assert type(q) is type(p) and q.dtype == p.dtype and q.shape == p.shape, name
        if isinstance(p, PackedWeight):
            assert q.__tensor_flatten__() == p.__tensor_flatten__(), name
            assert torch.equal(q.dequantize(), p.dequantize()), name
        else:
            assert torch.equal(q, p), name
    assert torch.equal(logits(loaded), logits(model))


def test_checkpoint_contents(tmp_path):
    model, plan = quantized("mixtral", torch.bfloat16)
    out = moe_ao.save_quantized(model, tmp_path / "c")
    assert Plan.from_json(str(out / "plan.json")) == plan
    meta = json.loads((out / "moe_ao.json").read_text())
    assert meta["format"] == "moe_ao.checkpoint" and meta["version"] == 2
    assert meta["weights"] == ["model.safetensors"]
    # The manifest lists every other file with its size and sha256; the document carries its own digest.
    assert set(meta["files"]) == {p.name for p in out.iterdir()} - {"moe_ao.json"}
    assert meta["files"]["plan.json"]["sha256"] == ckpt.file_digest(out / "plan.json")
    assert meta["sha256"] == ckpt.meta_digest(meta)
    gate_up = "model.layers.0.mlp.experts.gate_up_proj"
    assert meta["packed"][gate_up]["dtype"] == "bfloat16"
    assert tuple(meta["packed"][gate_up]["slice_bits"]) == model.get_parameter(gate_up).slice_bits
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        # The slot table sits under the parameter's own name (a loader without moe_ao fails on its shape).
        assert gate_up in keys and f"{gate_up}::q2" in keys and f"{gate_up}::d16" in keys
        assert f.get_tensor(gate_up).dtype == torch.int32 and "model.embed_tokens.weight" in keys
        assert f.get_tensor(f"{gate_up}::q3").dtype == torch.uint8


def test_tokenizer_is_saved(tmp_path):
    class FakeTokenizer:
        def save_pretrained(self, path):
            (path / "tokenizer.json").write_text("{}")

    model, _ = quantized("deepseek_moe")
    out = moe_ao.save_quantized(model, tmp_path / "c", tokenizer=FakeTokenizer())
    assert (out / "tokenizer.json").read_text() == "{}"


def test_saving_unquantized_model_raises(tmp_path):
    with pytest.raises(ValueError, match="not quantized"):
        moe_ao.save_quantized(archs.build("mixtral"), tmp_path / "c")
    assert list(tmp_path.iterdir()) == []


def test_existing_dir_needs_overwrite(tmp_path):
    model, _ = quantized("qwen2_moe")
    target = moe_ao.save_quantized(model, tmp_path / "c")
    before = dir_state(target)
    with pytest.raises(ValueError, match=r"exists.*overwrite=True"):
        moe_ao.save_quantized(model, target)
    assert dir_state(target) == before
    moe_ao.save_quantized(model, target, overwrite=True)
    assert FILES <= {p.name for p in target.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_overwrite_never_deletes_foreign_files(tmp_path):
    """A folder with a user's file is refused even with overwrite=True; so is a checkpoint the user added to."""
    model, _ = quantized("qwen2_moe")
    target = tmp_path / "c"
    target.mkdir()
    (target / "precious.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"not a moe_ao directory"):
        moe_ao.save_quantized(model, target, overwrite=True)
    assert dir_state(target) == {"precious.txt": b"mine"}
    other = moe_ao.save_quantized(model, tmp_path / "d")
    (other / "notes").mkdir()
    (other / "notes" / "precious.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"notes/precious\.txt.*did not write"):
        moe_ao.save_quantized(model, other, overwrite=True)
    assert (other / "notes" / "precious.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "d"]


def test_target_that_is_a_file_is_refused_before_writing(tmp_path):
    model, _ = quantized("mixtral")
    target = tmp_path / "c"
    target.write_text("a user's file")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"not a directory"):
            moe_ao.save_quantized(model, target, overwrite=overwrite)
    assert target.read_text() == "a user's file" and [p.name for p in tmp_path.iterdir()] == ["c"]


def test_empty_existing_dir_is_used_with_its_permissions(tmp_path):
    import os
    import stat
    import tempfile

    model, _ = quantized("mixtral")
    with tempfile.TemporaryDirectory(dir=tmp_path) as d:  # mode 0700, as the user made it
        out = moe_ao.save_quantized(model, d)
        assert str(out) == str(Path(d).resolve()) and FILES <= {p.name for p in out.iterdir()}
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        assert torch.equal(logits(moe_ao.load_quantized(d)), logits(model))
    new = moe_ao.save_quantized(model, tmp_path / "fresh")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(new.stat().st_mode) == 0o777 & ~mask  # the normal umask, not mkdtemp's 0700


def test_compiled_model_saves_like_the_model(tmp_path):
    """README order: quantize_, then torch.compile, then save: the wrapper is unwrapped."""
    model, plan = quantized("mixtral")
    compiled = torch.compile(model)
    out = moe_ao.save_quantized(compiled, tmp_path / "c")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("_orig_mod") for k in f.keys())
    assert torch.equal(logits(moe_ao.load_quantized(out)), logits(model))


def test_sharded_checkpoint_round_trips(tmp_path):
    model, _ = quantized("deepseek_v3", torch.bfloat16)
    out = moe_ao.save_quantized(model, tmp_path / "c", max_shard_bytes=40_000)
    meta = json.loads((out / "moe_ao.json").read_text())
    assert len(meta["weights"]) > 2 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == meta["weights"]
    for fqn in meta["packed"]:  # a packed tensor's parts stay in one shard
        assert len({f for k, f in index["weight_map"].items() if k.startswith(fqn + "::")}) == 1
    assert torch.equal(logits(moe_ao.load_quantized(out)), logits(model))


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    model, _ = quantized("deepseek_v3")

    def broken_save_file(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")  # a half-written file, then the failure
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        moe_ao.save_quantized(model, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_old_checkpoint(tmp_path, monkeypatch):
    old_model, _ = quantized("mixtral")
    target = moe_ao.save_quantized(old_model, tmp_path / "c")
    before = dir_state(target)
    new_model = archs.build("mixtral", seed=1)
    moe_ao.quantize_(new_model, Plan({u.name: 4 for u in moe_ao.units(new_model) if u.kind == "expert"},
                                     group_size=32))

    def broken_save_file(tensors, filename, metadata=None):
        raise RuntimeError("killed midway")

    monkeypatch.setattr(ckpt, "save_file", broken_save_file)
    with pytest.raises(RuntimeError, match="killed midway"):
        moe_ao.save_quantized(new_model, target, overwrite=True)
    assert dir_state(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["c"]
    assert torch.equal(logits(moe_ao.load_quantized(target)), logits(old_model))


def test_failure_late_in_save_cleans_up(tmp_path, monkeypatch):
    """A failure after the tensors are written (here: writing the plan) also leaves nothing."""
    model, _ = quantized("mixtral")
    monkeypatch.setattr(Plan, "to_json", lambda self, path=None: (_ for _ in ()).throw(OSError("no space")))
    with pytest.raises(OSError, match="no space"):
        moe_ao.save_quantized(model, tmp_path / "c")
    assert list(tmp_path.iterdir()) == []


def test_loading_a_non_checkpoint_raises(tmp_path):
    plain = tmp_path / "plain_dir"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"plain_dir.*not a moe_ao checkpoint"):
        moe_ao.load_quantized(plain)
    with pytest.raises(ValueError, match="missing_dir"):
        moe_ao.load_quantized(tmp_path / "missing_dir")


def test_loading_wrong_format_or_missing_tensor_raises(tmp_path):
    model, _ = quantized("mixtral")
    out = moe_ao.save_quantized(model, tmp_path / "c")
    meta_file = out / "moe_ao.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps(meta | {"version": 99}))
    with pytest.raises(ValueError, match=r"v99 not supported.*v1, v2"):
        moe_ao.load_quantized(out)
    meta["packed"]["model.layers.0.mlp.experts.down_proj"]["inner"].append("q5")
    meta["sha256"] = ckpt.meta_digest(meta)
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"lack \['model\.layers\.0\.mlp\.experts\.down_proj::q5'\]"):
        moe_ao.load_quantized(out)


def test_custom_architecture_is_registered():
    """archs registers the ModuleList (remote-code style) model with the Auto classes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = archs.configs()["deepseek_moe"]
    assert type(AutoConfig.for_model(cfg.model_type)) is type(cfg)
    assert type(AutoModelForCausalLM.from_config(cfg)).__name__ == "DeepseekMoEStyleForCausalLM"
