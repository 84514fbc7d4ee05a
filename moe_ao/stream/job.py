"""The on-disk state of a streamed quantization, so that a killed run resumes where it stopped.

A job writes into one resumable staging directory beside its target,
``.<name>.moe_ao-resume-<key>``, where the key is a digest of everything that
determines the result (the source checkpoint's files, the plan, the quantizer and its
calibration, moe_ao's version): the same command finds the same directory, another
command gets its own. In it::

    model-layer-00007.safetensors   layer 7's tensors, final (packed parts, norms, routers)
    state-00007.pt                  what layer 8 needs: its calibration inputs, the report so far
    progress.json                   the last finished layer and each layer's metadata

Each layer's shard and state are written under temporary names and renamed, and
progress.json (renamed last) is what declares the layer finished, so a kill at any
moment loses at most the layer in progress. The finished checkpoint is the directory
itself once the rest (embeddings, norm, head), the HF index, config, plan and
moe_ao.json are written; it then replaces the target as ``save_quantized`` does.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from moe_ao.checkpoint import INDEX_FILE, META_FILE, file_digest, finish_checkpoint, owned_files
from moe_ao.staged_dir import StagedDir

__all__ = ["StreamJob", "fingerprint"]

PROGRESS = "progress.json"
REST_FILE = "model-rest.safetensors"


def fingerprint(*parts: Any) -> str:
    """A digest of the job's inputs (strings, bytes and JSON-able values)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def _replace(path: Path, write) -> None:
    """Writes ``path`` whole or not at all: ``write(tmp)`` then a rename."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def layer_file(i: int) -> str:
    return f"model-layer-{i:05d}.safetensors"


class StreamJob:
    """A resumable job's directory (see the module doc).

    Args:
        out: the final checkpoint path.
        key: :func:`fingerprint` of the job's inputs.
        overwrite: whether the final checkpoint may replace a moe_ao checkpoint at ``out``.

    Raises:
        ValueError: ``out`` may not be replaced (checked before anything is written).
    """

    def __init__(self, out: str | os.PathLike, key: str, overwrite: bool) -> None:
        self.stage = StagedDir.resumable(out, key[:24], overwrite, owned_files)
        self.dir, self.key = self.stage.path, key
        progress = self.dir / PROGRESS
        data = json.loads(progress.read_text()) if progress.is_file() else None
        if data is None or data.get("key") != key:
            data = {"key": key, "done": -1, "layers": {}}
        self.progress = data

    @property
    def next_layer(self) -> int:
        """The first layer still to do."""
        return self.progress["done"] + 1

    def state(self) -> dict[str, Any] | None:
        """What the last finished layer left for the next one, or None at the start."""
        done = self.progress["done"]
        if done < 0:
            return None
        return torch.load(self.dir / f"state-{done:05d}.pt", weights_only=False)  # our own file

    def write_layer(self, i: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                    state: dict[str, Any] | None) -> None:
        """Records layer i as finished: its shard, the state the next layer needs, then progress."""
        assert i == self.next_layer, f"{i=} {self.next_layer=}"
        _replace(self.dir / layer_file(i), lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        if state is not None:
            _replace(self.dir / f"state-{i:05d}.pt", lambda p: torch.save(state, p))
        self.progress["layers"][str(i)] = meta | {"sha256": file_digest(self.dir / layer_file(i))}
        self.progress["done"] = i
        _replace(self.dir / PROGRESS, lambda p: p.write_text(json.dumps(self.progress)))
        if i > 0:
            (self.dir / f"state-{i - 1:05d}.pt").unlink(missing_ok=True)

    def verify_done(self) -> None:
        """Finished layers' shards are still the ones recorded (a resumed run trusts them)."""
        for i, meta in self.progress["layers"].items():
            f = self.dir / layer_file(int(i))
            if not f.is_file() or file_digest(f) != meta["sha256"]:
                raise ValueError(f"{f}: a finished layer's shard is missing or changed; delete {self.dir} to start "
                                 f"over")

    def finish(self, rest: dict[str, torch.Tensor], rest_meta: dict[str, Any], model: Any, config: Any, plan: Any,
               report: Any, tokenizer: Any = None) -> Path:
        """Writes the rest, the index and the checkpoint's descriptive files, and moves it onto the target."""
        _replace(self.dir / REST_FILE, lambda p: save_file(rest, str(p), metadata={"format": "pt"}))
        n = len(self.progress["layers"])
        weights = [layer_file(i) for i in range(n)] + [REST_FILE]
        meta: dict[str, Any] = {"packed": {}, "tied": {}, "tensors": {}}
        weight_map: dict[str, str] = {}
        for i in range(n):
            layer = self.progress["layers"][str(i)]
            for key in meta:
                meta[key] |= layer[key]
            weight_map |= dict.fromkeys(layer["keys"], layer_file(i))
        for key in meta:
            meta[key] |= rest_meta[key]
        weight_map |= dict.fromkeys(rest, REST_FILE)
        total = sum((self.dir / w).stat().st_size for w in weights)
        (self.dir / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                      indent=1) + "\n")
        for p in [*self.dir.glob("state-*.pt"), *self.dir.glob("*.tmp")]:  # resume state, interrupted writes
            p.unlink()
        (self.dir / PROGRESS).unlink(missing_ok=True)
        finish_checkpoint(self.dir, weights, meta, model, config, plan, report, tokenizer)
        assert (self.dir / META_FILE).is_file()
        return self.stage.commit()
