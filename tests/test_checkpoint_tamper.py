"""Corrupt, truncated or edited checkpoints are refused by name, never loaded as a wrong model.

Each case edits a saved checkpoint the way a disk, a copy or a person would. With
digests on (the default) any edit of a listed file is caught by its sha256; the
structural checks are exercised with ``verify=False`` or by re-signing the edit
(recomputing the digests, as a hostile editor could).
"""

from __future__ import annotations

import json
import shutil
import struct

import archs
import pytest
import torch
from safetensors.torch import load_file, save_file

import moe_ao
from moe_ao import checkpoint as ckpt
from moe_ao.checkpoint import CheckpointError
from moe_ao.plans import Plan

GATE_UP = "model.layers.0.mlp.experts.gate_up_proj"
Q_PROJ = "model.layers.0.self_attn.q_proj"


def _plan(units) -> Plan:
    entries = {u.name: (2, 4)[u.expert % 2] for u in units if u.kind == "expert"}
    entries |= {u.name: 4 for u in units if u.kind == "attention"}
    return Plan(entries, group_size=32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = archs.build("mixtral", torch.bfloat16)
    moe_ao.quantize_(model, _plan(moe_ao.units(model)))
    out = moe_ao.save_quantized(model, tmp_path_factory.mktemp("ckpt") / "c")
    with torch.no_grad():
        ref = model(torch.arange(12).view(2, 6)).logits
    return out, ref


@pytest.fixture
def ckpt_dir(saved, tmp_path):
    return shutil.copytree(saved[0], tmp_path / "c")


def resign(path) -> None:
    """Recomputes the manifest and moe_ao.json's own digest after an edit."""
    meta = json.loads((path / "moe_ao.json").read_text())
    for name in meta["files"]:
        f = path / name
        meta["files"][name] = {"bytes": f.stat().st_size, "sha256": ckpt.file_digest(f)}
    meta["sha256"] = ckpt.meta_digest(meta)
    (path / "moe_ao.json").write_text(json.dumps(meta))


def edit_meta(path, fn, sign: bool = True) -> None:
    meta = json.loads((path / "moe_ao.json").read_text())
    fn(meta)
    (path / "moe_ao.json").write_text(json.dumps(meta))
    if sign:
        resign(path)


def edit_tensors(path, fn) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_flipped_bytes_are_caught_by_the_digest(ckpt_dir):
    f = ckpt_dir / "model.safetensors"
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 600] = bytes(b ^ 0x5A for b in data[mid : mid + 600])
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: content does not match its sha256"):
        moe_ao.load_quantized(ckpt_dir)


def test_truncated_file_is_named_even_without_hashing(ckpt_dir):
    f = ckpt_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: \d+ bytes, moe_ao\.json says \d+: truncated"):
        moe_ao.load_quantized(ckpt_dir, verify=False)


def test_missing_file_is_named(ckpt_dir):
    (ckpt_dir / "plan.json").unlink()
    with pytest.raises(CheckpointError, match=r"plan\.json: missing"):
        moe_ao.load_quantized(ckpt_dir)


def test_nan_scale_is_refused(ckpt_dir):
    def poison(t):
        t[f"{GATE_UP}::s2"].view(-1)[3] = float("nan")

    edit_tensors(ckpt_dir, poison)
    with pytest.raises(CheckpointError, match="sha256"):
        moe_ao.load_quantized(ckpt_dir)
    resign(ckpt_dir)
    with pytest.raises(CheckpointError, match=rf"{GATE_UP}: 1 scales of s2 are NaN/Inf"):
        moe_ao.load_quantized(ckpt_dir)


def test_tied_entry_for_a_removed_weight_is_refused(ckpt_dir):
    """A tied entry would leave the weight uninitialised if the model does not really tie it."""
    router = "model.layers.0.mlp.gate.weight"
    edit_tensors(ckpt_dir, lambda t: t.pop(router))
    edit_meta(ckpt_dir, lambda m: m["tied"].update({router: "model.embed_tokens.weight"}))
    with pytest.raises(CheckpointError, match=rf"{router} is recorded as tied.*does not tie them"):
        moe_ao.load_quantized(ckpt_dir)


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda m: m["packed"][GATE_UP].update(slice_bits=[4] * len(m["packed"][GATE_UP]["slice_bits"])),
            r"gate_up_proj: inner tensors .* do not match its attributes \(missing \[\], unexpected \['q2', 's2'\]\)",
        ),
        (
            lambda m: m["packed"][GATE_UP].update(slice_bits=m["packed"][GATE_UP]["slice_bits"][::-1]),
            r"slot table does not match slice_bits",
        ),
        (
            lambda m: m["packed"][GATE_UP].update(logical_shape=[4, 64, 64]),
            r"logical_shape \[4, 64, 64\], the model's is \(4, 128, 64\)",
        ),
        (lambda m: m["tensors"]["model.norm.weight"].update(shape=[32]), r"model\.norm\.weight is recorded as"),
        (lambda m: m["packed"][GATE_UP].update(group_size=64), r"s2 is .*its attributes say"),
        (lambda m: m["packed"][GATE_UP].update(group_size=0), r"group_size=0"),
        (lambda m: m["packed"][GATE_UP].update(symmetric="false"), r"symmetric='false'"),
        (lambda m: m["packed"][GATE_UP].update(n_seg=3), r"n_seg=3 does not divide"),
        (lambda m: m["packed"][GATE_UP].update(dtype="float8"), r"gate_up_proj: dtype='float8'"),
        (lambda m: m.update(tied=[]), r"'tied' must be a JSON object"),
        (lambda m: m["files"].update({"../../etc/passwd": {"bytes": 1, "sha256": "0"}}), r"not a plain relative path"),
        (lambda m: m.update(weights=["other.safetensors"]), r"'other\.safetensors' is not in the manifest"),
    ],
)
def test_edited_packed_metadata_is_refused(ckpt_dir, edit, match):
    edit_meta(ckpt_dir, edit, sign=False)
    with pytest.raises(CheckpointError, match="moe_ao.json: its content does not match its sha256"):
        moe_ao.load_quantized(ckpt_dir)
    with pytest.raises(CheckpointError, match=match):
        moe_ao.load_quantized(ckpt_dir, verify=False)


def test_slot_index_out_of_range_is_refused(ckpt_dir):
    edit_tensors(ckpt_dir, lambda t: t[GATE_UP].__setitem__((0, 1), 99))
    resign(ckpt_dir)
    with pytest.raises(CheckpointError, match=rf"{GATE_UP}: its slot table does not match"):
        moe_ao.load_quantized(ckpt_dir)


def test_wrong_dtype_or_shape_of_a_plain_tensor_is_refused(ckpt_dir):
    edit_tensors(ckpt_dir, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].float()}))
    resign(ckpt_dir)
    with pytest.raises(
        CheckpointError,
        match=r"model\.norm\.weight is torch\.float32 \(64,\), expected "
        r"torch\.bfloat16 \(64,\)",
    ):
        moe_ao.load_quantized(ckpt_dir)


def test_edited_plan_is_refused(ckpt_dir):
    plan = json.loads((ckpt_dir / "plan.json").read_text())
    plan["units"][f"{Q_PROJ}"] = 2
    (ckpt_dir / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(CheckpointError, match=r"plan\.json: \d+ bytes, moe_ao\.json says \d+"):
        moe_ao.load_quantized(ckpt_dir)
    resign(ckpt_dir)
    with pytest.raises(CheckpointError, match=rf"unit {Q_PROJ} is planned as .*bits=2.* but stored as 4 bits"):
        moe_ao.load_quantized(ckpt_dir)
    plan["units"] = {"../model.layers.0.self_attn.q_proj": 4}
    (ckpt_dir / "plan.json").write_text(json.dumps(plan))
    resign(ckpt_dir)
    with pytest.raises(CheckpointError, match=r"plan\.json: plan names unit '\.\./model"):
        moe_ao.load_quantized(ckpt_dir)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "", '{"format": "moe_ao.checkpoint", "version": true}'])
def test_broken_meta_json_names_the_file(ckpt_dir, text):
    (ckpt_dir / "moe_ao.json").write_text(text)
    with pytest.raises(CheckpointError, match=r"moe_ao\.json"):
        moe_ao.load_quantized(ckpt_dir)


def test_broken_safetensors_header_names_the_file(ckpt_dir):
    f = ckpt_dir / "model.safetensors"
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    f.write_bytes(struct.pack("<Q", n) + b"{" * n + data[8 + n :])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        moe_ao.load_quantized(ckpt_dir, verify=False)


def test_unexpected_tensor_is_refused(ckpt_dir):
    edit_tensors(ckpt_dir, lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    resign(ckpt_dir)
    with pytest.raises(CheckpointError, match=r"unexpected \['model\.extra\.weight'\]"):
        moe_ao.load_quantized(ckpt_dir)


def test_intact_checkpoint_still_loads(ckpt_dir, saved):
    with torch.no_grad():
        assert torch.equal(moe_ao.load_quantized(ckpt_dir)(torch.arange(12).view(2, 6)).logits, saved[1])
