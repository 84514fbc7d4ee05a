"""Capture under a traceable experts implementation, restored afterwards, errors as ValueError."""

from __future__ import annotations

import archs
import pytest
import torch
from torch import nn

from moe_ao.passes.capture import capture, default_input_ids, experts_implementation


def test_experts_implementation_is_restored_even_on_error():
    model = archs.build("mixtral")
    before = model.config._experts_implementation
    with pytest.raises(RuntimeError, match="boom"):
        with experts_implementation(model, "batched_mm"):
            assert model.model.layers[0].mlp.experts.config._experts_implementation == "batched_mm"
            raise RuntimeError("boom")
    assert model.config._experts_implementation == before


def test_default_input_ids_fit_the_vocabulary():
    model = archs.build("mixtral")
    ids = default_input_ids(model, tokens=200)
    assert ids.shape == (1, 200) and int(ids.max()) < archs.VOCAB
    with pytest.raises(ValueError, match="no single nn.Embedding"):
        default_input_ids(nn.Linear(2, 2))


class Breaks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.sum() > 0:  # data-dependent control flow: export cannot trace it
            return self.emb(input_ids)
        return self.emb(input_ids) * 2


def test_capture_failure_is_a_value_error_naming_the_model():
    model = Breaks().train()
    with pytest.raises(ValueError, match=r"Breaks: graph capture under experts implementation 'batched_mm' failed"):
        capture(model)
    assert model.training  # mode restored
