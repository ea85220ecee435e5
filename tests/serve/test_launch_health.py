"""serve/launch.py: waiting for servers names the ones that never became healthy and why."""
import asyncio
import logging

import pytest
from aiohttp import web

from tensorrt_llm_dwdp.launcher import free_port
from tensorrt_llm_dwdp.serve.launch import wait_for_health_async


async def _server(status: int, text: str) -> tuple[web.AppRunner, str]:
    async def health(request):
        return web.Response(status=status, text=text)

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


def test_timeout_names_each_pending_server_with_its_last_answer(caplog):
    async def scenario():
        ok, ok_url = await _server(200, "OK")
        sick, sick_url = await _server(503, "unhealthy: engine not running")
        dead_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        try:
            with caplog.at_level(logging.INFO, logger="tensorrt_llm_dwdp.serve.launch"):
                with pytest.raises(TimeoutError) as err:
                    # report_s=0: every round reports, the first included, so a report comes
                    # however slowly a loaded machine polls; the timeout leaves that first round
                    # (three requests to local servers) 2 s.
                    await wait_for_health_async([ok_url, sick_url, dead_url], timeout_s=2.0,
                                                poll_s=0.1, report_s=0.0)
            return str(err.value), ok_url, sick_url, dead_url
        finally:
            await ok.cleanup()
            await sick.cleanup()

    message, ok_url, sick_url, dead_url = asyncio.run(scenario())
    assert ok_url not in message
    assert f"{sick_url} (HTTP 503: unhealthy: engine not running)" in message
    assert f"{dead_url} (ClientConnectorError" in message
    reports = [r.getMessage() for r in caplog.records if "still waiting for 2 server(s)" in r.getMessage()]
    assert reports and sick_url in reports[0] and dead_url in reports[0]


def test_returns_once_every_server_is_healthy():
    async def scenario():
        ok, url = await _server(200, "OK")
        try:
            await wait_for_health_async([url], timeout_s=5)
        finally:
            await ok.cleanup()

    asyncio.run(scenario())
