"""The disaggregated router: prefill on a context server, decode on a generation server.

Per request: POST it to a context server with ``disaggregated_params = {request_type:
context_only}`` (never streamed); the answer carries the first token and a one-time ``kv_url``.
If that first token already ends the request (EOS, a stop string, ``max_tokens == 1``) the
router answers from it. Otherwise it POSTs the original body plus ``generation_only`` params
(prompt ids, first token, kv_url) to a generation server, which pulls the KV from the context
server and decodes; its answer (streamed or not) is relayed to the client unchanged.

Failures stay contained: a context or generation server that cannot be reached or dies
mid-request turns into an OpenAI error body (HTTP 502, or an SSE error event when streaming had
begun); a client that disconnects closes the upstream connection, which aborts the request in
that engine. Before the client has received anything a request is retried, up to
``max_retries`` times, on another context server: when its context server cannot be reached
or breaks the connection (it died: the server is marked down and gets no requests until its
``/health`` answers again, probed every ``probe_s``), answers 5xx, or the generation server
could not fetch the KV from it (the hand-over died with it).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from typing import Any

from aiohttp import ClientError, ClientSession, ClientTimeout, web

from tensorrt_llm_dwdp.serve import protocol
from tensorrt_llm_dwdp.serve.disagg_config import DisaggConfig, RoleConfig, ServerInstance
from tensorrt_llm_dwdp.serve.launch import wait_for_health_async
from tensorrt_llm_dwdp.serve.metrics import ServerMetrics
from tensorrt_llm_dwdp.serve.protocol import ApiError

logger = logging.getLogger(__name__)

PROBE_S = 1.0  # default: how often a server marked down is probed (GET /health)


class ServerPicker:
    """Chooses the next server of one role: round robin, or fewest requests in flight."""

    def __init__(self, role: RoleConfig) -> None:
        self.instances = role.instances
        self.policy = role.router_type
        self.in_flight = {inst: 0 for inst in self.instances}
        self.down: dict[ServerInstance, str] = {}  # instance -> why it was marked down
        self._cycle = itertools.cycle(range(len(self.instances)))

    def mark_down(self, inst: ServerInstance, why: str) -> None:
        if inst not in self.down:
            logger.warning("%s is down (%s): no requests go to it until its /health answers",
                           inst.url, why)
        self.down[inst] = why

    def mark_up(self, inst: ServerInstance) -> None:
        if self.down.pop(inst, None) is not None:
            logger.warning("%s answers /health again: it takes requests", inst.url)

    def pick(self, exclude: set[ServerInstance] = frozenset()) -> ServerInstance:
        """The next server not in ``exclude`` and not down (falling back to the excluded, then
        to the down ones, rather than to nothing)."""
        candidates = ([i for i in self.instances if i not in exclude and i not in self.down]
                      or [i for i in self.instances if i not in self.down]
                      or list(self.instances))
        if self.policy == "load_balancing":
            return min(candidates, key=lambda i: self.in_flight[i])
        for _ in range(len(self.instances)):
            inst = self.instances[next(self._cycle)]
            if inst in candidates:
                return inst
        return candidates[0]


class UpstreamError(Exception):
    """A worker could not be reached or broke the connection."""


class RetryRequest(Exception):
    """The request failed before the client got anything; run it again from the context phase
    on another context server (``exclude``)."""

    def __init__(self, reason: ApiError, exclude: ServerInstance) -> None:
        super().__init__(reason.message)
        self.reason = reason
        self.exclude = exclude


class DisaggRouter:
    def __init__(self, config: DisaggConfig, *, request_timeout_s: float = 180.0,
                 server_start_timeout_s: float = 180.0, probe_s: float = PROBE_S) -> None:
        self.config = config
        self.probe_s = probe_s
        self.request_timeout_s = request_timeout_s
        self.server_start_timeout_s = server_start_timeout_s
        self.ctx = ServerPicker(config.context)
        self.gen = ServerPicker(config.generation)
        self.metrics = ServerMetrics("router")
        self.retries = 0  # requests run again on another context server
        self._session: ClientSession | None = None
        self._probe: asyncio.Task | None = None

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_post("/v1/completions", self.generate)
        app.router.add_post("/v1/chat/completions", self.generate)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        urls = [inst.url for inst in self.config.instances]
        logger.info("waiting up to %.0f s for %d servers: %s", self.server_start_timeout_s, len(urls), urls)
        await wait_for_health_async(urls, self.server_start_timeout_s)
        self._session = ClientSession(timeout=ClientTimeout(total=self.request_timeout_s))
        self._probe = asyncio.get_running_loop().create_task(self._probe_down())

    async def _on_cleanup(self, app: web.Application) -> None:
        if self._probe is not None:
            self._probe.cancel()
        if self._session is not None:
            await self._session.close()

    async def _probe_down(self) -> None:
        """Every ``probe_s``, GET /health of each server marked down; mark it up once it answers."""
        while True:
            await asyncio.sleep(self.probe_s)
            for picker in (self.ctx, self.gen):
                for inst in list(picker.down):
                    if await self._healthy(inst):
                        picker.mark_up(inst)

    async def _healthy(self, inst: ServerInstance) -> bool:
        try:
            async with self._session.get(inst.url + "/health",
                                         timeout=ClientTimeout(total=2)) as resp:
                return resp.status == 200
        except (ClientError, asyncio.TimeoutError):
            return False

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def models(self, request: web.Request) -> web.Response:
        inst = self.ctx.pick()
        try:
            async with self._session.get(inst.url + "/v1/models") as resp:
                return web.json_response(await resp.json(), status=resp.status)
        except (ClientError, asyncio.TimeoutError) as e:
            return _error(ApiError(f"context server {inst.url} unreachable: {e!r}", status=502, type="server_error"))

    async def prometheus(self, request: web.Request) -> web.Response:
        gauges = {f"{role}_in_flight": float(sum(p.in_flight.values()))
                  for role, p in (("context", self.ctx), ("generation", self.gen))}
        gauges.update({f"{role}_servers_down": float(len(p.down))
                       for role, p in (("context", self.ctx), ("generation", self.gen))})
        gauges["retried_requests"] = float(self.retries)
        return web.Response(text=self.metrics.render(gauges), content_type="text/plain", charset="utf-8")

    # ---- one request ------------------------------------------------------------------------------

    async def generate(self, request: web.Request) -> web.StreamResponse:
        arrival = time.perf_counter()
        endpoint = request.path
        self.metrics.active += 1
        status = 499
        try:
            body = protocol.parse_json_body(await request.read())
            if "disaggregated_params" in body:
                raise ApiError("disaggregated_params is set by the router, not by clients",
                               param="disaggregated_params")
            stream = body.get("stream") is True
            exclude: set[ServerInstance] = set()
            for attempt in range(self.config.max_retries + 1):
                try:
                    resp = await self._serve_once(request, endpoint, body, stream, exclude, arrival)
                    status = resp.status
                    return resp
                except RetryRequest as retry:
                    if attempt == self.config.max_retries:
                        raise retry.reason from None
                    exclude.add(retry.exclude)
                    self.retries += 1
                    logger.warning("running the request again on another context server: %s",
                                   retry.reason.message)
            raise AssertionError("unreachable")
        except ApiError as e:
            status = e.status
            return _error(e)
        finally:
            self.metrics.active -= 1
            self.metrics.record_request(endpoint, status)
            if status == 200:
                self.metrics.request_latency.observe(time.perf_counter() - arrival)

    async def _serve_once(self, request: web.Request, endpoint: str, body: dict, stream: bool,
                          exclude: set[ServerInstance], arrival: float) -> web.StreamResponse:
        """One attempt: context phase on a server not in ``exclude``, then generation. Raises
        RetryRequest while nothing has been sent to the client."""
        ctx_answer, inst = await self._context_phase(endpoint, body, exclude)
        self.metrics.prefill_latency.observe(time.perf_counter() - arrival)
        choice = ctx_answer["choices"][0]
        params = choice.get("disaggregated_params")
        if choice.get("finish_reason") is not None or not params or not params.get("kv_url"):
            return await self._answer_from_context(request, body, ctx_answer, stream)
        try:
            return await self._generation_phase(request, endpoint, body, params, stream)
        except ApiError as e:
            if e.code != "kv_transfer_failed":
                raise
            if not await self._healthy(inst):  # the hand-over died with its context server
                self.ctx.mark_down(inst, "its KV hand-over could not be fetched")
            raise RetryRequest(e, inst) from None

    async def _context_phase(self, endpoint: str, body: dict, exclude: set[ServerInstance]
                             ) -> tuple[dict, ServerInstance]:
        """The context server's answer and which server gave it. A server that cannot be
        reached or breaks the connection is marked down; that and a 5xx answer raise
        RetryRequest (the client has received nothing)."""
        ctx_body = {k: v for k, v in body.items() if k != "stream_options"}
        ctx_body["stream"] = False
        ctx_body["disaggregated_params"] = {"request_type": "context_only"}
        inst = self.ctx.pick(exclude)
        self.ctx.in_flight[inst] += 1
        try:
            async with self._session.post(inst.url + endpoint, json=ctx_body) as resp:
                data = await resp.read()
                if resp.status >= 500:
                    raise RetryRequest(_passthrough(resp.status, data, f"context server {inst.url}"),
                                       inst)
                if resp.status != 200:
                    raise _passthrough(resp.status, data, f"context server {inst.url}")
                return json.loads(data), inst
        except (ClientError, asyncio.TimeoutError, ValueError) as e:
            logger.warning("context server %s failed: %r", inst.url, e)
            if isinstance(e, ClientError):
                self.ctx.mark_down(inst, repr(e))
            raise RetryRequest(ApiError(f"context server {inst.url} failed: {e!r}", status=502,
                                        type="server_error", code="context_server_unavailable"),
                               inst) from None
        finally:
            self.ctx.in_flight[inst] -= 1

    async def _generation_phase(self, request: web.Request, endpoint: str, body: dict,
                                params: dict, stream: bool) -> web.StreamResponse:
        gen_body = dict(body)
        gen_body["disaggregated_params"] = {**params, "request_type": "generation_only"}
        inst = self.gen.pick()
        self.gen.in_flight[inst] += 1
        try:
            async with self._session.post(inst.url + endpoint, json=gen_body) as resp:
                if resp.status != 200 or not stream:
                    try:
                        data = await resp.read()
                    except (ClientError, asyncio.TimeoutError) as e:
                        raise ApiError(f"generation server {inst.url} failed mid-request: {e!r}", status=502,
                                       type="server_error", code="generation_server_failed") from e
                    if resp.status != 200:
                        raise _passthrough(resp.status, data, f"generation server {inst.url}")
                    return web.Response(body=data, content_type="application/json")
                return await self._relay_stream(request, resp, inst)
        except (ClientError, asyncio.TimeoutError) as e:
            await self._discard_kv(params.get("kv_url"))
            raise ApiError(f"generation server {inst.url} failed: {e!r}", status=502,
                           type="server_error", code="generation_server_unavailable") from e
        finally:
            self.gen.in_flight[inst] -= 1

    async def _relay_stream(self, request: web.Request, upstream, inst: ServerInstance) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await out.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                await out.write(chunk)
        except ConnectionResetError:
            logger.info("client went away; closing the stream from %s", inst.url)
            return out
        except (ClientError, asyncio.TimeoutError) as e:
            logger.warning("generation server %s broke a stream: %r", inst.url, e)
            err = ApiError(f"generation server {inst.url} failed mid-stream: {e!r}", status=502,
                           type="server_error", code="generation_server_failed")
            await out.write(protocol.sse(err.body()))
            await out.write(protocol.SSE_DONE)
        await out.write_eof()
        return out

    async def _discard_kv(self, kv_url: str | None) -> None:
        """Best effort: free a hand-over nobody will collect (it would expire anyway)."""
        if not kv_url:
            return
        try:
            async with self._session.delete(kv_url, timeout=ClientTimeout(total=5)):
                pass
        except (ClientError, asyncio.TimeoutError) as e:
            logger.debug("could not discard %s: %r", kv_url, e)

    async def _answer_from_context(self, request: web.Request, body: dict, answer: dict,
                                   stream: bool) -> web.StreamResponse:
        """The context server finished the request at its first token: answer from that."""
        choice = dict(answer["choices"][0])
        choice.pop("disaggregated_params", None)
        if not body.get("return_token_ids"):
            choice.pop("token_ids", None)
            choice.pop("prompt_token_ids", None)
        answer = {**answer, "choices": [choice]}
        if not stream:
            return web.json_response(answer)
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await out.prepare(request)
        await out.write(protocol.sse(_as_chunk(answer)))
        if (body.get("stream_options") or {}).get("include_usage"):
            await out.write(protocol.sse({**_as_chunk(answer), "choices": [], "usage": answer.get("usage")}))
        await out.write(protocol.SSE_DONE)
        await out.write_eof()
        return out


def _as_chunk(answer: dict) -> dict:
    """A finished non-streaming answer as one streaming chunk of the same request."""
    choice = answer["choices"][0]
    is_chat = answer.get("object") == "chat.completion"
    out: dict[str, Any] = {"index": 0, "finish_reason": choice.get("finish_reason")}
    if is_chat:
        out["delta"] = {"role": "assistant", "content": choice["message"]["content"]}
    else:
        out["text"] = choice.get("text", "")
        out["logprobs"] = None
    if "token_ids" in choice:
        out["token_ids"] = choice["token_ids"]
    return {"id": answer["id"], "object": "chat.completion.chunk" if is_chat else "text_completion",
            "created": answer["created"], "model": answer["model"], "choices": [out]}


def _passthrough(status: int, data: bytes, who: str) -> ApiError:
    """A worker's error answer, relayed with its status and OpenAI error fields."""
    try:
        err = json.loads(data)["error"]
        return ApiError(err["message"], status=status, type=err.get("type") or "server_error",
                        param=err.get("param"), code=err.get("code"))
    except (ValueError, KeyError, TypeError):
        return ApiError(f"{who} answered HTTP {status}: {data[:300]!r}", status=502, type="server_error")


def _error(e: ApiError) -> web.Response:
    return web.json_response(e.body(), status=e.status)
