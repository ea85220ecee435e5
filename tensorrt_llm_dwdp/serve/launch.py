"""Running aiohttp apps and waiting for servers: the process-level glue of serving.

``bind_listener`` takes a server's port before anything slow happens (a port in use fails at
once, naming it); ``serve_app`` runs an application on it until SIGINT/SIGTERM, with handler
cancellation on (a client that disconnects cancels its handler, which aborts its engine
request). ``wait_for_health`` polls ``/health`` of a list of servers with a deadline, so
launchers and tests never hang.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import time

from aiohttp import ClientError, ClientSession, ClientTimeout, web

logger = logging.getLogger(__name__)


def bind_listener(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port``, for ``serve_app``: bound before the model loads, so a
    port another process holds fails here (a launcher's worker ports are P+1, P+2, ..., where
    any outgoing connection may sit) rather than after minutes of loading, when the server's
    peers and the router would only see it never answer."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host or "0.0.0.0", port))
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror} (another "
                               f"process holds the port? pick another --port)") from e
    return sock


def serve_app(app: web.Application, host: str, port: int, *, sock: socket.socket | None = None,
              shutdown_timeout_s: float = 5.0) -> None:
    """Serve ``app`` on ``host:port`` (on ``sock`` when given: ``bind_listener``'s) until a
    signal; cleanup hooks run on the way out."""
    if sock is None:
        sock = bind_listener(host, port)
    logger.info("listening on http://%s:%d", host, port)
    web.run_app(app, sock=sock, handler_cancellation=True, print=None,
                shutdown_timeout=shutdown_timeout_s, access_log=None)


def advertised_url(host: str, port: int) -> str:
    """How peers reach a server bound to ``host``: a wildcard bind advertises the hostname."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    return f"http://{host}:{port}"


async def wait_for_health_async(urls: list[str], timeout_s: float, poll_s: float = 0.5,
                                report_s: float = 30.0) -> None:
    """Return when every ``url`` answers 200 on ``/health``; raise TimeoutError naming the rest
    and each one's last answer. Every ``report_s`` the servers still pending are logged with
    their last answer (a status and the body's start, or the connection error), so a start-up
    that never ends says which server holds it up and why."""
    deadline = time.monotonic() + timeout_s
    next_report = time.monotonic() + report_s
    pending = list(urls)
    last: dict[str, str] = {}
    async with ClientSession(timeout=ClientTimeout(total=5)) as session:
        while pending:
            still = []
            for url in pending:
                try:
                    async with session.get(url.rstrip("/") + "/health") as resp:
                        if resp.status != 200:
                            last[url] = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                            still.append(url)
                except (ClientError, OSError, asyncio.TimeoutError) as e:  # not up yet
                    last[url] = f"{type(e).__name__}: {e}"[:200]
                    still.append(url)
            pending = still
            if not pending:
                return
            now = time.monotonic()
            if now > deadline or now >= next_report:
                waiting = "; ".join(f"{u} ({last[u]})" for u in pending)  # each answered this round
                if now > deadline:
                    raise TimeoutError(f"servers not healthy within {timeout_s:.0f} s: {waiting}")
                next_report = now + report_s
                logger.info("still waiting for %d server(s): %s", len(pending), waiting)
            await asyncio.sleep(poll_s)


def wait_for_health(urls: list[str], timeout_s: float, poll_s: float = 0.5) -> None:
    asyncio.run(wait_for_health_async(urls, timeout_s, poll_s))
