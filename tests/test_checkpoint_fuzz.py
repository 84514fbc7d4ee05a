"""Property tests: malformed moe_ao.json and safetensors headers give a named error or the right model.

Hypothesis mutates a saved checkpoint's metadata (moe_ao.json, re-signed so that the
structural checks are the ones tested) and its safetensors header (loaded with
``verify=False``, since any edit of the file already fails its sha256). Loading must
either raise ``CheckpointError`` or return a model with exactly the original logits:
never another exception, never a silently different model.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import archs
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moe_ao
from moe_ao import checkpoint as ckpt
from moe_ao.checkpoint import CheckpointError
from moe_ao.plans import Plan

IDS = torch.arange(12).view(2, 6)
FUZZ = settings(
    max_examples=int(os.environ.get("MOE_AO_FUZZ_EXAMPLES", 60)),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

leaves = (
    st.none()
    | st.booleans()
    | st.integers(-2, 2**33)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.sampled_from(["bfloat16", "uint8", "int32", "BF16", "U8", "I32", "F32", "slot", "q2", "s2", "d16"])
)
values = st.recursive(
    leaves, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=8
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = archs.build("qwen2_moe", torch.bfloat16)
    units = moe_ao.units(model)
    plan = {u.name: (2, 3, 4, 16)[(u.expert or 0) % 4] for u in units if u.kind == "expert"}
    plan |= {u.name: {"bits": 4, "symmetric": False} for u in units if u.kind == "attention"}
    moe_ao.quantize_(model, Plan(plan, group_size=32))
    out = moe_ao.save_quantized(model, tmp_path_factory.mktemp("fuzz") / "c")
    with torch.no_grad():
        return out, model(IDS).logits


def _paths(node, prefix=()):
    """Every (path, value) inside a JSON document."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def mutate(draw, data):
    """Replaces, deletes or adds one to three entries anywhere in ``data`` (in place)."""
    for _ in range(draw(st.integers(1, 3))):
        spots = [p for p, v in _paths(data) if isinstance(v, (dict, list)) and p[:1] not in (("files",), ("sha256",))]
        path = draw(st.sampled_from(spots))
        node = data
        for key in path:
            node = node[key]
        if isinstance(node, dict):
            key = draw(st.sampled_from(sorted(node) + ["extra"]) if node else st.just("extra"))
        else:
            key = draw(st.integers(0, len(node))) if node else 0
        action = draw(st.sampled_from(["replace", "delete"]))
        if action == "delete" and (
            isinstance(node, dict) and key in node or isinstance(node, list) and key < len(node)
        ):
            del node[key]
        elif isinstance(node, dict):
            node[key] = draw(values)
        elif key < len(node):
            node[key] = draw(values)
        else:
            node.append(draw(values))


def _load_is_safe(path, ref, verify=True) -> None:
    try:
        model = moe_ao.load_quantized(path, verify=verify)
    except CheckpointError:
        return
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ref), "a modified checkpoint loaded as a different model"


@FUZZ
@given(st.data())
def test_mutated_moe_ao_json(saved, tmp_path_factory, data):
    src, ref = saved
    path = shutil.copytree(src, tmp_path_factory.mktemp("m") / "c")
    meta = json.loads((path / "moe_ao.json").read_text())
    mutate(data.draw, meta)
    meta["sha256"] = ckpt.meta_digest(meta)
    (path / "moe_ao.json").write_text(json.dumps(meta))
    _load_is_safe(path, ref)


@FUZZ
@given(st.data())
def test_mutated_safetensors_header(saved, tmp_path_factory, data):
    src, ref = saved
    path = shutil.copytree(src, tmp_path_factory.mktemp("h") / "c")
    f = path / "model.safetensors"
    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    mutate(data.draw, header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    f.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    meta = json.loads((path / "moe_ao.json").read_text())
    meta["files"]["model.safetensors"]["bytes"] = f.stat().st_size  # only the digest would catch it now
    meta["sha256"] = ckpt.meta_digest(meta)
    (path / "moe_ao.json").write_text(json.dumps(meta))
    _load_is_safe(path, ref, verify=False)
