"""The KV cache of one prefilled sequence, as a context server hands it to a generation server.

A context (prefill) worker stops a request after its first token and exports the sequence's
KV; a generation worker imports it into a free slot and decodes from there. The export is
packed into ONE contiguous byte buffer on the cache's device (``flat``; the named tensors are
views of it), so the same bytes can leave three ways: a peer process maps the buffer and copies
it in one memcpy (CUDA IPC on a GPU, POSIX shm on the CPU; ``serve/kv_transfer.py``), or
``to_bytes`` writes them after a safetensors header (named tensors + JSON metadata) for HTTP.
Tensors keep the exporter's device until the importer writes them into its cache.

The buffer may be a block of a context server's export pool (``serve/kv_pool.py``): ``pack``
and ``from_cache`` take ``alloc(nbytes)``, returning a block (``.tensor``: uint8 ``[nbytes]``,
``.release()``) or None (then a buffer of its own is made); ``release()`` gives the block back.
"""
from __future__ import annotations

import array
import base64
import binascii
import json
import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)

# 2: prompt ids as base64 of little-endian uint32 (1: a JSON list, 7 ms per 32K-token hand-over
# to write and read back, a quarter of the same-node fast path's time).
FORMAT_VERSION = 2

# torch dtype <-> safetensors dtype name (the KV caches' dtypes and a few more).
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
              torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
              torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
              torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


@dataclass(frozen=True)
class KvTensorSpec:
    """Where one named tensor lives in a packed hand-over buffer (``offset`` in bytes)."""

    name: str
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        n = _TORCH_DTYPES[self.dtype].itemsize
        for d in self.shape:
            n *= d
        return n

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "offset": self.offset}

    @classmethod
    def from_json(cls, d: Any) -> "KvTensorSpec":
        try:
            spec = cls(str(d["name"]), str(d["dtype"]), tuple(int(x) for x in d["shape"]), int(d["offset"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"KV layout entry {str(d)[:120]} is malformed: {exc}") from exc
        if spec.dtype not in _TORCH_DTYPES or spec.offset < 0 or any(x < 0 for x in spec.shape):
            raise ValueError(f"KV layout entry {spec} has an unknown dtype or a negative size")
        return spec


def layout_of(tensors: dict[str, torch.Tensor]) -> tuple[KvTensorSpec, ...]:
    """Dense packing, widest dtype first (every offset stays aligned to its element size)."""
    specs, offset = [], 0
    for name, t in sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0])):
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"KV tensor {name!r} has dtype {t.dtype}, which the hand-over cannot carry")
        specs.append(KvTensorSpec(name, _ST_DTYPES[t.dtype], tuple(t.shape), offset))
        offset += t.numel() * t.element_size()
    return tuple(specs)


def views_of(flat: torch.Tensor, layout: tuple[KvTensorSpec, ...]) -> dict[str, torch.Tensor]:
    """The named tensors of ``layout`` as views of the uint8 buffer ``flat`` (checked to fit)."""
    if flat.dtype != torch.uint8 or flat.dim() != 1:
        raise ValueError(f"a packed KV buffer is 1-D uint8, got {flat.dtype} {tuple(flat.shape)}")
    out = {}
    for s in layout:
        end = s.offset + s.nbytes
        if end > flat.numel() or s.offset % _TORCH_DTYPES[s.dtype].itemsize:
            raise ValueError(f"KV tensor {s.name!r} [{s.offset}, {end}) does not fit a buffer of "
                             f"{flat.numel()} bytes aligned to its dtype {s.dtype}")
        out[s.name] = flat[s.offset:end].view(_TORCH_DTYPES[s.dtype]).view(s.shape)
    return out


@dataclass(frozen=True)
class KvHandoff:
    """``tensors`` maps cache tensor names to ``[prompt_len, ...]`` slices of one sequence.

    ``flat``, when set, is the uint8 buffer the tensors are views of (laid out by ``layout``);
    ``pack()`` makes one for a hand-off built from loose tensors. ``block``, when set, is the
    export-pool block ``flat`` lives in (``release()`` frees it).
    """

    prompt_ids: tuple[int, ...]
    first_token: int
    tensors: dict[str, torch.Tensor]
    flat: torch.Tensor | None = field(default=None, compare=False, repr=False)
    layout: tuple[KvTensorSpec, ...] = field(default=(), compare=False, repr=False)
    block: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def from_cache(cls, cache, slot: int, prompt_ids, first_token: int,
                   alloc: Callable[[int], Any] | None = None) -> "KvHandoff":
        """Copy ``slot``'s first ``len(prompt_ids)`` positions into a packed buffer (a block of
        ``alloc`` when it has one, else on the cache's device, else the host), complete when
        this returns. ``prompt_ids``: ints (the sequence's, taken as they are: a per-element
        ``int()`` costs 2 ms of the engine thread per 32K-token export)."""
        live = cache.export_slot(slot, len(prompt_ids))
        return cls(tuple(prompt_ids), int(first_token), live).pack(copy=True, alloc=alloc)

    @classmethod
    def from_flat(cls, prompt_ids: tuple[int, ...], first_token: int, flat: torch.Tensor,
                  layout: tuple[KvTensorSpec, ...]) -> "KvHandoff":
        """A hand-off over ``flat``; ``prompt_ids`` as ``check_metadata`` returns them (a tuple
        of ints, kept as it is)."""
        return cls(tuple(prompt_ids), int(first_token), views_of(flat, layout), flat, layout)

    def pack(self, copy: bool = False, alloc: Callable[[int], Any] | None = None) -> "KvHandoff":
        """This hand-off over one packed buffer (itself when it already is one and not ``copy``):
        a block of ``alloc`` when it gives one, else a buffer of its own. A packed source is
        copied in one piece."""
        if self.flat is not None and not copy:
            return self
        layout = self.layout if self.flat is not None else layout_of(self.tensors)
        nbytes = sum(s.nbytes for s in layout)
        block = alloc(nbytes) if alloc is not None else None
        if block is not None:
            flat = block.tensor
        else:
            device = self.device
            try:
                flat = torch.empty(nbytes, dtype=torch.uint8, device=device)
            except torch.OutOfMemoryError:
                logger.warning("no room on %s for a %d-byte KV export; it goes to host memory", device, nbytes)
                flat = torch.empty(nbytes, dtype=torch.uint8)
        try:
            out = views_of(flat, layout)
            if self.flat is not None:
                flat.copy_(self.flat[:nbytes])
            else:
                for name, t in self.tensors.items():
                    out[name].copy_(t)
            if flat.device.type == "cuda":  # a peer process may read it next: no stream orders that
                torch.cuda.current_stream(flat.device).synchronize()
        except BaseException:
            if block is not None:
                block.release()
            raise
        return KvHandoff(self.prompt_ids, self.first_token, out, flat, layout, block)

    def release(self) -> None:
        """Free the export-pool block this hand-off lives in (no-op without one; idempotent)."""
        if self.block is not None:
            self.block.release()

    def write_to_cache(self, cache, slot: int) -> None:
        cache.import_slot(slot, self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def device(self) -> torch.device:
        if self.flat is not None:
            return self.flat.device
        return next(iter(self.tensors.values())).device if self.tensors else torch.device("cpu")

    def metadata(self) -> dict[str, str]:
        return {"format": str(FORMAT_VERSION), "prompt_ids": encode_token_ids(self.prompt_ids),
                "first_token": str(self.first_token)}

    def to_bytes(self) -> bytes:
        """A safetensors blob: its header describes the packed buffer, which follows as is."""
        packed = self.pack()
        header = {s.name: {"dtype": s.dtype, "shape": list(s.shape),
                           "data_offsets": [s.offset, s.offset + s.nbytes]} for s in packed.layout}
        header["__metadata__"] = packed.metadata()
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes
        body = memoryview(packed.flat.cpu().numpy())
        return b"".join((len(text).to_bytes(8, "little"), text, body))

    @classmethod
    def from_bytes(cls, blob: bytes) -> "KvHandoff":
        from safetensors.torch import load

        prompt_ids, first_token = check_metadata(_metadata(blob))
        try:
            tensors = load(blob)
        except Exception as exc:  # safetensors raises its own type; callers expect ValueError
            raise ValueError(f"KV hand-off blob of {len(blob)} bytes is malformed: "
                             f"{type(exc).__name__}: {exc}") from exc
        return cls(prompt_ids, first_token, tensors)


def encode_token_ids(ids) -> str:
    """Token ids as base64 of little-endian uint32 (ValueError for an id outside [0, 2^32))."""
    try:
        packed = array.array("I", ids)
    except (OverflowError, TypeError) as exc:
        raise ValueError(f"token ids must be integers in [0, 2^32): {exc}") from exc
    if sys.byteorder != "little":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def decode_token_ids(text: str) -> tuple[int, ...]:
    """The inverse of ``encode_token_ids``; ValueError for anything that is not its output."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError, ValueError) as exc:
        raise ValueError(f"is not base64: {exc}") from exc
    if len(raw) % 4:
        raise ValueError(f"holds {len(raw)} bytes, not a whole number of uint32 ids")
    ids = array.array("I")
    ids.frombytes(raw)
    if sys.byteorder != "little":
        ids.byteswap()
    return tuple(ids)


def check_metadata(meta: dict[str, str]) -> tuple[tuple[int, ...], int]:
    """``(prompt_ids, first_token)`` of a hand-off's metadata, validated (ValueError if not)."""
    if meta.get("format") != str(FORMAT_VERSION):
        raise ValueError(f"KV hand-off format {meta.get('format')!r} is not "
                         f"{FORMAT_VERSION}; context and generation servers differ in version")
    try:
        text, first_token = meta["prompt_ids"], int(meta["first_token"])
    except Exception as exc:
        raise ValueError(f"KV hand-off metadata is malformed: {type(exc).__name__}: {exc}") from exc
    try:
        prompt_ids = decode_token_ids(text)
    except ValueError as exc:
        raise ValueError(f"KV hand-off prompt_ids {str(text)[:40]!r} {exc}") from exc
    if first_token < 0:
        raise ValueError(f"KV hand-off first_token must be >= 0, got {first_token}")
    return prompt_ids, first_token


def _metadata(blob: bytes) -> dict[str, str]:
    """Read the safetensors header's ``__metadata__`` (8-byte little-endian length + JSON)."""
    if len(blob) < 8:
        raise ValueError("KV hand-off blob is truncated (no safetensors header)")
    size = int.from_bytes(blob[:8], "little")
    if size <= 0 or 8 + size > len(blob):
        raise ValueError("KV hand-off blob is truncated (header length out of range)")
    header = json.loads(blob[8:8 + size])
    return header.get("__metadata__", {})
