"""``PyExecutor``: the executor loop calls ``dwdp_manager.prefetch_first_layers()`` before each
forward step; a step that raises fails its requests and the loop goes on; shutdown calls
``dwdp_manager.__exit__(None, None, None)``."""
from __future__ import annotations


class PyExecutor:
    def __init__(self, model_engine, dwdp_manager=None) -> None:
        self.model_engine = model_engine
        self.dwdp_manager = dwdp_manager

    def _forward_step(self, batch):
        return self.model_engine.forward(batch)

    def _executor_loop(self, batches) -> list:
        """One result per batch: its logits, or the exception its step raised."""
        results = []
        for batch in batches:
            if self.dwdp_manager is not None:
                self.dwdp_manager.prefetch_first_layers()
            try:
                results.append(self._forward_step(batch))
            except Exception as exc:  # the requests of this step fail; the loop goes on
                results.append(exc)
        return results

    def shutdown(self) -> None:
        if self.dwdp_manager is not None:
            self.dwdp_manager.__exit__(None, None, None)
            self.dwdp_manager = None
