"""Reading and writing HF-layout safetensors checkpoints, one tensor at a time.

``CheckpointReader`` resolves a key to its shard (``model.safetensors`` or the
``model.safetensors.index.json`` weight map) and reads only that tensor (or a slice of it along
dim 0) from the memory-mapped file, so a rank touches only the bytes it loads.
``ShardedWriter`` streams tensors into shards of bounded size and writes the index at the end,
so a writer never holds more than one shard in memory.
"""
from __future__ import annotations

import json
import os
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointReader:
    """Key -> tensor access over a checkpoint folder. Close it (or use ``with``)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        index = os.path.join(self.path, INDEX_FILE)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index} has no 'weight_map'")
            self.weight_map: dict[str, str] = dict(weight_map)
        elif os.path.isfile(os.path.join(self.path, SINGLE_FILE)):
            with safe_open(os.path.join(self.path, SINGLE_FILE), framework="pt") as f:
                self.weight_map = {k: SINGLE_FILE for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
        missing = {s for s in set(self.weight_map.values())
                   if not os.path.isfile(os.path.join(self.path, s))}
        if missing:
            raise FileNotFoundError(f"{self.path}: shards listed in the index are missing: {sorted(missing)}")
        self._handles: dict[str, object] = {}
        self.bytes_read = 0
        self.keys_read: list[str] = []  # every key read, in order (diagnostics and tests)

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def _handle(self, key: str):
        if key not in self.weight_map:
            raise KeyError(f"checkpoint {self.path} lacks tensor {key!r}")
        shard = self.weight_map[key]
        if shard not in self._handles:
            h = safe_open(os.path.join(self.path, shard), framework="pt")
            self._handles[shard] = h.__enter__()
        return self._handles[shard]

    def get(self, key: str) -> torch.Tensor:
        t = self._handle(key).get_tensor(key)
        self.bytes_read += t.numel() * t.element_size()
        self.keys_read.append(key)
        return t

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def get_rows(self, key: str, start: int, end: int) -> torch.Tensor:
        """Rows ``[start, end)`` along dim 0, reading only those bytes."""
        t = self._handle(key).get_slice(key)[start:end]
        self.bytes_read += t.numel() * t.element_size()
        self.keys_read.append(key)
        return t


def _shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


class ShardedWriter:
    """Write ``(name, tensor)`` pairs into shards of at most ``shard_bytes`` (a single tensor
    larger than that gets a shard of its own). ``finish()`` names the shards ``model-0000i-of-
    0000n.safetensors`` and writes the index, or writes ``model.safetensors`` if one shard."""

    def __init__(self, path: str | os.PathLike, shard_bytes: int) -> None:
        if shard_bytes <= 0:
            raise ValueError(f"shard size must be > 0 bytes, got {shard_bytes}")
        self.path = os.fspath(path)
        os.makedirs(self.path, exist_ok=True)
        self.shard_bytes = shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in keys for _, keys in self._shards):
            raise ValueError(f"tensor {name!r} written twice")
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def add_all(self, items: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in items:
            self.add(name, tensor)

    def _flush(self) -> None:
        tmp = f".shard-{len(self._shards):05d}.safetensors"
        save_file(self._pending, os.path.join(self.path, tmp), metadata={"format": "pt"})
        self._shards.append((tmp, list(self._pending)))
        self._pending = {}
        self._pending_bytes = 0

    def finish(self) -> list[str]:
        """Flush, rename, write the index; returns the shard file names."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            names = [SINGLE_FILE]
        else:
            names = [_shard_name(i, n) for i in range(n)]
        weight_map = {}
        for (tmp, keys), final in zip(self._shards, names):
            os.replace(os.path.join(self.path, tmp), os.path.join(self.path, final))
            weight_map.update({k: final for k in keys})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            with open(os.path.join(self.path, INDEX_FILE), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        return names
