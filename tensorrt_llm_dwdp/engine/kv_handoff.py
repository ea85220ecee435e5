"""The KV cache of one prefilled sequence, as a context server hands it to a generation server.

A context (prefill) worker stops a request after its first token and exports the sequence's
KV; a generation worker imports it into a free slot and decodes from there. The payload is
a safetensors blob (named tensors + JSON metadata), so it crosses processes and devices the
same way whether it travels over HTTP, a file or shared memory. Tensors are moved to the CPU
on export and to the cache's device on import.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

FORMAT_VERSION = 1


@dataclass(frozen=True)
class KvHandoff:
    """``tensors`` maps cache tensor names to ``[prompt_len, ...]`` slices of one sequence."""

    prompt_ids: tuple[int, ...]
    first_token: int
    tensors: dict[str, torch.Tensor]

    @classmethod
    def from_cache(cls, cache, slot: int, prompt_ids, first_token: int) -> "KvHandoff":
        tensors = {k: v.detach().to("cpu", copy=True)
                   for k, v in cache.export_slot(slot, len(prompt_ids)).items()}
        return cls(tuple(int(t) for t in prompt_ids), int(first_token), tensors)

    def write_to_cache(self, cache, slot: int) -> None:
        cache.import_slot(slot, self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        meta = {"format": str(FORMAT_VERSION), "prompt_ids": json.dumps(list(self.prompt_ids)),
                "first_token": str(self.first_token)}
        return save({k: v.contiguous() for k, v in self.tensors.items()}, metadata=meta)

    @classmethod
    def from_bytes(cls, blob: bytes) -> "KvHandoff":
        from safetensors.torch import load

        meta = _metadata(blob)
        if meta.get("format") != str(FORMAT_VERSION):
            raise ValueError(f"KV hand-off format {meta.get('format')!r} is not "
                             f"{FORMAT_VERSION}; context and generation servers differ in version")
        try:
            tensors = load(blob)
            prompt_ids = json.loads(meta["prompt_ids"])
            first_token = int(meta["first_token"])
        except Exception as exc:  # safetensors raises its own type; callers expect ValueError
            raise ValueError(f"KV hand-off blob of {len(blob)} bytes is malformed: "
                             f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(prompt_ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt_ids):
            raise ValueError(f"KV hand-off prompt_ids must be a list of token ids >= 0, "
                             f"got {str(prompt_ids)[:80]}")
        if first_token < 0:
            raise ValueError(f"KV hand-off first_token must be >= 0, got {first_token}")
        return cls(tuple(prompt_ids), first_token, tensors)


def _metadata(blob: bytes) -> dict[str, str]:
    """Read the safetensors header's ``__metadata__`` (8-byte little-endian length + JSON)."""
    if len(blob) < 8:
        raise ValueError("KV hand-off blob is truncated (no safetensors header)")
    size = int.from_bytes(blob[:8], "little")
    if size <= 0 or 8 + size > len(blob):
        raise ValueError("KV hand-off blob is truncated (header length out of range)")
    header = json.loads(blob[8:8 + size])
    return header.get("__metadata__", {})
