"""The PostgreSQL store's schema, as numbered migrations applied in order (`llmfleet-agent db upgrade`, and
at the agent's start when its credential may).

Rules: a migration only adds (tables, columns, indexes, functions, grants) or moves data; it never drops a
table or a column that holds records, so an agent one version behind keeps working on an upgraded
database. Each runs in its own transaction; the whole upgrade holds an advisory lock, so agents that start
together apply each migration once. The applied versions are rows of `llmfleet_schema`.

Privileges: tables belong to the owner role that runs the migrations; the agent's login role is a member
of `llmfleet_agent_access` (made by `db setup`, or here when the migrating role may create roles), which is
granted only what an agent does: read keys and record their last use, insert audit records, add usage
through `llmfleet_add_usage` (which keeps the daily roll-ups), read for reports, and call the SECURITY
DEFINER functions that make a month's usage partition and remove what the owner's retention settings
(`llmfleet_settings`) let go. It may not create, alter, delete or truncate anything itself, nor choose
what expires.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

# the role whose members may do what an agent does (granted to the agent's login role); the SQL below
# spells it out (no SQL is built from strings), tests/test_postgres_store.py holds them equal
AGENT_ACCESS_ROLE = "llmfleet_agent_access"
# pg_advisory_lock key for upgrades: any fixed 64-bit number, the same in every agent
UPGRADE_LOCK = 0x6C6C6D66_6C656574  # "llmfleet"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


_INITIAL = """
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'llmfleet_agent_access') THEN
    CREATE ROLE llmfleet_agent_access NOLOGIN;
  END IF;
END $$;

CREATE TABLE keys (
    id             text PRIMARY KEY,
    name           text NOT NULL,
    role           text NOT NULL,
    hash           text NOT NULL,
    models         jsonb NOT NULL DEFAULT '[]',
    created        double precision NOT NULL,
    expires        double precision,
    revoked        double precision,
    last_used      double precision,
    max_concurrent integer,
    rpm            integer
);

CREATE TABLE audit (
    id     text PRIMARY KEY,
    ts     timestamptz NOT NULL,
    event  text NOT NULL,
    key_id text,
    host   text,
    detail jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_ts ON audit (ts);

-- one row per proxied request; monthly partitions (usage_YYYY_MM), so retention drops whole months;
-- the primary key makes a replayed record a no-op and serves every time-range scan (ts first)
CREATE TABLE usage (
    ts                timestamptz NOT NULL,
    request_id        text NOT NULL,
    host              text,
    key_id            text,
    user_name         text,
    method            text NOT NULL,
    route             text NOT NULL,
    model             text,
    status            smallint NOT NULL,
    stream            boolean NOT NULL,
    prompt_tokens     integer,
    completion_tokens integer,
    ttfb_ms           double precision,
    duration_ms       double precision NOT NULL,
    error             text,
    PRIMARY KEY (ts, request_id)
) PARTITION BY RANGE (ts);

-- the fleet's settings, set by the owner (`llmfleet-agent db upgrade --usage-retention ...`); agents only
-- read them, so no host can shorten what the fleet keeps
CREATE TABLE llmfleet_settings (
    name  text PRIMARY KEY,
    value interval  -- null: kept for ever
);
INSERT INTO llmfleet_settings VALUES ('usage_retention', interval '400 days'),
                                     ('audit_retention', interval '90 days');

-- the month's partition of `at` (UTC), made when missing; returns its name. Only months from ten years
-- back to one month ahead: a host with a wild clock cannot make partitions without end
CREATE FUNCTION llmfleet_usage_partition(at timestamptz) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
  first date := date_trunc('month', at AT TIME ZONE 'UTC')::date;
  part text := 'usage_' || to_char(first, 'YYYY_MM');
BEGIN
  IF at < now() - interval '10 years' OR at > now() + interval '1 month' THEN
    RAISE EXCEPTION 'no usage partition for %: records must be from ten years back to one month ahead', at
      USING ERRCODE = 'check_violation';
  END IF;
  IF to_regclass('public.' || part) IS NULL THEN
    PERFORM pg_advisory_xact_lock(hashtext('llmfleet_usage_partitions'));
    IF to_regclass('public.' || part) IS NULL THEN
      EXECUTE format('CREATE TABLE public.%I PARTITION OF public.usage FOR VALUES FROM (%L) TO (%L)',
                     part, first::timestamp AT TIME ZONE 'UTC',
                     (first + interval '1 month')::timestamp AT TIME ZONE 'UTC');
    END IF;
  END IF;
  RETURN part;
END $$;

-- drops the months that ended before now() - usage_retention, whole (no row-by-row delete, no bloat);
-- returns the number of rows they held. The cutoff is the database's, from the owner's setting.
CREATE FUNCTION llmfleet_drop_expired_usage() RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
  keep interval := (SELECT value FROM public.llmfleet_settings WHERE name = 'usage_retention');
  part record;
  n bigint;
  total bigint := 0;
BEGIN
  IF keep IS NULL THEN
    RETURN 0;
  END IF;
  PERFORM pg_advisory_xact_lock(hashtext('llmfleet_usage_partitions'));
  FOR part IN
    SELECT c.relname FROM pg_catalog.pg_inherits i JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
    WHERE i.inhparent = 'public.usage'::regclass AND c.relname ~ '^usage_[0-9]{4}_[0-9]{2}$'
      AND (to_date(substr(c.relname, 7), 'YYYY_MM') + interval '1 month')::timestamp AT TIME ZONE 'UTC'
          <= now() - keep
  LOOP
    EXECUTE format('SELECT count(*) FROM public.%I', part.relname) INTO n;
    EXECUTE format('DROP TABLE public.%I', part.relname);
    total := total + n;
  END LOOP;
  RETURN total;
END $$;

-- deletes at most 5000 audit records older than now() - audit_retention; the caller repeats while it
-- gets 5000 (short transactions)
CREATE FUNCTION llmfleet_prune_audit() RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
  keep interval := (SELECT value FROM public.llmfleet_settings WHERE name = 'audit_retention');
  n integer;
BEGIN
  IF keep IS NULL THEN
    RETURN 0;
  END IF;
  DELETE FROM public.audit WHERE id IN (SELECT id FROM public.audit WHERE ts < now() - keep LIMIT 5000);
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n;
END $$;

REVOKE ALL ON FUNCTION llmfleet_usage_partition(timestamptz) FROM PUBLIC;
REVOKE ALL ON FUNCTION llmfleet_drop_expired_usage() FROM PUBLIC;
REVOKE ALL ON FUNCTION llmfleet_prune_audit() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION llmfleet_usage_partition(timestamptz) TO llmfleet_agent_access;
GRANT EXECUTE ON FUNCTION llmfleet_drop_expired_usage() TO llmfleet_agent_access;
GRANT EXECUTE ON FUNCTION llmfleet_prune_audit() TO llmfleet_agent_access;
GRANT SELECT ON keys, llmfleet_schema, llmfleet_settings TO llmfleet_agent_access;
GRANT UPDATE (last_used) ON keys TO llmfleet_agent_access;
GRANT SELECT, INSERT ON audit TO llmfleet_agent_access;
GRANT SELECT ON usage TO llmfleet_agent_access;
"""

# per day (UTC), host, key, user and model: what reports read for whole days instead of raw rows. Kept up
# to date by the insert itself (llmfleet_add_usage), counting only the rows that were new, so a replay
# never counts twice; kept when raw rows expire.
_DAILY = """
CREATE TABLE usage_daily (
    day               date NOT NULL,
    host              text NOT NULL,
    key_id            text NOT NULL,
    user_name         text NOT NULL,
    model             text NOT NULL,
    requests          bigint NOT NULL,
    errors            bigint NOT NULL,
    prompt_tokens     bigint NOT NULL,
    completion_tokens bigint NOT NULL,
    PRIMARY KEY (day, host, key_id, user_name, model)
);

-- (re)computes the roll-ups of [first, last] from the raw rows: after a bulk load that bypassed the
-- agent's insert (COPY), or here for the rows stored before roll-ups existed
CREATE FUNCTION llmfleet_rebuild_usage_daily(first date, last date) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE n bigint;
BEGIN
  DELETE FROM public.usage_daily WHERE day BETWEEN first AND last;
  INSERT INTO public.usage_daily
  SELECT (ts AT TIME ZONE 'UTC')::date, coalesce(host, ''), coalesce(key_id, ''), coalesce(user_name, ''),
         coalesce(model, ''), count(*), count(*) FILTER (WHERE status >= 400),
         coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0)
  FROM public.usage
  WHERE ts >= first::timestamp AT TIME ZONE 'UTC' AND ts < (last + 1)::timestamp AT TIME ZONE 'UTC'
  GROUP BY 1, 2, 3, 4, 5;
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n;
END $$;
REVOKE ALL ON FUNCTION llmfleet_rebuild_usage_daily(date, date) FROM PUBLIC;

SELECT llmfleet_rebuild_usage_daily(
  coalesce((SELECT min(ts) FROM usage) AT TIME ZONE 'UTC', now() AT TIME ZONE 'UTC')::date,
  coalesce((SELECT max(ts) FROM usage) AT TIME ZONE 'UTC', now() AT TIME ZONE 'UTC')::date);

-- the one way an agent adds usage: the batch's rows (a row already there is skipped) and, in the same
-- statement, the roll-ups of the rows that were new. Agents may not write either table directly, so no
-- host can rewrite what the fleet's reports read. Returns how many rows were new.
CREATE FUNCTION llmfleet_add_usage(
    ts timestamptz[], request_id text[], host text[], key_id text[], user_name text[], method text[],
    route text[], model text[], status smallint[], stream boolean[], prompt_tokens integer[],
    completion_tokens integer[], ttfb_ms float8[], duration_ms float8[], error text[]
) RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
WITH new AS (
    INSERT INTO public.usage (ts, request_id, host, key_id, user_name, method, route, model, status,
                              stream, prompt_tokens, completion_tokens, ttfb_ms, duration_ms, error)
    SELECT * FROM unnest($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
    ON CONFLICT DO NOTHING
    RETURNING usage.ts, usage.host, usage.key_id, usage.user_name, usage.model, usage.status,
              usage.prompt_tokens, usage.completion_tokens
), daily AS (
    INSERT INTO public.usage_daily AS d
    SELECT (new.ts AT TIME ZONE 'UTC')::date, coalesce(new.host, ''), coalesce(new.key_id, ''),
           coalesce(new.user_name, ''), coalesce(new.model, ''), count(*),
           count(*) FILTER (WHERE new.status >= 400), coalesce(sum(new.prompt_tokens), 0),
           coalesce(sum(new.completion_tokens), 0)
    FROM new GROUP BY 1, 2, 3, 4, 5
    ON CONFLICT (day, host, key_id, user_name, model) DO UPDATE SET
        requests = d.requests + excluded.requests,
        errors = d.errors + excluded.errors,
        prompt_tokens = d.prompt_tokens + excluded.prompt_tokens,
        completion_tokens = d.completion_tokens + excluded.completion_tokens
    RETURNING 1
)
SELECT count(*) FROM new
$$;
REVOKE ALL ON FUNCTION llmfleet_add_usage(timestamptz[], text[], text[], text[], text[], text[], text[],
    text[], smallint[], boolean[], integer[], integer[], float8[], float8[], text[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION llmfleet_add_usage(timestamptz[], text[], text[], text[], text[], text[],
    text[], text[], smallint[], boolean[], integer[], integer[], float8[], float8[], text[])
    TO llmfleet_agent_access;
GRANT SELECT ON usage_daily TO llmfleet_agent_access;
"""

# personal keys (minted by directory users on any agent): their owner, suspension and last confirmation.
# The agent role writes them only through these functions, which touch personal keys only (owner_id set):
# no host can create, change or revoke the keys the operators made with the owner's credential, nor give a
# key an owner after the fact. Leases: one agent of the fleet at a time does a job (revalidation).
_PERSONAL = """
ALTER TABLE keys ADD COLUMN owner_id text, ADD COLUMN owner text, ADD COLUMN suspended text,
    ADD COLUMN checked double precision;
CREATE INDEX keys_owner ON keys (owner_id) WHERE owner_id IS NOT NULL;

-- what a host may put in a personal key is checked here, not trusted: a role no higher than operator (the
-- deployment's admin keys are the owner's to make), a list of text patterns, an owner that is a GUID, an
-- expiry within 400 days; its creation and confirmation times are the database's clock
CREATE FUNCTION llmfleet_personal_grant_ok(p_role text, p_models text) RETURNS boolean
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT p_role IN ('user', 'operator')
     AND jsonb_typeof(p_models::jsonb) = 'array'
     AND NOT EXISTS (SELECT FROM jsonb_array_elements(p_models::jsonb) e WHERE jsonb_typeof(e) <> 'string')
$$;

CREATE FUNCTION llmfleet_put_personal_key(p_id text, p_name text, p_role text, p_hash text, p_models text,
    p_created float8, p_expires float8, p_revoked float8, p_last_used float8, p_max_concurrent integer,
    p_rpm integer, p_owner_id text, p_owner text, p_suspended text, p_checked float8) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
  now_s float8 := extract(epoch FROM now());
BEGIN
  IF p_owner_id IS NULL OR p_owner_id !~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
    RAISE EXCEPTION 'llmfleet_put_personal_key: a personal key needs an owner (a GUID)';
  END IF;
  IF NOT public.llmfleet_personal_grant_ok(p_role, p_models) THEN
    RAISE EXCEPTION 'llmfleet_put_personal_key: role % or models % not allowed', p_role, p_models;
  END IF;
  IF p_expires IS NULL OR p_expires > now_s + 400 * 86400 THEN
    RAISE EXCEPTION 'llmfleet_put_personal_key: a personal key expires within 400 days';
  END IF;
  INSERT INTO public.keys (id, name, role, hash, models, created, expires, revoked, last_used,
                           max_concurrent, rpm, owner_id, owner, suspended, checked)
  VALUES (p_id, p_name, p_role, p_hash, p_models::jsonb, now_s, p_expires, NULL, NULL,
          p_max_concurrent, p_rpm, p_owner_id, p_owner, NULL, now_s);
END $$;

CREATE FUNCTION llmfleet_revoke_personal_key(p_id text, p_at float8) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
  UPDATE public.keys SET revoked = coalesce(revoked, extract(epoch FROM now()))
  WHERE id = p_id AND owner_id IS NOT NULL
$$;

-- revalidation's result: the grant (checked as above), the suspension, and a confirmation time that is the
-- database's clock (only when not suspended)
CREATE FUNCTION llmfleet_set_personal_grant(p_id text, p_role text, p_models text, p_suspended text,
    p_checked float8) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
  IF NOT public.llmfleet_personal_grant_ok(p_role, p_models) THEN
    RAISE EXCEPTION 'llmfleet_set_personal_grant: role % or models % not allowed', p_role, p_models;
  END IF;
  UPDATE public.keys SET role = p_role, models = p_models::jsonb, suspended = p_suspended,
      checked = CASE WHEN p_suspended IS NULL THEN extract(epoch FROM now()) ELSE checked END
  WHERE id = p_id AND owner_id IS NOT NULL;
END $$;

CREATE TABLE llmfleet_leases (
    name   text PRIMARY KEY,
    holder text NOT NULL,
    until  timestamptz NOT NULL
);
-- at most an hour: a host cannot keep the others from a job for longer than that
CREATE FUNCTION llmfleet_take_lease(p_name text, p_holder text, p_seconds float8) RETURNS boolean
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
  INSERT INTO public.llmfleet_leases AS l
  VALUES (p_name, p_holder, now() + make_interval(secs => least(greatest(p_seconds, 0), 3600)))
  ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until = excluded.until
  WHERE l.holder = excluded.holder OR l.until < now()
  RETURNING true
$$;

REVOKE ALL ON FUNCTION llmfleet_personal_grant_ok(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION llmfleet_put_personal_key(text, text, text, text, text, float8, float8, float8,
    float8, integer, integer, text, text, text, float8) FROM PUBLIC;
REVOKE ALL ON FUNCTION llmfleet_revoke_personal_key(text, float8) FROM PUBLIC;
REVOKE ALL ON FUNCTION llmfleet_set_personal_grant(text, text, text, text, float8) FROM PUBLIC;
REVOKE ALL ON FUNCTION llmfleet_take_lease(text, text, float8) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION llmfleet_put_personal_key(text, text, text, text, text, float8, float8, float8,
    float8, integer, integer, text, text, text, float8) TO llmfleet_agent_access;
GRANT EXECUTE ON FUNCTION llmfleet_revoke_personal_key(text, float8) TO llmfleet_agent_access;
GRANT EXECUTE ON FUNCTION llmfleet_set_personal_grant(text, text, text, text, float8)
    TO llmfleet_agent_access;
GRANT EXECUTE ON FUNCTION llmfleet_take_lease(text, text, float8) TO llmfleet_agent_access;
"""

# frontend keys (Open WebUI's): they name their end user per request; the owner makes them
_FRONTEND = """
ALTER TABLE keys ADD COLUMN frontend boolean NOT NULL DEFAULT false;
"""

# the gateway's keys: they act for the caller the gateway authenticated; the owner makes them
_GATEWAY = """
ALTER TABLE keys ADD COLUMN gateway boolean NOT NULL DEFAULT false;
"""

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "keys, audit, usage in monthly partitions", _INITIAL),
    Migration(2, "daily usage roll-ups", _DAILY),
    Migration(3, "personal keys and leases", _PERSONAL),
    Migration(4, "frontend keys", _FRONTEND),
    Migration(5, "gateway keys", _GATEWAY),
)
HEAD = MIGRATIONS[-1].version

_SCHEMA_TABLE = """
CREATE TABLE llmfleet_schema (
    version integer PRIMARY KEY,
    name    text NOT NULL,
    applied timestamptz NOT NULL DEFAULT now()
)
"""


async def schema_version(conn: asyncpg.Connection) -> int:
    """The highest migration applied (0: an empty database)."""
    if await conn.fetchval("SELECT to_regclass('public.llmfleet_schema')") is None:
        return 0
    return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM llmfleet_schema"))


async def upgrade(conn: asyncpg.Connection, target: int = HEAD) -> tuple[int, int, list[str]]:
    """Apply the migrations after the database's version up to `target`: (from, to, names applied)."""
    await conn.execute("SELECT pg_advisory_lock($1)", UPGRADE_LOCK)
    try:
        current = await schema_version(conn)
        if current == 0 and await conn.fetchval("SELECT to_regclass('public.llmfleet_schema')") is None:
            await conn.execute(_SCHEMA_TABLE)
        start, applied = current, []
        for migration in MIGRATIONS:
            if current < migration.version <= target:
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await conn.execute(
                        "INSERT INTO llmfleet_schema (version, name) VALUES ($1, $2)",
                        migration.version,
                        migration.name,
                    )
                current = migration.version
                applied.append(f"{migration.version:04d} {migration.name}")
        return start, current, applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", UPGRADE_LOCK)
