"""Tokenizers the engine can use offline.

Synthetic checkpoints ship a byte-level tokenizer (ids 0..255 are the bytes, then bos/eos/pad),
described by a ``tokenizer_config.json`` whose ``tokenizer_class`` is ``DwdpByteTokenizer``.
Real checkpoints use their own Hugging Face tokenizer through ``transformers`` (imported only
then). Both expose the same small surface: ``encode``, ``decode``, ``eos_token_id``,
``apply_chat_template``.
"""
from __future__ import annotations

import json
import os
from typing import Any, Protocol, Sequence

BYTE_TOKENIZER_CLASS = "DwdpByteTokenizer"
TOKENIZER_CONFIG = "tokenizer_config.json"


class Tokenizer(Protocol):
    eos_token_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str: ...


def _chat_prompt(messages: Sequence[dict[str, str]]) -> str:
    """Plain-text chat format: one ``role: content`` line per message, then ``assistant:``."""
    lines = []
    for i, m in enumerate(messages):
        if "role" not in m or "content" not in m:
            raise ValueError(f"chat message {i} needs 'role' and 'content' keys, got {sorted(m)}")
        lines.append(f"{m['role']}: {m['content']}\n")
    return "".join(lines) + "assistant:"


class ByteTokenizer:
    """Bytes as tokens: id b (0..255) is byte b; bos=256, eos=257, pad=258.

    ``vocab_size`` is the model's vocabulary (>= 259); ids at or above 256 decode to nothing, so
    any id a model emits decodes without error.
    """

    NUM_BYTES = 256

    def __init__(self, vocab_size: int = 259) -> None:
        if vocab_size < self.NUM_BYTES + 3:
            raise ValueError(f"ByteTokenizer needs vocab_size >= 259, got {vocab_size}")
        self.vocab_size = int(vocab_size)
        self.bos_token_id = 256
        self.eos_token_id = 257
        self.pad_token_id = 258

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id] + ids if add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < self.NUM_BYTES)
        return data.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str:
        return _chat_prompt(messages)

    def to_config(self) -> dict[str, Any]:
        return {
            "tokenizer_class": BYTE_TOKENIZER_CLASS,
            "vocab_size": self.vocab_size,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write ``tokenizer_config.json`` into the folder ``path``."""
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, TOKENIZER_CONFIG), "w", encoding="utf-8") as f:
            json.dump(self.to_config(), f, indent=2)


class HfTokenizer:
    """Adapter over ``transformers.AutoTokenizer`` giving the same surface as ``ByteTokenizer``."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        bos_id = tokenizer.bos_token_id
        # Whether encode() puts BOS in front itself (DeepSeek-V3's does; Qwen's does not).
        self._encode_adds_bos = bos_id is not None and tokenizer.encode("a")[:1] == [bos_id]

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str:
        if getattr(self._tok, "chat_template", None):
            text = self._tok.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=True
            )
            bos = self._tok.bos_token
            if self._encode_adds_bos and bos and text.startswith(bos):
                # The template writes BOS and encode() adds one: keep one, as HF's own
                # tokenize=True path does, so encode(apply_chat_template(m)) starts with one BOS.
                text = text[len(bos):]
            return text
        return _chat_prompt(messages)


def load_tokenizer(path: str | os.PathLike) -> ByteTokenizer | HfTokenizer:
    """The tokenizer of checkpoint folder ``path``: byte-level for synthetic ones, else HF's."""
    cfg_path = os.path.join(os.fspath(path), TOKENIZER_CONFIG)
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        if cfg.get("tokenizer_class") == BYTE_TOKENIZER_CLASS:
            tok = ByteTokenizer(int(cfg.get("vocab_size", 259)))
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if key in cfg and cfg[key] != getattr(tok, key):
                    raise ValueError(
                        f"{cfg_path}: {key}={cfg[key]} differs from the byte tokenizer's "
                        f"{getattr(tok, key)}"
                    )
            return tok
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise ImportError(
            f"{path} has no DwdpByteTokenizer config; loading its tokenizer needs transformers "
            "(pip install transformers)"
        ) from exc
    return HfTokenizer(AutoTokenizer.from_pretrained(os.fspath(path)))
