"""The limiter: one Redis client per worker that admits requests and settles their holds.

A request costs one EVALSHA before the upstream call (when its key has limits) and one after the
answer, which counts what every key spends. A budget is held, not just checked: admission holds
what the request may use, and the answer's settle charges the real usage and releases the hold,
so concurrent requests cannot all pass a check that only one of them could. A settle Redis did
not take is owed and sent again once Redis answers (see Limiter.owe).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import itertools
import logging
import secrets
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from ..config.settings import RedisSettings
from ..http.errors import Header, InsufficientQuota, LimiterUnavailable, RateLimited
from ..redisio.clients import failure_name, open_clients
from ..redisio.cluster import PrimaryDown
from ..redisio.pipe import Prepared
from ..redisio.scripts import asks_again, run_script
from .circuit import REDIS_ERRORS, Circuit, CircuitOpen, LimiterFailure
from .headers import ratelimit_headers, refusal
from .plan import KeyLimits, Plan

log = logging.getLogger("sluicegate")

UNKNOWN_HOLD = "?"  # a hold whose amount admission never heard back (charge.lua finds it by id)
RELEASED = -3  # token_bucket.lua's verdict for an admission that arrived after its request's settle
OWED_LIMIT = 100_000  # settles kept for when Redis answers again; past this the oldest are given up
# Error replies that mean the call itself is wrong (a script error): sending it again would never help.
# Others (LOADING after a restart, BUSY, OOM, MASTERDOWN, READONLY in a failover) pass.
PERMANENT_ERRORS = ("ERR", "WRONGTYPE")
REPAY_EVERY_S = 0.5  # how often owed settles are tried while Redis does not answer


@dataclass(frozen=True, slots=True)
class Admission:
    headers: list[Header]  # x-ratelimit-*
    held: tuple[str, ...]  # per budget: the amount held, "0", or "?" when the answer was lost


class HoldIds:
    """Hold ids unique across processes: a random prefix per process, then a counter.

    Never the client's X-Request-ID: two requests sent with the same one would share a hold.
    """

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._counter = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}.{next(self._counter)}"


class Limiter:
    """One Redis client per worker, opened in the lifespan."""

    def __init__(
        self,
        settings: RedisSettings,
        on_error: Callable[[], object] | None = None,
        on_circuit: Callable[[bool], object] | None = None,
        on_lost: Callable[[int], object] | None = None,
    ) -> None:
        """on_error: a call failed or was skipped; on_circuit: it opened (True) or closed; on_lost: this many
        owed settles were given up."""
        self.settings = settings
        self.timeout_s = settings.timeout_s
        self.clients = open_clients(settings)
        self.client = self.clients.client
        self.pipes = self.clients.open_pipes(self.timeout_s)
        self.hold_ids = HoldIds()
        self.on_error = on_error
        self._background: set[asyncio.Task[None]] = set()
        self.circuit = Circuit(settings.circuit_failures, settings.circuit_cooldown_s, on_circuit)
        # Settles Redis has not taken yet: sent again until it does (see owe()).
        self._owed: deque[tuple[Prepared, tuple[Any, ...]]] = deque()
        self._repaying: asyncio.Task[None] | None = None
        self.given_up = 0  # owed settles dropped: past OWED_LIMIT, refused by Redis, or still owed at close
        self._log_lost_at = 1
        self._on_lost = on_lost
        self._closed = False

    @property
    def owed(self) -> int:
        return len(self._owed)

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._repaying is not None:
            repaying, self._repaying = self._repaying, None
            repaying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await repaying  # its batch back in the queue before the last try below
        if self._owed:
            # One last try, bounded: a worker that stops with Redis away cannot wait for it.
            with contextlib.suppress(TimeoutError, LimiterFailure):
                async with asyncio.timeout(self.timeout_s * 4):
                    await self._repay_all()
            if self._owed:
                self._lose(len(self._owed))
                log.error("stopping with %d settles Redis never took: their spend and holds are lost", len(self._owed))
                self._owed.clear()
        self._closed = True
        await self.pipes.close()
        await self.clients.close()

    def owe(self, call: Prepared, more: tuple[Any, ...]) -> None:
        """Keep a settle that did not reach Redis, and send it again once Redis answers.

        Safe only for a settle that cannot count twice: one with a hold id (charge.lua remembers
        the ids it settled), or one that was never sent. The oldest go first past OWED_LIMIT.
        """
        if self._closed:  # the pipes' last calls, failed as they close: nobody is left to send them
            self._lose(1)
            return
        self._owed.append((call, more))
        if len(self._owed) > OWED_LIMIT:
            self._owed.popleft()
            self._lose(1)
            if self.given_up >= self._log_lost_at:
                self._log_lost_at = self.given_up + 1000
                log.error("%d settles given up: Redis has been away too long to keep them all", self.given_up)
        if self._repaying is None:
            self._repaying = asyncio.create_task(self._repay())

    def _lose(self, count: int) -> None:
        self.given_up += count
        if self._on_lost is not None:
            self._on_lost(count)

    async def _repay(self) -> None:
        """While anything is owed: every REPAY_EVERY_S, the oldest settle is sent (through the circuit,
        which makes it the probe once the cool-down is over); when Redis takes it, all the rest follow."""
        try:
            while self._owed:
                await asyncio.sleep(REPAY_EVERY_S)
                if self.circuit.ready():  # else nothing is sent, and nothing counted as a failure
                    with contextlib.suppress(LimiterFailure):
                        await self._repay_all()
        finally:
            self._repaying = None

    async def _repay_all(self) -> None:
        """Send what is owed, oldest first: one alone (the probe), then the rest a thousand at a time,
        until all is taken or Redis stops answering (LimiterFailure; what it did not take is still owed)."""
        size = 1
        while self._owed:
            batch = [self._owed.popleft() for _ in range(min(len(self._owed), size))]
            try:
                replies = await asyncio.gather(*(self.run(c, *m) for c, m in batch), return_exceptions=True)
            except asyncio.CancelledError:  # the worker stops: close() tries them once more
                self._owed.extendleft(reversed(batch))
                raise
            self._settle_replies(batch, replies)
            size = 1000

    def _settle_replies(self, batch: list[tuple[Prepared, tuple[Any, ...]]], replies: list[Any]) -> None:
        """Keep what Redis did not take, and stop. Given up: what Redis refused for good (a script error),
        and what may have run without a hold id to stop it counting twice (it was sent: not a CircuitOpen)."""
        again = []
        for entry, reply in zip(batch, replies, strict=True):
            if not isinstance(reply, BaseException):
                continue
            cause = reply.__cause__ if isinstance(reply, LimiterFailure) else reply
            if isinstance(cause, ResponseError) and str(cause).startswith(PERMANENT_ERRORS):
                log.error("an owed settle was refused by Redis and is given up: %s", failure_name(cause))
                self._lose(1)
            elif not _hold_id(entry[1]) and not isinstance(reply, CircuitOpen):
                self._lose(1)  # it may have run: sent again, it could count twice
            else:
                again.append(entry)  # LOADING, BUSY, a timeout...: Redis will take it later
        if again:
            self._owed.extendleft(reversed(again))
            raise LimiterFailure("Redis stopped answering while owed settles were sent")

    def in_background(self, settle: Awaitable[None]) -> None:
        """A settle nobody waits for; kept referenced until done, and awaited at close."""
        task = asyncio.ensure_future(settle)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def call(self, command: Awaitable[Any]) -> Any:
        """Await one Redis command within timeout_s; any failure becomes LimiterFailure.

        While the circuit is open the command is not sent at all.
        """
        return await self._guarded(command, timed=True)

    async def run(self, call: Prepared, *more: Any) -> Any:
        """One script call through the pipe (bounded there, not here), with the circuit and failures as in call()."""
        return await self._guarded(run_script(self.pipes, call, more), timed=False)

    async def _guarded(self, command: Awaitable[Any], timed: bool) -> Any:
        circuit = self.circuit
        if not circuit.allow():
            if inspect.iscoroutine(command):
                command.close()  # never sent: no "was never awaited" warning
            if self.on_error is not None:
                self.on_error()
            raise CircuitOpen("circuit open")
        try:
            if timed:
                async with asyncio.timeout(self.timeout_s):
                    result = await command
            else:
                result = await command
        except REDIS_ERRORS as exc:
            circuit.failure()
            if self.on_error is not None:
                self.on_error()
            raise LimiterFailure(failure_name(exc)) from exc
        except BaseException:
            circuit.abandon()
            raise
        circuit.success()
        return result

    async def admit(self, plan: Plan, wanted: tuple[int, ...] = (), hold_id: str = "") -> Admission:
        """Take from every bucket, and hold up to `wanted` of each budget, or take nothing.

        When the script was sent but its answer did not come back, each hold is
        "?": it may have been taken, and its settle finds it by id.
        """
        budgets = plan.budgets
        try:
            more = (*wanted, hold_id) if budgets else ()
            result: list[int] = await self.run(plan.call, *more)
            if result[0] == RELEASED:
                # Only an admission nobody waits for can meet its own settle; defensive all the same.
                raise LimiterFailure("the admission came after its settle")
        except LimiterFailure as exc:
            if self.settings.on_error == "deny":
                raise LimiterUnavailable("The rate limiter is unavailable; retry shortly.") from exc
            sent = not isinstance(exc, CircuitOpen)
            return Admission([], (UNKNOWN_HOLD if sent else "0",) * len(budgets))
        if result[0] == 1:
            return Admission(ratelimit_headers(plan, result), tuple(str(h) for h in result[3 : 3 + len(budgets)]))
        raise refusal(plan, result)

    async def settle(
        self, limits: KeyLimits, hold_id: str, held: tuple[str, ...], tokens: int, micros: int = 0
    ) -> None:
        """Count real usage after the answer and release the holds; buckets may go into debt."""
        # A failure is counted by on_error; the answer has already gone out, and a hold
        # that was not released expires.
        with contextlib.suppress(LimiterFailure):
            await self.run(limits.settle_call, max(tokens, 0), max(micros, 0), hold_id, *held)

    def settle_soon(
        self, limits: KeyLimits, hold_id: str, held: tuple[str, ...], tokens: int, micros: int
    ) -> asyncio.Future[Any] | None:
        """The same settle, queued now without a task of its own: it goes out with this tick's calls.

        Its outcome feeds the circuit and on_error as any call's does. None when it could not be
        queued (the circuit is open: it is owed, and sent once Redis answers again).
        """
        more = (max(tokens, 0), max(micros, 0), hold_id, *held)
        call = limits.settle_call
        if not self.circuit.allow():
            if self.on_error is not None:
                self.on_error()
            self.owe(call, more)  # never sent, so it cannot count twice
            return None
        pipe = self.pipes.now(call.slot)
        if pipe is None:  # cluster mode, before the slot map is read (no admission went before)
            self.in_background(self._settle_again(call, more))
            return None
        # Lazy: it goes out with the next admission's write, or within 10 ms. Calls keep their order
        # on the pipe, so this worker's next admission for the key still comes after it.
        future = pipe.call(call.pack(*more), lazy=True)
        future.add_done_callback(functools.partial(self._settled, call, more))
        return future

    def _settled(self, call: Prepared, more: tuple[Any, ...], future: asyncio.Future[Any]) -> None:
        if future.cancelled():
            self.circuit.abandon()
            self._owe_if_safe(call, more)
            return
        failure = future.exception()
        reply = future.result() if failure is None else failure
        if asks_again(reply):
            # Redis answered: it lost its scripts in a restart, or (Redis Cluster) the slot moved.
            # Load the script or follow the slot, and settle again.
            self.circuit.success()
            self.in_background(self._settle_again(call, more))
        elif isinstance(reply, REDIS_ERRORS):
            self.circuit.failure()
            if self.on_error is not None:
                self.on_error()
            self._owe_if_safe(call, more)
        else:
            self.circuit.success()

    def _owe_if_safe(self, call: Prepared, more: tuple[Any, ...]) -> None:
        """A settle that may or may not have run: sent again only if it carries a hold id (charge.lua
        counts an id once). One without (a key with no budget) may have been counted: it is not."""
        if _hold_id(more):
            self.owe(call, more)

    async def _settle_again(self, call: Prepared, more: tuple[Any, ...]) -> None:
        try:
            await self.run(call, *more)
        except LimiterFailure as exc:
            if _hold_id(more) or isinstance(exc, CircuitOpen):
                self.owe(call, more)

    async def ping(self) -> str | None:
        """None when Redis answers (in cluster mode, every primary), else the reason."""
        try:
            await self.call(self.clients.ping(self.timeout_s * 0.8))  # a silent primary is named before call() gives up
        except LimiterFailure as exc:
            return f"redis: {exc.__cause__ if isinstance(exc.__cause__, PrimaryDown) else exc}"
        return None


def _hold_id(settle_args: tuple[Any, ...]) -> str:
    """The hold id among a settle's own arguments (tokens, micros, hold id, what each budget held)."""
    hold_id: str = settle_args[2]
    return hold_id


class Settlement:
    """One request's holds on its key's budgets, from admission to its one settle.

    `admit` takes the holds with the admission. The first `settle` counts the
    real usage and releases the holds, queued while the answer's last bytes go
    out: this worker sends it before any later admission of the key. `close`,
    in the request's one `finally`, settles with nothing billed when no usage
    came (an upstream failure, a client gone). A hold whose admission never
    answered (a timeout, a client gone while Redis was slow) may still have
    been taken: its settle finds it by id.
    """

    __slots__ = ("_held", "_hold_id", "_limiter", "_limits", "_sent")

    def __init__(self, limiter: Limiter, limits: KeyLimits) -> None:
        self._limiter = limiter
        self._limits = limits
        self._hold_id = ""
        self._held = limits.nothing_held  # per budget, what the settle releases
        self._sent = False

    async def admit(self, plan: Plan, hold_tokens: int, hold_micros: int) -> list[Header]:
        """Admission, with holds if the key has budgets; returns the x-ratelimit-* headers."""
        wanted: tuple[int, ...] = ()
        if plan.budgets:
            self._hold_id = self._limiter.hold_ids.next()
            # Until Redis answers, it may hold something under this id.
            self._held = (UNKNOWN_HOLD,) * len(plan.budgets)
            wanted = tuple(hold_micros if b.in_money else hold_tokens for b in plan.budgets)
        try:
            admission = await self._limiter.admit(plan, wanted, self._hold_id)
        except (RateLimited, InsufficientQuota):
            self._held = self._limits.nothing_held  # refused: the script took nothing
            raise
        except LimiterUnavailable as exc:
            if isinstance(exc.__cause__, CircuitOpen):
                self._held = self._limits.nothing_held  # never sent
            raise
        self._held = admission.held
        return admission.headers

    def settle(self, tokens: int, micros: int = 0) -> None:
        """Queue the one settle; nobody waits for it (the answer is out), and the pipe sends it in order."""
        if self._sent:
            return
        held = self._held != self._limits.nothing_held
        if held or tokens > 0 or micros > 0:
            self._sent = True
            # The hold id goes even with nothing held (admitted unchecked while Redis was away): it is what
            # makes the settle count once if it has to be sent again.
            self._limiter.settle_soon(self._limits, self._hold_id, self._held, tokens, micros)

    def close(self) -> None:
        """In the request's one `finally`: settle with nothing billed if no usage came."""
        self.settle(0)
