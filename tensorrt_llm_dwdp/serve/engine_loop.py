"""One thread owns the engine; asyncio handlers talk to it through commands and event queues.

Every engine call (add, step, abort, export, stats) runs on the engine thread, in order, so the
engine and the DWDP manager it drives never see two threads. Handlers ``await`` a command's
result; token events come back to the event loop with ``call_soon_threadsafe`` into one
``asyncio.Queue`` per request. A step that fails with ``StepFailed`` (CUDA out of memory
included: the engine ended that step's requests and stays usable) fails those requests only
(``RequestFailed``) and the loop goes on. Any other error from a step means the engine cannot
go on: every open request gets it, the loop stops and ``failed`` is set (the server then
answers 503 on ``/health``).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from typing import Any, AsyncIterator, Callable

from tensorrt_llm_dwdp.engine.executor import StepFailed

logger = logging.getLogger(__name__)


class EngineFailed(RuntimeError):
    """The engine thread stopped after an error; the server cannot serve more requests."""


class RequestFailed(RuntimeError):
    """This request's step failed (``StepFailed``); the engine goes on serving others."""

    def __init__(self, message: str, out_of_memory: bool = False) -> None:
        super().__init__(message)
        self.out_of_memory = out_of_memory


class RequestStream:
    """Token events of one request, in order; raises what the engine thread raised."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.done = False

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        while not self.done:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                self.done = True
                raise item
            if item.finished:
                self.done = True
            yield item


class EngineLoop:
    """Drives ``engine.step()`` on a dedicated thread while the event loop serves HTTP.

    ``engine`` follows the executor contract: ``add_request``, ``step() -> [TokenEvent]``,
    ``has_work``, ``abort``, ``export_kv``. ``idle_wait_s`` bounds how long an idle thread waits
    for a command before checking for shutdown. ``thread_init`` runs first on the engine thread
    (the CUDA current device is per thread: a rank binds its GPU there).
    """

    def __init__(self, engine: Any, loop: asyncio.AbstractEventLoop, *, idle_wait_s: float = 0.05,
                 thread_init: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self._thread_init = thread_init
        self._loop = loop
        self._idle_wait_s = idle_wait_s
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, RequestStream] = {}
        self._stop = threading.Event()
        self.failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.error("engine thread did not stop within %.0f s", timeout_s)

    @property
    def healthy(self) -> bool:
        return self.failed is None and self._thread.is_alive() and not self._stop.is_set()

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(engine)`` on the engine thread and return its result (or raise its error)."""
        if self.failed is not None:
            raise EngineFailed(f"engine stopped after an error: {self.failed!r}")
        if not self._thread.is_alive():
            raise EngineFailed("engine thread is not running")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, fut))
        return await asyncio.wrap_future(fut)

    async def submit(self, request_id: str, make_request: Callable[[], Any]) -> RequestStream:
        """Add a request (built on the engine thread by ``make_request``) and return its stream.

        Errors of ``add_request`` (a prompt too long, a bad KV hand-over) raise here, before any
        event, and leave nothing registered.
        """
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already open")
        stream = RequestStream(request_id)
        self._streams[request_id] = stream
        try:
            await self.call(lambda engine: engine.add_request(make_request()))
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        return stream

    def release(self, stream: RequestStream, *, abort: bool) -> None:
        """Forget a stream; with ``abort`` the engine drops the request (client gone, error)."""
        self._streams.pop(stream.request_id, None)
        if abort and not stream.done and self.failed is None and self._thread.is_alive():
            rid = stream.request_id
            self._commands.put((lambda engine: engine.abort(rid), None))

    # ---- engine thread --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self._thread_init is not None:
                self._thread_init()
            while not self._stop.is_set():
                busy = self.engine.has_work()
                self._run_commands(block=not busy)
                if self.engine.has_work():
                    try:
                        events = self.engine.step()
                    except StepFailed as e:
                        logger.error("%s", e)
                        self._loop.call_soon_threadsafe(self._fail_requests, e)
                        continue
                    if events:
                        self._loop.call_soon_threadsafe(self._deliver, events)
            self._fail_commands(RuntimeError("engine loop was stopped"))
        except BaseException as e:  # noqa: BLE001 - the error goes to every waiting request
            logger.exception("engine loop stopped")
            self.failed = e
            self._loop.call_soon_threadsafe(self._fail_all, e)
            self._fail_commands(e)

    def _run_commands(self, block: bool) -> None:
        try:
            item = self._commands.get(timeout=self._idle_wait_s) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            fn, fut = item
            if fut is None:
                try:
                    fn(self.engine)
                except Exception:  # noqa: BLE001 - fire-and-forget (abort): log, keep serving
                    logger.exception("engine command failed")
            elif fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(self.engine))
                except Exception as e:  # noqa: BLE001 - handed to the awaiting handler
                    fut.set_exception(e)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return

    def _fail_commands(self, error: BaseException) -> None:
        while True:
            try:
                _, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            if fut is not None and fut.set_running_or_notify_cancel():
                fut.set_exception(EngineFailed(f"engine stopped after an error: {error!r}"))

    # ---- event-loop thread ----------------------------------------------------------------------

    def _deliver(self, events: list) -> None:
        for ev in events:
            stream = self._streams.get(ev.request_id)
            if stream is not None:
                stream.queue.put_nowait(ev)

    def _fail_requests(self, error: StepFailed) -> None:
        for rid in error.request_ids:
            stream = self._streams.get(rid)
            if stream is not None:
                stream.queue.put_nowait(RequestFailed(str(error), error.out_of_memory))

    def _fail_all(self, error: BaseException) -> None:
        for stream in list(self._streams.values()):
            stream.queue.put_nowait(EngineFailed(f"engine stopped after an error: {error!r}"))
