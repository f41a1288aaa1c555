"""`sluicegate demo`: the mock upstream and the gateway in one process, with a key made at start-up."""

from __future__ import annotations

import asyncio
import shutil
import sys
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from hypercorn.config import Sockets

from .app import create_app
from .auth import key_digest, new_key
from .limits import Limiter
from .listen import address, binding
from .mock_upstream import MockOptions, start_mock
from .redact import safe_url
from .server import bind_sockets, hypercorn_config, serve_app
from .settings import KeySettings, Settings

REDIS_START_WAIT_S = 0.3


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoOptions:
    config: str  # as given on the command line, for the commands the banner prints
    bind: tuple[str, int] | None = None
    mock_bind: tuple[str, int] | None = None


def _with_addresses(settings: Settings, options: DemoOptions) -> tuple[Settings, tuple[str, int]]:
    """--bind and --mock-bind applied; the mock serves the first provider, at the address its base_url names."""
    server = settings.server
    if options.bind is not None:
        server = replace(server, host=options.bind[0], port=options.bind[1])
    provider = settings.providers[0]
    upstream = urlsplit(provider.base_url)
    mock = options.mock_bind or (upstream.hostname or "127.0.0.1", upstream.port or 8001)
    base_url = upstream._replace(netloc=address(*mock)).geturl()
    providers = (replace(provider, base_url=base_url), *settings.providers[1:])
    return replace(settings, server=server, providers=providers), mock


async def _local_redis(settings: Settings) -> asyncio.subprocess.Process | None:
    """Start a throwaway redis-server for the demo when none answers and one is installed."""
    limiter = Limiter(settings.redis)
    try:
        if await limiter.ping() is None:
            return None
    finally:
        await limiter.close()
    url = urlsplit(settings.redis.url)
    binary = shutil.which("redis-server")
    if binary is None or url.hostname not in ("127.0.0.1", "localhost"):
        sys.stdout.write(f"no Redis at {safe_url(settings.redis.url)} and none to start: limits are NOT enforced\n")
        return None
    args = [binary, "--port", str(url.port or 6379), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    sys.stdout.write(f"started redis-server on port {url.port or 6379} (pid {proc.pid}) for the demo\n")
    await asyncio.sleep(REDIS_START_WAIT_S)
    return proc


async def run_demo(settings: Settings, options: DemoOptions) -> None:
    settings, mock = _with_addresses(settings, options)
    config = hypercorn_config(settings)
    # Both addresses before anything starts: a second demo stops here with one line.
    sockets = bind_sockets(config, settings.server)
    try:
        with binding(*mock, "--mock-bind"):
            runner = await start_mock(MockOptions(host=mock[0], port=mock[1]))
    except BaseException:
        _close(sockets)
        raise
    redis_proc: asyncio.subprocess.Process | None = None
    try:
        redis_proc = await _local_redis(settings)
        key = new_key()
        demo_key = KeySettings(name="demo", sha256=key_digest(key), rpm=60, tpm=100000)
        app = create_app(settings, (demo_key,))
        base = f"http://{address(settings.server.host, settings.server.port)}{settings.server.prefixes[0]}"
        model = next(iter(app.runtime.router.known_models), "mock-chat")
        body = f'{{"model":"{model}","stream":true,"messages":[{{"role":"user","content":"Hello!"}}]}}'
        sys.stdout.write(
            f"sluicegate demo: gateway on {base}, mock upstream on port {mock[1]}\n"
            f"demo key (made now, kept only in memory): {key}\n\n"
            f"try:\n  curl -sN {base}/chat/completions -H 'Authorization: Bearer {key}' "
            f"-H 'Content-Type: application/json' -d '{body}'\n\n"
        )
        sys.stdout.flush()
        await serve_app(app, config, sockets)
    finally:
        await runner.cleanup()
        if redis_proc is not None:
            redis_proc.terminate()
            await redis_proc.wait()


def _close(sockets: Sockets) -> None:
    for sock in sockets.insecure_sockets:
        sock.close()
