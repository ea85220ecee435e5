"""Reading and writing HF-layout safetensors checkpoints, one tensor at a time.

``CheckpointReader`` resolves a key to its shard (``model.safetensors`` or the
``model.safetensors.index.json`` weight map), parses each shard's header once and reads a
tensor (or a row range of it) with a positioned ``readinto`` straight into a fresh tensor. No
memory map: a rank's resident memory grows by exactly the bytes it loads, and only the owned
experts' byte ranges are ever read. ``ShardedWriter`` streams tensors into shards of bounded
size and writes the index at the end, so a writer never holds more than one shard in memory.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterable

import torch
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its shard, dtype, shape and absolute byte range in the file."""

    shard: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(path: str) -> dict[str, TensorEntry]:
    """Parse a safetensors header (8-byte little-endian length, then JSON)."""
    shard = os.path.basename(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (no header length)")
        (n,) = struct.unpack("<Q", raw)
        size = os.fstat(f.fileno()).st_size
        if n > size - 8:
            raise ValueError(f"{path}: header length {n} exceeds the file size {size}")
        header = json.loads(f.read(n))
    base = 8 + n
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
        dtype = _DTYPES[info["dtype"]]
        shape = tuple(int(d) for d in info["shape"])
        b, e = (base + int(o) for o in info["data_offsets"])
        itemsize = torch.empty((), dtype=dtype).element_size()
        if e - b != math.prod(shape) * itemsize or e > size:
            raise ValueError(f"{path}: tensor {key!r} byte range [{b}, {e}) does not fit its shape {shape}")
        out[key] = TensorEntry(shard, dtype, shape, b, e)
    return out


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
            shards = sorted(set(weight_map.values()))
        elif os.path.isfile(os.path.join(self.path, SINGLE_FILE)):
            weight_map, shards = None, [SINGLE_FILE]
        else:
            raise FileNotFoundError(f"{self.path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
        missing = [s for s in shards if not os.path.isfile(os.path.join(self.path, s))]
        if missing:
            raise FileNotFoundError(f"{self.path}: shards listed in the index are missing: {missing}")
        self.entries: dict[str, TensorEntry] = {}
        for shard in shards:
            self.entries.update(read_header(os.path.join(self.path, shard)))
        if weight_map is not None:
            for key, shard in weight_map.items():
                if key not in self.entries or self.entries[key].shard != shard:
                    raise ValueError(f"{index}: {key!r} is mapped to {shard} but that shard lacks it")
        self._files: dict[str, BinaryIO] = {}
        self.bytes_read = 0
        self.keys_read: list[str] = []  # every key read, in order (diagnostics and tests)

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def keys(self) -> list[str]:
        return list(self.entries)

    def _entry(self, key: str) -> TensorEntry:
        if key not in self.entries:
            raise KeyError(f"checkpoint {self.path} lacks tensor {key!r}")
        return self.entries[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key).shape

    def _read_into(self, entry: TensorEntry, begin: int, out: torch.Tensor) -> torch.Tensor:
        f = self._files.get(entry.shard)
        if f is None:
            f = self._files[entry.shard] = open(os.path.join(self.path, entry.shard), "rb", buffering=0)
        buf = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        f.seek(begin)
        got = 0
        while got < len(buf):
            n = f.readinto(buf[got:])
            if not n:
                raise EOFError(f"{self.path}/{entry.shard}: truncated while reading a tensor")
            got += n
        self.bytes_read += len(buf)
        return out

    def get(self, key: str) -> torch.Tensor:
        e = self._entry(key)
        self.keys_read.append(key)
        return self._read_into(e, e.begin, torch.empty(e.shape, dtype=e.dtype))

    def get_rows(self, key: str, start: int, end: int) -> torch.Tensor:
        """Rows ``[start, end)`` along dim 0, reading only those bytes."""
        e = self._entry(key)
        if not e.shape or not 0 <= start <= end <= e.shape[0]:
            raise IndexError(f"{key}: rows [{start}, {end}) outside shape {e.shape}")
        row = (e.end - e.begin) // e.shape[0] if e.shape[0] else 0
        self.keys_read.append(key)
        out = torch.empty((end - start, *e.shape[1:]), dtype=e.dtype)
        return self._read_into(e, e.begin + start * row, out)


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
