"""`llmfleet-ollama-sim serve`: started like `ollama serve`, stopped by SIGTERM or SIGINT (exit 0)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from aiohttp import web

from . import faults as f
from . import logs
from .app import build_app
from .logs import log
from .settings import Settings, load_settings
from .state import VERSION
from .store import ModelStore, StoreError

T = TypeVar("T")

SHUTDOWN_TIMEOUT = 0.5  # seconds given to open streams when stopping (aiohttp may take it twice)


def _flag_value(parse: Callable[[str, str], T], flag: str) -> Callable[[str], T]:
    """An argparse `type` that validates with `parse` and names the flag in its error."""

    def convert(raw: str) -> T:
        try:
            return parse(flag, raw)
        except f.SettingError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmfleet-ollama-sim",
        description="A stand-in for `ollama serve` for demos and tests. It is not a model: it echoes "
        "the words of the prompt.",
    )
    parser.add_argument(
        "-v", "--version", action="version", version=f"llmfleet-ollama-sim version is {VERSION}"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve", help="serve Ollama's REST API on OLLAMA_HOST (default 127.0.0.1:11434)"
    )
    serve.add_argument(
        "--token-delay",
        type=_flag_value(f.parse_seconds, "--token-delay"),
        metavar="S",
        help=f"sleep per emitted token, streamed or not [{f.TOKEN_DELAY_ENV}]",
    )
    serve.add_argument(
        "--pull-delay",
        type=_flag_value(f.parse_seconds, "--pull-delay"),
        metavar="S",
        help=f"sleep per pull/push/create progress step [{f.PULL_DELAY_ENV}, default {f.DEFAULT_PULL_DELAY}]",
    )
    serve.add_argument(
        "--start-delay",
        type=_flag_value(f.parse_seconds, "--start-delay"),
        metavar="S",
        help=f"sleep before listening [{f.START_DELAY_ENV}]",
    )
    serve.add_argument(
        "--exit-at-once",
        action="store_true",
        default=None,
        help=f"print an error and exit 1 at once [{f.EXIT_AT_ONCE_ENV}=1]",
    )
    serve.add_argument(
        "--exit-after-tokens",
        type=_flag_value(f.parse_token_count, "--exit-after-tokens"),
        metavar="N",
        help=f"die abruptly (exit 1) once a generation has emitted N tokens [{f.EXIT_AFTER_TOKENS_ENV}]",
    )
    serve.add_argument(
        "--refuse-start",
        action="store_true",
        default=None,
        help=f"stay alive but never listen [{f.REFUSE_START_ENV}=1]",
    )
    return parser


def _flags(args: argparse.Namespace) -> f.FaultFlags:
    return f.FaultFlags(
        token_delay=args.token_delay,
        pull_delay=args.pull_delay,
        start_delay=args.start_delay,
        exit_at_once=args.exit_at_once,
        exit_after_tokens=args.exit_after_tokens,
        refuse_start=args.refuse_start,
    )


def _stop_event() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    """Wait up to `seconds`; True if a stop signal came first."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    return stop.is_set()


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(512)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


async def serve(settings: Settings) -> int:
    stop = _stop_event()
    log.info("simulator settings: models=%s %s", settings.models_dir, settings.faults.describe())
    if settings.faults.start_delay:
        log.info("slow start: waiting %ss before listening", settings.faults.start_delay)
        if await _stopped_within(stop, settings.faults.start_delay):
            return 0
    if settings.faults.refuse_start:
        log.info("refusing to start (%s): alive, not listening", f.REFUSE_START_ENV)
        await stop.wait()
        return 0
    store = ModelStore(settings.models_dir)
    try:
        store.load()
        sock = bind(settings.host, settings.port)
    except StoreError as exc:
        log.error("%s", exc)
        return 1
    except OSError as exc:
        log.error("Error: listen tcp %s:%s: %s", settings.host, settings.port, exc.strerror or exc)
        return 1
    runner = web.AppRunner(build_app(settings, store), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    host, port = sock.getsockname()[:2]
    log.info("Listening on %s:%s (version %s)", host, port, VERSION)
    await stop.wait()
    log.info("stopping on signal")
    await runner.cleanup()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "serve":
        parser.print_help(sys.stderr)
        return 2
    try:
        settings = load_settings(os.environ, _flags(args))
    except f.SettingError as exc:
        print(f"llmfleet-ollama-sim: error: {exc}", file=sys.stderr)
        return 2
    logs.configure()
    if settings.faults.exit_at_once:
        print(f"Error: simulated crash at start ({f.EXIT_AT_ONCE_ENV})", file=sys.stderr)
        return 1
    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
