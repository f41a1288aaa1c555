"""Listening addresses: a bind that fails becomes one line that says what to do, not a traceback."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator


class BindError(Exception):
    """An address the gateway, the demo or the mock cannot listen on; the CLI prints it and exits 2."""


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@contextlib.contextmanager
def binding(host: str, port: int, option: str) -> Iterator[None]:
    """Around a bind: its OSError becomes a BindError naming the address and the option that changes it."""
    try:
        yield
    except OSError as exc:
        where = address(host, port)
        choose = f"choose another address with {option} HOST:PORT"
        if exc.errno == errno.EADDRINUSE:
            message = f"{where} is already in use: stop the process that holds it, or {choose}"
        elif exc.errno == errno.EACCES:
            message = f"cannot listen on {where}: permission denied (ports below 1024 need privileges); {choose}"
        else:
            # asyncio words its own strerror ("error while attempting to bind on address ..."): use the plain one.
            # A host name that does not resolve (socket.gaierror) has a negative errno and its own strerror.
            reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror or str(exc)
            message = f"cannot listen on {where}: {reason}; {choose}"
        raise BindError(message) from exc
