"""A script call on our pipes, to its answer: the one place that reads what a reply asks of us.

A reply may be a request rather than an answer: NOSCRIPT (a Redis restarted or flushed since the
script was loaded: load it and ask again), MOVED or ASK (Redis Cluster: the slot moved or is moving:
ask the node named), TRYAGAIN (the slot is half-way through a migration: ask again in a moment).
redis-py keeps these inside its script object and its cluster client; ours live here, beside the pipe.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.exceptions import NoScriptError, ResponseError

from .cluster import ASKING, Pipes, redirection
from .pipe import Prepared, pack_command

MAX_TRIES = 4  # one script load, one redirection, TRYAGAINs of a slot half-way through a migration
TRYAGAIN_S = 0.02


def asks_again(reply: object) -> bool:
    """Whether a reply asks for the call again (NOSCRIPT, MOVED, ASK): Redis answered, just not yet the script."""
    return isinstance(reply, NoScriptError) or (isinstance(reply, ResponseError) and redirection(reply) is not None)


async def run_script(pipes: Pipes, call: Prepared, more: tuple[Any, ...]) -> Any:
    """The call's answer; an error reply that is not a request to ask again is raised."""
    packed = call.pack(*more)
    pipe = await pipes.route(call.slot)
    asking = loaded = False
    for _ in range(MAX_TRIES):
        if asking:
            # ASKING lets the node importing the slot serve the one command right after it on this connection.
            _, reply = await asyncio.gather(pipe.call(ASKING), pipe.call(packed))
        else:
            reply = await pipe.call(packed)
        if isinstance(reply, NoScriptError) and not loaded:
            loaded = True
            await pipe.call(pack_command(b"SCRIPT", b"LOAD", call.script.source.encode()))
        elif isinstance(reply, ResponseError) and (to := redirection(reply)) is not None:
            pipe, asking = await pipes.redirected(to), to.asking
        elif isinstance(reply, ResponseError) and str(reply).startswith("TRYAGAIN"):
            await asyncio.sleep(TRYAGAIN_S)
        else:
            break
    if isinstance(reply, ResponseError):
        raise reply
    return reply
