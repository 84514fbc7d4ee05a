"""Export to GGUF, the file llama.cpp (and ollama, LM Studio) loads.

Names, metadata keys and layouts follow llama.cpp's ``convert_hf_to_gguf.py`` and its
model loaders: ``token_embd``, ``output_norm``, ``output``; per layer ``blk.N.attn_norm``,
``attn_{q,k,v,output}`` (and biases, q/k norms), ``ffn_norm``, ``ffn_gate_inp`` (the
router), one 3D tensor per projection for the routed experts
``ffn_{gate,up,down}_exps`` (numpy [E, N, K], ggml {K, N, E}), and ``ffn_*_shexp`` plus
``ffn_gate_inp_shexp`` for a gated shared expert. Supported (HF ``model_type`` -> GGUF
arch): Mixtral -> ``llama`` (q/k rows permuted to ggml's rotary layout, as the converter
does), Qwen2-MoE -> ``qwen2moe``, Qwen3-MoE -> ``qwen3moe``, OLMoE -> ``olmoe``.
Types per tensor: see :mod:`moe_ao.export.gguf_tensors`.

llama.cpp's qwen2moe/qwen3moe have no dense layers; a dense layer (Qwen2-MoE's
``mlp_only_layers``) is written as E identical experts, each the dense MLP with its down
projection scaled by E / top_k, behind a router of zeros (and a zero shared expert):
softmax gives every expert exactly 1/E, so any top_k of them sum to the dense output.
Expert tensors are then zero-padded to the widest MLP (zero rows and columns add
exactly nothing). The scale is exact when E / top_k is a power of two.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_ao.api import quantized_plan
from moe_ao.discovery import decoder_layers, units
from moe_ao.export.gguf_tensors import (
    encode,
    float_type_of,
    gguf_module,
    np_float,
    padded,
    permute_rows,
    qk_permutation,
    scaled,
)
from moe_ao.export.gguf_vocab import add_tokenizer
from moe_ao.export.layout import UnitCodes, unit_codes
from moe_ao.planner.serving import check_plan, get_target
from moe_ao.unit import Unit

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchSpec:
    """How one HF architecture maps onto a llama.cpp one.

    Attributes:
        arch: GGUF ``general.architecture``.
        permute_qk: q/k rows reordered to ggml's interleaved rotary layout (llama).
        norm_topk: whether llama.cpp renormalises the top-k routing weights (fixed there).
    """

    arch: str
    permute_qk: bool
    norm_topk: bool


ARCHS = {
    "mixtral": ArchSpec("llama", True, True),
    "qwen2_moe": ArchSpec("qwen2moe", False, False),
    "qwen3_moe": ArchSpec("qwen3moe", False, True),
    "olmoe": ArchSpec("olmoe", False, False),
}
ATTN = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
FFN = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
         "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}


def arch_spec(config: Any) -> ArchSpec:
    """The llama.cpp architecture of a transformers config.

    Raises:
        ValueError: an unsupported model type, rope scaling, or routing normalisation
            llama.cpp does not apply for that architecture.
    """
    spec = ARCHS.get(config.model_type)
    if spec is None:
        raise ValueError(f"GGUF export supports model types {sorted(ARCHS)}; got {config.model_type!r}")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type={rope.get('rope_type')!r} is not exported; only 'default'")
    norm = getattr(config, "norm_topk_prob", spec.norm_topk)
    if bool(norm) != spec.norm_topk:
        raise ValueError(f"norm_topk_prob={norm}: llama.cpp's {spec.arch} always uses {spec.norm_topk}")
    return spec


class _Builder:
    """Collects (name, parts, stacked) tensors of one model, layer by layer."""

    def __init__(self, model: nn.Module, spec: ArchSpec) -> None:
        self.model, self.spec, self.config = model, spec, model.config
        self.units = units(model)
        self.n_experts = self.config.num_local_experts if hasattr(self.config, "num_local_experts") \
            else self.config.num_experts
        self.top_k = self.config.num_experts_per_tok
        self.out: list[tuple[str, list[UnitCodes], bool, str]] = []  # name, parts, stacked, "quant"/"f32"
        ff = [u.shape[0] for u in self.units if u.kind in ("expert", "dense_mlp") and u.proj == "gate_proj"]
        self.n_ff_exp = max(ff)

    def codes(self, u: Unit) -> UnitCodes:
        c = unit_codes(self.model, u)
        if self.spec.permute_qk and u.proj in ("q_proj", "k_proj"):
            heads = self.config.num_attention_heads if u.proj == "q_proj" else self.config.num_key_value_heads
            c = permute_rows(c, qk_permutation(u.shape[0], heads))
        return c

    def add(self, name: str, parts: list[UnitCodes], stacked: bool = False, kind: str = "quant") -> None:
        self.out.append((name, parts, stacked, kind))

    def add_float(self, name: str, t: torch.Tensor, kind: str = "f32") -> None:
        """A float tensor kept in its own shape (1D norms and biases stay 1D)."""
        self.add(name, [UnitCodes(16, None, None, None, 1, t.detach(), (t.shape[0], t.shape[-1]))], kind=kind)

    def experts(self, layer: int, by_proj: dict[str, list[Unit]], dense: bool) -> None:
        F, H = self.n_ff_exp, self.config.hidden_size
        for proj, short in FFN.items():
            us = by_proj.get(proj, [])
            if not us:
                raise ValueError(f"layer {layer}: no {proj} units to build ffn_{short}_exps from")
            parts = [self.codes(u) for u in us]
            if dense:  # one dense MLP as n_experts identical experts (see the module doc)
                if proj == "down_proj":
                    parts = [scaled(parts[0], self.n_experts / self.top_k)]
                parts = parts * self.n_experts
            shape = (H, F) if proj == "down_proj" else (F, H)
            self.add(f"blk.{layer}.ffn_{short}_exps.weight", [padded(c, *shape) for c in parts], stacked=True)

    def layer(self, i: int, prefix: str) -> None:
        mine = [u for u in self.units if u.layer == i]
        for u in mine:
            if u.kind == "attention":
                self.add(f"blk.{i}.{ATTN[u.proj]}.weight", [self.codes(u)])
        experts = [u for u in mine if u.kind == "expert"]
        dense = [u for u in mine if u.kind == "dense_mlp"]
        by_proj = {p: [u for u in (experts or dense) if u.proj == p] for p in FFN}
        self.experts(i, by_proj, dense=not experts)
        routers = [u for u in mine if u.kind == "router"]
        router = next((u for u in routers if not u.name.endswith("shared_expert_gate")), None)
        H = self.config.hidden_size
        if router is not None:
            self.add_float(f"blk.{i}.ffn_gate_inp.weight", unit_codes(self.model, router).dense.float())
        else:
            self.add_float(f"blk.{i}.ffn_gate_inp.weight", torch.zeros(self.n_experts, H))
        self.shared(i, mine, dense=not experts)
        self.norms_and_biases(i, prefix)

    def shared(self, i: int, mine: list[Unit], dense: bool) -> None:
        size = getattr(self.config, "shared_expert_intermediate_size", 0)
        if not size:
            return
        shared = {u.proj: u for u in mine if u.kind == "shared_expert"}
        gate = next((u for u in mine if u.name.endswith("shared_expert_gate")), None)
        H = self.config.hidden_size
        for proj, short in FFN.items():
            if proj in shared:
                self.add(f"blk.{i}.ffn_{short}_shexp.weight", [self.codes(shared[proj])])
            elif dense:  # a dense layer has none: a zero shared expert adds nothing
                shape = (H, size) if proj == "down_proj" else (size, H)
                self.add_float(f"blk.{i}.ffn_{short}_shexp.weight", torch.zeros(shape), kind="float")
        # llama.cpp takes the gate's sigmoid as silu(x) / x, NaN at x = 0: the zero shared
        # expert of a dense layer gets a gate of ones (its output is 0 whatever the gate).
        w = unit_codes(self.model, gate).dense.float().reshape(-1) if gate is not None else torch.ones(H)
        self.add_float(f"blk.{i}.ffn_gate_inp_shexp.weight", w)

    def norms_and_biases(self, i: int, prefix: str) -> None:
        layer = self.model.get_submodule(prefix)
        for attr, short in NORMS.items():
            mod = layer.get_submodule(attr) if _has(layer, attr) else None
            if mod is not None:
                self.add_float(f"blk.{i}.{short}.weight", mod.weight.float())
        for proj, short in ATTN.items():
            lin = layer.self_attn.get_submodule(proj)
            if getattr(lin, "bias", None) is not None:
                b = lin.bias.detach().float()
                if self.spec.permute_qk and proj in ("q_proj", "k_proj"):
                    heads = self.config.num_attention_heads if proj == "q_proj" else self.config.num_key_value_heads
                    b = b[qk_permutation(b.shape[0], heads)]
                self.add_float(f"blk.{i}.{short}.bias", b)

    def build(self) -> list[tuple[str, list[UnitCodes], bool, str]]:
        embed = next(u for u in self.units if u.kind == "embedding")
        emb = unit_codes(self.model, embed)
        self.add("token_embd.weight", [emb])
        list_name, layers = decoder_layers(self.model)
        for i in range(len(layers)):
            self.layer(i, f"{list_name}.{i}")
        norm = self.model.get_submodule(list_name.rsplit(".", 1)[0]).norm
        self.add_float("output_norm.weight", norm.weight.float())
        head = next((u for u in self.units if u.kind == "lm_head"), None)
        self.add("output.weight", [unit_codes(self.model, head) if head is not None else emb])  # qwen2moe needs it
        return self.out


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def _metadata(writer: Any, config: Any, spec: ArchSpec, n_ff_exp: int, name: str) -> None:
    """The hyperparameters llama.cpp reads for ``spec.arch`` (keys as its converter writes them)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_expert_count(getattr(config, "num_local_experts", None) or config.num_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    if spec.arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    else:
        writer.add_expert_feed_forward_length(n_ff_exp)
    if getattr(config, "shared_expert_intermediate_size", 0):
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)


FILE_TYPES = {"Q4_0": "MOSTLY_Q4_0", "Q8_0": "MOSTLY_Q8_0", "Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_M",
              "BF16": "MOSTLY_BF16", "F16": "MOSTLY_F16", "F32": "ALL_F32"}


def export_gguf(model: nn.Module, out: str | Path, tokenizer: Any = None, name: str | None = None) -> Path:
    """Writes a moe_ao-quantized model as one GGUF file for llama.cpp.

    Args:
        model: a model quantized by moe_ao (Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE).
        out: the ``.gguf`` file to write (parent directories are created).
        tokenizer: its byte-level BPE tokenizer (required: llama.cpp needs the vocabulary).
        name: ``general.name`` (default: the config's name or architecture).

    Returns:
        The file written (the type of every tensor is logged at INFO and stored in it).

    Raises:
        ValueError: no tokenizer, an unsupported architecture or tokenizer, or a plan
            llama.cpp cannot hold (names the layer or tensor).
        ImportError: the gguf package is missing.
    """
    gguf = gguf_module()
    plan = quantized_plan(model)
    if plan is None:
        raise ValueError("model is not quantized by moe_ao; call moe_ao.quantize_ first")
    if tokenizer is None:
        raise ValueError("GGUF export needs the tokenizer (llama.cpp reads the vocabulary from the file)")
    spec = arch_spec(model.config)
    check_plan(plan, units(model), get_target("llama.cpp"))
    builder = _Builder(model, spec)
    tensors = builder.build()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), spec.arch)
    _metadata(writer, model.config, spec, builder.n_ff_exp, name or getattr(model.config, "_name_or_path", "") or
              spec.arch)
    add_tokenizer(writer, tokenizer, model.config.vocab_size)
    float_type = float_type_of(model.dtype, gguf)
    counts: Counter[str] = Counter()
    for tname, parts, stacked, kind in tensors:
        if kind == "f32":
            arr, ggml_type = np_float(parts[0].dense, gguf.GGMLQuantizationType.F32, gguf)
            type_name = "F32"
        else:
            arr, ggml_type, type_name = encode(parts, tname, float_type, gguf, stacked)
        counts[type_name] += 1
        writer.add_tensor(tname, arr, raw_dtype=ggml_type)
    main = max((t for t in counts if t not in ("F32",)), key=lambda t: counts[t], default="F32")
    writer.add_file_type(int(getattr(gguf.LlamaFileType, FILE_TYPES.get(main, "ALL_F32"))))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    logger.info("GGUF export (%s): %d tensors, types %s -> %s", spec.arch, len(tensors), dict(counts), out)
    return out
