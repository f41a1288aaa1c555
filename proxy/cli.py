"""Entry points: argument parsing, hypercorn start, key and config commands."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from .config.limit_kinds import LimitKind, Shape, kinds_for
from .config.settings import ConfigError, Settings, config_path, load_settings
from .devtools.bench import command as bench_command
from .devtools.demo import DemoOptions, run_demo, with_demo_key
from .devtools.mock_upstream import MockOptions, run_mock
from .http.listen import BindError
from .ops.admin import keys_new, keys_usage, search_file, search_redis
from .server import serve


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


CONFIG_HELP = "TOML config file (default: $SLUICEGATE_CONFIG, else config/gateway.toml)"


def _command(sub: Any, name: str, *, summary: str, description: str, example: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=summary,
        description=description,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def _limit_help(kind: LimitKind) -> str:
    if kind.shape is Shape.BUCKET:
        return f"{kind.unit} per minute for this key (default: no limit)"
    return f"lifetime total of {kind.unit}; once spent, 402 insufficient_quota (default: no budget)"


def _name_choices(sub: Any) -> None:
    """A missing subcommand is reported as '{a,b}' rather than as the attribute it is stored in."""
    sub.metavar = "{" + ",".join(sub.choices) + "}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sluicegate",
        description="OpenAI-compatible LLM API gateway. `sluicegate COMMAND --help` explains a command.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = _command(
        sub,
        "serve",
        summary="run the gateway under hypercorn",
        description="Run the gateway. SIGTERM drains and stops, SIGHUP reloads the config file.",
        example="sluicegate serve --config config/gateway.toml --bind 127.0.0.1:9090 --workers 2",
    )
    p.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    p.add_argument(
        "--bind",
        type=_bind,
        metavar="HOST:PORT",
        help="address to listen on, e.g. 0.0.0.0:9090 (default: $SLUICEGATE_BIND, else the config's "
        "[server] bind, else 127.0.0.1:9090)",
    )
    p.add_argument(
        "--workers",
        type=_positive,
        default=1,
        metavar="N",
        help="worker processes sharing the port, each with its own connections (default 1)",
    )

    p = _command(
        sub,
        "check-config",
        summary="validate a config file; exit 2 listing every problem",
        description="Read a config as `serve` would, environment included. Every problem is printed, one a line,\n"
        "and the exit code is 2; warnings (an unset provider key variable) do not fail.",
        example="sluicegate check-config --config config/gateway.toml",
    )
    p.add_argument("--config", metavar="PATH", help=CONFIG_HELP)

    keys_parser = _command(
        sub,
        "keys",
        summary="make a key (new), or show what keys have spent (usage)",
        description="Client keys: `keys new` makes one, `keys usage` shows what each has spent and its bucket levels.",
        example="sluicegate keys new --name alice --rpm 60 --models deepseek-chat",
    )
    keys = keys_parser.add_subparsers(dest="keys_command", required=True)
    p = _command(
        keys,
        "new",
        summary="print a fresh key once, and the [[keys]] block that stores its sha256",
        description="Print a fresh key once, and the [[keys]] block to paste into the config: the block holds\n"
        "the key's sha256, so the key itself is stored nowhere. Omitted options leave no line in it.",
        example="sluicegate keys new --name alice --group gold --rpm 60 --tpm 100000 --models 'deepseek-chat,gpt-4o*'",
    )
    p.add_argument(
        "--name", required=True, help="the key's name in records, metrics and 429 messages: 1-64 of A-Z a-z 0-9 _ . -"
    )
    p.add_argument("--group", help="the [groups.NAME] whose limits the key shares (default: default)")
    for kind in kinds_for("key"):
        p.add_argument("--" + kind.name.replace("_", "-"), type=_positive, metavar="N", help=_limit_help(kind))
    p.add_argument(
        "--models",
        metavar="LIST",
        help="models the key may use, comma-separated names or globs, e.g. 'deepseek-chat,gpt-4o*' "
        "(default: every model)",
    )
    p = _command(
        keys,
        "usage",
        summary="what each key has spent and holds of its budget, and its bucket levels",
        description="One line per key: tokens spent and held of its budget, and its rpm/tpm bucket levels, read\n"
        "from the config's Redis. With the demo config it shows the key the last demo made.",
        example="sluicegate keys usage --config config/gateway.toml --name alice",
    )
    p.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    p.add_argument("--name", help="only this key (default: every key in the config)")
    _name_choices(keys)

    p = _command(
        sub,
        "events",
        summary="find the event record of a request id (from the file or Redis sink)",
        description="Print the event record of a request id, as a user pastes it from an error message or the\n"
        "x-request-id header. Exit 1 when there is none, 2 when the records cannot be read.",
        example="sluicegate events --config config/gateway.toml --request-id req_6f1c2a9e03b4d7a85e21c0f9",
    )
    p.add_argument("--request-id", required=True, metavar="ID", help="the request id, e.g. req_6f1c… or your own")
    p.add_argument(
        "--config",
        metavar="PATH",
        help=f"{CONFIG_HELP}; its [events] sink says where to look: its file or Redis stream",
    )
    p.add_argument(
        "--file",
        metavar="PATH",
        help="search this JSONL file instead, e.g. a rotated events.jsonl.1 (default: the config's [events] path)",
    )

    p = _command(
        sub,
        "mock-upstream",
        summary="a built-in OpenAI-compatible fake LLM",
        description="A fake OpenAI-compatible LLM for demos, tests and load tests. Request headers such as\n"
        "x-mock-status: 503 switch on faults (see the README, 'The mock upstream').",
        example="sluicegate mock-upstream --bind 127.0.0.1:8001 --chunks 25 --chunk-delay-ms 50 --ttfb-ms 200",
    )
    p.add_argument(
        "--bind",
        type=_bind,
        default=("127.0.0.1", 8001),
        metavar="HOST:PORT",
        help="address to listen on (default 127.0.0.1:8001)",
    )
    p.add_argument(
        "--chunks",
        type=_positive,
        default=8,
        metavar="N",
        help="tokens in each answer, streamed one chunk each (default 8)",
    )
    p.add_argument(
        "--chunk-delay-ms", type=float, default=20.0, metavar="MS", help="pause between streamed chunks (default 20)"
    )
    p.add_argument(
        "--ttfb-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="wait before answering a model route, as a model does before its first token (default 0)",
    )
    p.add_argument("--name", default="mock", help="shows in answers, to tell several mocks apart (default mock)")
    p.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="require 'Authorization: Bearer $VAR' on every request, as a provider does (default: no key needed)",
    )
    p.add_argument(
        "--models",
        type=_names,
        default=MockOptions.models,
        metavar="LIST",
        help="what GET /v1/models lists, comma-separated (default mock-chat,mock-embed)",
    )

    bench_command.add_parser(sub, _positive)

    p = _command(
        sub,
        "demo",
        summary="run the mock upstream and the gateway together with a fresh demo key",
        description="The mock upstream and the gateway in one process, with a key made now. The banner names\n"
        "the addresses, the Redis and the records file, and prints a curl line and the `events` and\n"
        "`keys usage` commands that work against it.",
        example="sluicegate demo --bind 127.0.0.1:9191 --mock-bind 127.0.0.1:8101",
    )
    p.add_argument(
        "--config", default="config/demo.toml", metavar="PATH", help="the demo's config (default config/demo.toml)"
    )
    p.add_argument(
        "--bind",
        type=_bind,
        metavar="HOST:PORT",
        help="the gateway's address (default: the config's [server] bind, 127.0.0.1:9090)",
    )
    p.add_argument(
        "--mock-bind",
        type=_bind,
        metavar="HOST:PORT",
        help="the mock upstream's address (default: that of the config's first provider, 127.0.0.1:8001)",
    )
    _name_choices(sub)
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
