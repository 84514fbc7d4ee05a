"""Shared plumbing of the quality benchmarks: machine facts, model + reference cache."""

from __future__ import annotations

import copy
import platform
import resource
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

import moe_ao
from moe_ao import models
from moe_ao.calibration import load_calibration, load_eval_tokens
from moe_ao.eval.metrics import compare, eval_windows, logprobs


def machine() -> str:
    """One line naming the CPU, core count and library versions."""
    cpu = next((l.split(":")[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    return (f"{cpu}, {torch.get_num_threads()} threads, Python {platform.python_version()}, torch {torch.__version__},"
            f" transformers {transformers.__version__}, moe_ao {moe_ao.__version__}")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Bench:
    """A float model with its held-out reference and calibration windows."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    windows: torch.Tensor
    ref_lp: torch.Tensor
    calibration: torch.Tensor

    @classmethod
    def load(cls, name: str, seq_len: int = 256, eval_windows_n: int = 48, n_calib: int = 128,
             calib_source: str = "wikitext2-valid", seed: int = 0) -> Bench:
        model, tok = models.load(name)
        windows = eval_windows(load_eval_tokens(tok), seq_len, eval_windows_n)
        calib = load_calibration(calib_source, tok, n_calib, seq_len, seed, model.config)
        return cls(name, model, tok, windows, logprobs(model, windows), calib)

    def fresh(self) -> torch.nn.Module:
        return copy.deepcopy(self.model)

    def judge(self, model: torch.nn.Module) -> dict[str, float]:
        return compare(self.ref_lp, model, self.windows).as_dict()
