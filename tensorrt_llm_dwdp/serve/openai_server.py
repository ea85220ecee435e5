"""The OpenAI-compatible HTTP server of one engine (aggregated, context or generation worker).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (streaming SSE or not),
``GET /v1/models``, ``GET /health``, ``GET /metrics``, ``GET /engine/steps`` (the engine's step
log: kind, start, wall and device time, tokens, kernels compiled), and for disaggregated
serving ``GET|DELETE /v1/kv/{id}``, ``POST /v1/kv/{id}/share`` (see ``kv_transfer``). A request carrying
``disaggregated_params.request_type == "context_only"`` stops after prefill and answers with
the first token and a ``kv_url``; ``generation_only`` pulls that KV (same-node fast path, else
HTTP) and decodes the rest.

A client that disconnects (aiohttp cancels its handler) has its request aborted in the engine;
other requests continue. Run the app with ``handler_cancellation=True`` (``launch.serve_app``).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from typing import Any, Callable, Mapping

from aiohttp import ClientSession, web

from tensorrt_llm_dwdp.engine.scheduler import ContextLengthExceeded
from tensorrt_llm_dwdp.serve import protocol
from tensorrt_llm_dwdp.serve.engine_loop import EngineFailed, EngineLoop, RequestFailed, RequestStream
from tensorrt_llm_dwdp.serve.kv_pool import KvExportPool
from tensorrt_llm_dwdp.serve.kv_puller import FALLBACK_REASONS, KvPuller
from tensorrt_llm_dwdp.serve.kv_transfer import KV_ROUTE, KvFetchError, KvRoutes, KvStore
from tensorrt_llm_dwdp.serve.metrics import ServerMetrics
from tensorrt_llm_dwdp.serve.output import RequestOutput
from tensorrt_llm_dwdp.serve.protocol import ApiError, DisaggParams, GenerationRequest

logger = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """What the HTTP layer needs to know about its engine and itself.

    ``public_url`` is how peers reach this server (the base of the ``kv_url`` it hands out).
    ``device`` is where the engine runs (imported KV lands there); ``kv_transfer`` is ``auto``
    (same-node CUDA IPC / shm when possible, else HTTP) or ``http``.
    """

    model_name: str
    max_seq_len: int
    vocab_size: int
    public_url: str
    kv_fetch_timeout_s: float = 60.0
    metrics_timeout_s: float = 10.0
    device: str = "cpu"
    kv_transfer: str = "auto"
    # Fixed figures of this worker shown on /metrics (e.g. its measured expert memory).
    static_gauges: Mapping[str, float] = dataclasses.field(default_factory=dict)


class OpenAIServer:
    """Builds the aiohttp application around one engine; the engine thread starts with the app.

    ``kv_pool`` is the export pool context-only requests' KV goes to (the engine's
    ``kv_export_alloc`` should be its ``export_alloc``); None: this server hands KV over HTTP
    only. The caller owns it (closes it after the app); it is created at the first
    context-only request unless it already was.
    """

    def __init__(self, engine: Any, tokenizer: Any, config: ServerConfig, *,
                 kv_store: KvStore | None = None, kv_pool: KvExportPool | None = None, role: str = "worker",
                 engine_thread_init: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self._engine_thread_init = engine_thread_init
        self.tokenizer = tokenizer
        self.config = config
        self.kv_store = kv_store or KvStore(pool=kv_pool)
        self.metrics = ServerMetrics(role, FALLBACK_REASONS)
        self.kv_routes = KvRoutes(self.kv_store, self.metrics.record_request)
        self.kv_puller = KvPuller(config.device, fast_path=config.kv_transfer == "auto",
                                  timeout_s=config.kv_fetch_timeout_s)
        self.loop: EngineLoop | None = None
        self._session: ClientSession | None = None
        self._started = time.time()

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_get("/engine/steps", self.engine_steps)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        self.kv_routes.add_to(app)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        self.loop = EngineLoop(self.engine, asyncio.get_running_loop(), thread_init=self._engine_thread_init)
        self.loop.start()
        self._session = ClientSession()

    async def _on_cleanup(self, app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()
        if self.loop is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.loop.stop)
        self.kv_store.close()
        self.kv_puller.close()

    # ---- small endpoints ------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        if self.loop is not None and self.loop.healthy:
            return web.Response(text="OK")
        reason = repr(self.loop.failed) if self.loop is not None and self.loop.failed else "engine not running"
        return _json_error(ApiError(f"unhealthy: {reason}", status=503, type="service_unavailable"))

    async def models(self, request: web.Request) -> web.Response:
        self.metrics.record_request("/v1/models", 200)
        return web.json_response({"object": "list", "data": [{
            "id": self.config.model_name, "object": "model", "created": int(self._started),
            "owned_by": "tensorrt_llm_dwdp", "max_model_len": self.config.max_seq_len,
        }]})

    async def prometheus(self, request: web.Request) -> web.Response:
        gauges: dict[str, float] = {**self.config.static_gauges,
                                    "kv_store_bytes": float(self.kv_store.nbytes),
                                    "kv_store_entries": float(len(self.kv_store)),
                                    "kv_pool_mappings": float(self.kv_puller.mapped_pools),
                                    "kv_pool_mappings_opened": float(self.kv_puller.opened)}
        if self.kv_store.pool is not None:
            gauges.update(self.kv_store.pool.stats())
        dwdp: Mapping[str, float] | None = None
        if self.loop is not None and self.loop.healthy:
            try:
                engine_stats, dwdp = await asyncio.wait_for(
                    self.loop.call(_engine_stats), self.config.metrics_timeout_s)
                gauges.update(engine_stats)
            except (asyncio.TimeoutError, EngineFailed) as e:
                logger.warning("engine stats unavailable for /metrics: %r", e)
        return web.Response(text=self.metrics.render(gauges, dwdp),
                            content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def engine_steps(self, request: web.Request) -> web.Response:
        """The engine's logged steps (``executor.StepRecord``) after step ``?after=N`` (default
        -1: all it keeps): ``{"step_count", "steps": [...]}``; benchmarks diff two reads."""
        try:
            after = int(request.query.get("after", "-1"))
        except ValueError:
            return _json_error(ApiError("after must be an integer step index", param="after"))
        if self.loop is None or not self.loop.healthy:
            return _json_error(ApiError("engine is not running", status=503, type="service_unavailable"))

        # The engine thread only snapshots the (immutable) records; they become dicts here.
        step_count, records = await self.loop.call(
            lambda engine: (engine.stats.step_count, engine.stats.steps_after(after)))
        return web.json_response({"step_count": step_count, "steps": [r.to_dict() for r in records]})

    # ---- generation -----------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, protocol.parse_completion_request)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, protocol.parse_chat_request)

    async def _generate(self, request: web.Request, parse) -> web.StreamResponse:
        arrival = time.perf_counter()
        endpoint = request.path
        try:
            req = parse(protocol.parse_json_body(await request.read()))
            self._check_model(req.model)
            prompt_ids = self._prompt_ids(req)
            max_tokens = self._max_tokens(req, prompt_ids)
            if self.loop is None or not self.loop.healthy:
                raise ApiError("engine is not running", status=503, type="service_unavailable")
        except ApiError as e:
            self.metrics.record_request(endpoint, e.status)
            return _json_error(e)
        job = _Job(req, prompt_ids, max_tokens, arrival, self._new_output(req),
                   protocol.new_id(req.kind))
        self.metrics.active += 1
        self.metrics.prompt_tokens += len(prompt_ids)
        try:
            if req.stream:
                return await self._respond_stream(request, job)
            return await self._respond_full(job)
        finally:
            self.metrics.active -= 1
            self.metrics.generation_tokens += len(job.output.ids)
            if job.first_token_at is not None and (req.disagg is None or req.disagg.request_type != "generation_only"):
                self.metrics.prefill_latency.observe(job.first_token_at - arrival)
            if job.output.finished:
                self.metrics.request_latency.observe(time.perf_counter() - arrival)
            else:
                self.metrics.aborted += 1
            self.metrics.record_request(endpoint, job.status)

    def _check_model(self, model: str | None) -> None:
        name = self.config.model_name
        if model is not None and model not in (name, os.path.basename(name.rstrip("/"))):
            raise ApiError(f"model {model!r} is not served here; this server serves {name!r}",
                           status=404, type="not_found_error", param="model", code="model_not_found")

    def _prompt_ids(self, req: GenerationRequest) -> list[int]:
        if req.disagg is not None and req.disagg.request_type == "generation_only":
            ids = list(req.disagg.prompt_token_ids)
        elif req.prompt_ids is not None:
            ids = list(req.prompt_ids)
        elif req.prompt is not None:
            ids = list(self.tokenizer.encode(req.prompt))
        else:
            ids = list(self.tokenizer.encode(self.tokenizer.apply_chat_template(list(req.messages))))
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ApiError(f"token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})",
                           param="prompt", code="invalid_token_id")
        if req.disagg is not None and req.disagg.request_type == "generation_only":
            first = req.disagg.first_gen_tokens[0]
            if not 0 <= first < self.config.vocab_size:
                raise ApiError(f"first_gen_tokens[0]={first} is outside the vocabulary "
                               f"[0, {self.config.vocab_size})",
                               param="disaggregated_params.first_gen_tokens", code="invalid_token_id")
        if not ids:
            raise ApiError("the prompt encodes to no tokens", param="prompt")
        return ids

    def _max_tokens(self, req: GenerationRequest, prompt_ids: list[int]) -> int:
        room = self.config.max_seq_len - len(prompt_ids)
        if room < 1:
            raise ApiError(f"prompt of {len(prompt_ids)} tokens leaves no room in max_seq_len="
                           f"{self.config.max_seq_len}", param="prompt", code="context_length_exceeded")
        max_tokens = req.max_tokens if req.max_tokens is not None else room
        if max_tokens > room:
            raise ApiError(f"prompt of {len(prompt_ids)} tokens + max_tokens={max_tokens} exceeds "
                           f"max_seq_len={self.config.max_seq_len}", param="max_tokens",
                           code="context_length_exceeded")
        if req.disagg is not None:
            if req.stream and req.disagg.request_type == "context_only":
                raise ApiError("context_only requests cannot stream", param="stream")
            if req.disagg.request_type == "generation_only" and max_tokens < 2:
                raise ApiError("generation_only needs max_tokens >= 2 (the first token came from "
                               "the context server)", param="max_tokens")
        return max_tokens

    def _new_output(self, req: GenerationRequest) -> RequestOutput:
        hidden = set(req.stop_token_ids)
        eos = self.tokenizer.eos_token_id
        if eos is not None and not req.ignore_eos:
            hidden.add(int(eos))
        return RequestOutput(self.tokenizer.decode, req.stop, hidden)

    # ---- the engine side of one request -----------------------------------------------------------

    async def _start(self, job: _Job) -> RequestStream:
        """Submit to the engine; for generation_only, pull and import the context's KV first."""
        from tensorrt_llm_dwdp.engine.executor import Request
        from tensorrt_llm_dwdp.engine.scheduler import SamplingParams

        req = job.req
        params = SamplingParams(max_tokens=job.max_tokens, stop_token_ids=tuple(req.stop_token_ids),
                                ignore_eos=req.ignore_eos, **req.sampling)
        rid = job.rid
        kv = None
        if req.disagg is not None and req.disagg.request_type == "generation_only":
            try:
                kv, transfer = await self.kv_puller.pull(self._session, req.disagg.kv_url)
            except KvFetchError as e:
                raise ApiError(str(e), status=502, type="server_error", param="disaggregated_params.kv_url",
                               code="kv_transfer_failed") from e
            self.metrics.record_kv_transfer(transfer.path, transfer.nbytes, transfer.seconds,
                                            fallback=transfer.reason, phases=transfer.phases)
            if kv.first_token != req.disagg.first_gen_tokens[0]:
                # The engine decodes from the KV's token: it must be the one the client holds.
                raise ApiError(f"request rejected: the KV at {req.disagg.kv_url} holds first token "
                               f"{kv.first_token} but first_gen_tokens is {list(req.disagg.first_gen_tokens)}",
                               param="disaggregated_params.first_gen_tokens")
        context_only = req.disagg is not None and req.disagg.request_type == "context_only"
        pool = self.kv_store.pool
        if context_only and pool is not None and not pool.ready and pool.error is None:
            # Made once, before the first export, so that export lands in it.
            await asyncio.get_running_loop().run_in_executor(None, pool.ensure)

        def make_request():
            return Request(rid, list(job.prompt_ids), params, context_only=context_only, kv_import=kv)

        try:
            return await self.loop.submit(rid, make_request)
        except ContextLengthExceeded as e:
            raise ApiError(f"request rejected by the engine: {e}", param="max_tokens",
                           code="context_length_exceeded") from e
        except (ValueError, KeyError) as e:
            raise ApiError(f"request rejected by the engine: {e}", param=None) from e

    async def _events(self, job: _Job):
        """Yield text deltas as tokens arrive; the engine request is aborted if not finished."""
        req = job.req
        stream = await self._start(job)  # before any yield: KV or admission errors keep their status
        try:
            if req.disagg is not None and req.disagg.request_type == "generation_only":
                job.first_token_at = time.perf_counter()
                yield job.output.feed(req.disagg.first_gen_tokens[0], None)
                if job.output.finished:
                    return
            async for ev in stream:
                if job.first_token_at is None:
                    job.first_token_at = time.perf_counter()
                if ev.finish_reason == "context_done":
                    yield await self._context_done(job, ev.token_id)
                    return
                delta = job.output.feed(ev.token_id, ev.finish_reason)
                yield delta
                if job.output.finished:
                    return
        except RequestFailed as e:  # this request's step failed; the server goes on
            raise ApiError(str(e), status=500, type="server_error",
                           code="out_of_memory" if e.out_of_memory else "step_failed") from e
        finally:
            self.loop.release(stream, abort=not stream.done)

    async def _context_done(self, job: _Job, token: int) -> str:
        """First token of a context-only request: finish here, or export the KV for decode."""
        reason = job.output.natural_finish(token, job.max_tokens)
        delta = job.output.feed(token, reason)
        rid = job.rid
        if job.output.finished:
            await self.loop.call(lambda engine: engine.abort(rid))  # drop the unneeded export
            return delta
        handoff = await self.loop.call(lambda engine: engine.export_kv(rid))
        try:
            kv_id = self.kv_store.put(handoff)
        except MemoryError as e:
            handoff.release()
            raise ApiError(str(e), status=503, type="service_unavailable", code="kv_store_full") from e
        job.handoff = DisaggParams(
            "context_only", first_gen_tokens=(token,), prompt_token_ids=tuple(job.prompt_ids),
            kv_url=self.config.public_url.rstrip("/") + KV_ROUTE.format(kv_id=kv_id), ctx_request_id=rid)
        return delta

    async def _respond_full(self, job: _Job) -> web.Response:
        try:
            async for _ in self._events(job):
                pass
        except ApiError as e:
            job.status = e.status
            return _json_error(e)
        except EngineFailed as e:
            job.status = 500
            return _json_error(ApiError(str(e), status=500, type="server_error"))
        job.status = 200
        body = protocol.full_response(
            job.req, rid=job.rid, model=self.config.model_name, text=job.output.text,
            finish_reason=job.output.finish_reason, prompt_ids=job.prompt_ids,
            output_ids=job.output.ids, disagg=job.handoff)
        return web.json_response(body)

    async def _respond_stream(self, request: web.Request, job: _Job) -> web.StreamResponse:
        req, created, model = job.req, int(time.time()), self.config.model_name
        events = self._events(job)
        try:
            first_delta = await events.__anext__()
        except StopAsyncIteration:
            first_delta = ""
        except ApiError as e:  # nothing sent yet: a normal error body and status
            job.status = e.status
            return _json_error(e)
        except EngineFailed as e:
            job.status = 500
            return _json_error(ApiError(str(e), status=500, type="server_error"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        job.status = 200
        sent = 0
        try:
            await resp.write(protocol.sse(self._chunk(job, created, model, first_delta, sent, first=True)))
            sent = len(job.output.ids)
            async for delta in events:
                await resp.write(protocol.sse(self._chunk(job, created, model, delta, sent)))
                sent = len(job.output.ids)
            if req.include_usage:
                await resp.write(protocol.sse(protocol.usage_chunk(
                    req, rid=job.rid, model=model, created=created,
                    prompt_tokens=len(job.prompt_ids), completion_tokens=len(job.output.ids))))
        except (ApiError, EngineFailed) as e:
            err = e if isinstance(e, ApiError) else ApiError(str(e), status=500, type="server_error")
            await resp.write(protocol.sse(err.body()))
        except ConnectionResetError:
            logger.info("client of %s went away; request aborted", job.rid)
            return resp
        finally:
            await events.aclose()
        await resp.write(protocol.SSE_DONE)
        await resp.write_eof()
        return resp

    def _chunk(self, job: _Job, created: int, model: str, delta: str, sent: int, first: bool = False) -> dict:
        return protocol.stream_chunk(
            job.req, rid=job.rid, model=model, created=created, text=delta,
            finish_reason=job.output.finish_reason, token_ids=job.output.ids[sent:], first=first)


@dataclasses.dataclass(eq=False)
class _Job:
    """Mutable state of one HTTP generation request while it runs."""

    req: GenerationRequest
    prompt_ids: list[int]
    max_tokens: int
    arrival: float
    output: RequestOutput
    rid: str
    first_token_at: float | None = None
    handoff: DisaggParams | None = None
    status: int = 499  # "client closed request" until an answer is produced


def _json_error(e: ApiError) -> web.Response:
    return web.json_response(e.body(), status=e.status)


def _engine_stats(engine: Any) -> tuple[dict[str, float], dict[str, float] | None]:
    """Snapshot (on the engine thread) of the engine's counters and the DWDP manager's stats."""
    stats = engine.stats
    gauges = {
        "engine_prefill_steps": float(stats.prefill_steps),
        "engine_prefill_tokens": float(stats.prefill_tokens),
        "engine_prefill_seconds": float(stats.prefill_seconds),
        "engine_decode_steps": float(stats.decode_steps),
        "engine_decode_tokens": float(stats.decode_tokens),
        "engine_decode_seconds": float(stats.decode_seconds),
        "engine_prefill_device_seconds": float(stats.prefill_device_seconds),
        "engine_idle_steps": float(stats.idle_steps),
        "engine_idle_seconds": float(stats.idle_seconds),
        "engine_kernel_compiles": float(stats.kernel_compiles),
        "engine_kernel_compile_seconds": float(stats.kernel_compile_seconds),
    }
    if hasattr(engine, "vote_seconds"):   # expert parallelism: the lockstep votes
        gauges["engine_lockstep_vote_seconds"] = float(engine.vote_seconds)
    dwdp = engine.dwdp.stats if engine.dwdp is not None else None
    return gauges, (_numeric_fields(dwdp) if dwdp is not None else None)


def _numeric_fields(stats: Any) -> dict[str, float]:
    if dataclasses.is_dataclass(stats):
        items = dataclasses.asdict(stats).items()
    elif isinstance(stats, Mapping):
        items = stats.items()
    else:
        raise TypeError(f"DWDP stats of type {type(stats).__name__} are neither a dataclass nor a mapping")
    return {k: float(v) for k, v in items if isinstance(v, (int, float)) and not isinstance(v, bool)}

