"""Streamed quantization from checkpoint files equals in-memory quantize_, resumes after SIGKILL,
and names bad input before writing anything."""

from __future__ import annotations

import json

import archs
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import moe_ao
from moe_ao.stream import SourceError, StreamedModel, quantize_pretrained, write_random_checkpoint

IDS = torch.randint(0, archs.VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))


def mixed_plan(units) -> moe_ao.Plan:
    entries = {u.name: (2, 3, 4, 8)[(u.expert + u.segment) % 4] for u in units if u.kind == "expert"}
    entries |= {u.name: 4 for u in units if u.kind in ("attention", "shared_expert", "dense_mlp", "lm_head")}
    entries |= {u.name: 8 for u in units if u.kind == "embedding"}  # outside the layers: packed with the rest
    return moe_ao.Plan(entries, group_size=32)


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe", "deepseek_v3"])
def source(request, tmp_path_factory):
    cfg = archs.configs()[request.param]
    return write_random_checkpoint(cfg, tmp_path_factory.mktemp(request.param) / "src", dtype=torch.bfloat16)


def dir_state(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def same_params(a, b) -> bool:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    if pa.keys() != pb.keys():
        return False
    for k, x in pa.items():
        y = pb[k]
        if isinstance(x, moe_ao.PackedWeight):
            fx, fy = x.__tensor_flatten__(), y.__tensor_flatten__()
            if fx != fy or not all(torch.equal(getattr(x, n), getattr(y, n)) for n in fx[0]):
                return False
        elif not torch.equal(x, y):
            return False
    return True


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_streamed_equals_in_memory(source, method, tmp_path):
    ref = AutoModelForCausalLM.from_pretrained(source)
    plan = mixed_plan(moe_ao.units(ref))
    kw = {"calibration": IDS, "progress": False} if method == "gptq" else {}
    out = quantize_pretrained(source, plan, tmp_path / "q", method=method, **kw)
    moe_ao.quantize_(ref, plan, method=method, **kw)
    got = moe_ao.load_quantized(out)
    assert same_params(got, ref)  # the same codes, scales and float tensors, bit for bit
    with torch.no_grad():
        assert torch.equal(got(IDS).logits, ref(IDS).logits)
    assert moe_ao.quantization_report(got).quantized == moe_ao.quantization_report(ref).quantized
    meta = json.loads((out / "moe_ao.json").read_text())
    assert len(meta["weights"]) == ref.config.num_hidden_layers + 1  # a shard per layer, plus the rest
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # the resumable staging folder became the checkpoint


def test_streamed_model_builds_what_from_pretrained_builds(source):
    streamed = StreamedModel(source)
    streamed.preflight()
    streamed.load_rest()
    ref = AutoModelForCausalLM.from_pretrained(source)
    for i in range(len(streamed.layers)):
        with streamed.layer(i) as layer:
            mine = layer.state_dict()
            theirs = ref.model.layers[i].state_dict()
            assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
        assert all(p.is_meta for p in streamed.layers[i].parameters())  # released
    mine = dict(streamed.model.named_buffers())
    for name, buf in ref.named_buffers():
        if not name.startswith("model.layers."):  # layers' own buffers were compared while loaded
            assert torch.equal(mine[name], buf), name  # rotary tables rebuilt


# ------------------------------------------------------------------ bad input
def _copy(source, tmp_path):
    import shutil

    return shutil.copytree(source, tmp_path / "src")


def _shard_of(src, key_part: str):
    """The first attention projection weight of the layer named by ``key_part``, and its shard."""
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    key = next(k for k in index if key_part in k and k.endswith("proj.weight"))
    return key, src / index[key]


@pytest.mark.parametrize("case, match", [
    ("missing shard", r"model-layer-00001\.safetensors: missing"),
    ("truncated shard", r"model-layer-00001\.safetensors: not a readable safetensors file"),
    ("index names an absent tensor", r"names tensor model\.layers\.1\.ghost\.weight in .*no shard holds it"),
    ("wrong shape", r"layer 1: .*cannot be built|layer 1: tensors of the wrong shape"),
    ("integer tensor", r"is I32, expected floating point"),
    ("missing tensor", r"layer 1: the checkpoint lacks \['model\.layers\.1\.self_attn\.\w+\.weight'\]"),
])
def test_bad_source_is_named_before_anything_is_written(source, tmp_path, case, match):
    src = _copy(source, tmp_path)
    key, shard = _shard_of(src, "layers.1.self_attn.")
    if case == "missing shard":
        shard.unlink()
    elif case == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:-64])
    elif case == "index names an absent tensor":
        index = json.loads((src / "model.safetensors.index.json").read_text())
        index["weight_map"]["model.layers.1.ghost.weight"] = shard.name
        (src / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        tensors = load_file(str(shard))
        if case == "wrong shape":
            tensors[key] = tensors[key][:, :-1].contiguous()
        elif case == "integer tensor":
            tensors[key] = tensors[key].to(torch.int32)
        else:
            del tensors[key]
            index = json.loads((src / "model.safetensors.index.json").read_text())
            del index["weight_map"][key]
            (src / "model.safetensors.index.json").write_text(json.dumps(index))
        save_file(tensors, str(shard))
    ref_units = moe_ao.units(AutoModelForCausalLM.from_pretrained(source))
    with pytest.raises(SourceError, match=match):
        quantize_pretrained(src, mixed_plan(ref_units), tmp_path / "q")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no staging


def test_failure_mid_run_keeps_finished_layers_and_resumes(source, tmp_path):
    src = _copy(source, tmp_path)
    key, shard = _shard_of(src, "layers.1.self_attn.")
    tensors = load_file(str(shard))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(shard))
    plan = mixed_plan(moe_ao.units(AutoModelForCausalLM.from_pretrained(source)))
    with pytest.raises(ValueError, match=r"layer 1: .*self_attn.*NaN.*layers 0-0 are finished and kept in .*resume"):
        quantize_pretrained(src, plan, tmp_path / "q", method="gptq", calibration=IDS, progress=False)
    resume = [p for p in tmp_path.iterdir() if "moe_ao-resume" in p.name]
    assert len(resume) == 1 and (resume[0] / "model-layer-00000.safetensors").is_file()
    assert not (tmp_path / "q").exists()


def test_tied_embedding_and_head_stream_as_one_tensor(tmp_path):
    """A tied checkpoint (one [V, d] tensor on disk) planned with both units alike: streamed
    equals in memory, and the loaded head shares the packed embedding."""
    cfg = archs.configs()["mixtral"]
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    float_model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    float_model.save_pretrained(tmp_path / "src")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "src")
    assert ref.lm_head.weight is ref.model.embed_tokens.weight
    units = moe_ao.units(ref)
    plan = moe_ao.Plan({u.name: 4 for u in units if u.kind in ("attention", "expert", "embedding", "lm_head")},
                       group_size=32)
    got = moe_ao.load_quantized(quantize_pretrained(tmp_path / "src", plan, tmp_path / "q", method="rtn"))
    moe_ao.quantize_(ref, plan)
    assert isinstance(got.lm_head.weight, moe_ao.PackedWeight) and got.lm_head.weight is got.model.embed_tokens.weight
    assert same_params(got, ref)
    with torch.no_grad():
        assert torch.equal(got(IDS).logits, ref(IDS).logits)
