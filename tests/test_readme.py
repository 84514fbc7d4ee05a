"""README.md's examples are tests: every Python block runs, in order, in one namespace.

The blocks are written to run as they stand on the embedded models (a newcomer copies
them), so they cannot drift from the API. The plan JSON example must parse and fit
tiny-mixtral.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import moe_ao

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
PYTHON = re.findall(r"```python\n(.*?)```", README, re.S)
PLAN_JSON = [b for b in re.findall(r"```json\n(.*?)```", README, re.S) if '"moe_ao.plan"' in b]


def test_readme_has_examples_and_they_compile():
    assert len(PYTHON) >= 4 and PLAN_JSON
    for i, code in enumerate(PYTHON, 1):
        compile(code, f"README.md python block {i}", "exec")


def test_plan_json_example_fits_the_embedded_model():
    model, _ = moe_ao.models.load("tiny-mixtral")
    for text in PLAN_JSON:
        moe_ao.Plan.from_json(text).validate(moe_ao.units(model))


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write to out/
    namespace: dict = {}
    for i, code in enumerate(PYTHON, 1):
        exec(compile(code, f"README.md python block {i}", "exec"), namespace)  # noqa: S102
