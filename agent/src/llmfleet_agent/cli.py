"""`llmfleet-agent`: serve, check-config, keys create|list|revoke, usage, status, openapi."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from aiohttp import web

from . import __version__, openapi
from .access import AccessLogger
from .app import create_app, ssl_context
from .config import Config, ConfigError, load_config, parse_config, parse_duration
from .http_errors import install_parser_errors
from .keys import KeyRecord, generate_secret, validate_secret
from .logs import event, setup_logging
from .roles import Role
from .store import AuditRecord, UsageSummary, open_store

log = logging.getLogger("llmfleet.cli")
KEY_ENV = "LLMFLEET_API_KEY"
SHUTDOWN_BACKSTOP = 5.0


class CliError(Exception):
    """A user error: printed as one line, exit code 1."""


# ----- serve / check-config ------------------------------------------------------------------------------
def cmd_serve(cfg: Config, args: argparse.Namespace) -> int:
    setup_logging(cfg.logging.level, cfg.logging.format)
    ctx = ssl_context(cfg)
    scheme = "https" if ctx else "http"
    event(
        log,
        logging.INFO,
        f"llmfleet-agent {__version__} starting; will listen on {scheme}://{cfg.listen.host}:{cfg.listen.port}",
        config=str(args.config_path),
    )
    _use_uvloop()
    install_parser_errors()
    try:
        web.run_app(
            create_app(cfg),
            host=cfg.listen.host,
            port=cfg.listen.port,
            ssl_context=ctx,
            access_log_class=AccessLogger,
            # the grace for requests in flight is the agent's own (app.py, _close_gate); aiohttp's wait
            # after it is only a backstop
            shutdown_timeout=SHUTDOWN_BACKSTOP,
            # a client that goes away cancels its request, and so the generation upstream
            handler_cancellation=True,
            print=None,
        )
    except OSError as exc:
        raise CliError(f"cannot listen on {cfg.listen.host}:{cfg.listen.port}: {exc.strerror}") from None
    event(log, logging.INFO, "llmfleet-agent stopped")
    return 0


def _use_uvloop() -> None:
    """uvloop's event loop when it is installed (it is a dependency on Linux): less overhead per request."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def cmd_check_config(cfg: Config, args: argparse.Namespace) -> int:
    ssl_context(cfg)  # a certificate that does not load is a config error too
    print(f"{args.config_path}: configuration is valid")
    if args.show:
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
    return 0


# ----- keys ------------------------------------------------------------------
def _run_store(cfg: Config, coro_fn: Any) -> Any:
    async def run() -> Any:
        store = open_store(cfg.store)
        await store.open()
        try:
            return await coro_fn(store)
        finally:
            await store.close()

    return asyncio.run(run())


def cmd_keys_create(cfg: Config, args: argparse.Namespace) -> int:
    ttl = None
    if args.expires:
        try:
            ttl = parse_duration(args.expires)
        except ValueError as exc:
            raise CliError(f"--expires: {exc}") from None
    if args.from_stdin:
        try:
            secret = validate_secret(sys.stdin.read())
        except ValueError as exc:
            raise CliError(f"key from standard input: {exc}") from None
    else:
        secret = generate_secret()
    wanted = KeyRecord.new(
        secret, args.name, Role(args.role), tuple(args.models or ()), ttl, args.max_concurrent, args.rpm
    )

    async def store_key(store: Any) -> str:
        existing = await store.get_key(wanted.id)
        if existing is not None and existing.revoked is None:
            if existing.same_grant(wanted):
                return "unchanged"
            await store.put_key(existing.with_grant_of(wanted))
            await store.add_audit([AuditRecord("key_updated", wanted.id, {"name": args.name, "via": "cli"})])
            return "updated"
        if existing is not None:
            raise CliError(f"key {existing.id} was revoked; a revoked key cannot be stored again")
        for other in await store.list_keys():
            if other.name == args.name and other.revoked is None:
                raise CliError(
                    f"--name: an active key named {args.name!r} exists ({other.id}); revoke it first"
                )
        await store.put_key(wanted)
        detail = {"name": args.name, "role": args.role, "models": list(wanted.models), "via": "cli"}
        await store.add_audit([AuditRecord("key_created", wanted.id, detail)])
        return "created"

    result = _run_store(cfg, store_key)
    if args.json:
        out = {"result": result, **wanted.public()}
        if not args.from_stdin:
            out["key"] = secret
        print(json.dumps(out))
    elif args.from_stdin:
        print(f"{result} key {wanted.id} ({args.name}, role {args.role})")
    else:
        print(secret)
        print(
            f"key {wanted.id} ({args.name}, role {args.role}) created; the key is shown only once",
            file=sys.stderr,
        )
    return 0


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts))


def cmd_keys_list(cfg: Config, args: argparse.Namespace) -> int:
    keys: list[KeyRecord] = _run_store(cfg, lambda store: store.list_keys())
    if args.json:
        print(json.dumps([k.public() for k in keys], indent=2))
        return 0
    header = ("ID", "NAME", "ROLE", "MODELS", "CREATED", "EXPIRES", "LAST USED", "STATE")
    rows = [header]
    now = time.time()
    for k in keys:
        state = "revoked" if k.revoked else ("expired" if k.refusal(now) else "active")
        rows.append(
            (
                k.id,
                k.name,
                k.role.value,
                ",".join(k.models) or "*",
                _when(k.created),
                _when(k.expires),
                _when(k.last_used),
                state,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_keys_revoke(cfg: Config, args: argparse.Namespace) -> int:
    async def revoke(store: Any) -> KeyRecord | None:
        record = await store.revoke_key(args.id, time.time())
        if record is not None:
            await store.add_audit(
                [AuditRecord("key_revoked", record.id, {"name": record.name, "via": "cli"})]
            )
        return record

    record = _run_store(cfg, revoke)
    if record is None:
        raise CliError(f"no key with id {args.id!r} (see `llmfleet-agent keys list`)")
    print(f"key {record.id} ({record.name}) revoked")
    return 0


# ----- usage ------------------------------------------------------------------
def cmd_usage(cfg: Config, args: argparse.Namespace) -> int:
    try:
        window = parse_duration(args.since)
    except ValueError as exc:
        raise CliError(f"--since: {exc}") from None
    if window is None:
        raise CliError(f"--since: {args.since!r} has no start; give a duration such as 7d")
    since = time.time() - window
    rows: list[UsageSummary] = _run_store(cfg, lambda store: store.summarize_usage(since, args.by))
    if args.json:
        print(json.dumps({"since": since, "by": args.by, "rows": [asdict(r) for r in rows]}, indent=2))
        return 0
    header = (args.by.upper(), "REQUESTS", "ERRORS", "PROMPT TOKENS", "COMPLETION TOKENS")
    table = [header] + [
        (r.group, str(r.requests), str(r.errors), str(r.prompt_tokens), str(r.completion_tokens))
        for r in rows
    ]
    total = [
        sum(getattr(r, f) for r in rows) for f in ("requests", "errors", "prompt_tokens", "completion_tokens")
    ]
    table.append(("total", *map(str, total)))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print(f"usage since {time.strftime('%Y-%m-%d %H:%M', time.gmtime(since))} UTC, by {args.by}")
    for row in table:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return 0


# ----- status ------------------------------------------------------------------
def _read_key(args: argparse.Namespace) -> str:
    if args.key_file:
        try:
            return Path(args.key_file).read_text().strip()
        except OSError as exc:
            raise CliError(f"--key-file: cannot read {args.key_file}: {exc.strerror}") from None
    key = os.environ.get(KEY_ENV, "").strip()
    if not key:
        raise CliError(f"no key: set {KEY_ENV} or pass --key-file (an operator key)")
    return key


def cmd_status(cfg: Config, args: argparse.Namespace) -> int:
    host = "127.0.0.1" if cfg.listen.host in ("0.0.0.0", "::", "") else cfg.listen.host
    scheme = "https" if cfg.listen.tls else "http"
    url = args.url or f"{scheme}://{host}:{cfg.listen.port}"
    context = None
    if url.startswith("https"):
        context = ssl.create_default_context(cafile=str(cfg.listen.tls.cert) if cfg.listen.tls else None)
        context.check_hostname = False  # the local agent's certificate names the host, not the loopback
    if not url.startswith(("http://", "https://")):
        raise CliError(f"--url: {url!r} is not an http:// or https:// address")
    headers = {"Authorization": f"Bearer {_read_key(args)}"}
    req = urllib.request.Request(f"{url}/agent/status", headers=headers)  # noqa: S310 - scheme checked
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as resp:  # noqa: S310 - scheme checked
            body = json.load(resp)
    except urllib.error.HTTPError as err:
        raise CliError(
            f"{url}/agent/status answered {err.code}: {err.read().decode(errors='replace')}"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        raise CliError(f"cannot reach the agent at {url}: {exc}") from None
    print(json.dumps(body, indent=2) if args.json else format_status(body))
    return 0


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _probe_line(probe: dict[str, Any], render: Any) -> str:
    if probe["status"] == "ok":
        return str(render(probe["data"]))
    return f"{probe['status'].replace('_', ' ')}: {probe.get('reason')}"


def format_status(body: dict[str, Any]) -> str:
    """A short human summary of GET /agent/status."""
    agent, ollama, idle, host = body["agent"], body["ollama"], body["idle"], body["host"]
    ready = body["ready"]
    models = ollama["models"]
    lines = [
        (
            "agent",
            f"{agent['version']}, pid {agent['pid']}, up {agent['uptime_seconds']:.0f}s, "
            f"listening on {agent['listen']}{' (TLS)' if agent['tls'] else ''}",
        ),
        ("ready", "yes" if ready["ready"] else "no: " + "; ".join(ready["reasons"])),
        (
            "ollama",
            f"{ollama['state']} ({ollama['reason']}), version {ollama['version']}, "
            f"restarts {ollama['restarts']}",
        ),
        (
            "models",
            f"wanted {', '.join(models['wanted']) or '-'}; missing {', '.join(models['missing']) or 'none'}",
        ),
        (
            "idle",
            f"{idle['idle_seconds']:.1f}s idle, {idle['inflight']} in flight"
            f"{', DRAINING' if idle['draining'] else ''}",
        ),
        ("cpu", _probe_line(host["cpu"], lambda d: f"{d['percent']:.0f}% of {d['count']} cores")),
        (
            "memory",
            _probe_line(host["memory"], lambda d: f"{d['percent']:.0f}% used of {_gib(d['total_bytes'])}"),
        ),
        ("load", _probe_line(host["load"], lambda d: f"{d['1m']:.2f} {d['5m']:.2f} {d['15m']:.2f}")),
        (
            "disk",
            _probe_line(
                host["disk"], lambda d: f"{d['path']}: {d['percent']:.0f}% used, {_gib(d['free_bytes'])} free"
            ),
        ),
        (
            "gpu",
            _probe_line(
                host["gpu"],
                lambda gpus: "; ".join(
                    f"#{g['index']} {g['name']} {g['utilization_percent']}%, "
                    f"{_gib(g['memory_used_bytes'])}/{_gib(g['memory_total_bytes'])}"
                    for g in gpus
                ),
            ),
        ),
    ]
    return "\n".join(f"{name:<8} {text}" for name, text in lines)


# ----- openapi ------------------------------------------------------------------
def cmd_openapi(_cfg: Config | None, _args: argparse.Namespace) -> int:
    """The document GET /openapi.json serves: the routes are the same whatever the configuration."""
    sys.stdout.write(openapi.dumps(openapi.build_openapi(create_app(parse_config({}, "defaults")))))
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


# ----- parser ------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmfleet-agent", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", "-c", help="the agent's YAML file (default: $LLMFLEET_CONFIG)")
        return p

    with_config(sub.add_parser("serve", help="run the agent")).set_defaults(func=cmd_serve)
    check = with_config(sub.add_parser("check-config", help="validate the configuration and exit"))
    check.add_argument("--show", action="store_true", help="print the effective configuration")
    check.set_defaults(func=cmd_check_config)

    status = with_config(sub.add_parser("status", help="show the running agent's status"))
    status.add_argument("--url", help="the agent's address (default: from the config's listen section)")
    status.add_argument("--key-file", help=f"file holding an operator key (default: ${KEY_ENV})")
    status.add_argument("--json", action="store_true", help="the full status as JSON")
    status.set_defaults(func=cmd_status)

    usage = with_config(sub.add_parser("usage", help="summarise usage records"))
    usage.add_argument("--since", default="7d", metavar="DURATION", help="how far back (default 7d)")
    usage.add_argument("--by", choices=["key", "model", "day"], default="key", help="grouping (default key)")
    usage.add_argument("--json", action="store_true")
    usage.set_defaults(func=cmd_usage)

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="keys_command", required=True)
    create = with_config(keys.add_parser("create", help="create a key and print it once"))
    create.add_argument("--name", required=True, help="who or what the key is for")
    create.add_argument("--role", required=True, choices=[r.value for r in Role])
    create.add_argument("--models", nargs="+", metavar="PATTERN", help="limit the key to these model globs")
    create.add_argument("--expires", metavar="DURATION", help="lifetime, e.g. 30d, 12h (default: never)")
    create.add_argument(
        "--max-concurrent", type=_positive, metavar="N", help="requests at once (default: config)"
    )
    create.add_argument("--rpm", type=_positive, metavar="N", help="requests per minute (default: config)")
    create.add_argument("--from-stdin", action="store_true", help="store the key read from standard input")
    create.add_argument("--json", action="store_true", help="machine-readable output")
    create.set_defaults(func=cmd_keys_create)
    listing = with_config(keys.add_parser("list", help="list keys (never their secrets)"))
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_keys_list)
    revoke = with_config(keys.add_parser("revoke", help="revoke a key by id"))
    revoke.add_argument("id")
    revoke.set_defaults(func=cmd_keys_revoke)

    document = sub.add_parser("openapi", help="print the agent's API as an OpenAPI document (no config)")
    document.set_defaults(func=cmd_openapi, config=None, needs_config=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.config_path = args.config or os.environ.get("LLMFLEET_CONFIG")
        cfg = load_config(args.config) if getattr(args, "needs_config", True) else None
        return int(args.func(cfg, args))
    except ConfigError as exc:
        print(f"llmfleet-agent: configuration error: {exc}", file=sys.stderr)
        return 2
    except CliError as exc:
        print(f"llmfleet-agent: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
