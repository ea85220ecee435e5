"""Incremental detokenization with stop strings, for streaming and non-streaming answers.

Each token decodes only a short window: the ids since the last settled text plus the token
before it, whose decode is subtracted so tokenizers that drop a leading space at the start of a
decode still get it right (the vLLM / TGI scheme). Cost per token is constant, not the whole
output again. Text that can still change is held back: a window ending in U+FFFD (an incomplete
UTF-8 sequence waiting for its next byte) and any tail that could start a stop string.
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
        self.text = ""          # decoded text of ids[:_read] (before any stop cut)
        self._prefix = 0        # ids[_prefix:_read] is the context window of the next decode
        self._read = 0          # ids before this index are settled into self.text
        self.emitted = 0        # characters of the final text already released
        self.stopped = False
        self.final_text: str | None = None

    def push(self, token: int) -> tuple[str, bool]:
        if self.stopped:
            raise RuntimeError("push after a stop string ended the text")
        prev_len = len(self.text)
        self.ids.append(token)
        self._settle(final=False)
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
            self._settle(final=True)
            self.final_text = self.text
        return self._release(self.final_text)

    def _settle(self, final: bool) -> None:
        """Append the text of ids[_read:] once it is complete (always when ``final``)."""
        if self._read == len(self.ids):
            return
        before = self._decode(self.ids[self._prefix:self._read])
        window = self._decode(self.ids[self._prefix:])
        if not final and window.endswith(REPLACEMENT):
            return
        self.text += window[len(before):]
        self._prefix, self._read = self._read, len(self.ids)

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
