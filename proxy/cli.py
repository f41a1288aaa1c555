"""Entry points: argument parsing, hypercorn start, key and config commands."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from .admin import keys_new, keys_usage, search_file, search_redis
from .bench import command as bench_command
from .demo import DemoOptions, run_demo, with_demo_key
from .limit_kinds import kinds_for
from .listen import BindError
from .mock_upstream import MockOptions, run_mock
from .server import serve
from .settings import ConfigError, Settings, config_path, load_settings


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _bind(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT with a port from 0 to 65535, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected names separated by commas, got {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluicegate", description="OpenAI-compatible LLM API gateway")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the gateway under hypercorn")
    p.add_argument("--config", help="TOML config (default: $SLUICEGATE_CONFIG or config/gateway.toml)")
    p.add_argument("--bind", type=_bind, help="HOST:PORT (overrides server.bind and $SLUICEGATE_BIND)")
    p.add_argument("--workers", type=_positive, default=1, help="worker processes (default 1)")

    p = sub.add_parser("check-config", help="validate a config file; exit 2 listing every problem")
    p.add_argument("--config")

    keys = sub.add_parser("keys", help="key management").add_subparsers(dest="keys_command", required=True)
    p = keys.add_parser("new", help="print a fresh key once, and the [[keys]] block that stores its sha256")
    p.add_argument("--name", required=True)
    p.add_argument("--group")
    for kind in kinds_for("key"):
        p.add_argument("--" + kind.name.replace("_", "-"), type=_positive)
    p.add_argument("--models", help="comma-separated model names or globs")
    p = keys.add_parser("usage", help="what each key has spent and holds of its budget, and its bucket levels")
    p.add_argument("--config")
    p.add_argument("--name", help="only this key")

    p = sub.add_parser("events", help="find the event record of a request id (from the file or Redis sink)")
    p.add_argument("--request-id", required=True)
    p.add_argument("--config")
    p.add_argument("--file", help="an events JSONL file (default: the config's [events] path or Redis stream)")

    p = sub.add_parser("mock-upstream", help="a built-in OpenAI-compatible fake LLM")
    p.add_argument("--bind", type=_bind, default=("127.0.0.1", 8001), help="HOST:PORT (default 127.0.0.1:8001)")
    p.add_argument("--chunks", type=_positive, default=8)
    p.add_argument("--chunk-delay-ms", type=float, default=20.0)
    p.add_argument("--ttfb-ms", type=float, default=0.0)
    p.add_argument("--name", default="mock", help="shows in answers, to tell several mocks apart")
    p.add_argument("--api-key-env", help="require 'Authorization: Bearer $VAR' on every request")
    p.add_argument(
        "--models", type=_names, default=MockOptions.models, help="what GET /v1/models lists, comma-separated"
    )

    bench_command.add_parser(sub, _positive)

    p = sub.add_parser("demo", help="run the mock upstream and the gateway together with a fresh demo key")
    p.add_argument("--config", default="config/demo.toml")
    p.add_argument("--bind", type=_bind, help="the gateway's HOST:PORT (default: the config's server.bind)")
    p.add_argument("--mock-bind", type=_bind, help="the mock's HOST:PORT (default: its provider's base_url)")
    return parser


NO_KEYS = "no [[keys]]: every request will be refused with 401 (`sluicegate keys new` makes one)"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _print_events(lines: list[bytes], code: int) -> int:
    out = sys.stdout.buffer if code == 0 else sys.stderr.buffer
    out.write(b"".join(line + b"\n" for line in lines) or b"no event record with that request id\n")
    out.flush()
    return code


def _events_elsewhere(settings: Settings) -> str | None:
    """Why `events` has nothing to search with this config, if so."""
    sink = settings.events.sink
    if sink == "stdout":
        return (
            f'{settings.source} writes event records to stdout ([events] sink = "stdout"): they are in the '
            "gateway's output (its terminal or journal); save that to a file and search it with --file PATH"
        )
    if sink == "off":
        return f'{settings.source} writes no event records ([events] sink = "off")'
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except BindError as exc:
        print(f"sluicegate {args.command}: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "keys" and args.keys_command == "new":
        try:
            sys.stdout.write(keys_new(args))
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 2
        return 0
    if args.command == "bench":
        return bench_command.main(args)
    if args.command == "mock-upstream":
        host, port = args.bind
        run_mock(
            MockOptions(
                host=host, port=port, chunks=args.chunks, chunk_delay_ms=args.chunk_delay_ms,
                ttfb_ms=args.ttfb_ms, name=args.name, models=args.models,
                api_key=os.environ.get(args.api_key_env) if args.api_key_env else None,
            )
        )  # fmt: skip
        return 0
    path = config_path(getattr(args, "config", None))
    if args.command == "events" and args.file:
        return _print_events(*search_file(args.file, args.request_id))
    try:
        settings = load_settings(path)
        if args.command == "keys":
            settings = with_demo_key(settings)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    if args.command == "check-config":
        for warning in settings.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        if not settings.keys:
            print(f"warning: {NO_KEYS}", file=sys.stderr)
        print(f"{path}: ok ({plural(len(settings.providers), 'provider')}, {plural(len(settings.keys), 'key')})")
        return 0
    if args.command == "events":
        elsewhere = _events_elsewhere(settings)
        if elsewhere is not None:
            print(elsewhere, file=sys.stderr)
            return 2
        if settings.events.sink == "redis":
            return _print_events(*asyncio.run(search_redis(settings, args.request_id)))
        return _print_events(*search_file(settings.events.path, args.request_id))
    if args.command == "keys":
        lines, code = asyncio.run(keys_usage(settings, args.name))
        print("\n".join(lines), file=sys.stdout if code == 0 else sys.stderr)
        return code
    if args.command == "demo":
        asyncio.run(run_demo(settings, DemoOptions(config=path, bind=args.bind, mock_bind=args.mock_bind)))
        return 0
    if not settings.keys:
        logging.getLogger("sluicegate").warning(NO_KEYS)
    return serve(settings, args.bind, args.workers)
