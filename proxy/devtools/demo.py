"""`sluicegate demo`: the mock upstream and the gateway in one process, with a key made at start-up.

What a new user tries next works against it. The event records go to the config's
[events] file, and beside that file `demo-key.toml` holds the demo key's [[keys]]
block (its sha256, never the key), which `sluicegate keys usage` reads along with
the config. The banner names every address, the Redis in use and the commands to run.
"""

from __future__ import annotations

import asyncio
import shlex
import shutil
import sys
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

from hypercorn.config import Sockets
from redis.connection import parse_url

from ..app import create_app
from ..config.settings import ConfigError, KeySettings, Settings
from ..http.listen import address, binding
from ..limits.limiter import Limiter
from ..redact import safe_url
from ..request.auth import key_digest, new_key
from ..server import bind_sockets, hypercorn_config, serve_app
from .mock_upstream import MockOptions, start_mock

DEMO_KEY_FILE = "demo-key.toml"
# The curl line sets it, so the `events` line below it can name the record before it exists.
REQUEST_ID = "demo-hello"
REDIS_START_CHECKS = 40  # a started redis-server answers within 0.05 s x 40
REDIS_START_CHECK_S = 0.05


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoOptions:
    config: str  # as given on the command line, for the commands the banner prints
    bind: tuple[str, int] | None = None
    mock_bind: tuple[str, int] | None = None


def demo_key_path(settings: Settings) -> Path | None:
    """Beside the event records; a config whose records go elsewhere keeps its demo key only in memory."""
    return Path(settings.events.path).parent / DEMO_KEY_FILE if settings.events.sink == "file" else None


def with_demo_key(settings: Settings) -> Settings:
    """The config's keys and the one the last demo on it made, if one left its file."""
    path = demo_key_path(settings)
    if path is None or not path.exists():
        return settings
    try:
        (table,) = tomllib.loads(path.read_text(encoding="utf-8"))["keys"]
        key = KeySettings(name=table["name"], sha256=table["sha256"], rpm=table["rpm"], tpm=table["tpm"])
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(
            [f"{path}: not the file `sluicegate demo` writes ({exc!r}); delete it, the next demo writes it afresh"]
        ) from exc
    return settings.with_keys(key)


def _write_demo_key(path: Path, key: KeySettings) -> None:
    path.write_text(
        "# Written by `sluicegate demo` at start-up: the [[keys]] block of its key (the sha256, not the key).\n"
        "# `sluicegate keys usage` reads it beside the event records; the next demo overwrites it.\n"
        f'[[keys]]\nname = "{key.name}"\nsha256 = "{key.sha256}"\nrpm = {key.rpm}\ntpm = {key.tpm}\n',
        encoding="utf-8",
    )


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


async def _redis(settings: Settings) -> tuple[asyncio.subprocess.Process | None, str]:
    """The Redis the demo counts in, described for the banner; a throwaway one started when none answers."""
    url = settings.redis.url
    shown = safe_url(url)
    parts = parse_url(url)  # type: ignore[no-untyped-call]
    if await _ping(settings) is None:
        return None, f"{shown} (already running; the demo counts in database {parts.get('db', 0)})"
    unchecked = f"{shown} does not answer, so limits are NOT enforced"
    where = urlsplit(url)
    binary = shutil.which("redis-server")
    if binary is None or where.hostname not in ("127.0.0.1", "localhost"):
        return None, f"{unchecked} (no redis-server here to start for the demo)"
    args = [binary, "--port", str(where.port or 6379), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    if parts.get("password"):
        args += ["--requirepass", parts["password"]]  # so the URL's password works on it
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    for _ in range(REDIS_START_CHECKS):
        await asyncio.sleep(REDIS_START_CHECK_S)
        if proc.returncode is not None:
            return None, f"{unchecked} (the redis-server started for the demo exited at once)"
        if await _ping(settings) is None:
            return proc, f"{shown} (started for the demo, pid {proc.pid}; stops with it)"
    proc.terminate()
    await proc.wait()
    return None, f"{unchecked} (not even a redis-server started for the demo)"


async def _ping(settings: Settings) -> str | None:
    limiter = Limiter(settings.redis)
    try:
        return await limiter.ping()
    finally:
        await limiter.close()


def banner(
    *, settings: Settings, mock: tuple[str, int], redis: str, key: str, key_file: Path | None, config: str, model: str
) -> str:
    base = f"http://{address(settings.server.host, settings.server.port)}{settings.server.prefixes[0]}"
    sink = settings.events.sink
    records = {
        "file": str(Path(settings.events.path).resolve()),
        "stdout": "stdout, between these lines",
        "redis": "the Redis stream sluicegate:events",
        "off": "none ([events] sink = off)",
    }[sink]
    kept = f"its sha256 is in {key_file}" if key_file is not None else "kept only in memory"
    body = f'{{"model":"{model}","stream":true,"messages":[{{"role":"user","content":"Hello!"}}]}}'
    lines = [
        "sluicegate demo",
        f"  gateway        {base}",
        f"  mock upstream  http://{address(*mock)}{urlsplit(settings.providers[0].base_url).path}",
        f"  Redis          {redis}",
        f"  event records  {records}",
        f"  demo key       {key}  (made now; {kept})",
        "",
        "Try it:",
        f"  curl -sN {base}/chat/completions -H 'Authorization: Bearer {key}' "
        f"-H 'Content-Type: application/json' -H 'X-Request-ID: {REQUEST_ID}' -d '{body}'",
    ]
    then = []
    if sink in ("file", "redis"):
        then.append(f"  sluicegate events --config {shlex.quote(config)} --request-id {REQUEST_ID}")
    if key_file is not None:
        then.append(f"  sluicegate keys usage --config {shlex.quote(config)}")
    if then:
        lines += ["", "Then find that request's event record, and what the demo key has spent:", *then]
    return "\n".join([*lines, "", "Ctrl-C stops the demo.", ""]) + "\n"


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
        redis_proc, redis = await _redis(settings)
        key = new_key()
        demo_key = KeySettings(name="demo", sha256=key_digest(key), rpm=60, tpm=100_000)
        key_file = demo_key_path(settings)
        if key_file is not None:
            key_file.parent.mkdir(parents=True, exist_ok=True)
            _write_demo_key(key_file, demo_key)
        app = create_app(settings, (demo_key,))
        model = next(iter(app.runtime.router.known_models), "mock-chat")
        text = banner(
            settings=settings, mock=mock, redis=redis, key=key, key_file=key_file, config=options.config, model=model
        )
        sys.stdout.write(text)
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
