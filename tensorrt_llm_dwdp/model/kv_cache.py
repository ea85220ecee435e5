"""A slot-addressed KV cache: per layer one K and one V tensor ``[max_seqs, max_len, heads, dim]``.

A sequence owns a slot for its lifetime; position p of slot s lives at ``[s, p]``. What K and V
hold is the attention module's choice: Qwen3 stores the rotated per-head K and V; DeepSeek's MLA
stores its compressed latent (K = normalised ``kv_lora`` latent with one "head", V = the rotated
shared rope key), as HF and the DeepSeek reference do, and up-projects it when attending.
"""
from __future__ import annotations

import torch


class KvCache:
    """Owns the cache tensors; ``append`` writes new tokens and returns everything cached."""

    def __init__(
        self,
        num_layers: int,
        max_seqs: int,
        max_len: int,
        k_shape: tuple[int, int],
        v_shape: tuple[int, int],
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if num_layers < 1 or max_seqs < 1 or max_len < 1:
            raise ValueError(
                f"KvCache needs num_layers, max_seqs, max_len >= 1, got {num_layers}, {max_seqs}, {max_len}"
            )
        self.max_seqs = max_seqs
        self.max_len = max_len
        self.k = [torch.zeros(max_seqs, max_len, *k_shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(max_seqs, max_len, *v_shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token position takes over all layers (K and V)."""
        return self.nbytes // (self.max_seqs * self.max_len)

    def _check(self, slot: int, end: int) -> None:
        if not 0 <= slot < self.max_seqs:
            raise IndexError(f"cache slot {slot} out of range [0, {self.max_seqs})")
        if end > self.max_len:
            raise ValueError(f"sequence in slot {slot} reaches length {end} > cache max_len {self.max_len}")

    def append(
        self, layer: int, slot: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``/``v`` ``[n, heads, dim]`` at positions ``[start, start + n)`` of ``slot``;
        return views of positions ``[0, start + n)``."""
        end = start + k.shape[0]
        self._check(slot, end)
        self.k[layer][slot, start:end] = k
        self.v[layer][slot, start:end] = v
        return self.k[layer][slot, :end], self.v[layer][slot, :end]

    def write(self, layer: int, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write a step's packed ``k``/``v`` ``[N, heads, dim]`` at flat positions ``index [N]``
        (``slot * max_len + position``, see ``StepMetadata.cache_index``): one copy per tensor."""
        self.k[layer].view(-1, *self.k[layer].shape[2:]).index_copy_(0, index, k)
        self.v[layer].view(-1, *self.v[layer].shape[2:]).index_copy_(0, index, v)

    def prefix(self, layer: int, slot: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of positions ``[0, end)`` of ``slot``: ``[end, heads, dim]``."""
        self._check(slot, end)
        return self.k[layer][slot, :end], self.v[layer][slot, :end]

    def batch(self, layer: int, slots: torch.Tensor, slot_range: slice | None,
              length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions ``[0, length)`` of several slots, ``[B, length, heads, dim]``: a view when
        the slots are the consecutive ``slot_range``, else a gathered copy."""
        if length > self.max_len:
            raise ValueError(f"batch of length {length} > cache max_len {self.max_len}")
        k, v = self.k[layer][:, :length], self.v[layer][:, :length]
        if slot_range is not None:
            return k[slot_range], v[slot_range]
        return k.index_select(0, slots), v.index_select(0, slots)

    def export_slot(self, slot: int, length: int) -> dict[str, torch.Tensor]:
        """Views of the first ``length`` positions of ``slot``, named ``layers.{i}.k|v``."""
        self._check(slot, length)
        out = {}
        for i in range(self.num_layers):
            out[f"layers.{i}.k"] = self.k[i][slot, :length]
            out[f"layers.{i}.v"] = self.v[i][slot, :length]
        return out

    def check_import(self, tensors: dict[str, torch.Tensor]) -> int:
        """Raise unless ``tensors`` (an ``export_slot`` of a cache like this one) fit; return
        their length. Lets a caller refuse a bad hand-over before it holds a slot."""
        expected = {f"layers.{i}.{kv}" for i in range(self.num_layers) for kv in "kv"}
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise KeyError(f"KV import: missing {missing[:4]}, unexpected {extra[:4]}")
        length = tensors["layers.0.k"].shape[0]
        if length > self.max_len:
            raise ValueError(f"KV import of length {length} > cache max_len {self.max_len}")
        for i in range(self.num_layers):
            for name, store in (("k", self.k[i]), ("v", self.v[i])):
                t = tensors[f"layers.{i}.{name}"]
                if tuple(t.shape) != (length, *store.shape[2:]):
                    raise ValueError(
                        f"KV import layers.{i}.{name}: shape {tuple(t.shape)} != "
                        f"{(length, *store.shape[2:])}"
                    )
        return length

    def import_slot(self, slot: int, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of ``export_slot``; every layer's K and V must be present with matching shape."""
        length = self.check_import(tensors)
        self._check(slot, length)
        for i in range(self.num_layers):
            for name, store in (("k", self.k[i]), ("v", self.v[i])):
                store[slot, :length] = tensors[f"layers.{i}.{name}"].to(store.device, store.dtype)
