"""`llmfleet-agent`: serve, check-config, db setup|upgrade|status, keys create|list|revoke, usage, status,
openapi."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from . import __version__, gc_tuning, openapi, reports
from .access import AccessLogger
from .app import create_app, ssl_context
from .config import Config, ConfigError, load_config, parse_config, parse_duration
from .http_errors import install_parser_errors
from .keys import KeyRecord, generate_secret, validate_secret
from .logs import event, setup_logging
from .logs import flush as flush_log
from .roles import Role
from .store import AuditRecord, UsageSummary, open_store
from .store.base import USAGE_GROUPS
from .store.errors import StoreError
from .store.setup import Credential
from .store.urls import parse_postgres

log = logging.getLogger("llmfleet.cli")
KEY_ENV = "LLMFLEET_API_KEY"
SHUTDOWN_BACKSTOP = 5.0


class CliError(Exception):
    """A user error: printed as one line, exit code 1."""


# ----- serve / check-config ------------------------------------------------------------------------------
def _serve(cfg: Config, args: argparse.Namespace, what: str, app: web.Application, grace: float) -> int:
    """Run `app` (the agent's or the gateway's) on cfg.listen until SIGTERM; `grace`: aiohttp's wait for
    requests in flight at shutdown."""
    ctx = ssl_context(cfg)
    scheme = "https" if ctx else "http"
    event(
        log,
        logging.INFO,
        f"{what} {__version__} starting; will listen on {scheme}://{cfg.listen.host}:{cfg.listen.port}",
        config=str(args.config_path),
    )
    app.on_startup.append(gc_tuning.freeze_startup)  # last: after every part has started
    try:
        web.run_app(
            app,
            host=cfg.listen.host,
            port=cfg.listen.port,
            ssl_context=ctx,
            access_log_class=AccessLogger,
            shutdown_timeout=grace,
            # a client that goes away cancels its request, and so the generation upstream
            handler_cancellation=True,
            print=None,
        )
    except StoreError as exc:
        raise CliError(f"store {_store_display(cfg)}: {exc}") from None
    except OSError as exc:
        raise CliError(f"cannot listen on {cfg.listen.host}:{cfg.listen.port}: {exc.strerror}") from None
    except Exception as exc:
        if type(exc).__module__.startswith("asyncpg"):  # a wrong password, a database that does not exist
            raise CliError(f"store {_store_display(cfg)}: {exc}") from None
        raise
    event(log, logging.INFO, f"{what} stopped")
    return 0


def _prepare(cfg: Config) -> None:
    setup_logging(cfg.logging.level, cfg.logging.format)
    use_uvloop()
    install_parser_errors()
    gc_tuning.tune()


def cmd_serve(cfg: Config, args: argparse.Namespace) -> int:
    _prepare(cfg)
    # the grace for requests in flight is the agent's own (app.py, _close_gate); aiohttp's wait after it
    # is only a backstop
    return _serve(cfg, args, "llmfleet-agent", create_app(cfg), SHUTDOWN_BACKSTOP)


def cmd_gateway(cfg: Config, args: argparse.Namespace) -> int:
    """The fleet's one endpoint (gateway/): the same checks as an agent, the fleet's hosts behind it."""
    from .gateway.app import create_gateway_app

    _prepare(cfg)
    return _serve(cfg, args, "llmfleet-agent gateway", create_gateway_app(cfg), cfg.listen.shutdown_timeout)


def use_uvloop() -> None:
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


def cmd_ldap_check(cfg: Config, args: argparse.Namespace) -> int:
    """Reach the directory as the agent will: TLS verified, the service account's bind, every mapped
    group found (a security group). Exit 1 naming the first thing that fails."""
    from .directory import Directory, DirectoryUnavailable  # ldap3 only where it is used

    if cfg.auth.ldap is None:
        raise CliError(f"{args.config_path}: no auth.ldap section")
    directory = Directory(cfg.auth.ldap)
    try:
        report = asyncio.run(directory.check())
    except DirectoryUnavailable as exc:
        raise CliError(f"auth.ldap: the directory cannot be used: {exc}") from None
    finally:
        directory.close()
    if args.json:
        print(json.dumps(dataclasses.asdict(report), indent=2))
    else:
        print(f"{report.server}: the service account {cfg.auth.ldap.bind_user} signed in over TLS")
        for name, dn in report.groups.items():
            print(f"  {name}: {dn or 'NOT FOUND'}")
    if report.problems:
        raise CliError("; ".join(report.problems))
    return 0


# ----- the store ----------------------------------------------------------------
def _stdin_document(args: argparse.Namespace) -> dict[str, Any]:
    """With --stdin-json: the JSON object on standard input (secrets: a key, database credentials), read
    once; secrets never go on a command line, where other users of the host could read them."""
    if not getattr(args, "stdin_json", False):
        return {}
    if not hasattr(args, "_stdin_doc"):
        try:
            doc = json.loads(sys.stdin.read())
        except ValueError as exc:
            raise CliError(f"--stdin-json: standard input is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise CliError("--stdin-json: standard input must be a JSON object")
        args._stdin_doc = doc
    return args._stdin_doc  # type: ignore[no-any-return]


def _credential(doc: dict[str, Any], name: str) -> Credential | None:
    """The credential `doc[name]` ({"user": ..., "password": ...}), or None when absent."""
    value = doc.get(name)
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or not isinstance(value.get("user"), str)
        or not isinstance(value.get("password"), str)
        or not value["user"]
        or not value["password"]
    ):
        raise CliError(f'--stdin-json: "{name}" must be {{"user": "...", "password": "..."}}')
    return Credential(value["user"], value["password"])


def _open_store(cfg: Config, args: argparse.Namespace, migrate: bool = True) -> Any:
    """The configured store; for PostgreSQL with the "store" credential of --stdin-json when given."""
    cred = _credential(_stdin_document(args), "store")
    try:
        return open_store(
            cfg.store, cred.user if cred else None, cred.password if cred else None, migrate=migrate
        )
    except (ValueError, StoreError) as exc:
        raise CliError(str(exc)) from None


def _run_store(cfg: Config, coro_fn: Any, args: argparse.Namespace | None = None) -> Any:
    async def run() -> Any:
        store = _open_store(cfg, args or argparse.Namespace())
        await store.open()
        try:
            return await coro_fn(store)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except (StoreError, OSError) as exc:
        raise CliError(f"store {_store_display(cfg)}: {exc}") from None
    except Exception as exc:
        if type(exc).__module__.startswith("asyncpg"):
            raise CliError(f"store {_store_display(cfg)}: {exc}") from None
        raise


def _store_display(cfg: Config) -> str:
    return cfg.store.url if cfg.store.sqlite_path else parse_postgres(cfg.store.url).display()


# ----- db -------------------------------------------------------------------------
def _require_postgres(cfg: Config) -> None:
    if cfg.store.sqlite_path is not None:
        raise CliError(
            "store.url is SQLite: `db` commands are for a PostgreSQL store (the agent keeps its"
            " SQLite schema up to date itself)"
        )


def cmd_db_upgrade(cfg: Config, args: argparse.Namespace) -> int:
    _require_postgres(cfg)
    from .store import migrations
    from .store.postgres import set_retention

    wanted: dict[str, float | None] = {}
    for name in ("usage_retention", "audit_retention"):
        text = getattr(args, name)
        if text is not None:
            try:
                wanted[name] = parse_duration(text)
            except ValueError as exc:
                raise CliError(f"--{name.replace('_', '-')}: {exc}") from None

    async def run(store: Any) -> tuple[int, int, list[str], list[str]]:
        conn = await store.connect()
        try:
            start, end, applied = await migrations.upgrade(conn)
            changed = [name for name, seconds in wanted.items() if await set_retention(conn, name, seconds)]
            return start, end, applied, changed
        finally:
            await conn.close()

    start, end, applied, settings = _run_store_unopened(cfg, args, run)
    out = {
        "changed": bool(applied or settings),
        "from": start,
        "to": end,
        "applied": applied,
        "settings": settings,
    }
    print(json.dumps(out))
    return 0


def cmd_db_status(cfg: Config, args: argparse.Namespace) -> int:
    _require_postgres(cfg)
    from .store import migrations

    async def run(store: Any) -> int:
        conn = await store.connect()
        try:
            return await migrations.schema_version(conn)
        finally:
            await conn.close()

    version = _run_store_unopened(cfg, args, run)
    print(json.dumps({"version": version, "head": migrations.HEAD}))
    return 0


def cmd_db_setup(cfg: Config, args: argparse.Namespace) -> int:
    _require_postgres(cfg)
    from .store.setup import setup_roles, setup_schema

    doc = _stdin_document(args)
    admin, owner, agent = (_credential(doc, name) for name in ("admin", "owner", "agent"))
    if admin is None or owner is None or agent is None:
        raise CliError('--stdin-json: give "admin", "owner" and "agent", each {"user": ..., "password": ...}')
    database = parse_postgres(cfg.store.url).database

    async def run(store: Any) -> list[str]:
        conn = await store.connect()
        try:
            changed = await setup_roles(conn, database, owner, agent, args.reset_passwords)
            changed += await setup_schema(conn, owner.user)
            return changed
        finally:
            await conn.close()

    try:
        changed = _run_store_unopened(cfg, args, run, admin)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    print(json.dumps({"changed": bool(changed), "created": changed}))
    return 0


def _run_store_unopened(
    cfg: Config, args: argparse.Namespace, coro_fn: Any, cred: Credential | None = None
) -> Any:
    """Run coro_fn(store) on a store that is not opened (no pool, no schema check): `db` commands."""
    if cred is None:
        store = _open_store(cfg, args, migrate=False)
    else:
        try:
            store = open_store(cfg.store, cred.user, cred.password, migrate=False)
        except (ValueError, StoreError) as exc:
            raise CliError(str(exc)) from None
    try:
        return asyncio.run(coro_fn(store))
    except (StoreError, OSError) as exc:
        raise CliError(f"store {_store_display(cfg)}: {exc}") from None
    except Exception as exc:
        if type(exc).__module__.startswith("asyncpg"):
            raise CliError(f"store {_store_display(cfg)}: {exc}") from None
        raise


# ----- keys ------------------------------------------------------------------


def cmd_keys_create(cfg: Config, args: argparse.Namespace) -> int:
    ttl = None
    if args.expires:
        try:
            ttl = parse_duration(args.expires)
        except ValueError as exc:
            raise CliError(f"--expires: {exc}") from None
    if args.from_stdin:
        doc = _stdin_document(args)
        text = doc.get("key") if args.stdin_json else sys.stdin.read()
        if not isinstance(text, str):
            raise CliError('--stdin-json: "key" (a string) is required with --from-stdin')
        try:
            secret = validate_secret(text)
        except ValueError as exc:
            raise CliError(f"key from standard input: {exc}") from None
    else:
        secret = generate_secret()
    wanted = KeyRecord.new(
        secret,
        args.name,
        Role(args.role),
        tuple(args.models or ()),
        ttl,
        args.max_concurrent,
        args.rpm,
        frontend=args.frontend,
        gateway=args.gateway,
    )
    if wanted.frontend and wanted.gateway:
        raise CliError("--frontend and --gateway: a key is one or the other")

    host = cfg.resolved_host_id

    async def store_key(store: Any) -> str:
        existing = await store.get_key(wanted.id)
        if existing is not None and existing.revoked is None:
            if existing.same_grant(wanted):
                return "unchanged"
            await store.put_key(existing.with_grant_of(wanted))
            await store.add_audit(
                [AuditRecord("key_updated", wanted.id, {"name": args.name, "via": "cli"}, host=host)]
            )
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
        await store.add_audit([AuditRecord("key_created", wanted.id, detail, host=host)])
        return "created"

    result = _run_store(cfg, store_key, args)
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
    keys: list[KeyRecord] = _run_store(cfg, lambda store: store.list_keys(), args)
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
                [
                    AuditRecord(
                        "key_revoked",
                        record.id,
                        {"name": record.name, "via": "cli"},
                        host=cfg.resolved_host_id,
                    )
                ]
            )
        return record

    record = _run_store(cfg, revoke, args)
    if record is None:
        raise CliError(f"no key with id {args.id!r} (see `llmfleet-agent keys list`)")
    print(f"key {record.id} ({record.name}) revoked")
    return 0


# ----- usage ------------------------------------------------------------------
def cmd_usage(cfg: Config, args: argparse.Namespace) -> int:
    """The report GET /agent/usage answers, from the store the config names (reports.py: the same query)."""
    try:
        query = reports.parse_query(args.since, args.until, args.by)
    except reports.ReportError as exc:
        raise CliError(f"--{exc.parameter}: {exc.reason}") from None
    rows: list[UsageSummary] = _run_store(
        cfg, lambda store: reports.usage_report(store, query.since, query.until, query.by), args
    )
    if args.json:
        print(json.dumps(reports.report_json(query, rows), indent=2))
        return 0
    if args.csv:
        sys.stdout.write(reports.report_csv(rows))
        return 0
    header = (query.by.upper(), "REQUESTS", "ERRORS", "PROMPT TOKENS", "COMPLETION TOKENS")
    table = [header] + [
        (r.group, str(r.requests), str(r.errors), str(r.prompt_tokens), str(r.completion_tokens))
        for r in rows
    ]
    total = [
        sum(getattr(r, f) for r in rows) for f in ("requests", "errors", "prompt_tokens", "completion_tokens")
    ]
    table.append(("total", *map(str, total)))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print(f"usage from {reports.rfc3339(query.since)} until {reports.rfc3339(query.until)}, by {query.by}")
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

    def store_line(store: dict[str, Any]) -> str:
        since = store.get("failing_since")
        state = "writes ok" if since is None else f"FAILING for {max(0.0, time.time() - since):.0f}s"
        spools, dropped = [], 0
        for name in ("usage", "audit"):
            spool = (store.get(name) or {}).get("spool")
            if spool is None:
                continue
            dropped += spool["dropped"]
            held = f"{name} {spool['records']}"
            if spool["records"]:
                held += f" ({spool['bytes'] / 2**20:.1f} MiB, oldest {spool['oldest_age_seconds']:.0f}s)"
            spools.append(held)
        text = f"{store['kind']}, {state}; spooled records: {', '.join(spools) or '-'}"
        return text + (f"; {dropped} DROPPED (spool full)" if dropped else "")

    if "store" in body:  # an agent before the spool has no such section
        lines.append(("store", store_line(body["store"])))
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
    with_config(
        sub.add_parser(
            "gateway", help="run the fleet's gateway (the gateway section): one endpoint for every host"
        )
    ).set_defaults(func=cmd_gateway)
    check = with_config(sub.add_parser("check-config", help="validate the configuration and exit"))
    check.add_argument("--show", action="store_true", help="print the effective configuration")
    check.set_defaults(func=cmd_check_config)

    ldap = sub.add_parser("ldap", help="directory logins (auth.ldap)").add_subparsers(
        dest="ldap_command", required=True
    )
    ldap_check = with_config(
        ldap.add_parser("check", help="sign in as the service account and find the mapped groups")
    )
    ldap_check.add_argument("--json", action="store_true", help="the report as JSON")
    ldap_check.set_defaults(func=cmd_ldap_check)

    status = with_config(sub.add_parser("status", help="show the running agent's status"))
    status.add_argument("--url", help="the agent's address (default: from the config's listen section)")
    status.add_argument("--key-file", help=f"file holding an operator key (default: ${KEY_ENV})")
    status.add_argument("--json", action="store_true", help="the full status as JSON")
    status.set_defaults(func=cmd_status)

    usage = with_config(sub.add_parser("usage", help="the usage report (as GET /agent/usage answers it)"))
    when = "an RFC 3339 time with a zone, a Unix time in seconds, or a duration ago such as 12h"
    usage.add_argument("--since", metavar="TIME", help=f"the window's start: {when} (default 7d)")
    usage.add_argument("--until", metavar="TIME", help=f"the window's end, excluded: {when} (default now)")
    usage.add_argument("--by", choices=USAGE_GROUPS, default="key", help="grouping (default key)")
    output = usage.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="the JSON GET /agent/usage answers")
    output.add_argument("--csv", action="store_true", help="the CSV GET /agent/usage answers")
    usage.set_defaults(func=cmd_usage)

    db = sub.add_parser("db", help="the PostgreSQL store: roles, schema").add_subparsers(
        dest="db_command", required=True
    )
    stdin_help = (
        'credentials as JSON on standard input: {"store": {"user": ..., "password": ...}} replaces the'
        " URL's user and store.password_file"
    )
    upgrade = with_config(
        db.add_parser("upgrade", help="apply the schema migrations (the owner's credential)")
    )
    upgrade.add_argument("--stdin-json", action="store_true", help=stdin_help)
    for what in ("usage", "audit"):
        upgrade.add_argument(
            f"--{what}-retention",
            metavar="DURATION",
            help=f"how long the fleet keeps {what} records (400d, 90d, never); the database's setting,"
            " which every agent's pruning follows (default: unchanged; new databases: 400d usage, 90d audit)",
        )
    upgrade.set_defaults(func=cmd_db_upgrade)
    db_status = with_config(
        db.add_parser("status", help="the schema version and the version this agent needs")
    )
    db_status.add_argument("--stdin-json", action="store_true", help=stdin_help)
    db_status.set_defaults(func=cmd_db_status)
    setup = with_config(
        db.add_parser("setup", help="make the owner and agent roles (the administrator's credential, once)")
    )
    setup.add_argument(
        "--stdin-json",
        action="store_true",
        required=True,
        help='{"admin": {...}, "owner": {...}, "agent": {...}}, each {"user": ..., "password": ...}',
    )
    setup.add_argument("--reset-passwords", action="store_true", help="set the passwords of existing roles")
    setup.set_defaults(func=cmd_db_setup)

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
    create.add_argument(
        "--frontend",
        action="store_true",
        help="a frontend's key (Open WebUI): its requests are recorded for the end user its"
        " X-OpenWebUI-User-* headers name",
    )
    create.add_argument(
        "--gateway",
        action="store_true",
        help="the fleet gateway's key: it acts for the callers the gateway authenticated (accepted only from"
        " auth.gateway_sources)",
    )
    create.add_argument("--json", action="store_true", help="machine-readable output")
    keys_stdin = (
        'secrets as JSON on standard input: {"key": ... (with --from-stdin), "store": {"user": ...,'
        ' "password": ...}} (a PostgreSQL store: keys are written with the owner\'s credential)'
    )
    create.add_argument("--stdin-json", action="store_true", help=keys_stdin)
    create.set_defaults(func=cmd_keys_create)
    listing = with_config(keys.add_parser("list", help="list keys (never their secrets)"))
    listing.add_argument("--json", action="store_true")
    listing.add_argument("--stdin-json", action="store_true", help=keys_stdin)
    listing.set_defaults(func=cmd_keys_list)
    revoke = with_config(keys.add_parser("revoke", help="revoke a key by id"))
    revoke.add_argument("id")
    revoke.add_argument("--stdin-json", action="store_true", help=keys_stdin)
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
        flush_log()  # the access lines of a server that ran come before its last word
        print(f"llmfleet-agent: configuration error: {exc}", file=sys.stderr)
        return 2
    except CliError as exc:
        flush_log()
        print(f"llmfleet-agent: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
