"""The files that make a moe_ao checkpoint a Hugging Face model repo.

``save_quantized`` calls :func:`write_hub_files` on the finished directory:

- ``config.json`` gets ``quantization_config = {"quant_method": "moe_ao", ...}`` with the
  plan, so ``AutoModelForCausalLM.from_pretrained`` dispatches to the quantizer that
  ``import moe_ao`` registers (:mod:`moe_ao.hf_quantizer`);
- ``README.md`` is a model card: YAML front matter (library, tags, base model), how to
  load it, and the plan's per-layer summary, so the directory can be pushed to the Hub
  as it is (``huggingface_hub.upload_folder``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from moe_ao.plans import Plan

QUANT_METHOD = "moe_ao"
CONFIG_FORMAT = "moe_ao.checkpoint"
CONFIG_VERSION = 1


def quantization_config(plan: Plan) -> dict[str, Any]:
    """The ``quantization_config`` entry of config.json for a checkpoint of ``plan``."""
    return {"quant_method": QUANT_METHOD, "format": CONFIG_FORMAT, "version": CONFIG_VERSION,
            "plan": plan.to_dict()}


def model_card(model: nn.Module, plan: Plan) -> str:
    """A Hub model card (markdown with YAML front matter) describing the plan.

    Args:
        model: the quantized model (its config names the architecture and base model).
        plan: its plan.

    Returns:
        The README.md text.
    """
    from moe_ao.planner.summary import summarize  # planner sits below api; imported when writing

    config = model.config
    base = getattr(config, "_name_or_path", "") or ""
    arch = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    front = ["---", "library_name: transformers", "tags:", "- moe_ao", "- quantized", "- mixture-of-experts"]
    if base and not Path(base).exists():  # a Hub id, not a local path
        front.append(f"base_model: {base}")
    front.append("---")
    body = f"""
# {arch}, mixed-precision quantized with moe_ao

Weights are stored packed (2/3/4/8-bit codes with group scales, 16-bit where the plan
says so), bits chosen per linear by a moe_ao plan (`plan.json`). Load it with
transformers after importing moe_ao, which registers the `moe_ao` quantization method:

```python
import moe_ao  # registers quant_method "moe_ao" with transformers
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("<this repo>", device_map="cpu")
```

or with `moe_ao.load_quantized("<local dir>")`. Without `import moe_ao`, transformers
does not know the method and loading fails with a size mismatch on the packed weights.

## Plan

{summarize(plan, model)}
Strategy metadata: `{json.dumps({k: plan.meta[k] for k in ("strategy", "budget_bits") if k in plan.meta})}`.
"""
    return "\n".join(front) + "\n" + body


def write_hub_files(out: Path, model: nn.Module, plan: Plan) -> None:
    """Adds ``quantization_config`` to ``out/config.json`` and writes ``out/README.md``.

    Args:
        out: the checkpoint directory (config.json already written).
        model: the quantized model.
        plan: its plan.
    """
    config_file = out / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"] = quantization_config(plan)
    config_file.write_text(json.dumps(config, indent=2) + "\n")  # unsorted: the plan keeps its order
    (out / "README.md").write_text(model_card(model, plan))
