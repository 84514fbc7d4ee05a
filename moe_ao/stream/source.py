"""A Hugging Face checkpoint directory read lazily: headers now, tensors one layer at a time.

``config.json`` plus ``model.safetensors`` or shards named by ``model.safetensors.index.json``.
Opening checks what can be checked without reading tensor data: every shard exists and
has a readable header, the index names no tensor its shard lacks, no tensor is in two
shards, and every tensor is floating point. Tensors are then handed out as lazy
``safe_open`` slices (memory-mapped), grouped by the decoder layer their name carries.

Shapes: the checkpoint stores weights in its on-disk layout (e.g. Mixtral's experts one
by one, ``block_sparse_moe.experts.3.w1.weight``); transformers' own conversion mapping
turns a layer's slices into the model's parameters (``moe_ao.stream.model``).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from moe_ao.unit import layer_index

__all__ = ["CheckpointSource", "SourceError"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FLOAT_DTYPES = ("F64", "F32", "BF16", "F16", "F8_E4M3", "F8_E5M2")


class SourceError(ValueError):
    """A source checkpoint that is missing, truncated or inconsistent (names the file and tensor)."""


class CheckpointSource:
    """The tensors of a local HF checkpoint, by name, without loading them.

    Args:
        path: the checkpoint directory.

    Raises:
        SourceError: no config.json or weights, a missing or unreadable shard, an index
            naming a tensor its shard does not hold, a tensor in two shards, or a tensor
            that is not floating point.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise SourceError(f"{self.path}: not a Hugging Face checkpoint (no config.json)")
        self.files = self._weight_files()
        self.where: dict[str, str] = {}  # tensor name -> its file
        self.shapes: dict[str, tuple[list[int], str]] = {}
        for name in self.files:
            for key, (shape, dtype) in self._header(name).items():
                if key in self.where:
                    raise SourceError(f"{self.path / name}: tensor {key} is also in {self.where[key]}")
                if dtype not in FLOAT_DTYPES:
                    raise SourceError(f"{self.path / name}: tensor {key} is {dtype}, expected floating point")
                self.where[key], self.shapes[key] = name, (shape, dtype)
        self._check_index()

    def _weight_files(self) -> list[str]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                self.index = json.loads(index.read_text())["weight_map"]
                assert isinstance(self.index, dict)
            except (ValueError, KeyError, TypeError, AssertionError) as e:
                raise SourceError(f"{index}: not a safetensors index ({e})") from None
            return sorted(set(self.index.values()))
        self.index = None
        if (self.path / SINGLE_FILE).is_file():
            return [SINGLE_FILE]
        raise SourceError(f"{self.path}: no {SINGLE_FILE} and no {INDEX_FILE}")

    def _header(self, name: str) -> dict[str, tuple[list[int], str]]:
        file = self.path / name
        if not file.is_file():
            raise SourceError(f"{file}: missing (named by {INDEX_FILE})")
        try:
            # safetensors checks the header against the file size: a truncated shard fails here.
            with safe_open(str(file), "pt") as handle:
                return {k: (list(handle.get_slice(k).get_shape()), handle.get_slice(k).get_dtype())
                        for k in handle.keys()}
        except (SafetensorError, OSError) as e:
            raise SourceError(f"{file}: not a readable safetensors file ({e})") from None

    def _check_index(self) -> None:
        if self.index is None:
            return
        for key, name in self.index.items():
            if self.where.get(key) != name:
                held = f"it is in {self.where[key]}" if key in self.where else "no shard holds it"
                raise SourceError(f"{self.path / INDEX_FILE}: names tensor {key} in {name}, but {held}")

    def groups(self) -> dict[int | None, list[str]]:
        """Tensor names by decoder layer index (None: embeddings, final norm, head)."""
        out: dict[int | None, list[str]] = defaultdict(list)
        for key in self.where:
            out[layer_index(key)].append(key)
        return dict(out)

    @contextlib.contextmanager
    def slices(self, keys: list[str]) -> Iterator[dict[str, Any]]:
        """Lazy, memory-mapped slices of ``keys`` (read when a conversion materializes them).

        The files are mapped only inside the ``with``: pages of a mapped file count in the
        process's RSS while mapped, so keeping every shard open would make a streamed run's
        RSS grow with the checkpoint it reads.
        """
        with contextlib.ExitStack() as stack:
            handles = {f: stack.enter_context(safe_open(str(self.path / f), "pt"))
                       for f in sorted({self.where[k] for k in keys})}
            yield {k: handles[self.where[k]].get_slice(k) for k in keys}

    @property
    def nbytes(self) -> int:
        """Bytes of all weight files."""
        return sum((self.path / f).stat().st_size for f in self.files)
