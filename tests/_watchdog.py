"""A per-test watchdog for code that can hang where no exception reaches it (a GPU kernel
that never finishes: every later CUDA call waits behind it)."""
from __future__ import annotations

import contextlib
import faulthandler
import os

_STREAM = None


def terminal_stream(config=None):
    """A writable stream on the terminal's stderr, past pytest's fd capture (the capture
    manager keeps a duplicate of the original fd 2); fd 2 itself outside pytest."""
    global _STREAM
    if _STREAM is None:
        fd = 2
        capman = config.pluginmanager.getplugin("capturemanager") if config else None
        err = getattr(getattr(capman, "_global_capturing", None), "err", None)
        saved = getattr(err, "targetfd_save", None)
        if isinstance(saved, int):
            fd = saved
        _STREAM = os.fdopen(os.dup(fd), "w")
    return _STREAM


@contextlib.contextmanager
def hang_watchdog(limit_s: float, config=None):
    """Inside: if ``limit_s`` passes, every thread's stack goes to the terminal and the
    process exits (faulthandler's own thread: it fires while the main thread is blocked in C,
    GIL held or not)."""
    faulthandler.dump_traceback_later(limit_s, exit=True, file=terminal_stream(config))
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
