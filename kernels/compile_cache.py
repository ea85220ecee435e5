"""Compiled-kernel cache: one ``cute.compile`` per kernel configuration, reused for every call.

Token counts, tile counts and the number of B tensors are dynamic in the compiled kernels, so
the key is the static configuration alone (kind, model dims, tiles, dtypes). The owner (a MoE
backend) holds one cache; nothing is module-global.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

logger = logging.getLogger(__name__)


def require_cutlass() -> None:
    """Import the CUTLASS DSL or fail with what to install (kernels import it lazily)."""
    try:
        import cutlass  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "the sm90 CuTeDSL kernels need the CUTLASS DSL: pip install nvidia-cutlass-dsl==4.3.5"
        ) from exc


class CompileCache:
    """Maps a configuration key to its compiled kernel; compiles on first use."""

    def __init__(self) -> None:
        self._compiled: dict[Hashable, Any] = {}
        self._lock = threading.Lock()
        self.compiles = 0
        self.compile_seconds = 0.0

    def get(self, key: Hashable, compile_fn: Callable[[], Any]) -> Any:
        """The kernel compiled for ``key``; ``compile_fn()`` builds it the first time."""
        with self._lock:
            fn = self._compiled.get(key)
            if fn is None:
                start = time.perf_counter()
                fn = compile_fn()
                seconds = time.perf_counter() - start
                self._compiled[key] = fn
                self.compiles += 1
                self.compile_seconds += seconds
                logger.info("compiled %s in %.1f s", key, seconds)
            return fn

    def __len__(self) -> int:
        return len(self._compiled)

    def clear(self) -> None:
        with self._lock:
            self._compiled.clear()
