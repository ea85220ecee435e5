"""Upstream's per-layer calls mapped onto our manager's strict step protocol.

Our manager wants, every step, ``start_step()`` and then ``composite_weights(i)`` / ``done(i)``
for every registered layer in order (``dwdp/steps.py``). TensorRT-LLM does not promise that:
its warm-up runs forwards before the executor loop first calls ``prefetch_first_layers()``, a
forward may leave MoE layers out, and a forward that raises never reaches
``record_compute_and_prefetch_next``. :class:`StepAdapter` keeps our manager's order whatever
upstream does:

- a bind with no step under way starts one (the layer's prefetch is queued and waited for at
  once: a synchronous fetch, the cost of a cold step);
- a bind further down the step marks the layers in between done without computing them
  (their buffers are released; nothing reads them);
- a bind of a layer the step has already passed (a new forward), or ``prefetch_first_layers``
  in the middle of a step, abandons that step (``abort_step``) and starts a new one; binding
  the layer the step is at again (its forward raised before ``record``) binds it again.

The manager is anything with ``start_step``, ``abort_step``, ``composite_weights`` and
``done`` (our ``DwdpManager``). Pure bookkeeping: no torch, no device.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

logger = logging.getLogger(__name__)


@dataclass
class StepCounts:
    """What the adapter had to repair, for logs and tests."""

    steps: int = 0          #: steps started (by prefetch_first_layers or by a cold bind)
    cold_binds: int = 0     #: binds that found no step under way (warm-up, first forward)
    skipped: int = 0        #: layers marked done without a bind
    aborted: int = 0        #: steps abandoned mid-way (a forward raised or restarted)


class StepAdapter:
    """One rank's position in the step, mirrored from the calls it forwards to ``manager``."""

    def __init__(self, manager: Any, layers: Sequence[int]) -> None:
        if not layers:
            raise ValueError("StepAdapter needs at least one registered MoE layer")
        self._manager = manager
        self.layers = list(layers)
        self._pos_of = {layer: pos for pos, layer in enumerate(self.layers)}
        self._pos = 0                   # position of the next layer our manager expects
        self._open = False              # the manager has queued the step at _pos
        self._bound: int | None = None  # the layer bound and not yet recorded
        self.counts = StepCounts()

    @property
    def mid_step(self) -> bool:
        """True between a step's first layer and its last ``record``."""
        return self._pos != 0

    def _position(self, what: str, layer_idx: int) -> int:
        pos = self._pos_of.get(layer_idx)
        if pos is None:
            raise KeyError(f"DwdpManager.{what}({layer_idx}): layer {layer_idx} was not added "
                           f"(registered MoE layers: {self.layers})")
        return pos

    def _abort(self, why: str) -> None:
        logger.info("DWDP step abandoned before layer %s: %s", self.layers[self._pos], why)
        self._manager.abort_step()
        self._pos, self._open, self._bound = 0, False, None
        self.counts.aborted += 1

    def _start(self) -> None:
        self._manager.start_step()
        self._open = True
        self.counts.steps += 1

    def start_step(self) -> None:
        """``prefetch_first_layers()``: a new step; one left unfinished is abandoned."""
        if self._pos != 0:
            self._abort("prefetch_first_layers() came before the step's last MoE layer")
        self._bound = None
        self._start()

    def bind(self, layer_idx: int) -> dict:
        """``wait_and_bind(backend, layer_idx)``: the layer's ``[E, ...]`` tensors, once ready."""
        target = self._position("wait_and_bind", layer_idx)
        if target < self._pos:
            self._abort(f"layer {layer_idx} was bound again: a new forward began")
        if self._pos == 0 and not self._open:
            self.counts.cold_binds += 1
            self._start()
        while self._pos < target:
            self._manager.done(self.layers[self._pos])
            self._pos += 1
            self.counts.skipped += 1
        views = self._manager.composite_weights(layer_idx)
        self._bound = layer_idx
        return views

    def record(self, layer_idx: int) -> None:
        """``record_compute_and_prefetch_next(layer_idx)``: the layer's compute is issued."""
        target = self._position("record_compute_and_prefetch_next", layer_idx)
        if target != self._pos or self._bound != layer_idx:
            raise RuntimeError(
                f"DwdpManager.record_compute_and_prefetch_next({layer_idx}) without its own "
                f"wait_and_bind({layer_idx}) (the step is at layer {self.layers[self._pos]}, "
                f"bound: {self._bound})")
        self._manager.done(layer_idx)
        self._bound = None
        self._pos = (self._pos + 1) % len(self.layers)
