"""``quantize_pretrained``: quantize a checkpoint larger than memory, straight from its files.

The float model is never whole in memory. Its skeleton is built on the meta device;
the embeddings, final norm and head are loaded once; then each decoder layer in turn
is brought in from the memory-mapped shards, calibrated (GPTQ) or rounded (RTN),
packed, written to the output as its own shard, and put back on the meta device. Peak
memory is one float layer, its GPTQ work copy and statistics, the calibration set's
hidden states and the head: flat in depth, independent of the output size.

A killed run started again with the same arguments resumes after its last finished
layer (``moe_ao.stream.job``) and ends with the same checkpoint, byte for byte, as an
uninterrupted one; the codes equal those of ``quantize_`` on the model loaded whole.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from moe_ao import __version__
from moe_ao.api import prepare, resolve_config, rtn_packed
from moe_ao.distributed import barrier, broadcast_object, is_writer
from moe_ao.packed_state import state_and_meta
from moe_ao.plans import Plan
from moe_ao.progress import Progress
from moe_ao.quant.configs import GPTQConfig, QuantizerConfig
from moe_ao.stream.job import StreamJob, fingerprint
from moe_ao.stream.model import StreamedModel

__all__ = ["quantize_pretrained"]

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "chat_template.jinja", "generation_config.json")


class _CopyTokenizer:
    """Copies the source's tokenizer files (what ``tokenizer.save_pretrained`` would write)."""

    def __init__(self, src: Path) -> None:
        self.files = [src / f for f in TOKENIZER_FILES if (src / f).is_file()]

    def save_pretrained(self, path: str | os.PathLike) -> None:
        for f in self.files:
            shutil.copyfile(f, Path(path) / f.name)


def _job_key(streamed: StreamedModel, plan: Plan, config: QuantizerConfig) -> str:
    src = streamed.source
    files = [(f, (src.path / f).stat().st_size, int((src.path / f).stat().st_mtime)) for f in src.files]
    options = {k: v for k, v in vars(config).items() if k not in ("calibration", "progress")}
    calib = config.calibration.numpy().tobytes() if isinstance(config, GPTQConfig) else b""
    return fingerprint(__version__, str(src.path.resolve()), files, plan.to_dict(), config.method.value, options,
                       calib, str(streamed.dtype), torch.get_num_threads())


def quantize_pretrained(
    src: str | os.PathLike,
    plan: Plan,
    out: str | os.PathLike,
    config: QuantizerConfig | str | None = None,
    *,
    method: str | None = None,
    calibration: torch.Tensor | None = None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    **options: Any,
) -> Path:
    """Quantizes the checkpoint at ``src`` by ``plan`` into a moe_ao checkpoint at ``out``, layer by layer.

    Args:
        src: a local HF checkpoint directory (config.json + safetensors, sharded or not).
        plan: the plan (unit names as ``moe_ao.units`` gives them for this model).
        out: the output checkpoint directory (sharded: one shard per decoder layer).
        config, method, calibration, **options: the quantizer, as for ``moe_ao.quantize_``.
        overwrite: replace an existing moe_ao checkpoint at ``out``.
        dtype: the model's dtype (default: the checkpoint config's).

    Returns:
        The checkpoint path (load it with ``moe_ao.load_quantized``).

    Raises:
        moe_ao.stream.source.SourceError: a missing or truncated shard, an index naming
            absent tensors, a tensor of the wrong shape or kind (before anything is
            written); mid-run, finished layers are kept for a resume.
        ValueError: the plan does not fit the model, or ``out`` may not be replaced.
    """
    config = resolve_config(config, method, calibration, options)
    streamed = StreamedModel(src, dtype)
    streamed.preflight()
    model = streamed.model
    all_units, planned, report = prepare(model, plan, config)
    job, start, state = None, 0, None
    if is_writer():  # under torch.distributed only rank 0 writes; the others follow its resume point
        job = StreamJob(out, _job_key(streamed, plan, config), overwrite)
        if job.next_layer > 0:
            job.verify_done()
            logger.warning("%s: resuming after layer %d (from %s)", out, job.next_layer - 1, job.dir)
        start, state = job.next_layer, job.state()
    start, state = broadcast_object((start, state), "the resume point")
    streamed.load_rest()
    run, inputs = _start(model, plan, planned, all_units, config, report, state)
    n = len(streamed.layers)
    with Progress(n, "quantized layers", getattr(config, "progress", True)) as bar:
        bar.update(start)
        for i in range(start, n):
            try:
                with streamed.layer(i):
                    keys = streamed.keys_of(i)
                    if run is None:
                        packed = rtn_packed(model, plan, planned, all_units, report, keys)
                    else:
                        packed, inputs = run.layer(i, inputs)
                    tensors, meta = state_and_meta(model, keys, packed)
            except (ValueError, RuntimeError) as e:
                where = job.dir if job is not None else "rank 0's output"
                kept = f"layers 0-{i - 1} are finished and kept in {where}" if i else "no layer was finished"
                raise type(e)(f"layer {i}: {e} ({kept}; rerun the same command to resume; changed source files "
                              f"start over)") from e
            state = {"quantized": report.quantized, "extra": report.extra}
            if run is not None:
                state |= {"inputs": run.whole(inputs), "record": run.record}
            if job is not None:
                job.write_layer(i, tensors, meta | {"keys": sorted(tensors)}, state)
            bar.update()
    if run is not None:
        run.finish()
    rest_keys = streamed.keys_of(None)
    rest_packed = rtn_packed(model, plan, planned, all_units, report, rest_keys)  # planned units outside the layers
    rest, rest_meta = state_and_meta(model, rest_keys, rest_packed)
    config_out = streamed.config
    config_out.dtype = streamed.dtype
    if job is None:
        barrier("the checkpoint rank 0 writes")
        return Path(out)
    written = job.finish(rest, rest_meta, model, config_out, plan, report, _CopyTokenizer(Path(src)))
    barrier("the checkpoint rank 0 writes")
    return written


def _start(model, plan, planned, all_units, config, report, state: dict[str, Any] | None):
    """The GPTQ run and layer inputs to continue from (None, None for RTN), restoring a resumed state."""
    if state is not None:
        report.quantized.update(state["quantized"])
        report.extra.update(state["extra"])
    if not isinstance(config, GPTQConfig):
        return None, None
    from moe_ao.quant.gptq_driver import LayerwiseGPTQ

    run = LayerwiseGPTQ(model, plan, planned, all_units, config, report)
    if state is None:
        return run, run.first_inputs()
    run.record = state["record"]
    return run, run.own(state["inputs"])
