"""Evaluation: KL/top-1/perplexity against the float model, and lm-eval-harness tasks."""

from moe_ao.eval.harness import lm_eval, local_task
from moe_ao.eval.metrics import Quality, compare, eval_windows, logprobs

__all__ = ["Quality", "compare", "eval_windows", "lm_eval", "local_task", "logprobs"]
