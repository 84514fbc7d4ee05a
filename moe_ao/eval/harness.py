"""lm-eval-harness on an in-memory (quantized) model, with offline local tasks.

``lm_eval(model, tokenizer, tasks=[...])`` wraps the model in lm-eval's ``HFLM`` and
runs ``simple_evaluate``. Tasks are lm-eval task names (which fetch their data from
the Hugging Face hub: needs internet), task config dicts, or ``local_task()`` — the
shipped WikiText-2 next-sentence task read from a local jsonl. ``include_path``
points lm-eval at a folder of user YAML tasks (e.g. pointing at local json files).
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from moe_ao.eval.nextsent import TASK_FILE


def local_task(path: str | os.PathLike = TASK_FILE, name: str = "wikitext2_nextsent") -> dict[str, Any]:
    """The task config dict of a local multiple-choice jsonl ({context, choices, label})."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "target_delimiter": " ",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    }


def lm_eval(
    model: nn.Module,
    tokenizer: Any,
    tasks: list[str | dict[str, Any]] | None = None,
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    include_path: str | None = None,
    seed: int = 1234,
) -> dict[str, dict[str, float]]:
    """Runs lm-eval-harness tasks on ``model`` as it is in memory.

    Args:
        model: a (quantized) transformers causal LM.
        tokenizer: its tokenizer.
        tasks: task names or config dicts; default: the shipped local task.
        num_fewshot: few-shot examples (e.g. 5 for MMLU as in the paper).
        limit: documents per task (int) or fraction.
        batch_size: lm-eval batch size.
        include_path: folder of extra YAML task definitions.
        seed: lm-eval's seeds.

    Returns:
        task name -> {metric: value}.

    Raises:
        ImportError: lm-eval is not installed (``pip install moe_ao[eval]``).
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError(f"moe_ao.eval.lm_eval needs lm-eval and accelerate ({e}): pip install 'moe_ao[eval]'") from e
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    manager = TaskManager(include_path=include_path) if include_path else None
    out = simple_evaluate(
        model=lm, tasks=tasks or [local_task()], num_fewshot=num_fewshot, limit=limit,
        task_manager=manager, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed, bootstrap_iters=0, log_samples=False,
    )
    results = {}
    for task, metrics in out["results"].items():
        results[task] = {k.split(",")[0]: v for k, v in metrics.items()
                         if isinstance(v, (int, float)) and not k.startswith("alias") and "stderr" not in k}
    return results
