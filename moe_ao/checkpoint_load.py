"""Reading a moe_ao checkpoint: every check runs before the model is built or changed.

The order is cheapest first: moe_ao.json (valid JSON, its own sha256, field types),
the manifest (each file's size, then its sha256), the safetensors headers (the exact
set of tensors the model and the packed attributes call for, with shapes and dtypes),
then the data (packed layouts, finite scales), the plan against the stored bits, and
after assembly the tied weights. See ``moe_ao.checkpoint`` for the format.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from moe_ao import experts as experts_impl
from moe_ao.api import PLAN_ATTR, REPORT_ATTR, QuantizationReport, swap_in
from moe_ao.checkpoint import (
    FORMAT,
    META_FILE,
    READABLE_VERSIONS,
    SINGLE_FILE,
    CheckpointError,
    file_digest,
    meta_digest,
)
from moe_ao.discovery import packed_shape, units
from moe_ao.packed_state import inner_keys, rebuild_packed
from moe_ao.plans import Plan
from moe_ao.quant.assemble import units_by_param
from moe_ao.skeleton import meta_model
from moe_ao.tensors.layout import FLOAT_DTYPES, expected_buffers
from moe_ao.tensors.packed import PackedWeight
from moe_ao.unit import Unit

logger = logging.getLogger(__name__)

# safetensors' dtype names
_NAMED = {"uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
          "bool": torch.bool, "float64": torch.float64}
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _safe_name(path: Path, name: Any) -> str:
    """A file name from the manifest, refused unless it stays inside the checkpoint."""
    p = PurePosixPath(name) if isinstance(name, str) else None
    if p is None or not name or p.is_absolute() or ".." in p.parts or "\\" in name:
        raise CheckpointError(f"{path / META_FILE}: file name {name!r} is not a plain relative path")
    return name


def _check_types(path: Path, meta: dict[str, Any]) -> None:
    where = path / META_FILE
    checks = {"packed": dict, "tied": dict}
    if meta["version"] >= 2:
        checks |= {"files": dict, "weights": list, "tensors": dict}
    for key, kind in checks.items():
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(f"{where}: {key!r} must be a JSON {kind.__name__.replace('dict', 'object')}, "
                                  f"got {type(meta.get(key)).__name__}")
    for fqn, info in meta["packed"].items():
        inner = info.get("inner") if isinstance(info, dict) else None
        if not isinstance(inner, list) or not all(isinstance(n, str) for n in inner) or len(set(inner)) != len(inner):
            raise CheckpointError(f"{where}: packed tensor {fqn}: attributes must be an object with an 'inner' list")
    for name, rec in meta.get("tensors", {}).items():
        if not (isinstance(rec, dict) and isinstance(rec.get("dtype"), str)
                and (rec["dtype"] in FLOAT_DTYPES or rec["dtype"] in _NAMED) and isinstance(rec.get("shape"), list)
                and all(isinstance(d, int) and not isinstance(d, bool) for d in rec["shape"])):
            raise CheckpointError(f"{where}: tensor {name}: record {rec!r} must be {{'dtype': a dtype name, "
                                  f"'shape': [int, ...]}}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta["tied"].items()):
        raise CheckpointError(f"{where}: 'tied' must map tensor names to tensor names")
    if meta.get("report") is not None and not isinstance(meta["report"], dict):
        raise CheckpointError(f"{where}: 'report' must be an object or null")
    for name, entry in meta.get("files", {}).items():
        _safe_name(path, name)
        if not (
            isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)
        ):
            raise CheckpointError(f"{where}: manifest entry {name!r} must be {{'bytes': int, 'sha256': str}}")
    for name in meta.get("weights", []):
        if _safe_name(path, name) not in meta["files"]:
            raise CheckpointError(f"{where}: weight file {name!r} is not in the manifest")


def read_meta(path: Path, verify: bool = True) -> dict[str, Any]:
    """moe_ao.json, parsed and checked (format, version, own digest, field types).

    Raises:
        CheckpointError: naming the file and the problem.
    """
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a moe_ao checkpoint (no such directory)")
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise CheckpointError(f"{path}: not a moe_ao checkpoint (no {META_FILE})")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{meta_file}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_file}: expected a JSON object, got {type(meta).__name__}")
    if (
        meta.get("format") != FORMAT
        or meta.get("version") not in READABLE_VERSIONS
        or isinstance(meta.get("version"), bool)
    ):
        raise CheckpointError(
            f"{meta_file}: format {meta.get('format')!r} v{meta.get('version')!r} not supported;"
            f" allowed: {FORMAT!r} v{', v'.join(map(str, READABLE_VERSIONS))}"
        )
    if meta["version"] >= 2 and verify and meta.get("sha256") != meta_digest(meta):
        raise CheckpointError(
            f"{meta_file}: its content does not match its sha256: edited or corrupted after the save "
            f"(load with verify=False to skip this check at your own risk)"
        )
    _check_types(path, meta)
    if meta["version"] == 1:
        logger.warning("%s: a format-1 checkpoint has no file digests; only its structure is checked", path)
    return meta


def check_files(path: Path, meta: dict[str, Any], verify: bool) -> None:
    """Every manifest file exists with its size, and (``verify``) its sha256."""
    for name, entry in meta.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (listed in {META_FILE})")
        if f.stat().st_size != entry["bytes"]:
            raise CheckpointError(
                f"{f}: {f.stat().st_size} bytes, {META_FILE} says {entry['bytes']}: truncated or replaced"
            )
        if verify and file_digest(f) != entry["sha256"]:
            raise CheckpointError(f"{f}: content does not match its sha256 in {META_FILE}: corrupted or modified")


def read_headers(path: Path, weights: list[str]) -> dict[str, tuple[str, tuple[int, ...], torch.dtype]]:
    """tensor name -> (file, shape, dtype), from the safetensors headers only."""
    out: dict[str, tuple[str, tuple[int, ...], torch.dtype]] = {}
    for name in weights:
        try:
            with safe_open(str(path / name), "pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    if sl.get_dtype() not in _DTYPES:
                        raise CheckpointError(f"{path / name}: tensor {key} has unsupported dtype {sl.get_dtype()}")
                    if key in out:
                        raise CheckpointError(f"{path / name}: tensor {key} is also in {out[key][0]}")
                    out[key] = (name, tuple(sl.get_shape()), _DTYPES[sl.get_dtype()])
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path / name}: not a readable safetensors file ({e})") from None
    return out


def check_headers(
    path: Path, meta: dict[str, Any], model: nn.Module, headers: Mapping[str, tuple[str, tuple[int, ...], torch.dtype]],
    model_units: list[Unit] | None = None,
) -> None:
    """The stored tensors are exactly the model's (packed ones as their parts), shapes and dtypes included.

    A packed bank whose float layout is not [E, out, in] (``Unit.layout``) is stored repacked
    to [E, out, in]: that is the logical shape it must have."""
    state = model.state_dict()
    by_param = units_by_param(model_units or [])
    packed, tied = meta["packed"], meta["tied"]
    want: dict[str, tuple[tuple[int, ...], torch.dtype] | None] = {}
    for name, t in state.items():
        if name in tied:
            continue
        if name in packed:
            info = packed[name]
            try:
                expected_buffers(info, t.dtype)  # attributes well-formed (their buffers are checked later)
            except ValueError as e:
                raise CheckpointError(f"{path / META_FILE}: packed tensor {name}: {e}") from None
            shape = packed_shape(t, by_param[name]) if name in by_param else tuple(t.shape)
            if list(info["logical_shape"]) != list(shape):
                raise CheckpointError(
                    f"{path / META_FILE}: packed tensor {name} has logical_shape "
                    f"{info.get('logical_shape')}, the model's is {tuple(shape)}"
                )
            # the inner tensors are checked against their attributes once read
            want |= dict.fromkeys(inner_keys(name, info["inner"], legacy=meta["version"] == 1).values())
        else:
            recorded = meta.get("tensors", {}).get(name)  # format 2 records every plain tensor's dtype
            dtype = (FLOAT_DTYPES | _NAMED)[recorded["dtype"]] if recorded else None
            if recorded is not None and list(t.shape) != recorded["shape"]:
                raise CheckpointError(
                    f"{path / META_FILE}: tensor {name} is recorded as {recorded}, the model's is {tuple(t.shape)}"
                )
            want[name] = (tuple(t.shape), dtype)
    unknown = sorted(set(packed) - set(state)) + sorted(set(tied) - set(state))
    if unknown:
        raise CheckpointError(f"{path / META_FILE}: names tensors the model does not have: {unknown[:3]}")
    missing, extra = sorted(set(want) - set(headers)), sorted(set(headers) - set(want))
    if missing or extra:
        raise CheckpointError(f"{path}: the weight files lack {missing[:3]} and/or hold unexpected {extra[:3]}")
    for key, expected in want.items():
        file, shape, dtype = headers[key]
        if expected is not None and (shape != expected[0] or expected[1] not in (None, dtype)):
            raise CheckpointError(
                f"{path / file}: tensor {key} is {dtype} {shape}, expected "
                f"{expected[1] or 'a tensor of shape'} {expected[0]}"
            )


def _slice_of(u: Unit, w: PackedWeight) -> int:
    return u.expert * w.n_seg + u.segment if u.fused else u.segment


def check_plan(path: Path, plan: Plan, model_units: list[Unit], packed: Mapping[str, PackedWeight],
               tied: Mapping[str, str] | None = None) -> None:
    """The plan fits the model, and every unit's stored bits are the plan's (a tied name's are
    those of the tensor it shares)."""
    try:
        plan.validate(model_units)
    except ValueError as e:
        raise CheckpointError(f"{path / 'plan.json'}: {e}") from None
    for u in model_units:
        spec = plan.get(u.name)
        want = spec.bits if spec is not None else 16
        w = packed.get((tied or {}).get(u.param, u.param))
        have = w.slice_bits[_slice_of(u, w)] if w is not None else 16
        if have != want or (want < 16 and (w.group_size, w.symmetric) != (spec.group_size, spec.symmetric)):
            stored = f"{have} bits" + (f", group {w.group_size}, symmetric={w.symmetric}" if have < 16 else "")
            raise CheckpointError(
                f"{path / 'plan.json'}: unit {u.name} is planned as {spec or '16 bits'} but stored as {stored}"
            )


def _build_skeleton(path: Path) -> nn.Module:
    """The model without its weights (meta parameters): the packed model is loaded where the float
    one would not fit."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None
    return meta_model(config)


ALIGNMENT = 64  # bytes: PyTorch's CPU allocator's alignment


def _load_tensors(path: Path, weights: list[str]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    flat: dict[str, torch.Tensor] = {}
    for name in weights:
        try:
            tensors = load_file(str(path / name))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path / name}: {e}") from None
        for key, t in tensors.items():
            # safetensors hands out each tensor in its own buffer at the file's 8-byte alignment;
            # BLAS picks its kernel by alignment, so a misaligned float weight would give other
            # rounding than the same weight in memory. A copy is 64-byte aligned (one tensor at a time).
            flat[key] = t.clone() if t.data_ptr() % ALIGNMENT else t
    return flat


def _check_ties(path: Path, model: nn.Module, tied: Mapping[str, str]) -> None:
    state = model.state_dict(keep_vars=True)
    for name, source in tied.items():
        if source not in state or state[name] is not state[source]:
            raise CheckpointError(
                f"{path / META_FILE}: tensor {name} is recorded as tied to {source}, but the "
                f"model does not tie them (its weight would be left uninitialised)"
            )


def load_checkpoint(path: Path, device: str | torch.device, verify: bool) -> nn.Module:
    """See :func:`moe_ao.checkpoint.load_quantized`."""
    meta = read_meta(path, verify)
    check_files(path, meta, verify)
    weights = [_safe_name(path, n) for n in meta.get("weights", [SINGLE_FILE])]
    headers = read_headers(path, weights)
    model = _build_skeleton(path)
    model_units = units(model)
    check_headers(path, meta, model, headers, model_units)
    try:
        plan = Plan.from_json(str(path / "plan.json"))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    flat = _load_tensors(path, weights)
    try:
        new = rebuild_packed(lambda key: flat.pop(key, None), meta, str(path), legacy=meta["version"] == 1)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    check_plan(path, plan, model_units, new, meta["tied"])
    swap_in(model, new)
    model.load_state_dict(flat, strict=False, assign=True)
    if meta["tied"]:
        model.tie_weights()
    _check_ties(path, model, meta["tied"])
    unset = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unset:
        raise CheckpointError(f"{path}: the checkpoint does not set {unset[:3]}")
    if any(t.ndim == 3 for t in new.values()):
        experts_impl.select(model)
    setattr(model, PLAN_ATTR, plan)
    report = meta.get("report")
    if report:
        try:
            setattr(model, REPORT_ATTR, QuantizationReport(**report))
        except TypeError as e:
            raise CheckpointError(f"{path / META_FILE}: 'report' is malformed ({e})") from None
    return model.to(device).eval()
