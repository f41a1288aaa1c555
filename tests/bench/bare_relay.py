"""The floor for a Python relay: raw ASGI + one aiohttp session under hypercorn.

No auth, no parsing, no routing: method, path, query and body go to the
upstream base URL and the answer is streamed back with iter_any(). The
benchmark in overhead.py compares sluicegate against this.

    python tests/bench/bare_relay.py --bind 127.0.0.1:9100 --upstream http://127.0.0.1:8001
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import aiohttp
from hypercorn.asyncio import serve
from hypercorn.config import Config

KEEP_RESPONSE_HEADERS = frozenset({b"content-type", b"content-length", b"cache-control"})


class BareRelay:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    # No cap on connections (aiohttp's default is 100), as in the reference harness's relay:
                    # with one, 200 concurrent streams would queue for the upstream.
                    connector = aiohttp.TCPConnector(limit=0)
                    self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if self.session is not None:
                        await self.session.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http" or self.session is None:
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        query = scope.get("query_string", b"")
        url = self.upstream + scope["path"] + ("?" + query.decode("latin-1") if query else "")
        async with self.session.request(
            scope["method"], url, data=body, headers={"Content-Type": "application/json"}
        ) as resp:
            headers = [(k.lower(), v) for k, v in resp.raw_headers if k.lower() in KEEP_RESPONSE_HEADERS]
            await send({"type": "http.response.start", "status": resp.status, "headers": headers})
            async for chunk in resp.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def main(bind: str, upstream: str) -> None:
    config = Config()
    config.bind = [bind]
    config.accesslog = None
    config.include_server_header = False
    config.graceful_timeout = 2.0
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await serve(BareRelay(upstream), config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]


def loop_factory() -> Any:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="127.0.0.1:9100", help="HOST:PORT to listen on")
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:8001")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(main(args.bind, args.upstream))
