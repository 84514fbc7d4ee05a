"""lm-eval-harness on in-memory models with the shipped offline task (moe_ao.eval)."""

from __future__ import annotations

import json

import pytest

import moe_ao
from moe_ao import models
from moe_ao.calibration import resolve_text
from moe_ao.eval.harness import lm_eval, local_task
from moe_ao.eval.nextsent import N_CHOICES, TASK_FILE, build_docs


def test_shipped_task_is_reproducible_from_held_out_text():
    shipped = [json.loads(line) for line in TASK_FILE.read_text().splitlines()]
    assert shipped == build_docs(resolve_text("wikitext2-test", allow_eval=True))
    for doc in shipped:
        assert len(doc["choices"]) == N_CHOICES and 0 <= doc["label"] < N_CHOICES
        assert len(set(doc["choices"])) == N_CHOICES


@pytest.mark.slow
def test_lm_eval_runs_offline_on_float_and_quantized_models(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = models.load("tiny-mixtral")
    ref = lm_eval(model, tok, limit=24)["wikitext2_nextsent"]
    units = moe_ao.units(model)
    moe_ao.quantize_(model, moe_ao.Plan({u.name: 2 for u in units if u.kind == "expert"}, group_size=32))
    quant = lm_eval(model, tok, tasks=[local_task()], limit=24)["wikitext2_nextsent"]
    for r in (ref, quant):
        assert set(r) >= {"acc", "acc_norm"}
        assert all(k / 24 == pytest.approx(r["acc"]) for k in [round(r["acc"] * 24)])  # a share of 24 docs
    # The tiny models sit near chance (0.25) on this task, so no quality claim here:
    # the test pins the offline harness path, float and quantized.
