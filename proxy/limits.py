"""Token buckets and budgets in Redis: one Lua script per decision.

Everything that does not change between requests (Redis key names, script
arguments, header names) is built once per config in `KeyLimits`; a request
costs one EVALSHA before the upstream call (when its key has limits) and one
after the answer, which counts what every key spends.

A budget is held, not just checked: admission holds what the request may use,
and the answer's settle charges the real usage and releases the hold, so
concurrent requests cannot all pass a check that only one of them could.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import itertools
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError

from .errors import Header, InsufficientQuota, LimiterUnavailable, RateLimited
from .limit_kinds import BUCKET_KINDS, BUDGET_KINDS, Counts, LimitKind, Scope
from .redis_clients import failure_name, open_clients
from .redis_cluster import ASKING, PrimaryDown, redirection
from .redis_pipe import Prepared, Script, pack_command
from .settings import GroupSettings, KeySettings, LimitSettings, RedisSettings

log = logging.getLogger("sluicegate")

_MONTH_LUA = files("proxy").joinpath("month.lua").read_text()  # month_of(), shared by both scripts
ADMIT = Script(_MONTH_LUA + files("proxy").joinpath("token_bucket.lua").read_text())
SETTLE = Script(_MONTH_LUA + files("proxy").joinpath("charge.lua").read_text())
REDIS_ERRORS = (RedisError, RedisClusterException, OSError, TimeoutError)  # the cluster's: no node reachable
UNKNOWN_HOLD = "?"  # a hold whose amount admission never heard back (charge.lua finds it by id)
RELEASED = -3  # token_bucket.lua's verdict for an admission that arrived after its request's settle
# How long Redis remembers a settled hold id (charge.lua): a settle sent again, or an admission that comes
# after its settle, within this long does nothing. Both follow a Redis stall by seconds, not minutes.
SETTLED_MEMORY_S = 120.0
OWED_LIMIT = 100_000  # settles kept for when Redis answers again; past this the oldest are given up
# Error replies that mean the call itself is wrong (a script error): sending it again would never help.
# Others (LOADING after a restart, BUSY, OOM, MASTERDOWN, READONLY in a failover) pass.
PERMANENT_ERRORS = ("ERR", "WRONGTYPE")
REPAY_EVERY_S = 0.5  # how often owed settles are tried while Redis does not answer
MICROS = 1_000_000  # money is counted in micro-units of the currency, as integers, to stay exact
MAX_TRIES = 4  # one script load, one redirection, TRYAGAINs of a slot half-way through a migration
TRYAGAIN_S = 0.02
HELD_WAIT_MS = 1000  # a settle frees held tokens within about an answer's time: ask again soon
HELD_HEADERS: tuple[Header, ...] = (
    (b"retry-after", str(math.ceil(HELD_WAIT_MS / 1000)).encode()),
    (b"retry-after-ms", str(HELD_WAIT_MS).encode()),
)


class LimiterFailure(Exception):
    """Redis did not answer in time or at all, or the circuit is open."""


class CircuitOpen(LimiterFailure):
    """The command was not sent: Redis has failed too often in a row (see Circuit)."""


class Circuit:
    """Stops requests from waiting on a Redis that keeps failing.

    Closed: every call goes to Redis. After `threshold` consecutive failures it
    opens: for `cooldown_s` no call is made and the caller's on_error applies at
    once. Then one call goes through as a probe (the others still fail fast);
    its success closes the circuit, its failure opens it for another cool-down.
    """

    def __init__(self, threshold: int, cooldown_s: float, on_change: Callable[[bool], object] | None = None) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.on_change = on_change
        self.failures = 0
        self.open_until = 0.0  # time.monotonic()
        self.probing = False

    @property
    def is_open(self) -> bool:
        return self.failures >= self.threshold

    def allow(self) -> bool:
        if self.failures < self.threshold:
            return True
        if self.probing or time.monotonic() < self.open_until:
            return False
        self.probing = True
        return True

    def success(self) -> None:
        if self.failures:
            was_open = self.is_open
            self.failures = 0
            self.probing = False
            if was_open and self.on_change is not None:
                self.on_change(False)

    def failure(self) -> None:
        was_open = self.is_open
        self.failures += 1
        self.probing = False
        if self.is_open:
            self.open_until = time.monotonic() + self.cooldown_s
            if not was_open and self.on_change is not None:
                self.on_change(True)

    def ready(self) -> bool:
        """Whether allow() would let a call through now; nothing changes."""
        return self.failures < self.threshold or (not self.probing and time.monotonic() >= self.open_until)

    def abandon(self) -> None:
        """A call ended without an answer either way (its request was cancelled): free the probe slot."""
        self.probing = False


@dataclass(frozen=True, slots=True)
class Bucket:
    redis_key: str
    scope: Scope
    owner: str
    kind: LimitKind
    per_minute: int
    capacity: int

    @property
    def rate_per_s(self) -> float:
        return self.per_minute / 60.0

    @property
    def at_admission(self) -> bool:
        """Taken from when the request is admitted (one request), rather than charged after the answer."""
        return self.kind.counts is Counts.REQUESTS

    def describe(self) -> str:
        return f"{self.kind.name} limit of {self.scope} '{self.owner}' ({self.per_minute} per minute)"


def key_prefix(key: KeySettings) -> str:
    # The group is the hash tag, so one decision's keys share a Redis Cluster slot.
    return f"sg:{{g:{key.group}}}:k:{key.name}"


def group_prefix(group: str) -> str:
    return f"sg:{{g:{group}}}:g"


def settled_key(key: KeySettings) -> str:
    """The hold ids the key's settles counted lately (charge.lua), so none counts twice."""
    return key_prefix(key) + ":settled"


def budget_keys(key: KeySettings) -> tuple[str, str, str]:
    """The spent tokens, the holds (a ZSET of "id:tokens" scored by expiry in ms) and the total they hold."""
    prefix = key_prefix(key)
    return prefix + ":spent", prefix + ":holds", prefix + ":held"


def money_keys(prefix: str) -> tuple[str, str, str]:
    """The spent money (a hash of micro-units: total, month, period), its holds and the total they hold."""
    return prefix + ":money", prefix + ":money_holds", prefix + ":money_held"


def limit_sources(
    key: KeySettings, group: GroupSettings
) -> tuple[tuple[Scope, str, KeySettings | GroupSettings, str], ...]:
    """Where a request's limits come from: (scope, owner's name, its settings, its Redis key prefix)."""
    return (("key", key.name, key, key_prefix(key)), ("group", group.name, group, group_prefix(group.name)))


def buckets_for(key: KeySettings, group: GroupSettings) -> tuple[Bucket, ...]:
    found: list[Bucket] = []
    sources = limit_sources(key, group)
    for scope, owner, source, prefix in sources:
        for kind in BUCKET_KINDS:
            value = source.limit(kind) if scope in kind.scopes else None
            if value is not None:
                per_minute = int(value)  # the config reads bucket kinds as whole numbers
                burst = getattr(source, kind.burst_key) if kind.burst_key is not None else None
                capacity = burst if burst is not None else per_minute
                found.append(Bucket(f"{prefix}:{kind.name}", scope, owner, kind, per_minute, capacity))
    return tuple(found)


@dataclass(frozen=True, slots=True)
class Budget:
    """A total a request holds from at admission and its answer spends: a key's tokens, a key's or group's money."""

    kind: LimitKind
    scope: Scope
    owner: str
    amount: int  # tokens, or micro-units of the currency
    keys: tuple[str, str, str]  # what is spent, the holds, the total they hold
    counted: str  # what of keys[0] counts: "" the counter; "total" or "month" of a money hash

    @property
    def in_money(self) -> bool:
        return self.kind.counts is Counts.MONEY


def budgets_for(key: KeySettings, group: GroupSettings) -> tuple[Budget, ...]:
    found: list[Budget] = []
    sources = limit_sources(key, group)
    for scope, owner, source, prefix in sources:
        for kind in BUDGET_KINDS:
            amount = source.limit(kind) if scope in kind.scopes else None
            if amount is None:
                continue
            if kind.counts is Counts.MONEY:
                counted = "month" if kind.period_key and getattr(source, kind.period_key) == "month" else "total"
                found.append(Budget(kind, scope, owner, to_micros(amount), money_keys(prefix), counted))
            else:
                found.append(Budget(kind, scope, owner, int(amount), budget_keys(key), ""))
    return tuple(found)


def to_micros(amount: float) -> int:
    return round(amount * MICROS)


@dataclass(frozen=True, slots=True)
class Plan:
    """The admit script call for one kind of request, precomputed.

    With budgets, a request adds what it would hold of each and its hold id to `args`.
    """

    buckets: tuple[Bucket, ...]
    budgets: tuple[Budget, ...]
    keys: tuple[str, ...]
    args: tuple[Any, ...]
    call: Prepared  # the EVALSHA, packed once
    top_up: str = ""  # [limits] budget_message, for a spent budget's 402
    # Per bucket kind with buckets here: its three x-ratelimit-* names, and (index, limit as text) of each bucket.
    header_rows: tuple[tuple[tuple[bytes, bytes, bytes], tuple[tuple[int, bytes], ...]], ...] = ()
    money_scope: Scope | None = None  # whose budget in money this request draws on, if any: "key" before "group"

    @property
    def budgeted(self) -> bool:
        return bool(self.budgets)

    @classmethod
    def build(
        cls, buckets: tuple[Bucket, ...], budgets: tuple[Budget, ...], limits: LimitSettings, settled: str = ""
    ) -> Plan:
        """settled: with budgets, the key's settled hold ids (settled_key), which an admission checks first."""
        args: list[Any] = [len(buckets), len(budgets), math.ceil(limits.hold_ttl_s * 1000), limits.clock_offset_s]
        for b in buckets:
            args += [b.capacity, b.rate_per_s, 1 if b.at_admission else 0]
        for budget in budgets:
            args += [budget.amount, budget.counted]
        keys = [b.redis_key for b in buckets] + [k for budget in budgets for k in budget.keys]
        if budgets:
            keys.append(settled)
        call = Prepared(ADMIT, keys, args, more=len(budgets) + 1 if budgets else 0)
        rows = []
        for kind in BUCKET_KINDS:
            members = tuple((i, str(b.per_minute).encode()) for i, b in enumerate(buckets) if b.kind is kind)
            if members:
                label = kind.header
                names = (
                    b"x-ratelimit-limit-" + label,
                    b"x-ratelimit-remaining-" + label,
                    b"x-ratelimit-reset-" + label,
                )
                rows.append((names, members))
        money = next((b.scope for b in budgets if b.in_money), None)
        return cls(buckets, budgets, tuple(keys), tuple(args), call, limits.budget_message, tuple(rows), money)


@dataclass(frozen=True, slots=True)
class KeyLimits:
    key: KeySettings
    model: Plan | None  # chat, completions, embeddings: every bucket, the budgets
    passthrough: Plan | None  # other routes: the buckets taken at admission (rpm) and the budgets
    reserve_tokens: int  # held of a budget for a completion of unknown length
    budgets: tuple[Budget, ...]
    token_buckets: tuple[Bucket, ...]  # charged from the answer's usage
    charge_keys: tuple[str, ...]
    charge_args: tuple[Any, ...]  # a settle adds the usage, the hold id and what each budget held
    settle_call: Prepared  # the EVALSHA, packed once

    @classmethod
    def build(cls, key: KeySettings, group: GroupSettings, limits: LimitSettings) -> KeyLimits:
        buckets = buckets_for(key, group)
        budgets = budgets_for(key, group)
        admitted = tuple(b for b in buckets if b.at_admission)
        charged = tuple(b for b in buckets if not b.at_admission)
        args: list[Any] = [len(charged), len(budgets), limits.clock_offset_s, math.ceil(SETTLED_MEMORY_S * 1000)]
        for b in charged:
            args += [b.capacity, b.rate_per_s]
        # Spending is counted for every key, so `keys usage` and the billing routes show it without a budget too.
        spent = (budget_keys(key)[0], money_keys(key_prefix(key))[0], money_keys(group_prefix(group.name))[0])
        settled = settled_key(key)
        charge_keys = (
            *(b.redis_key for b in charged),
            *spent,
            *(k for budget in budgets for k in budget.keys[1:]),
            *((settled,) if budgets else ()),
        )
        return cls(
            key=key,
            model=Plan.build(buckets, budgets, limits, settled) if buckets or budgets else None,
            passthrough=Plan.build(admitted, budgets, limits, settled) if admitted or budgets else None,
            reserve_tokens=limits.reserve_tokens,
            budgets=budgets,
            token_buckets=charged,
            charge_keys=charge_keys,
            charge_args=tuple(args),
            settle_call=Prepared(SETTLE, charge_keys, args, more=3 + len(budgets)),
        )

    @property
    def nothing_held(self) -> tuple[str, ...]:
        return ("0",) * len(self.budgets)


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


def format_duration(ms: int) -> str:
    """OpenAI's style for x-ratelimit-reset-*: 20ms, 1s, 6m0s, 1h2m3s."""
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    seconds = math.ceil(ms / 1000)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{seconds}s"
    if minutes:
        return f"{minutes}m{seconds}s"
    return f"{seconds}s"


def ratelimit_headers(plan: Plan, result: list[int]) -> list[Header]:
    """The tightest bucket of each kind speaks for it."""
    headers: list[Header] = []
    first = 3 + len(plan.budgets)  # the levels follow the verdict, the refusal, the wait and the holds
    for (limit_name, remaining_name, reset_name), members in plan.header_rows:
        tightest: tuple[bytes, int, int] | None = None
        for i, limit in members:
            level = result[first + 2 * i]
            if tightest is None or level < tightest[1]:
                tightest = (limit, level, result[first + 1 + 2 * i])
        if tightest is not None:
            limit, level, reset_ms = tightest
            headers += [
                (limit_name, limit),
                (remaining_name, str(max(level, 0)).encode()),
                (reset_name, format_duration(reset_ms).encode()),
            ]
    return headers


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
        return await self._guarded(self._eval(call, more), timed=False)

    async def _eval(self, call: Prepared, more: tuple[Any, ...]) -> Any:
        packed = call.pack(*more)
        pipe = await self.pipes.route(call.slot)
        asking = loaded = False
        for _ in range(MAX_TRIES):
            if asking:
                # ASKING lets the node importing the slot serve the one command right after it on this connection.
                _, reply = await asyncio.gather(pipe.call(ASKING), pipe.call(packed))
            else:
                reply = await pipe.call(packed)
            if isinstance(reply, NoScriptError) and not loaded:
                # A Redis restarted or flushed since the script was last loaded: load it and ask again.
                loaded = True
                await pipe.call(pack_command(b"SCRIPT", b"LOAD", call.script.source.encode()))
            elif isinstance(reply, ResponseError) and (to := redirection(reply)) is not None:
                # Redis Cluster: the slot moved (MOVED) or is moving (ASK); ask the node it names.
                pipe, asking = await self.pipes.redirected(to), to.asking
            elif isinstance(reply, ResponseError) and str(reply).startswith("TRYAGAIN"):
                # The slot is half-way through a migration: its keys are on two nodes for a moment.
                await asyncio.sleep(TRYAGAIN_S)
            else:
                break
        if isinstance(reply, ResponseError):
            raise reply
        return reply

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
        verdict, worst, wait_ms = result[0], result[1], result[2]
        if verdict == 1:
            return Admission(ratelimit_headers(plan, result), tuple(str(h) for h in result[3 : 3 + len(budgets)]))
        if verdict == -1:
            budget = budgets[worst - 1]
            message = budget.kind.spent_message(budget.scope, plan.top_up)
            raise InsufficientQuota(message, headers=((b"x-should-retry", b"false"),))
        if verdict == -2:
            budget = budgets[worst - 1]
            raise RateLimited(
                budget.kind.held_message(budget.scope, format_duration(HELD_WAIT_MS)),
                headers=HELD_HEADERS,
                scope=budget.scope,
                limit=budget.kind.limit_label,
            )
        bucket = plan.buckets[worst - 1]
        headers = [
            (b"retry-after", str(max(1, math.ceil(wait_ms / 1000))).encode()),
            (b"retry-after-ms", str(wait_ms).encode()),
            *ratelimit_headers(plan, result),
        ]
        raise RateLimited(
            f"Rate limit reached: the {bucket.describe()} is used up. Retry in {format_duration(wait_ms)}.",
            headers=headers,
            scope=bucket.scope,
            limit=bucket.kind.limit_label,
        )

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
        if isinstance(reply, NoScriptError) or (isinstance(reply, ResponseError) and redirection(reply)):
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
