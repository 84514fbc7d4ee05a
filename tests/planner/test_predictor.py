"""The block importance predictor learns, ranks, and is deterministic."""

from __future__ import annotations

import pytest
import torch

from moe_ao.planner.predictor import BlockPredictor, PredictorConfig, block_scores, train_block_predictor
from moe_ao.profile_stats import Profile

FAST = PredictorConfig(max_epochs=40, patience=10, batch_size=32)


def linear_task(n: int = 512, d: int = 8, offset: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs with a constant feature (a non-zero mean, as hidden states have) and a linear target."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, 0] = 1.0
    w = torch.randn(d, generator=g)
    w[0] = 0.0
    return x, offset + 0.1 * (x @ w) / w.norm()


def test_architecture_is_the_papers():
    m = BlockPredictor(16, 1024, torch.Generator().manual_seed(0))
    assert m.fc1.weight.shape == (1024, 16) and m.fc1.bias is None
    assert m.fc2.weight.shape == (1, 1024) and m.fc2.bias is None
    assert m(torch.randn(5, 16) * 100).abs().max() <= 1  # tanh output


def test_learns_a_linear_target():
    x, y = linear_task()
    model, score = train_block_predictor(x.half(), y, FAST, seed=0)
    assert score.val_mse < 0.1 * float(y.var())  # explains > 90% of the variance on held-out tokens
    assert (score.n_train, score.n_val) == (461, 51)  # 10% held out
    assert score.score == pytest.approx(score.val_cos, abs=0.02)
    with torch.no_grad():
        untrained = float(((BlockPredictor(8, 1024, torch.Generator().manual_seed(0))(x) - y) ** 2).mean())
    assert score.val_mse < untrained / 5


def test_deterministic_and_seeded():
    x, y = linear_task(n=128)
    cfg = PredictorConfig(max_epochs=3)
    _, a = train_block_predictor(x, y, cfg, seed=5)
    _, b = train_block_predictor(x, y, cfg, seed=5)
    _, c = train_block_predictor(x, y, cfg, seed=6)
    assert a == b and a != c


def test_ranking_picks_lowest_cos_blocks():
    prof = Profile()
    for layer, offset in enumerate([0.9, 0.3, 0.8, 0.5]):
        x, y = linear_task(n=256, offset=offset, seed=layer)
        prof.block_inputs[layer], prof.block_cos[layer] = x.half(), y
    scores = block_scores(prof, config=FAST)
    ranking = sorted(scores, key=lambda layer: scores[layer].score)
    assert ranking == [1, 3, 2, 0]
    assert all(s.val_mse < 0.02 for s in scores.values())  # vs 0.06 variance of the block offsets


def test_scores_are_trained_once_per_profile_and_not_saved(monkeypatch, tmp_path):
    prof = Profile()
    x, y = linear_task(n=64)
    prof.block_inputs[0], prof.block_cos[0] = x.half(), y
    first = block_scores(prof, config=FAST, seed=1)
    import moe_ao.planner.predictor as predictor

    monkeypatch.setattr(predictor, "train_block_predictor", lambda *a, **k: pytest.fail("retrained"))
    assert block_scores(prof, config=FAST, seed=1) == first
    with pytest.raises(pytest.fail.Exception, match="retrained"):
        block_scores(prof, config=FAST, seed=2)  # another seed is another result
    prof.save(str(tmp_path / "p.pt"))
    assert Profile.load(str(tmp_path / "p.pt"))._memo == {}


def test_errors():
    with pytest.raises(ValueError, match="val_fraction=1.0; allowed: 0 < val_fraction < 1"):
        PredictorConfig(val_fraction=1.0)
    with pytest.raises(ValueError, match=r"must be \[n, d\] and \[n\]"):
        train_block_predictor(torch.randn(4, 3), torch.randn(5))
    with pytest.raises(ValueError, match="at least 2 tokens, got 1"):
        train_block_predictor(torch.randn(1, 3), torch.randn(1))
    with pytest.raises(ValueError, match=r"layer 3: stats needs block_inputs and block_cos; have inputs for \[\]"):
        block_scores(Profile(), layers=[3])
