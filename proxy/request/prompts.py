"""What a request's prompt may cost, read from its body before it is sent: the bound a budget holds."""

from __future__ import annotations

from typing import Any

# What a provider adds around each message, content part or tool beyond their text: OpenAI's chat
# format puts 3-4 special tokens around a message and renders a tool's schema with a few words of
# syntax per parameter. Counted per JSON object or array of the body, which is at least that often.
STRUCTURE_TOKENS = 4
BASE_TOKENS = 16  # the tokens that start the answer, and slack
# A request whose prompt lives at the provider (a Responses API conversation continued by id, a stored
# prompt, an uploaded file) has no bound in its body: it holds all that is left of a budget.
SERVER_SIDE_CONTEXT = ("previous_response_id", "conversation")
UNBOUNDED_TOKENS = 10**12


def prompt_bound(payload: Any) -> int:
    """An upper bound of the prompt tokens any provider's tokenizer can count for this body.

    Every token is at least one byte of UTF-8 text, so the bytes of the text bound the tokens made
    of it: every string of the body counts (keys too, since a tool's parameter names are rendered
    into the prompt; the few that are settings, such as "model", only add slack), numbers as their
    digits, and each object or array STRUCTURE_TOKENS. Not an average (bytes / 4 is one for English
    and too low for code, CJK or emoji): what a budget holds must cover what the answer can cost.
    Images and audio given by URL are the exception: their tokens come from pixels and seconds.
    A prompt kept at the provider (SERVER_SIDE_CONTEXT, a stored prompt, a file by id) is unbounded.
    """
    if isinstance(payload, dict) and (
        any(payload.get(name) for name in SERVER_SIDE_CONTEXT) or isinstance(payload.get("prompt"), dict)
    ):
        return UNBOUNDED_TOKENS
    total = BASE_TOKENS
    stack = [payload]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            total += len(value) if value.isascii() else len(value.encode())
        elif isinstance(value, dict):
            total += STRUCTURE_TOKENS
            for key, item in value.items():
                if key == "file_id":
                    return UNBOUNDED_TOKENS
                total += len(key) if key.isascii() else len(key.encode())
                if isinstance(item, str):  # most values: no trip through the stack
                    total += len(item) if item.isascii() else len(item.encode())
                else:
                    stack.append(item)
        elif isinstance(value, list):
            total += STRUCTURE_TOKENS
            stack.extend(value)
        elif value is not None:
            total += len(str(value))
    return total
