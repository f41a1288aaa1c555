"""Run the gateway under hypercorn: one worker in-process, or N spawned workers.

Each worker owns its event loop and signal handlers: SIGTERM/SIGINT drain and
stop, SIGHUP reloads the config file in place. With --workers N the parent
only holds the listening sockets and passes signals on to its children.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import os
import signal
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from types import FrameType

from hypercorn.asyncio.lifespan import Lifespan
from hypercorn.config import Config, Sockets
from hypercorn.utils import repr_socket_addr, wrap_app
from prometheus_client.multiprocess import mark_process_dead

from .app import Gateway, create_app
from .config.settings import ServerSettings, Settings
from .http.connections import Listener
from .http.listen import binding

log = logging.getLogger("sluicegate")

H11_MAX_HEAD_BYTES = 128 * 1024


def hypercorn_config(settings: Settings) -> Config:
    server = settings.server
    config = Config()
    config.bind = [f"{server.host}:{server.port}"]
    config.graceful_timeout = server.graceful_timeout_s
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.include_server_header = False
    # Above nginx's upstream keepalive_timeout (deploy/nginx.conf: 60 s), so nginx closes an
    # idle pooled connection first and never sends a request on one the gateway is closing.
    config.keep_alive_timeout = server.keep_alive_timeout_s
    # Off: hypercorn applies it to every read, also while a client waits in silence on a long
    # stream. Slow heads and bodies have their own deadlines (http/internals.py, read_body).
    config.read_timeout = None
    # The whole request head must fit here or hypercorn answers a bare 431 and closes; kept
    # well above the gateway's own header limits (http/head.py), which answer in the envelope.
    config.h11_max_incomplete_size = H11_MAX_HEAD_BYTES
    config.backlog = server.backlog
    return config


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def bind_sockets(config: Config, server: ServerSettings, option: str = "--bind") -> Sockets:
    """Bound before anything else starts, so a taken port stops the start at once with one line."""
    with binding(server.host, server.port, option):
        return config.create_sockets()


async def serve_app(app: Gateway, config: Config, sockets: Sockets) -> None:
    """Serve until SIGTERM or SIGINT, then drain.

    SIGTERM: /readyz answers 503 at once while requests are still served for
    drain_delay_s, so a balancer polling it moves traffic away; then the listener
    closes and in-flight requests get graceful_timeout_s. A second SIGTERM, or
    SIGINT, skips what is left of the delay.
    """
    server = app.runtime.settings.server
    stop = asyncio.Event()
    hurry = asyncio.Event()

    def on_sigterm() -> None:
        if stop.is_set():
            hurry.set()
        app.draining = True
        stop.set()

    def on_sigint() -> None:
        app.draining = True
        stop.set()
        hurry.set()

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    loop.add_signal_handler(signal.SIGINT, on_sigint)
    loop.add_signal_handler(signal.SIGHUP, app.reload)
    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")  # type: ignore[arg-type]
    listener = Listener(wrapped, config, server)
    lifespan = Lifespan(wrapped, config, loop, listener.state)
    lifespan_task = loop.create_task(lifespan.handle_lifespan())
    await lifespan.wait_for_startup()
    failure = lifespan_task.exception() if lifespan_task.done() else None
    if failure is not None:
        raise failure
    listening = sockets.insecure_sockets
    listener.start(listening)
    for sock in listening:
        log.info("serving on http://%s", repr_socket_addr(sock.family, sock.getsockname()))
    await stop.wait()
    if not hurry.is_set() and server.drain_delay_s > 0:
        log.info("draining: /readyz answers 503; still serving for %gs", server.drain_delay_s)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(server.drain_delay_s):
                await hurry.wait()
    await listener.stop_accepting()
    log.info("stopped accepting; in-flight requests get up to %gs", config.graceful_timeout)
    await listener.close(config.graceful_timeout)
    await lifespan.wait_for_shutdown()
    await lifespan_task


def run_worker(settings: Settings, config: Config, sockets: Sockets) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(serve_app(create_app(settings), config, sockets))


def serve(settings: Settings, bind: tuple[str, int] | None, workers: int) -> int:
    if bind:
        settings = replace(settings, server=replace(settings.server, host=bind[0], port=bind[1]))
    config = hypercorn_config(settings)
    sockets = bind_sockets(config, settings.server)
    if workers == 1:
        run_worker(settings, config, sockets)
        return 0
    _metrics_dir()
    ctx = multiprocessing.get_context("spawn")
    children = [ctx.Process(target=run_worker, args=(settings, config, sockets), daemon=False) for _ in range(workers)]
    stopping = False

    def pass_on(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = stopping or signum != signal.SIGHUP
        for child in children:
            if child.pid is not None and child.is_alive():
                os.kill(child.pid, signum)

    # An ignored SIGHUP survives exec: a worker still starting up ignores a reload rather
    # than dying of it, until its event loop installs the real handler.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, pass_on)
    for child in children:
        child.start()
        if stopping:
            child.terminate()
    # The workers hold their own copies now. Without closing ours, a drained gateway's port
    # would still complete handshakes into a queue nobody accepts from, until this process exits.
    for sock in sockets.insecure_sockets:
        sock.close()
    signal.signal(signal.SIGHUP, pass_on)
    return _wait_for_workers(children, lambda: stopping, lambda: pass_on(signal.SIGTERM, None))


def _wait_for_workers(
    children: Sequence[multiprocessing.process.BaseProcess], stopping: Callable[[], bool], stop_all: Callable[[], None]
) -> int:
    """Until every worker is gone; one that dies on its own takes the others down, so a supervisor restarts all."""
    exit_code = 0
    running = list(children)
    while running:
        ready = multiprocessing.connection.wait([child.sentinel for child in running])
        for child in [c for c in running if c.sentinel in ready]:
            child.join()
            running.remove(child)
            if child.pid is not None:
                mark_process_dead(child.pid)  # type: ignore[no-untyped-call]
            if not stopping():
                log.error("worker %s exited with code %s: stopping the others", child.pid, child.exitcode)
                exit_code = child.exitcode or 1
                stop_all()
            # A worker still starting up has no handler yet and dies of the stop signal passed
            # on; it had nothing in flight, so that is a clean stop.
            stopped = stopping() and child.exitcode in (-signal.SIGTERM, -signal.SIGINT)
            exit_code = exit_code or (0 if stopped else child.exitcode or 0)
    return exit_code


def _metrics_dir() -> None:
    """prometheus-client multiprocess mode: set before the workers import it, emptied of old files."""
    path = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="sluicegate-metrics-"))
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.db"):
        old.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
