"""The answer's state machine: the exact messages sent, the moves refused, the answers left unfinished."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from proxy.records.metrics import Metrics
from proxy.records.record import RequestRecord
from proxy.request.exchange import AnswerState, Exchange, UnexpectedMessage

Message = dict[str, Any]
START = {"type": "http.response.start", "status": 200, "headers": [(b"x-request-id", b"req-1")]}


def exchange() -> tuple[Exchange, list[Message]]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    record = RequestRecord.start("req-1", "POST")
    ex = Exchange(send, record, [(b"x-request-id", b"req-1")], Metrics().active_streams)  # type: ignore[arg-type]
    return ex, sent


async def test_an_answer_starts_goes_on_and_ends() -> None:
    ex, sent = exchange()
    assert ex.state is AnswerState.REQUEST
    await ex.start(200, [])
    assert ex.state is AnswerState.RESPONSE
    await ex.body(b"data: 1\n\n")
    await ex.body(b"data: 2\n\n")
    assert ex.state is AnswerState.RESPONSE
    await ex.end(b"")
    assert ex.state is AnswerState.CLOSED
    assert sent == [
        START,
        {"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True},
        {"type": "http.response.body", "body": b"data: 2\n\n", "more_body": True},
        {"type": "http.response.body", "body": b"", "more_body": False},
    ]
    assert ex.record.status == 200
    assert ex.record.first_byte_at is not None


async def test_respond_is_one_start_and_one_last_body() -> None:
    ex, sent = exchange()
    await ex.respond(201, [(b"content-type", b"text/plain")], b"made")
    assert sent == [
        {
            "type": "http.response.start",
            "status": 201,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"4"), (b"x-request-id", b"req-1")],
        },
        {"type": "http.response.body", "body": b"made", "more_body": False},
    ]
    assert ex.state is AnswerState.CLOSED


Step = Callable[[Exchange], Awaitable[None]]


async def cut(ex: Exchange) -> None:
    ex.cut()


async def start(ex: Exchange) -> None:
    await ex.start(200, [])


async def body(ex: Exchange) -> None:
    await ex.body(b"more")


async def end(ex: Exchange) -> None:
    await ex.end(b"last")


@pytest.mark.parametrize(
    ("before", "move", "message"),
    [
        ([], body, "Expected http.response.start, but got http.response.body."),
        ([], end, "Expected http.response.start, but got the last http.response.body."),
        ([], cut, "Expected http.response.start, but got a cut."),
        ([start], start, "Expected http.response.body, but got http.response.start."),
        ([start, end], body, "Expected nothing more (the answer has ended), but got http.response.body."),
        ([start, end], end, "Expected nothing more (the answer has ended), but got the last http.response.body."),
        ([start, end], start, "Expected nothing more (the answer has ended), but got http.response.start."),
        ([start, cut], body, "Expected nothing more (the answer was cut off), but got http.response.body."),
        ([start, cut], end, "Expected nothing more (the answer was cut off), but got the last http.response.body."),
    ],
    ids=[
        "body-before-start", "end-before-start", "cut-before-start", "start-twice", "body-after-end",
        "end-twice", "start-after-end", "body-after-cut", "end-after-cut",
    ],
)  # fmt: skip
async def test_a_move_the_state_does_not_allow_raises_and_sends_nothing(
    before: list[Step], move: Step, message: str
) -> None:
    ex, sent = exchange()
    for step in before:
        await step(ex)
    state, sent_before = ex.state, list(sent)
    with pytest.raises(UnexpectedMessage) as info:
        await move(ex)
    assert str(info.value) == message
    assert (ex.state, sent) == (state, sent_before)


@pytest.mark.parametrize(
    ("steps", "client_left", "warning"),
    [
        ([], False, "request req-1 ended without an answer"),
        ([start], False, "request req-1 ended with its answer half-sent"),
        ([start, body], False, "request req-1 ended with its answer half-sent"),
        # A client that left had nowhere to take the rest: not a fault of ours, no noise.
        ([], True, None),
        ([start, body], True, None),
        ([start, end], False, None),
        ([start, body, end], True, None),
        # Broken off on purpose (a provider failed mid-way in a body that cannot carry an error).
        ([start, body, cut], False, None),
    ],
)
async def test_an_answer_left_unfinished_is_logged_once(
    steps: list[Step], client_left: bool, warning: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    ex, _ = exchange()
    for step in steps:
        await step(ex)
    ex.record.client_disconnected = client_left
    with caplog.at_level("WARNING", logger="sluicegate"):
        ex.check_ended()
    assert [r.getMessage() for r in caplog.records] == ([] if warning is None else [warning])
    assert all(r.levelname == "WARNING" for r in caplog.records)
