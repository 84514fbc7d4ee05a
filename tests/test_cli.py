"""The moe-ao command line (moe_ao.cli) on the embedded models."""

from __future__ import annotations

import pytest
import torch

import moe_ao
from moe_ao.cli import main
from moe_ao.profile_stats import Profile


def test_user_mistakes_are_one_line_errors(capsys, tmp_path):
    rc = main(["plan", "--model", "tiny-mixtral", "--strategy", "nope", "-o", str(tmp_path / "p.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "nope" in err and "\n" not in err  # no model loaded
    assert main(["units", "--model", "no-such-model"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "tiny-mixtral" in last  # lists the available names


def test_plan_then_quantize_round_trip(tmp_path, capsys):
    plan_file, out = tmp_path / "plan.json", tmp_path / "q"
    assert main(["plan", "--model", "tiny-mixtral", "--strategy", "first-k", "--budget", "2.5",
                 "--group-size", "32", "-o", str(plan_file), "--heatmap", str(tmp_path / "h.png")]) == 0
    plan = moe_ao.Plan.from_json(str(plan_file))
    model, _ = moe_ao.models.load("tiny-mixtral")
    assert plan.avg_bits(model) == pytest.approx(2.5, abs=0.05)
    assert (tmp_path / "h.png").stat().st_size > 0
    assert main(["quantize", "--model", "tiny-mixtral", "--plan", str(plan_file), "--method", "rtn",
                 "-o", str(out)]) == 0
    q = moe_ao.load_quantized(out)
    assert moe_ao.quantized_plan(q) == plan
    ids = torch.tensor([[1, 2, 3, 4]])
    ref = moe_ao.quantize_(model, plan)
    assert torch.equal(q(ids).logits, ref(ids).logits)
    # Rerunning into the checkpoint needs --overwrite; a folder with a user's file is never replaced.
    again = ["quantize", "--model", "tiny-mixtral", "--plan", str(plan_file), "--method", "rtn", "-o", str(out)]
    assert main(again) == 2 and "overwrite" in capsys.readouterr().err
    assert main(again + ["--overwrite"]) == 0
    user = tmp_path / "mine"
    user.mkdir()
    (user / "precious.txt").write_text("keep")
    capsys.readouterr()
    assert main(again[:-1] + [str(user), "--overwrite"]) == 2
    assert "not a moe_ao directory" in capsys.readouterr().err and (user / "precious.txt").read_text() == "keep"



def test_streamed_profile_with_estimated_sensitivities_then_knapsack_plan(tmp_path):
    prof, plan_file = tmp_path / "profile.pt", tmp_path / "plan.json"
    assert main(["profile", "--model", "tiny-mixtral", "--n-samples", "2", "--seq-len", "32", "--sensitivity",
                 "estimate", "--group-size", "32", "-o", str(prof)]) == 0
    stats = Profile.load(str(prof))
    assert len(stats.sensitivity_estimates) == 196 and not stats.sensitivities
    assert stats.estimate_setup["tokens"] == 64 and stats.estimate_setup["quantizer"] == "gptq"
    assert main(["plan", "--model", "tiny-mixtral", "--strategy", "knapsack", "--budget", "2.5", "--group-size", "32",
                 "--profile", str(prof), "-o", str(plan_file)]) == 0
    details = moe_ao.Plan.from_json(str(plan_file)).meta["details"]
    assert details["sensitivity_source"] == "estimate" and details["sensitivity_requested"] == "auto"

@pytest.mark.slow
def test_profile_with_kl_sensitivities_then_knapsack_plan(tmp_path, capsys):
    prof, plan_file = tmp_path / "profile.pt", tmp_path / "plan.json"
    assert main(["profile", "--model", "tiny-mixtral", "--n-samples", "2", "--seq-len", "32", "--sensitivity", "kl",
                 "--kl-windows", "1", "--group-size", "32", "-o", str(prof)]) == 0
    stats = Profile.load(str(prof))
    assert len(stats.sensitivities) == 196 and stats.sensitivity_setup["kl_tokens"] == 32
    assert main(["plan", "--model", "tiny-mixtral", "--strategy", "knapsack", "--budget", "2.5", "--group-size", "32",
                 "--profile", str(prof), "-o", str(plan_file)]) == 0
    plan = moe_ao.Plan.from_json(str(plan_file))
    assert plan.meta["details"]["sensitivity"] == "kl-gptq" and plan.meta["avg_bits"] <= 2.5
    capsys.readouterr()
    assert main(["plan", "--model", "tiny-mixtral", "--strategy", "knapsack", "--budget", "2.5", "--group-size", "64",
                 "--profile", str(prof), "-o", str(plan_file)]) == 2
    assert "measured at group_size=32, the plan uses 64" in capsys.readouterr().err
    # With --profile, an explicit --sensitivity picks the table the knapsack uses.
    assert main(["plan", "--model", "tiny-mixtral", "--strategy", "knapsack", "--budget", "2.5", "--group-size", "32",
                 "--profile", str(prof), "--sensitivity", "hessian", "-o", str(plan_file)]) == 0
    assert moe_ao.Plan.from_json(str(plan_file)).meta["details"]["sensitivity"] != "kl-gptq"


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--method", "rtn", "--n-samples", "4", "--seq-len", "64", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "reload bit-exact: True" in text and "held-out KL" in text
    assert (out / "demo_report.md").is_file() and (out / "plan_heatmap.png").is_file()
    assert (out / "checkpoint" / "plan.json").is_file() and (out / "checkpoint" / "model.safetensors").is_file()
    # A rerun into the same folder replaces the checkpoint (the report beside it is not in its way).
    assert main(["demo", "--method", "rtn", "--n-samples", "4", "--seq-len", "64", "--out", str(out)]) == 0


def test_plan_prices_lm_head_when_the_base_names_it(tmp_path):
    """An untied copy of tiny-mixtral: the knapsack measures lm_head's KL with the rest and gives it bits."""
    import json

    model, tok = moe_ao.models.load("tiny-mixtral")
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.save_pretrained(tmp_path / "untied")
    tok.save_pretrained(tmp_path / "untied")
    base = {"attention": 4, "expert": 2, "lm_head": 4}
    plan_file = tmp_path / "plan.json"
    assert main(["plan", "--model", str(tmp_path / "untied"), "--strategy", "knapsack", "--budget", "3.0",
                 "--group-size", "32", "--sensitivity", "estimate", "--n-samples", "2", "--seq-len", "32",
                 "--param", f"base={json.dumps(base)}", "-o", str(plan_file)]) == 0
    plan = moe_ao.Plan.from_json(str(plan_file))
    assert plan["lm_head"].bits in (2, 3, 4, 8) and plan.meta["details"]["sensitivity_source"] == "estimate"
