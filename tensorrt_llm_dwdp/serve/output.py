"""What a request has produced so far: token ids, released text, finish reason.

Pure bookkeeping between engine token events and response bodies, shared by the streaming and
non-streaming paths and by all three phases (full, context-only, generation-only).
"""
from __future__ import annotations

from typing import Callable, Iterable

from tensorrt_llm_dwdp.serve.detokenize import IncrementalText


class RequestOutput:
    """Feeds generated tokens through detokenization and stop strings.

    ``hidden_ids`` are tokens that end a request without showing in its text (EOS unless
    ``ignore_eos``, and ``stop_token_ids``); they still count in ``ids`` / usage, as upstream.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Iterable[str], hidden_ids: Iterable[int]) -> None:
        self._text = IncrementalText(decode, tuple(stop))
        self._hidden = frozenset(hidden_ids)
        self.ids: list[int] = []
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """All text released so far (the whole answer once finished)."""
        return self._text.final_text if self._text.final_text is not None else self._text.text[:self._text.emitted]

    def feed(self, token: int, reason: str | None) -> str:
        """Add one token; ``reason`` is the engine's finish reason (None while running).

        Returns the text delta to send. A stop string found in the text finishes the request
        with ``"stop"`` even when the engine has not finished it (the caller then aborts it).
        """
        if self.finished:
            raise RuntimeError("token fed after the request finished")
        self.ids.append(token)
        delta = ""
        if not (reason == "stop" and token in self._hidden):
            delta, stopped = self._text.push(token)
            if stopped:
                self.finish_reason = "stop"
                return delta
        if reason is not None:
            self.finish_reason = reason
            delta += self._text.finish()
        return delta

    def natural_finish(self, token: int, max_tokens: int) -> str | None:
        """Why a request would end at ``token`` (the next one, not yet fed): the check a context
        server makes on its first token, where the engine reports only ``context_done``."""
        if token in self._hidden:
            return "stop"
        if len(self.ids) + 1 >= max_tokens:
            return "length"
        return None
