"""``moe-ao plan --serving`` -> ``moe-ao quantize`` -> ``moe-ao export`` (the README's serving commands)."""

from __future__ import annotations

import json

import pytest

from moe_ao.cli import main

pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'moe_ao[export]')")


def test_plan_quantize_export_both_formats(tmp_path, capsys):
    plan_file, ckpt = tmp_path / "plan.json", tmp_path / "q"
    assert main(["plan", "--model", "tiny-mixtral", "--strategy", "uniform", "--param", "bits=4",
                 "--group-size", "32", "--serving", "llama.cpp", "-o", str(plan_file)]) == 0
    assert json.loads(plan_file.read_text())["meta"]["serving"] == "llama.cpp"
    assert main(["quantize", "--model", "tiny-mixtral", "--plan", str(plan_file), "--method", "rtn",
                 "-o", str(ckpt)]) == 0
    assert main(["export", "--checkpoint", str(ckpt), "--format", "gguf", "-o", str(tmp_path / "m.gguf")]) == 0
    assert (tmp_path / "m.gguf").stat().st_size > 1_000_000
    assert main(["export", "--checkpoint", str(ckpt), "--format", "compressed-tensors",
                 "-o", str(tmp_path / "ct")]) == 0
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert (tmp_path / "ct" / "tokenizer.json").is_file()
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(ckpt), "--format", "gguf", "--humming", "-o", str(tmp_path / "x")]) == 2
    assert "--humming applies to --format compressed-tensors" in capsys.readouterr().err
