"""What a load run sends: the endpoint's path and the request bodies, built once before the run."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

ENDPOINTS = {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings"}
SYNTHETIC_BODIES = 64  # distinct synthetic prompts, so a provider's prefix cache cannot serve them all
VOCABULARY = (  # words of about one token each
    "the quick brown fox jumps over a lazy dog while seven wise owls watch from old oak trees near green hills "
    "and blue rivers under bright summer skies"
)
WORDS = VOCABULARY.split()


class WorkloadError(ValueError):
    """A prompts file that cannot be used; the message names the line."""


@dataclass(frozen=True, kw_only=True)
class Workload:
    endpoint: str  # a key of ENDPOINTS
    model: str
    stream: bool
    max_tokens: int | None
    bodies: tuple[bytes, ...]

    @property
    def path(self) -> str:
        return ENDPOINTS[self.endpoint]


def synthetic_prompts(input_tokens: int, seed: int = 7) -> list[str]:
    """Prompts of about `input_tokens` tokens each (one common English word is about one token)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(max(1, input_tokens))) for _ in range(SYNTHETIC_BODIES)]


def prompts_file(path: Path) -> list[list[dict[str, Any]]]:
    """The conversations of a JSONL file: each line {"messages": [...]}, {"prompt": "..."} or a list of messages."""
    conversations: list[list[dict[str, Any]]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise WorkloadError(f"cannot read prompts file {path}: {exc.strerror}") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise WorkloadError(f"{path}:{number}: not JSON ({exc})") from exc
        if isinstance(item, dict) and isinstance(item.get("prompt"), str):
            item = [{"role": "user", "content": item["prompt"]}]
        elif isinstance(item, dict):
            item = item.get("messages")
        if not (isinstance(item, list) and item and all(isinstance(m, dict) and "content" in m for m in item)):
            raise WorkloadError(f'{path}:{number}: expected {{"messages": [...]}}, {{"prompt": "..."}} or a list')
        conversations.append(item)
    if not conversations:
        raise WorkloadError(f"{path}: no prompts in the file")
    return conversations


def build(
    *, endpoint: str, model: str, stream: bool, max_tokens: int | None, input_tokens: int, prompts: Path | None
) -> Workload:
    conversations = (
        prompts_file(prompts)
        if prompts is not None
        else [[{"role": "user", "content": text}] for text in synthetic_prompts(input_tokens)]
    )
    bodies = []
    for messages in conversations:
        body: dict[str, Any] = {"model": model}
        if endpoint == "chat":
            body["messages"] = messages
        else:
            text = "\n".join(str(m["content"]) for m in messages)
            body["input" if endpoint == "embeddings" else "prompt"] = text
        if endpoint != "embeddings":
            if max_tokens is not None:
                body["max_tokens"] = max_tokens
            if stream:
                body["stream"] = True
                body["stream_options"] = {"include_usage": True}
        bodies.append(orjson.dumps(body))
    return Workload(
        endpoint=endpoint, model=model, stream=stream and endpoint != "embeddings", max_tokens=max_tokens,
        bodies=tuple(bodies),
    )  # fmt: skip
