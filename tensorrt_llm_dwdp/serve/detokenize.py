"""Incremental detokenization with stop strings, for streaming and non-streaming answers.

The whole output is decoded again at every token (outputs are short next to the forward step),
and only text that can no longer change is released: a trailing U+FFFD (an incomplete UTF-8
sequence still waiting for its next byte) and any tail that could be the start of a stop string
are held back until the next token decides them.
"""
from __future__ import annotations

from typing import Callable, Sequence

REPLACEMENT = "\ufffd"


class IncrementalText:
    """Turns generated token ids into text deltas and finds stop strings.

    ``decode`` maps a list of ids to text. ``push(token)`` returns ``(delta, stopped)``; once
    ``stopped`` is true the text is final (cut before the stop string) and later pushes are
    refused. ``finish()`` releases what was held back. EOS / stop tokens are never pushed: the
    caller leaves them out, as OpenAI answers do.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = tuple(stop)
        self._max_stop = max((len(s) for s in self._stop), default=0)
        self.ids: list[int] = []
        self.text = ""          # decoded text of ids (before any stop cut)
        self.emitted = 0        # characters of the final text already released
        self.stopped = False
        self.final_text: str | None = None

    def push(self, token: int) -> tuple[str, bool]:
        if self.stopped:
            raise RuntimeError("push after a stop string ended the text")
        prev_len = len(self.text)
        self.ids.append(token)
        self.text = self._decode(self.ids)
        if self._stop:
            start = max(0, prev_len - self._max_stop + 1)
            cut = min((p for p in (self.text.find(s, start) for s in self._stop) if p >= 0), default=-1)
            if cut >= 0:
                self.stopped = True
                self.final_text = self.text[:cut]
                return self._release(self.final_text), True
        return self._release(self.text[:len(self.text) - self._held_back(self.text)]), False

    def finish(self) -> str:
        """Release the rest; returns the last delta. ``final_text`` holds the whole answer."""
        if self.final_text is None:
            self.final_text = self.text
        return self._release(self.final_text)

    def _release(self, upto: str) -> str:
        delta = upto[self.emitted:]
        self.emitted = max(self.emitted, len(upto))
        return delta

    def _held_back(self, text: str) -> int:
        hold = 0
        if text.endswith(REPLACEMENT):
            hold = len(text) - len(text.rstrip(REPLACEMENT))
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return hold
