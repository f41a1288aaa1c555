"""Body -> upstream -> client: fallback across providers, disconnect watcher, usage scan."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Literal

import aiohttp
import orjson
from starlette.types import Receive

from ..http.errors import GatewayError, Header, RequestTimeout, RequestTooLarge, UpstreamError
from ..records.record import RequestRecord
from .exchange import Exchange
from .scrub import NEWLINE, Scrubber
from .upstream import (
    REASON_429,
    AttemptFailed,
    IdleWatch,
    ProviderClient,
    Retryable,
    Sessions,
    forwarded_headers,
    open_upstream,
    raise_for_status,
    response_headers,
)
from .usage import PASSTHROUGH_TAIL_BYTES, Inflater, StreamUsageScanner, Usage, usage_from_answer

Kind = Literal["json", "stream", "raw"]
BodyFor = Callable[["ProviderClient"], tuple[bytes, bool]]
# What the answer that went to the client reported: its status, the provider's usage (None when it gave
# none) and the gateway's estimate for a 2xx answer without it (None where there is nothing to estimate).
OnAnswer = Callable[[int, "Usage | None", "Usage | None"], None]
STREAM_HEADERS: tuple[Header, ...] = (
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
)
# The client's framing or timing cannot be trusted any more: answer, then end the connection.
CLOSE: tuple[Header, ...] = ((b"connection", b"close"),)
STREAM_HEADER_NAMES = frozenset(name for name, _ in STREAM_HEADERS)


# How long a request runs before a task watches for its client leaving (DisconnectWatcher).
WATCH_AFTER_S = 0.05


class ClientGone(Exception):
    """The client disconnected before its request body was read."""


async def read_body(receive: Receive, limit: int, content_length: int | None, timeout_s: float) -> bytes:
    if content_length is not None and content_length > limit:
        raise RequestTooLarge(f"The request body is {content_length} bytes; this gateway takes at most {limit}.")
    try:
        # One deadline for the whole body, not one per read: a client that trickles a byte
        # at a time gets no longer than one that sends nothing. No task, one timer handle.
        async with asyncio.timeout(timeout_s):
            return await _read_all(receive, limit)
    except TimeoutError:
        raise RequestTimeout(f"The request body did not arrive within {timeout_s:g}s.", headers=CLOSE) from None


async def _read_all(receive: Receive, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        part: bytes = message.get("body", b"")
        size += len(part)
        if size > limit:
            raise RequestTooLarge(f"The request body is over {limit} bytes, the most this gateway takes.")
        parts.append(part)
        if not message.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


class DisconnectWatcher:
    """Watches receive() in its own task and cancels the request task on http.disconnect.

    hypercorn drops sends after a disconnect without telling, so this is the
    only signal; cancelling makes the upstream request close at once.

    The task starts only once the request has taken WATCH_AFTER_S: most answers
    are out before that, and a timer costs a fraction of a task. A client that
    leaves sooner is seen then (hypercorn queues the disconnect), so an upstream
    call outlives its client by at most that long.
    """

    __slots__ = ("_receive", "_target", "_task", "_timer", "disconnected")

    def __init__(self, receive: Receive) -> None:
        self.disconnected = False
        self._target = asyncio.current_task()
        self._receive = receive
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(WATCH_AFTER_S, self._start)

    def _start(self) -> None:
        self._timer = None
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.disconnected = True
        if self._target is not None:
            self._target.cancel()

    def stop(self) -> None:
        """Call before the last send: a disconnect after that is a normal end."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            self._task.cancel()
            # The cancelled task's traceback holds our frame: without this, every request
            # leaves a reference cycle for the garbage collector (p99 pauses under load).
            self._task = None
        self._target = None


async def relay(
    ex: Exchange,
    *,
    sessions: Sessions,
    attempts: Sequence[ProviderClient],
    method: str,
    path_and_query: str,
    client_headers: Sequence[Header],
    body_for: BodyFor,
    kind: Kind,
    watcher: DisconnectWatcher,
    on_answer: OnAnswer,
    request_bytes: int,
) -> None:
    """Try each provider in order until one answers something to pass on.

    body_for(provider) gives the body to send and whether the gateway itself
    added include_usage (so the usage-only event is withheld from the client).
    on_answer hears once from the attempt whose answer went to the client; failed attempts never report.
    """
    record = ex.record
    forwarded = forwarded_headers(client_headers, record.request_id)
    last: GatewayError | None = None  # built only when needed: most requests never fail
    for number, client in enumerate(attempts, 1):
        final = number == len(attempts)
        record.attempts = number
        record.provider = client.settings.name
        body, injected = body_for(client)
        headers = {**forwarded, **client.auth}
        if record.upstream_sent_at is None:
            record.upstream_sent_at = time.perf_counter()
        try:
            session = sessions.get(client.settings)
            url = client.base_url + path_and_query
            async with open_upstream(session, client, method, url, headers=headers, body=body) as resp:
                raise_for_status(resp.status, client.settings, last_attempt=final)
                is_sse = resp.content_type == "text/event-stream"
                if kind == "raw" and (resp.status < 400 or is_sse):
                    # Any shape, so a longer tail: a passthrough answer's usage may sit kilobytes from its end.
                    # (An error is read whole, as on the model routes: so its text can be cleaned of our key.)
                    scanner = StreamUsageScanner(False, PASSTHROUGH_TAIL_BYTES, sse=is_sse)
                    await _forward_stream(
                        ex,
                        resp,
                        client,
                        watcher=watcher,
                        scanner=scanner,
                        on_answer=on_answer,
                        request_bytes=request_bytes,
                    )
                elif is_sse and resp.status == 200 and kind == "stream":
                    scanner = StreamUsageScanner(injected)
                    await _forward_stream(
                        ex,
                        resp,
                        client,
                        watcher=watcher,
                        scanner=scanner,
                        on_answer=on_answer,
                        request_bytes=request_bytes,
                    )
                else:
                    await _forward_whole(
                        ex, resp, client, watcher=watcher, on_answer=on_answer, request_bytes=request_bytes
                    )
                return
        except Retryable as exc:
            last = exc.error
            record.failures.append((client.settings.name, exc.reason))
    raise last if last is not None else UpstreamError("No provider could be tried.")


async def _forward_whole(
    ex: Exchange,
    resp: aiohttp.ClientResponse,
    client: ProviderClient,
    *,
    watcher: DisconnectWatcher,
    on_answer: OnAnswer,
    request_bytes: int,
) -> None:
    watch = IdleWatch(resp.content, client.settings.idle_timeout_s)
    status = resp.status
    try:
        with client.read_errors:
            body = await resp.read()
            usage = usage_from_answer(body, resp.headers.get("Content-Encoding")) if status == 200 else None
    finally:
        watch.stop()
    _count_refusal(ex.record, resp, client)
    # A JSON answer's completion is about its bytes / 4, if the provider did not say.
    estimate = Usage.estimate(request_bytes, len(body) // 4) if usage is None and 200 <= status < 300 else None
    on_answer(status, usage, estimate)
    watcher.stop()
    scrub = client.scrub
    headers = response_headers(resp, scrub)
    if scrub is not None and status >= 400:  # an error's text may quote the key; an answer's is the model's
        body, headers = _scrub_error(scrub, body, headers, resp.headers.get("Content-Encoding"))
    await ex.respond(status, headers, body)


def _scrub_error(
    scrub: Scrubber, body: bytes, headers: list[Header], encoding: str | None
) -> tuple[bytes, list[Header]]:
    """An error body without the provider's key. Compressed bytes cannot be edited: one that holds the key
    goes out inflated, without its Content-Encoding (one that cannot be read here goes as it came)."""
    inflater = Inflater.of(encoding)
    if inflater is None:
        return scrub.whole(body), headers
    plain = inflater.feed(body)
    if inflater.whole and scrub.within(plain):
        return scrub.whole(plain), [h for h in headers if h[0] != b"content-encoding"]
    return body, headers


async def _forward_stream(
    ex: Exchange,
    resp: aiohttp.ClientResponse,
    client: ProviderClient,
    *,
    watcher: DisconnectWatcher,
    scanner: StreamUsageScanner,
    on_answer: OnAnswer,
    request_bytes: int,
) -> None:
    headers = response_headers(resp, client.scrub)
    is_sse = resp.content_type == "text/event-stream"
    if is_sse:
        headers = [h for h in headers if h[0] not in STREAM_HEADER_NAMES]
        headers.extend(STREAM_HEADERS)
    _count_refusal(ex.record, resp, client)
    inflater = Inflater.of(resp.headers.get("Content-Encoding"))
    if inflater is not None:
        # Compressed bytes go out as they came: usage is read from a copy, nothing is withheld.
        scanner.strip_usage_event = False
    status = resp.status
    await ex.start(status, headers)
    failure: GatewayError | None = None
    ex.active_streams.inc()
    send = ex.body_sender()
    record = ex.record
    # An error body, or an event stream (where an error event may come): not an image's or audio's bytes.
    scrub = client.scrub.stream() if client.scrub is not None and (status >= 400 or is_sse) else None
    rare = scrub.rare if scrub is not None else NEWLINE
    leaked = False  # the provider's key inside a compressed answer, where it cannot be replaced
    inflated_tail = b""
    watch = IdleWatch(resp.content, client.settings.idle_timeout_s)
    try:
        with client.stream_errors:
            async for chunk in resp.content.iter_any():
                watch.waiting = False  # until the chunk is out: a slow client is not an idle provider
                if inflater is None:
                    out = scanner.feed(chunk)
                    # StreamScrub.may_hold, written out: a call per chunk would cost more than the test.
                    if (
                        scrub is not None
                        and out
                        and (scrub.held or out[-1] != NEWLINE or (rare in out and scrub.within(out)))
                    ):
                        out = scrub.feed(out)
                else:
                    inflated = inflater.feed(chunk)
                    scanner.feed(inflated)
                    if scrub is not None:
                        # With the end of what came before: the key may start in one piece and end in the next.
                        seen = inflated_tail + inflated
                        if scrub.within(seen):
                            leaked = True
                            break
                        inflated_tail = seen[-scrub.overlap :] if scrub.overlap else b""
                    out = chunk
                if out:
                    if record.first_byte_at is None:
                        record.first_byte_at = time.perf_counter()
                    await send(out)
                watch.waiting = True
    except AttemptFailed as exc:
        failure = exc.error
        ex.record.failures.append((client.settings.name, exc.reason))
    finally:
        watch.stop()
        ex.active_streams.dec()
        # Runs on a client disconnect too: a stream cut short still charges what is known. An answer
        # without usage is estimated: its prompt, and one token an event (none for a body that is not SSE).
        estimate = None
        if scanner.usage is None and 200 <= status < 300 and (scanner.events or not is_sse):
            estimate = Usage.estimate(request_bytes, scanner.events)
        on_answer(status, scanner.usage, estimate)
    watcher.stop()
    if leaked:
        ex.record.error = "upstream_error"
        ex.cut()  # what is left of a compressed answer cannot be cleaned: the client sees it cut short
        return
    if failure is None:
        rest = scanner.flush() if inflater is None else b""
        if scrub is not None:
            rest = scrub.feed(rest) + scrub.flush()
        await ex.end(rest)
        return
    ex.record.error = failure.code
    if not is_sse or inflater is not None:
        # No way to say it inside an image or audio body, or after cut compressed bytes: ending
        # without the last message makes hypercorn close the connection, so the client sees a cut
        # answer, not a whole one.
        ex.cut()
        return
    event = {"error": {"message": failure.message, "type": failure.type, "param": None, "code": failure.code}}
    event["error"]["request_id"] = ex.record.request_id
    # Held bytes of an unfinished event are dropped; one cut off mid-way gets its end first,
    # or the error would be glued onto it and clients could not parse either.
    # Bytes the scrub kept back are the start of an unfinished event, dropped like the scanner's.
    held_back = scrub.flush() if scrub is not None else b""
    fresh_line = b"\n\n" if scanner.mid_event or held_back else b""
    await ex.end(fresh_line + b"data: " + orjson.dumps(event) + b"\n\n")


def _count_refusal(record: RequestRecord, resp: aiohttp.ClientResponse, client: ProviderClient) -> None:
    """A provider's 429 passed on as the answer (no provider left to try) is still a failed attempt for ops."""
    if resp.status == 429:
        record.failures.append((client.settings.name, REASON_429))
