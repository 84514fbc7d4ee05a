"""Every MoE architecture of the installed transformers, built tiny from its own config class.

``moe_architectures()`` reads the installed transformers: every model folder whose
modeling file defines a ``*ForCausalLM`` class and mentions experts, with the config
class that causal LM declares (``config_class``). A module whose tiny model holds no
routed experts at all (bamba: its ``num_experts`` is hard-wired to 1) is left out by
``is_moe``.

``tiny_config(arch)`` shrinks the config's own defaults: every size-like field that the
default config has is replaced (hidden 64, 8 experts top-2, 2 layers, 4 heads of 16, ...),
and ``FIXES`` holds the few architecture-specific values a generic rule cannot give
(layer patterns of hybrids, fields that must agree). Nothing is downloaded; the weights
are random and seeded.
"""

from __future__ import annotations

import functools
import importlib
import os
import re

import torch
from torch import nn

VOCAB = 128
HIDDEN = 64
EXPERTS = 8
TOP_K = 2

# Field name -> tiny value, applied only where the default config has the field.
GENERIC = {
    "vocab_size": VOCAB, "unpadded_vocab_size": VOCAB, "vocab_size_per_layer_input": VOCAB,
    "hidden_size": HIDDEN, "d_model": HIDDEN,
    "intermediate_size": 128, "intermediate_size_mlp": 128, "ffn_hidden_size": 128,
    "dense_intermediate_size": 128, "moe_intermediate_size": 32, "expert_ffn_hidden_size": 32,
    "shared_expert_intermediate_size": 32, "shared_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 32, "shared_experts_intermediate_size": 32,
    "num_hidden_layers": 2, "n_layers": 2, "num_layers": 2,
    "num_attention_heads": 4, "n_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "swa_head_dim": 16,
    "num_local_experts": EXPERTS, "num_experts": EXPERTS, "n_routed_experts": EXPERTS,
    "moe_num_experts": EXPERTS, "num_experts_per_tok": TOP_K, "num_experts_per_token": TOP_K,
    "moe_topk": TOP_K, "n_group": 1, "topk_group": 1, "num_expert_group": 1,
    "q_lora_rank": 32, "kv_lora_rank": 32, "o_lora_rank": 32, "o_groups": 2, "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8, "qk_head_dim": 16, "v_head_dim": 16, "rotary_dim": 8,
    "index_n_heads": 2, "index_head_dim": 16, "index_topk": 8, "index_topk_blocks": 2, "index_block_size": 8,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
    "linear_value_head_dim": 16, "linear_num_heads": 4, "linear_head_dim": 16,
    "mamba_n_heads": 4, "mamba_num_heads": 4, "mamba_d_head": 16, "mamba_head_dim": 16, "mamba_dt_rank": 8,
    "mamba_d_state": 16, "ssm_state_size": 16, "mamba_n_groups": 1, "n_groups": 1,
    "mamba_chunk_size": 16, "chunk_size": 16, "attention_chunk_size": 16, "block_size": 16,
    "sliding_window": 16, "sliding_window_size": 16, "max_position_embeddings": 128,
    "max_window_layers": 2, "hidden_size_per_layer_input": 16, "router_hidden_size": 32,
    "gated_norm_rank": 8, "loop_gate_rank": 8, "hc_lowrank": 16, "ple_embed_dim": 16,
    "first_k_dense_replace": 1, "num_dense_layers": 1, "moe_layer_start_index": 1, "moe_layer_end_index": 1,
    "num_nextn_predict_layers": 0, "zero_expert_num": 2, "n_shared_experts": 1, "num_shared_experts": 1,
    "moe_num_shared_experts": 1, "global_attn_every_n_layers": 2, "n_layers_per_attn_res_block": 1,
    "ngram_vocab_size_base": 256, "make_ngram_vocab_size_divisible_by": 8, "heads_per_ngram": 2,
    "loop_layer_index_start": 0, "loop_layer_index_end": 2, "no_rope_layer_interval": 2,
}

# Architecture-specific values a generic rule cannot give (applied after GENERIC).
FIXES: dict[str, dict] = {
    "dbrx": {"d_model": HIDDEN, "n_heads": 4, "n_layers": 2, "max_seq_len": 128,
             "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
             "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": EXPERTS, "moe_top_k": TOP_K}},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 1, "expert_layer_offset": 0,
              "use_mamba_kernels": False},
    "nemotron_h": {"layers_block_type": ["linear_attention", "moe", "full_attention", "moe"],
                   "mtp_layers_block_type": []},
    "hunyuan_v1_moe": {"num_experts": EXPERTS, "moe_topk": TOP_K},
    "llama4": {"interleave_moe_layer_step": 1, "intermediate_size": 32},
    "gemma4": {"enable_moe_block": True, "num_experts": EXPERTS, "top_k_experts": TOP_K,
               "moe_intermediate_size": 32, "global_head_dim": 16, "num_kv_shared_layers": 0},
    "longcat_flash": {"num_layers": 1},
    "lfm2_moe": {"num_dense_layers": 1, "layer_types": ["conv", "full_attention"]},
    "beam": {"mlp_layer_types": ["dense", "sparse"]},
    "flint": {"mlp_only_layers": [0]},
    "dots3_note": {"num_key_value_heads": 4},
    "granitemoehybrid": {"layer_types": ["mamba", "attention"], "mamba_n_heads": 8},
    "inkling2_loop": {"num_hidden_layers": 3, "loop_layer_index_start": 1, "loop_layer_index_end": 2},
    "zaya": {"num_experts_per_tok": 1},
    "doge": {"is_moe": True, "num_experts": 16, "num_experts_per_tok": TOP_K, "keep_window_size": 16},
    # hybrids: one linear-attention layer, then one full-attention layer
    "bailing_hybrid": {"layer_group_size": 2},
    "kimi_linear": {"layer_types": ["linear_attention", "full_attention"]},
    "qwen3_next": {"layer_types": ["linear_attention", "full_attention"]},
    "qwen3_5_moe": {"layer_types": ["linear_attention", "full_attention"]},
    "qwen4_exp": {"layer_types": ["linear_attention", "indexed_attention"], "indexer_n_heads": 2,
                  "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8, "indexer_compress_ratio": 2},
}
# Multi-head latent attention (MLA) wants as many key/value heads as query heads.
for _arch in ("axk1", "axk2", "deepseek_v3", "deepseek_v32", "glm_moe_dsa", "longcat_flash"):
    FIXES[_arch] = {"num_key_value_heads": 4, "head_dim": 8} | FIXES.get(_arch, {})  # head_dim: the rope part


# Modules the enumeration finds that hold no routed experts at all.
NOT_MOE = {"bamba": "BambaDecoderLayer hard-wires num_experts = 1: a dense MLP"}


def _transformers_dir() -> str:
    import transformers

    return os.path.dirname(transformers.__file__)


@functools.cache
def moe_architectures() -> tuple[str, ...]:
    """Model folders of the installed transformers with a ``*ForCausalLM`` and routed experts, sorted."""
    root = os.path.join(_transformers_dir(), "models")
    found = []
    for mod in sorted(os.listdir(root)):
        path = os.path.join(root, mod, f"modeling_{mod}.py")
        if not os.path.exists(path):
            continue
        src = open(path, encoding="utf-8").read()
        if mod in NOT_MOE:
            continue
        if re.search(r"^class \w+ForCausalLM\(", src, re.M) and re.search(r"expert", src, re.I):
            found.append(mod)
    return tuple(found)


def causal_lm_class(arch: str) -> type[nn.Module]:
    """The architecture's ``*ForCausalLM`` class (the first one its modeling file defines)."""
    m = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    src = open(m.__file__, encoding="utf-8").read()
    name = re.search(r"^class (\w+ForCausalLM)\(", src, re.M).group(1)
    return getattr(m, name)


def tiny_config(arch: str, **overrides):
    """The causal LM's config class, its size fields shrunk (GENERIC), plus FIXES[arch] and ``overrides``."""
    config_class = causal_lm_class(arch).config_class
    defaults = config_class().to_dict()
    kwargs = {k: v for k, v in GENERIC.items() if k in defaults}
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(defaults.get(key), int) and defaults[key] >= VOCAB:
            kwargs[key] = 1  # token ids must lie in the tiny vocabulary
    kwargs.update(FIXES.get(arch, {}))
    kwargs.update(overrides)
    config = config_class(**kwargs)
    config.architectures = [causal_lm_class(arch).__name__]
    return config


def build(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides) -> nn.Module:
    """A seeded tiny ``arch`` causal LM in eval mode; weights of 2+ dims redrawn with std 0.1
    (many initialise to ~0.02 or zeros, which makes routing and quantization error degenerate)."""
    torch.manual_seed(seed)
    config = tiny_config(arch, **overrides)
    model = causal_lm_class(arch)._from_config(config, dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.1)
    return model.eval()
