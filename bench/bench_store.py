#!/usr/bin/env python3
"""Benchmark: the PostgreSQL store at fleet scale, on a durable server (fsync, synchronous_commit on).

1. A throwaway PostgreSQL cluster (agent/tests/postgres.py, durable settings) with the schema at head.
2. N generated usage records (default 10,000,000) over the last D days (default 90), with the shapes of a
   real fleet (200 keys of very different weight, 12 models, 8 hosts, users behind the frontend keys,
   about 3% errors, token counts), loaded with COPY month partition by month partition (a second process
   generates the next chunk while one is copied), then the daily roll-ups computed with
   llmfleet_rebuild_usage_daily and the table vacuumed and analysed (what autovacuum would have done to
   a table that old). Reports load time, rows/s and the sizes on disk.
3. The 30-day report through PostgresStore.summarize_usage, by key, model, day, host and user, over a
   window that starts and ends mid-day (so the raw rows of both partial days are read besides the
   roll-ups): cold-ish (the server restarted just before: its buffers are empty, the OS cache is not) and
   warm (median of 5), with EXPLAIN (ANALYZE, BUFFERS) of the report by key.
4. Inserts: one writer (a PostgresStore, as one agent) calling add_usage with batches of 500 (the agent's
   BatchWriter batch) as fast as it can, then four at once (four processes, four host ids), then four
   paced at 2,000 records/s each, flushing once a second as BatchWriter does.

Prints a table and writes bench/results/store-<time>.json.

    make bench-store                 # or: .venv/bin/python bench/bench_store.py [--records 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import hashlib
import json
import math
import multiprocessing
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

import asyncpg
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "agent" / "tests"))  # postgres.py: the tests' throwaway server

from llmfleet_agent.store import migrations  # noqa: E402
from llmfleet_agent.store import postgres as pgstore  # noqa: E402
from llmfleet_agent.store.base import USAGE_GROUPS  # noqa: E402
from llmfleet_agent.store.postgres import PostgresStore  # noqa: E402
from llmfleet_agent.store.urls import parse_postgres  # noqa: E402
from llmfleet_agent.usage import UsageRecord  # noqa: E402

DAY = 86400
DB = "bench"
# what was measured (the store's files may differ from the last commit): every process checks it has the same
SOURCE = {
    name: hashlib.sha256((Path(pgstore.__file__).parent / name).read_bytes()).hexdigest()[:16]
    for name in ("postgres.py", "migrations.py")
}
COLUMNS = (
    "ts",
    "request_id",
    "host",
    "key_id",
    "user_name",
    "method",
    "route",
    "model",
    "status",
    "stream",
    "prompt_tokens",
    "completion_tokens",
    "ttfb_ms",
    "duration_ms",
    "error",
)
# 12 models, the most popular first (a key's models are drawn with these weights); the last one embeds
MODELS = (
    "llama3.1:8b",
    "qwen2.5:7b",
    "llama3.1:70b",
    "qwen2.5-coder:32b",
    "mistral:7b",
    "gemma2:27b",
    "deepseek-r1:14b",
    "phi3:14b",
    "mixtral:8x7b",
    "gemma2:9b",
    "llava:13b",
    "nomic-embed-text:latest",
)
EMBED = "nomic-embed-text:latest"
N_KEYS, N_HOSTS, N_FRONTENDS, USERS_PER_FRONTEND = 200, 8, 20, 50
USER_SHARE = 0.30  # of the records: those of the frontend keys, which name the person behind them
ERROR_SHARE = 0.03
# (status, weight among the errors, error text, tokens known)
ERRORS = (
    (429, 30, "rate limit: 60 requests a minute", False),
    (499, 25, "the client went away", True),
    (502, 15, "ollama failed mid-answer: connection reset", True),
    (404, 10, "model not found", False),
    (400, 10, "invalid JSON body", False),
    (500, 5, "ollama answered 500", False),
    (503, 5, "ollama is not ready", False),
)
# the share of a day's requests in each UTC hour (a working day in Europe and the Americas)
HOURLY = (2, 2, 2, 2, 2, 3, 5, 8, 11, 13, 14, 14, 13, 14, 15, 15, 14, 12, 10, 8, 6, 4, 3, 2)
TARGET_REPORT_S = 1.0
TARGET_INSERT_RATE = 2000.0


# --- the fleet that made the records -----------------------------------------------------------------------


class Fleet:
    """Keys, models, hosts and users, all drawn from the seed: every process that builds one gets the same."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(seed)  # noqa: S311 - data, not secrets
        self.hosts = [f"i-{rng.getrandbits(68):017x}" for _ in range(N_HOSTS)]
        model_weights = [1 / (i + 1) ** 0.9 for i in range(len(MODELS))]
        self.model_hosts = {m: rng.sample(self.hosts, rng.choice((2, 2, 3))) for m in MODELS}
        self.keys = [f"{rng.getrandbits(64):016x}" for _ in range(N_KEYS)]
        weights = [1 / (i + 1) ** 0.9 for i in range(N_KEYS)]
        frontends = set(rng.sample(range(N_KEYS), N_FRONTENDS))
        share = sum(weights[i] for i in frontends) / sum(weights)
        # scaled so that the frontend keys make USER_SHARE of the records
        scale = USER_SHARE / (1 - USER_SHARE) * (1 - share) / share
        weights = [w * scale if i in frontends else w for i, w in enumerate(weights)]
        self.key_cum = list(_cumulative(weights))
        self.key_names = [
            f"{'webui' if i in frontends else 'team'}-{i:03d}" for i in range(N_KEYS)
        ]  # the report's "<id> (<name>)" labels
        self.key_models: list[list[str]] = []
        for _ in range(N_KEYS):
            chosen: set[str] = set()
            for _ in range(rng.choice((1, 1, 2, 2, 3))):
                chosen.add(rng.choices(MODELS, weights=model_weights)[0])
            self.key_models.append(sorted(chosen))
        self.key_users: list[list[str] | None] = [
            [f"user{i:03d}.{u:02d}@corp.example" for u in range(USERS_PER_FRONTEND)]
            if i in frontends
            else None
            for i in range(N_KEYS)
        ]
        self.error_cum = list(_cumulative([e[1] for e in ERRORS]))

    def record(self, rng: random.Random, ts: float, host: str | None = None) -> tuple[Any, ...]:
        """One record's fields in COLUMNS order (ts as a float, the request id random as the agent's)."""
        k = bisect.bisect(self.key_cum, rng.random() * self.key_cum[-1])
        model = rng.choice(self.key_models[k])
        users = self.key_users[k]
        if model == EMBED:
            route, stream = "/api/embed", False
        else:
            r = rng.random()
            route = "/api/chat" if r < 0.55 else "/v1/chat/completions" if r < 0.9 else "/api/generate"
            stream = rng.random() < 0.7
        ttfb = 40 + rng.lognormvariate(4.5, 0.8)
        if rng.random() < ERROR_SHARE:
            status, _, error, tokens = ERRORS[
                bisect.bisect(self.error_cum, rng.random() * self.error_cum[-1])
            ]
        else:
            status, error, tokens = 200, None, True
        prompt = completion = None
        if tokens:
            prompt = int(rng.lognormvariate(6.0, 1.0)) + 1
            completion = 0 if model == EMBED else int(rng.lognormvariate(5.0, 1.0))
            if status != 200:
                completion = rng.randrange(completion + 1)
        duration = ttfb + (completion or 0) * 25.0 * rng.uniform(0.7, 1.3)
        return (
            ts,
            f"{rng.getrandbits(64):016x}",
            host or rng.choice(self.model_hosts[model]),
            self.keys[k],
            rng.choice(users) if users else None,
            "POST",
            route,
            model,
            status,
            stream,
            prompt,
            completion,
            round(ttfb, 3) if status != 404 else None,
            round(duration, 3),
            error,
        )


def _cumulative(values: list[float] | list[int]) -> list[float]:
    out, total = [], 0.0
    for v in values:
        total += v
        out.append(total)
    return out


@lru_cache(maxsize=1)
def _fleet(seed: int) -> Fleet:
    return Fleet(seed)


def plan(records: int, start: float, end: float, seed: int) -> list[tuple[float, float, int]]:
    """(start, end, records) of each hour-long slice of [start, end): a daily and weekly rhythm, some growth
    over the period and some noise from day to day, adding up to `records` exactly."""
    rng = random.Random(seed ^ 0x5EED)  # noqa: S311
    slices: list[tuple[float, float, float]] = []
    noise: dict[int, float] = {}
    t = start
    while t < end:
        stop = min(end, (t // 3600 + 1) * 3600)
        moment = datetime.fromtimestamp(t, timezone.utc)
        day = int(t // DAY)
        noise.setdefault(day, rng.uniform(0.85, 1.15))
        weight = HOURLY[moment.hour] * (0.3 if moment.weekday() >= 5 else 1.0) * noise[day]
        weight *= 1 + 0.5 * (t - start) / (end - start)  # the fleet grew by half over the period
        slices.append((t, stop, weight * (stop - t) / 3600))
        t = stop
    total = sum(w for _, _, w in slices)
    exact = [records * w / total for _, _, w in slices]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])[: records - sum(counts)]:
        counts[i] += 1
    return [(a, b, n) for (a, b, _), n in zip(slices, counts, strict=True)]


def chunks(slices: list[tuple[float, float, int]], size: int) -> list[list[tuple[float, float, int]]]:
    """Consecutive slices grouped into chunks of about `size` records, never across a month."""
    out: list[list[tuple[float, float, int]]] = []
    current: list[tuple[float, float, int]] = []
    count, month = 0, None
    for s in slices:
        moment = datetime.fromtimestamp(s[0], timezone.utc)
        if current and (count + s[2] > size or (moment.year, moment.month) != month):
            out.append(current)
            current, count = [], 0
        current.append(s)
        count += s[2]
        month = (moment.year, moment.month)
    if current:
        out.append(current)
    return out


def generate(seed: int, index: int, part: list[tuple[float, float, int]]) -> list[tuple[Any, ...]]:
    """The records of one chunk, in time order, ready for COPY (runs in the generator process)."""
    fleet = _fleet(seed)
    rng = random.Random(seed * 1_000_003 + index)  # noqa: S311
    utc = timezone.utc
    rows = []
    for start, end, n in part:
        span = end - start
        for ts in sorted(start + rng.random() * span for _ in range(n)):
            row = fleet.record(rng, ts)
            rows.append((datetime.fromtimestamp(ts, utc), *row[1:]))
    return rows


# --- helpers ------------------------------------------------------------------------------------------------


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


class Cpu:
    """The machine's CPU use between two moments: busy and iowait, in cores."""

    def __init__(self) -> None:
        self.t0, self.c0 = time.perf_counter(), psutil.cpu_times()

    def result(self) -> dict[str, float]:
        c1, elapsed = psutil.cpu_times(), time.perf_counter() - self.t0
        idle = (c1.idle - self.c0.idle) + (c1.iowait - self.c0.iowait)
        total = sum(c1) - sum(self.c0)
        cores = os.cpu_count() or 1
        busy = (total - idle) / total * cores if total else 0.0
        return {
            "loadavg_1m": round(os.getloadavg()[0], 2),  # others' work too: this VM is shared
            "busy_cores": round(busy, 2),
            "iowait_cores": round((c1.iowait - self.c0.iowait) / total * cores if total else 0.0, 2),
            "seconds": round(elapsed, 1),
        }


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else math.nan


@dataclass
class Server:
    """The throwaway server and what connects to it."""

    pg: Any  # postgres.PostgresServer

    def store(self, **kw: Any) -> PostgresStore:
        return PostgresStore(parse_postgres(self.pg.url("postgres", DB)), self.pg.password, **kw)

    async def admin(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.pg.admin_dsn(DB))


# --- 1, 2: the server and the load --------------------------------------------------------------------------


async def settings(conn: asyncpg.Connection) -> dict[str, str]:
    names = (
        "fsync",
        "synchronous_commit",
        "full_page_writes",
        "wal_level",
        "shared_buffers",
        "work_mem",
        "maintenance_work_mem",
        "effective_cache_size",
        "max_wal_size",
        "checkpoint_timeout",
        "random_page_cost",
        "jit",
        "max_parallel_workers_per_gather",
    )
    rows = await conn.fetch("SELECT name, current_setting(name) FROM unnest($1::text[]) AS name", list(names))
    return {r[0]: r[1] for r in rows}


async def sizes(conn: asyncpg.Connection) -> dict[str, Any]:
    row = await conn.fetchrow(
        "SELECT sum(pg_table_size(relid)), sum(pg_indexes_size(relid)), count(*) FILTER (WHERE isleaf)"
        " FROM pg_partition_tree('usage')"
    )
    daily = await conn.fetchrow(
        "SELECT pg_table_size('usage_daily'), pg_indexes_size('usage_daily'), count(*) FROM usage_daily"
    )
    return {
        "usage": {
            "table_bytes": int(row[0]),
            "index_bytes": int(row[1]),
            "total_bytes": int(row[0] + row[1]),
            "partitions": int(row[2]),
        },
        "usage_daily": {
            "table_bytes": int(daily[0]),
            "index_bytes": int(daily[1]),
            "total_bytes": int(daily[0] + daily[1]),
            "rows": int(daily[2]),
        },
    }


async def load(server: Server, args: argparse.Namespace, start: float, end: float) -> dict[str, Any]:
    fleet = Fleet(args.seed)
    conn = await server.admin()
    try:
        await migrations.upgrade(conn)
        await conn.executemany(
            "INSERT INTO keys (id, name, role, hash, created) VALUES ($1, $2, 'user', $3, $4)",
            [(k, n, "0" * 64, start) for k, n in zip(fleet.keys, fleet.key_names, strict=True)],
        )
        month = datetime.fromtimestamp(start, timezone.utc).replace(day=1, hour=0, minute=0, second=0)
        while month.timestamp() < end:
            await conn.execute("SELECT llmfleet_usage_partition($1)", month)
            month = (month + timedelta(days=32)).replace(day=1)

        parts = chunks(plan(args.records, start, end, args.seed), args.chunk)
        print(
            f"  loading {args.records:,} records over {args.days} days in {len(parts)} chunks"
            f" ({args.generators} generator process(es))",
            flush=True,
        )
        cpu = Cpu()
        started = time.perf_counter()
        copy_seconds, loaded, last_print = 0.0, 0, started
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=args.generators, mp_context=ctx) as pool:
            ahead: deque[Future[list[tuple[Any, ...]]]] = deque()
            queue = iter(enumerate(parts))
            for index, part in queue:
                ahead.append(pool.submit(generate, args.seed, index, part))
                if len(ahead) > args.generators:
                    break
            while ahead:
                rows = await asyncio.wrap_future(ahead.popleft())
                nxt = next(queue, None)
                if nxt is not None:
                    ahead.append(pool.submit(generate, args.seed, *nxt))
                t0 = time.perf_counter()
                await conn.copy_records_to_table("usage", records=rows, columns=COLUMNS)
                copy_seconds += time.perf_counter() - t0
                loaded += len(rows)
                now = time.perf_counter()
                if now - last_print >= 15 or not ahead:
                    last_print = now
                    rate = loaded / (now - started)
                    print(
                        f"    {loaded:>12,} / {args.records:,} ({loaded / args.records:4.0%})"
                        f"  {rate:,.0f} rows/s  elapsed {now - started:5.0f} s"
                        f"  eta {(args.records - loaded) / rate:5.0f} s",
                        flush=True,
                    )
        load_seconds = time.perf_counter() - started
        load_cpu = cpu.result()

        first = datetime.fromtimestamp(start, timezone.utc).date()
        last = datetime.fromtimestamp(end, timezone.utc).date()
        t0 = time.perf_counter()
        rollup_rows = await conn.fetchval("SELECT llmfleet_rebuild_usage_daily($1, $2)", first, last)
        rollup_seconds = time.perf_counter() - t0
        print(f"  roll-ups: {rollup_rows:,} rows in {rollup_seconds:.1f} s", flush=True)
        t0 = time.perf_counter()
        await conn.execute("VACUUM (ANALYZE) usage")
        await conn.execute("VACUUM (ANALYZE) usage_daily")
        vacuum_seconds = time.perf_counter() - t0
        print(f"  VACUUM (ANALYZE): {vacuum_seconds:.1f} s", flush=True)
        await conn.execute("CHECKPOINT")
        on_disk = await sizes(conn)
        count = await conn.fetchval("SELECT count(*) FROM usage")
        assert count == args.records, (count, args.records)
        return {
            "records": args.records,
            "days": args.days,
            "chunks": len(parts),
            "generator_processes": args.generators,
            "seconds": round(load_seconds, 1),
            "rows_per_s": round(args.records / load_seconds),
            "copy_seconds": round(copy_seconds, 1),
            "copy_rows_per_s": round(args.records / copy_seconds),
            "cpu": load_cpu,
            "rollup_seconds": round(rollup_seconds, 1),
            "rollup_rows": int(rollup_rows),
            "vacuum_analyze_seconds": round(vacuum_seconds, 1),
            "sizes": on_disk,
            "settings": await settings(conn),
            "server_version": await conn.fetchval("SHOW server_version"),
        }
    finally:
        await conn.close()


# --- 3: the 30-day report -----------------------------------------------------------------------------------


def _explain_summary(lines: list[str]) -> dict[str, Any]:
    """The plan's text, with the figures worth a glance: times, JIT compilation, sorts spilled to disk."""
    out: dict[str, Any] = {"jit_ms": 0.0, "sorts_on_disk_kb": []}
    for line in lines:
        s = line.strip()
        if s.startswith("Planning Time:"):
            out["planning_ms"] = float(s.split()[2])
        elif s.startswith("Execution Time:"):
            out["execution_ms"] = float(s.split()[2])
        elif s.startswith("Timing:") and "Total" in s:  # JIT compilation
            out["jit_ms"] = float(s.rsplit("Total", 1)[1].split()[0])
        elif "Sort Method: external merge" in s:
            out["sorts_on_disk_kb"].append(int(s.rsplit("Disk:", 1)[1].strip().removesuffix("kB")))
    out["plan"] = lines
    return out


async def report(server: Server, args: argparse.Namespace, since: float, until: float) -> dict[str, Any]:
    first_day, last_day, lead_end, trail_start = pgstore.report_bounds(since, until)
    conn = await server.admin()
    try:
        rollup_rows, rollup_records = await conn.fetchrow(
            "SELECT count(*), coalesce(sum(requests), 0) FROM usage_daily WHERE day >= $1 AND day < $2",
            first_day.date(),
            last_day.date(),
        )
        raw_rows = await conn.fetchval(
            "SELECT count(*) FROM usage WHERE (ts >= $1 AND ts < $2) OR (ts >= $3 AND ts < $4)",
            pgstore._ts(since),
            lead_end,
            trail_start,
            pgstore._ts(until),
        )
        window_records = await conn.fetchval(
            "SELECT count(*) FROM usage WHERE ts >= $1 AND ts < $2", pgstore._ts(since), pgstore._ts(until)
        )
    finally:
        await conn.close()
    out: dict[str, Any] = {
        "since": pgstore._ts(since).isoformat(),
        "until": pgstore._ts(until).isoformat(),
        "whole_days": (last_day - first_day).days,
        "partial_hours": [round((first_day.timestamp() - since) / 3600, 2), round((until % DAY) / 3600, 2)],
        "rollup_rows_read": int(rollup_rows),
        "rollup_records": int(rollup_records),
        "raw_rows_read": int(raw_rows),
        "records_in_window": int(window_records),
        "runs": args.runs,
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "by": {},
    }
    print(
        f"  report window {out['since']} .. {out['until']}: {window_records:,} records, read as"
        f" {rollup_rows:,} roll-up rows + {raw_rows:,} raw rows",
        flush=True,
    )
    for by in USAGE_GROUPS:
        # cold-ish: the server restarted (empty shared buffers; the OS page cache is not emptied)
        server.pg.stop()
        server.pg.start()
        store = server.store(statement_timeout=120.0)
        await store.open()
        try:
            await store.pool.fetchval("SELECT 1")  # the connection, not the report
            t0 = time.perf_counter()
            rows = await store.summarize_usage(since, until, by)
            cold = time.perf_counter() - t0
            warm = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                again = await store.summarize_usage(since, until, by)
                warm.append(time.perf_counter() - t0)
                assert again == rows
        finally:
            await store.close()
        total = sum(r.requests for r in rows)
        assert total == window_records, (by, total, window_records)  # roll-ups + raw rows = the raw rows
        out["by"][by] = {
            "groups": len(rows),
            "cold_ms": round(cold * 1000, 1),
            "warm_ms": [round(w * 1000, 1) for w in warm],
            "warm_median_ms": round(statistics.median(warm) * 1000, 1),
        }
        print(
            f"    by {by:<6} {len(rows):>6} groups  cold {cold * 1000:7.1f} ms"
            f"  warm median {statistics.median(warm) * 1000:7.1f} ms",
            flush=True,
        )
    params = (
        pgstore._ts(since),
        pgstore._ts(until),
        first_day.date(),
        last_day.date(),
        lead_end,
        trail_start,
    )
    conn = await server.admin()
    try:
        # as the store runs it: a prepared statement, whose first runs get a plan for their values (custom)
        # and later ones may get a generic plan, which prunes partitions when it starts
        await conn.execute(
            "PREPARE report(timestamptz, timestamptz, date, date, timestamptz, timestamptz) AS "
            + pgstore._REPORTS["key"]
        )
        explains = {}
        values = ", ".join(f"'{v.isoformat()}'" for v in params)  # our own dates (EXECUTE takes no $n)
        for mode in ("force_custom_plan", "force_generic_plan"):
            await conn.execute(f"SET plan_cache_mode = {mode}")
            rows = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) EXECUTE report({values})")
            explains[mode.removeprefix("force_").removesuffix("_plan")] = _explain_summary(
                [r[0] for r in rows]
            )
        out["explain_key"] = explains
    finally:
        await conn.close()
    return out


# --- 4: inserts ---------------------------------------------------------------------------------------------


def writer_process(cfg: dict[str, Any], barrier: Any, results: Any) -> None:
    results.put(asyncio.run(_writer(cfg, barrier)))


async def _writer(cfg: dict[str, Any], barrier: Any) -> dict[str, Any]:
    fleet = _fleet(cfg["seed"])
    rng = random.Random(cfg["seed"] + 7919 * (cfg["index"] + 1))  # noqa: S311
    store = PostgresStore(parse_postgres(cfg["url"]), cfg["password"], statement_timeout=60.0)
    await store.open()
    host = cfg["host"]

    def batch(n: int) -> list[UsageRecord]:
        now = time.time()
        out = []
        for _ in range(n):
            f = fleet.record(rng, now - rng.random(), host)
            out.append(
                UsageRecord(
                    ts=f[0],
                    request_id=f[1],
                    host=f[2],
                    key_id=f[3],
                    user=f[4],
                    method=f[5],
                    route=f[6],
                    model=f[7],
                    status=f[8],
                    stream=f[9],
                    prompt_tokens=f[10],
                    completion_tokens=f[11],
                    ttfb_ms=f[12],
                    duration_ms=f[13],
                    error=f[14],
                )
            )
        return out

    size, seconds, rate = cfg["batch"], cfg["seconds"], cfg["rate"]
    try:
        await store.add_usage(batch(size))  # the connection and the partition, not the measurement
        await asyncio.to_thread(barrier.wait)
        latencies: list[float] = []
        flushes: list[float] = []
        written, behind = 0, 0
        cpu0, started = time.process_time(), time.perf_counter()
        if not rate:  # as fast as it can: one batch after the other
            while time.perf_counter() - started < seconds:
                records = batch(size)
                t0 = time.perf_counter()
                await store.add_usage(records)
                latencies.append(time.perf_counter() - t0)
                written += len(records)
        else:  # paced: `rate` records a second, flushed once a second in batches of `size`
            tick = started
            while tick - started < seconds:
                tick += 1.0
                delay = tick - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    behind += 1
                t_flush = time.perf_counter()
                for offset in range(0, int(rate), size):
                    records = batch(min(size, int(rate) - offset))
                    t0 = time.perf_counter()
                    await store.add_usage(records)
                    latencies.append(time.perf_counter() - t0)
                    written += len(records)
                flushes.append(time.perf_counter() - t_flush)
        elapsed = time.perf_counter() - started
        if flushes:  # each flush writes the second before its tick: on time, `seconds` of records
            elapsed = max(tick - started, elapsed - flushes[-1])
        return {
            "source": SOURCE,
            "host": host,
            "records": written,
            "seconds": round(elapsed, 2),
            "records_per_s": round(written / elapsed, 1),
            "batch_p50_ms": round(pct(latencies, 0.5) * 1000, 1),
            "batch_p99_ms": round(pct(latencies, 0.99) * 1000, 1),
            "batch_max_ms": round(max(latencies) * 1000, 1),
            "flush_p50_ms": round(pct(flushes, 0.5) * 1000, 1) if flushes else None,
            "flush_p99_ms": round(pct(flushes, 0.99) * 1000, 1) if flushes else None,
            "flush_max_ms": round(max(flushes) * 1000, 1) if flushes else None,
            "seconds_behind": behind,
            "writer_cpu_seconds": round(time.process_time() - cpu0, 1),
        }
    finally:
        await store.close()


def inserts(server: Server, args: argparse.Namespace, writers: int, rate: float) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(writers + 1), ctx.Queue()
    fleet = Fleet(args.seed)
    procs = []
    for i in range(writers):
        cfg = {
            "index": i,
            "seed": args.seed,
            "url": server.pg.url("postgres", DB),
            "password": server.pg.password,
            "host": f"bench-{writers}x-{i}-{fleet.hosts[i % N_HOSTS]}",
            "batch": args.batch,
            "seconds": args.insert_seconds,
            "rate": rate,
        }
        proc = ctx.Process(target=writer_process, args=(cfg, barrier, results))
        proc.start()
        procs.append(proc)
    barrier.wait(timeout=120)
    cpu = Cpu()
    per = [results.get(timeout=args.insert_seconds + 300) for _ in procs]
    machine = cpu.result()
    for proc in procs:
        proc.join(timeout=30)
    if any(w.pop("source") != SOURCE for w in per):
        raise SystemExit("the store's source files changed during the run: measure again")
    rates = [w["records_per_s"] for w in per]
    return {
        "writers": writers,
        "batch": args.batch,
        "paced_rate": rate or None,
        "per_writer": per,
        "min_records_per_s": min(rates),
        "total_records_per_s": round(sum(rates), 1),
        "cpu": machine,
    }


# --- the run ------------------------------------------------------------------------------------------------


def data_end(now: float) -> float:
    """The end of the data and of the report's window: 14:23:17 UTC today (yesterday when that is still to
    come), so that the window starts and ends mid-day."""
    end = now // DAY * DAY + 14 * 3600 + 23 * 60 + 17
    return end if end <= now else end - DAY


async def measure(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    end = data_end(time.time())
    start = end - args.days * DAY
    result: dict[str, Any] = {"load": await load(server, args, start, end)}
    window = min(30, args.days) * DAY
    result["report"] = await report(server, args, end - window, end)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=10_000_000)
    parser.add_argument(
        "--days", type=int, default=90, help="the records' span (the 30-day report reads a third of them)"
    )
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--chunk", type=int, default=100_000, help="records per COPY")
    parser.add_argument("--generators", type=int, default=1, help="processes generating records")
    parser.add_argument("--runs", type=int, default=5, help="warm runs of each report (the median)")
    parser.add_argument("--insert-seconds", type=float, default=20.0)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=500, help="records per add_usage (BatchWriter's)")
    parser.add_argument(
        "--paced-rate", type=float, default=TARGET_INSERT_RATE, help="records/s per paced writer; 0: skip"
    )
    parser.add_argument(
        "--keep", action="store_true", help="leave the server running (prints how to reach it)"
    )
    parser.add_argument("--quick", action="store_true", help="200,000 records, 5 s of inserts: a smoke run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if args.quick:
        args.records, args.insert_seconds = 200_000, 5.0

    from postgres import PostgresServer

    print(
        f"llmfleet bench-store: {args.records:,} records over {args.days} days on a durable PostgreSQL",
        flush=True,
    )
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="llmfleet-bench-store-") as tmp:
        pg = PostgresServer(Path(tmp), durable=True).start()
        server = Server(pg)
        try:
            pg.create_database(DB)
            result = asyncio.run(measure(server, args))
            print("  inserts: 1 writer, as fast as it can", flush=True)
            result["inserts"] = {"one": inserts(server, args, 1, 0)}
            print(f"  inserts: {args.writers} writers at once, as fast as they can", flush=True)
            result["inserts"]["many"] = inserts(server, args, args.writers, 0)
            if args.paced_rate:
                print(
                    f"  inserts: {args.writers} writers paced at {args.paced_rate:,.0f} records/s", flush=True
                )
                result["inserts"]["paced"] = inserts(server, args, args.writers, args.paced_rate)
        finally:
            if args.keep:
                print(f"  server kept: {pg.admin_dsn(DB)} (data in {pg.dir})")
            else:
                pg.destroy()

    mem = psutil.virtual_memory()
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "total_seconds": round(time.time() - started),
        "machine": {
            "cpus": os.cpu_count(),
            "memory_gib": round(mem.total / 2**30, 1),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "asyncpg": asyncpg.__version__,
        },
        "source": SOURCE,
        **result,
    }
    load_, rep, ins = result["load"], result["report"], result["inserts"]
    worst_warm = max(b["warm_median_ms"] for b in rep["by"].values())
    worst_cold = max(b["cold_ms"] for b in rep["by"].values())
    per_agent = min(ins["one"]["min_records_per_s"], ins["many"]["min_records_per_s"])
    paced_ok = "paced" not in ins or all(w["seconds_behind"] == 0 for w in ins["paced"]["per_writer"])
    result["targets"] = {
        "report_under_1s": worst_cold < TARGET_REPORT_S * 1000 and worst_warm < TARGET_REPORT_S * 1000,
        "worst_report_warm_ms": worst_warm,
        "worst_report_cold_ms": worst_cold,
        "inserts_2000_per_agent": per_agent >= TARGET_INSERT_RATE and paced_ok,
        "worst_insert_rate_per_agent": per_agent,
    }

    s = load_["sizes"]
    print(f"\n  PostgreSQL {load_['server_version']}: fsync={load_['settings']['fsync']}", end="")
    print(
        f" synchronous_commit={load_['settings']['synchronous_commit']}"
        f" shared_buffers={load_['settings']['shared_buffers']} work_mem={load_['settings']['work_mem']}"
    )
    print(
        f"  load     {load_['records']:,} records / {load_['days']} days: {load_['seconds']} s"
        f" ({load_['rows_per_s']:,} rows/s; in COPY {load_['copy_seconds']} s, {load_['copy_rows_per_s']:,}"
        f" rows/s); roll-ups {load_['rollup_seconds']} s ({load_['rollup_rows']:,} rows);"
        f" VACUUM ANALYZE {load_['vacuum_analyze_seconds']} s"
    )
    print(
        f"  on disk  usage {fmt_bytes(s['usage']['total_bytes'])}"
        f" (table {fmt_bytes(s['usage']['table_bytes'])},"
        f" indexes {fmt_bytes(s['usage']['index_bytes'])}, {s['usage']['partitions']} partitions);"
        f" usage_daily {fmt_bytes(s['usage_daily']['total_bytes'])}"
    )
    print(
        f"  report   30 days ({rep['records_in_window']:,} records): {rep['rollup_rows_read']:,} roll-up rows"
        f" ({rep['whole_days']} whole days) + {rep['raw_rows_read']:,} raw rows (partial days of"
        f" {rep['partial_hours'][0]} h and {rep['partial_hours'][1]} h)"
    )
    print("           by      groups   cold ms   warm ms (median)")
    for by, b in rep["by"].items():
        print(f"           {by:<6} {b['groups']:>7} {b['cold_ms']:>9.1f} {b['warm_median_ms']:>9.1f}")
    print("  inserts  writers  records/s per writer  total/s  batch p50  batch p99  CPU busy (cores)")
    for name, run in ins.items():
        rates = [w["records_per_s"] for w in run["per_writer"]]
        label = f"{run['writers']}{' paced' if name == 'paced' else ''}"
        p50 = statistics.median(w["batch_p50_ms"] for w in run["per_writer"])
        p99 = max(w["batch_p99_ms"] for w in run["per_writer"])
        print(
            f"           {label:<8} {min(rates):>9,.0f} .. {max(rates):>7,.0f}"
            f" {run['total_records_per_s']:>8,.0f}"
            f" {p50:>7.1f} ms {p99:>7.1f} ms  {run['cpu']['busy_cores']}"
        )
        if name == "paced":
            flush = max(w["flush_max_ms"] for w in run["per_writer"])
            behind = sum(w["seconds_behind"] for w in run["per_writer"])
            print(
                f"           paced: slowest flush of a second's records {flush:.0f} ms;"
                f" seconds behind: {behind}"
            )
    t = result["targets"]
    print(
        f"\n  targets  30-day report under 1 s: {'met' if t['report_under_1s'] else 'MISSED'}"
        f" (worst warm {worst_warm:.0f} ms, worst cold {worst_cold:.0f} ms);"
        f" 2,000 records/s per agent: {'met' if t['inserts_2000_per_agent'] else 'MISSED'}"
        f" (slowest writer {per_agent:,.0f}/s)"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    name = "quick" if args.quick else time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = args.out / f"store-{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n  written: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
