"""Quality metrics against the float model on held-out text.

KL divergence KL(p_ref || p_q) per token (mean), top-1 agreement, and perplexity, on
non-overlapping windows of a held-out token stream. The reference log-probabilities
are computed once and reused across every quantized variant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def eval_windows(tokens: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows int64 [n, seq_len] from a token stream [N]."""
    n = tokens.numel() // seq_len
    if n == 0:
        raise ValueError(f"{tokens.numel()} evaluation tokens are fewer than seq_len={seq_len}")
    if max_windows is not None:
        n = min(n, max_windows)
    return tokens[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def logprobs(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """log-softmax of the model's next-token logits, float32 [n, L, V]."""
    device = next(model.parameters()).device
    out = [
        F.log_softmax(model(w.to(device), use_cache=False).logits.float(), dim=-1).cpu()
        for w in windows.split(batch_size)
    ]
    return torch.cat(out)


@dataclass
class Quality:
    """Metrics of a model against the reference on the same windows."""

    kl: float
    top1: float
    ppl: float
    ref_ppl: float

    def as_dict(self) -> dict[str, float]:
        return {"kl": self.kl, "top1": self.top1, "ppl": self.ppl, "ref_ppl": self.ref_ppl}


def _ppl(lp: torch.Tensor, windows: torch.Tensor) -> float:
    nll = -lp[:, :-1].gather(-1, windows[:, 1:, None]).mean()
    return math.exp(nll.item())


@torch.no_grad()
def compare(ref_lp: torch.Tensor, model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> Quality:
    """KL(ref || model), top-1 agreement and perplexity on ``windows``.

    Args:
        ref_lp: reference log-probs [n, L, V] from :func:`logprobs` on the same windows.
        model: the model to judge.
        windows: int64 [n, L].
        batch_size: windows per forward.
    """
    lp = logprobs(model, windows, batch_size)
    kl = F.kl_div(lp, ref_lp, log_target=True, reduction="none").sum(-1).mean()
    top1 = (lp.argmax(-1) == ref_lp.argmax(-1)).float().mean()
    return Quality(kl.item(), top1.item(), _ppl(lp, windows), _ppl(ref_lp, windows))
