"""Block importance predictor (the paper's +LayerISP).

One small MLP per decoder block learns to predict, per token, the cosine similarity
between the block's input and output hidden states from the input alone:

    Linear(d -> 1024, no bias) -> ReLU -> Linear(1024 -> 1, no bias) -> Tanh

trained with MSE (AdamW, lr 1e-4, weight decay 1e-2) and early stopping on a 10%
held-out split. A block's score is the mean prediction on its held-out tokens; the
blocks with the lowest predicted similarity change the hidden state most and get
their experts raised first.

Beyond the paper: inputs are divided per feature by the training split's RMS
(hidden states carry massive-activation outliers in the thousands, which would
otherwise dominate the first layer). They are not centred: the MLP has no biases, so
f(0) = 0 and only the inputs' own mean lets it express a constant offset. The epoch
count is capped, and all
randomness (init, split, shuffling) comes from one seeded generator per block, so
the scores are reproducible. Shapes: n tokens, d hidden size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from moe_ao.profile_stats import Profile


@dataclass(frozen=True)
class PredictorConfig:
    """Training settings (paper values where the paper gives them).

    Attributes:
        hidden: MLP width (paper: 1024).
        lr: AdamW learning rate (paper: 1e-4).
        weight_decay: AdamW weight decay (paper: 1e-2).
        val_fraction: held-out share of tokens (paper: 10%).
        max_epochs: cap on passes over the training split.
        patience: epochs without a held-out improvement before stopping.
        batch_size: tokens per step.
        standardize: divide inputs per feature by their training-split RMS.
    """

    hidden: int = 1024
    lr: float = 1e-4
    weight_decay: float = 1e-2
    val_fraction: float = 0.1
    max_epochs: int = 50
    patience: int = 5
    batch_size: int = 256
    standardize: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction}; allowed: 0 < val_fraction < 1")
        for name in ("hidden", "max_epochs", "patience", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; allowed: a positive int")


@dataclass(frozen=True)
class BlockScore:
    """One block's predictor result.

    Attributes:
        layer: decoder layer index.
        score: mean predicted cosine similarity on held-out tokens.
        val_mse: held-out MSE of the best epoch.
        val_cos: mean true cosine similarity on the held-out tokens (for reference).
        epochs: epochs trained (early stopping included).
        n_train: training tokens.
        n_val: held-out tokens.
    """

    layer: int
    score: float
    val_mse: float
    val_cos: float
    epochs: int
    n_train: int
    n_val: int


class BlockPredictor(nn.Module):
    """The paper's MLP, with the per-feature input scale stored as a buffer."""

    def __init__(self, d: int, hidden: int, generator: torch.Generator) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, 1, bias=False)
        with torch.no_grad():  # nn.Linear's own uniform bound, drawn from our generator
            self.fc1.weight.uniform_(-1 / math.sqrt(d), 1 / math.sqrt(d), generator=generator)
            self.fc2.weight.uniform_(-1 / math.sqrt(hidden), 1 / math.sqrt(hidden), generator=generator)
        self.register_buffer("scale", torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, d] -> predicted cosine similarity [n]."""
        x = x / self.scale
        return torch.tanh(self.fc2(torch.relu(self.fc1(x)))).squeeze(-1)


def _split(n: int, val_fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if n < 2:
        raise ValueError(f"the block predictor needs at least 2 tokens, got {n}")
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    perm = torch.randperm(n, generator=generator)
    return perm[n_val:], perm[:n_val]


@torch.no_grad()
def _mse(model: BlockPredictor, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(((model(x) - y) ** 2).mean())


def train_block_predictor(
    x: torch.Tensor, y: torch.Tensor, config: PredictorConfig | None = None, seed: int = 0, layer: int = -1
) -> tuple[BlockPredictor, BlockScore]:
    """Trains one block's predictor and scores the block on held-out tokens.

    Args:
        x: block inputs [n, d] (any float dtype; trained in float32).
        y: per-token cosine similarity of input and output [n].
        config: training settings.
        seed: seeds init, split and shuffling.
        layer: layer index, recorded in the score.

    Returns:
        (the trained predictor at its best held-out epoch, the block's score).

    Raises:
        ValueError: mismatched or too few tokens.
    """
    config = config or PredictorConfig()
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"block inputs {tuple(x.shape)} and cosines {tuple(y.shape)} must be [n, d] and [n]")
    g = torch.Generator().manual_seed(seed)
    x, y = x.float(), y.float()
    train, val = _split(x.shape[0], config.val_fraction, g)
    model = BlockPredictor(x.shape[1], config.hidden, g)
    if config.standardize:
        model.scale.copy_(x[train].pow(2).mean(0).sqrt().clamp_min(1e-6))
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    best, best_state, stale, epochs = _mse(model, x[val], y[val]), None, 0, 0
    for epochs in range(1, config.max_epochs + 1):  # noqa: B007 (read after the loop)
        order = train[torch.randperm(train.numel(), generator=g)]
        for batch in order.split(config.batch_size):
            loss = ((model(x[batch]) - y[batch]) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        mse = _mse(model, x[val], y[val])
        if mse < best:
            best, stale = mse, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= config.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    with torch.no_grad():
        score = float(model(x[val]).mean())
    return model, BlockScore(layer, score, best, float(y[val].mean()), epochs, train.numel(), val.numel())


def block_scores(
    stats: Profile, layers: list[int] | None = None, config: PredictorConfig | None = None, seed: int = 0
) -> dict[int, BlockScore]:
    """Trains a predictor per block on ``stats.block_inputs`` -> ``stats.block_cos``.

    Args:
        stats: profile holding block_inputs [n, d] and block_cos [n] per layer.
        layers: blocks to score (default: every layer present in both fields).
        config: training settings.
        seed: base seed (block l uses a generator seeded from (seed, l)).

    Returns:
        layer -> BlockScore, layers ascending. Each block is trained once per Profile,
        config and seed (remembered on the Profile, not saved).

    Raises:
        ValueError: a requested layer lacks block inputs or cosines.
    """
    if layers is None:
        layers = sorted(set(stats.block_inputs) & set(stats.block_cos))
    out = {}
    for layer in sorted(layers):
        if layer not in stats.block_inputs or layer not in stats.block_cos:
            raise ValueError(
                f"layer {layer}: stats needs block_inputs and block_cos; have inputs for"
                f" {sorted(stats.block_inputs)} and cosines for {sorted(stats.block_cos)}"
            )
        key = ("block_score", layer, config, seed)  # a pure function of these and the layer's data
        out[layer] = stats.memo(key, lambda layer=layer: train_block_predictor(
            stats.block_inputs[layer], stats.block_cos[layer], config, seed=seed * 100_003 + layer, layer=layer)[1])
    return out


def config_dict(config: PredictorConfig) -> dict:
    """The config as a JSON-ready dict (for plan meta)."""
    return asdict(config)
