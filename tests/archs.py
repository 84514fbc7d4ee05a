"""Tiny MoE models of every supported architecture, built from random configs.

Nothing is downloaded: each builder makes a small seeded model of a real transformers
architecture (Mixtral, Qwen2-MoE, DeepSeek-V3) or of the DeepSeek-MoE-16B layout that
remote-code models use (an ``nn.ModuleList`` of expert MLPs plus shared experts and a
dense first layer), which is defined here and registered with the Auto classes.

All in_features are multiples of 32 so group sizes 32 divide every linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DeepseekV3Config,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
)

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, tie_word_embeddings=False)


class DeepseekMoEStyleConfig(MixtralConfig):
    """DeepSeek-MoE-16B layout: ModuleList experts, shared experts, first layer dense."""

    model_type = "test_deepseek_moe"

    def __init__(self, moe_intermediate_size: int = 32, n_shared_experts: int = 2,
                 first_k_dense_replace: int = 1, **kwargs) -> None:
        self.moe_intermediate_size = moe_intermediate_size
        self.n_shared_experts = n_shared_experts
        self.first_k_dense_replace = first_k_dense_replace
        super().__init__(**kwargs)


class DeepseekMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEGate(nn.Module):
    """Softmax top-k router with a bare weight, as DeepSeek-MoE's remote code has."""

    def __init__(self, config: DeepseekMoEStyleConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(config.num_local_experts, config.hidden_size))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.linear(x.float(), self.weight.float()).softmax(-1)
        weights, idx = scores.topk(self.top_k, dim=-1)
        return idx, weights


class DeepseekMoE(nn.Module):
    def __init__(self, config: DeepseekMoEStyleConfig) -> None:
        super().__init__()
        H, I = config.hidden_size, config.moe_intermediate_size
        self.gate = MoEGate(config)
        self.experts = nn.ModuleList(DeepseekMLP(H, I) for _ in range(config.num_local_experts))
        self.shared_experts = DeepseekMLP(H, I * config.n_shared_experts)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        idx, weights = self.gate(x)
        # Every expert on every token, weighted by a dense routing matrix: static shapes,
        # so torch.compile sees no data-dependent control flow.
        dense = torch.zeros(x.shape[0], len(self.experts), dtype=weights.dtype, device=x.device)
        dense.scatter_(1, idx, weights)
        out = self.shared_experts(x)
        for e, expert in enumerate(self.experts):
            out = out + expert(x) * dense[:, e : e + 1].to(x.dtype)
        return out.reshape(shape)


class DeepseekMoEStyleForCausalLM(MixtralForCausalLM):
    config_class = DeepseekMoEStyleConfig

    def __init__(self, config: DeepseekMoEStyleConfig) -> None:
        super().__init__(config)
        for i, layer in enumerate(self.model.layers):
            if i < config.first_k_dense_replace:
                layer.mlp = DeepseekMLP(config.hidden_size, config.intermediate_size)
            else:
                layer.mlp = DeepseekMoE(config)
        self.post_init()


def _register() -> None:
    try:
        AutoConfig.register(DeepseekMoEStyleConfig.model_type, DeepseekMoEStyleConfig)
        AutoModelForCausalLM.register(DeepseekMoEStyleConfig, DeepseekMoEStyleForCausalLM)
    except ValueError:
        pass  # already registered in this process


def configs() -> dict[str, object]:
    """One small config per supported architecture."""
    _register()
    return {
        "mixtral": MixtralConfig(**COMMON, intermediate_size=64, num_hidden_layers=2,
                                 num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": Qwen2MoeConfig(**COMMON, intermediate_size=128, moe_intermediate_size=32,
                                    shared_expert_intermediate_size=64, num_hidden_layers=3,
                                    num_experts=6, num_experts_per_tok=3, mlp_only_layers=[0]),
        "deepseek_v3": DeepseekV3Config(**COMMON | {"num_key_value_heads": 4}, intermediate_size=128,
                                        moe_intermediate_size=32, num_hidden_layers=3,
                                        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                                        first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32,
                                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                                        n_group=2, topk_group=1),
        "deepseek_moe": DeepseekMoEStyleConfig(**COMMON, intermediate_size=128, moe_intermediate_size=32,
                                               num_hidden_layers=3, num_local_experts=5,
                                               num_experts_per_tok=3, n_shared_experts=2),
    }


ARCHS = tuple(configs())


def build(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A seeded tiny model of ``arch`` in eval mode.

    Weights are re-drawn with std 0.1 (transformers initialises many to ~0.02 or zeros,
    which would make routing and quantization error degenerate).
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(configs()[arch], dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.1)
    return model.eval()
