"""The agent's configuration: one YAML file, validated at start.

Every section has safe defaults, so a file with only `listen`, `ollama` and `store` works. An unknown key
or a bad value raises `ConfigError` with a message that names the key (for example `ollama.port`).
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .addresses import parse_networks
from .durations import parse_duration
from .loopback import is_loopback

CONFIG_ENV = "LLMFLEET_CONFIG"
DEFAULT_STATE_DIR = Path("/var/lib/llmfleet-agent")

Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0)]


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the offending key."""


def _duration_or_null(value: object) -> float | None:
    return None if value is None else parse_duration(value)  # type: ignore[arg-type]


# a duration in the file (a number of seconds or 30s, 15m, 2h, 7d, 1w), or null or never for no limit
Duration = Annotated[Annotated[float, Field(gt=0)] | None, BeforeValidator(_duration_or_null)]


def _duration_required(value: object) -> float:
    seconds = parse_duration(value)  # type: ignore[arg-type]
    if seconds is None:
        raise ValueError(f"{value!r}: a duration is required here, not a word for no limit")
    return seconds


# a duration that must be one (a number of seconds or 30s, 15m, 2h, 7d, 1w)
Interval = Annotated[float, Field(gt=0), BeforeValidator(_duration_required)]


def _networks_required(value: list[str]) -> list[str]:
    parse_networks(value)  # ValueError naming the one that is not
    return value


# addresses or CIDR blocks (auth.gateway_sources, listen.forwarded_by)
Networks = Annotated[list[str], AfterValidator(_networks_required)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSConfig(_Section):
    cert: Path
    key: Path


class ListenConfig(_Section):
    host: str = "127.0.0.1"
    port: Port = 8443
    tls: TLSConfig | None = None
    # on SIGTERM: how long requests in flight may take to finish before their answers are cut
    shutdown_timeout: Seconds = 30.0
    # a load balancer's networks: a connection from these is handled as coming from the last address of its
    # X-Forwarded-For (forwarded.py); empty: the header is ignored
    forwarded_by: Networks = []


class RestartConfig(_Section):
    initial_delay: Seconds = 0.5
    max_delay: Seconds = 30.0
    max_failures: Annotated[int, Field(ge=1)] = 5
    # a child that ran this long without failing has its failure count reset
    reset_after: Seconds = 30.0

    @model_validator(mode="after")
    def _delays_ordered(self) -> RestartConfig:
        if self.max_delay < self.initial_delay:
            raise ValueError("max_delay must be at least initial_delay")
        return self


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/]*(:[A-Za-z0-9._\-]+)?$")


class OllamaConfig(_Section):
    command: Annotated[list[str], Field(min_length=1)] = ["ollama", "serve"]
    port: Port = 11434
    models: list[str] = []
    models_dir: Path | None = None
    env: dict[str, str] = {}
    start_timeout: Seconds = 60.0
    stop_timeout: Seconds = 10.0
    health_interval: Seconds = 5.0
    restart: RestartConfig = RestartConfig()

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not _ENV_NAME.match(name):
                raise ValueError(f"{name!r} is not an environment variable name")
            if name == "OLLAMA_HOST":
                raise ValueError("OLLAMA_HOST is set by the agent (127.0.0.1 and ollama.port)")
        return value

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not _MODEL_NAME.match(name):
                raise ValueError(f"{name!r} is not a model name (name:tag)")
        return value


class LdapGroupGrant(_Section):
    # what members (nested membership counts) get: their highest role across their groups, and the union
    # of the groups' model patterns (a group with no patterns grants every model)
    role: Literal["user", "operator", "admin"] = "user"
    models: list[str] = []


DEFAULT_MAX_STALE = 3600.0
_LDAP_URL = re.compile(r"^(ldaps?)://([^/:?#\s]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?/?$")


class LdapConfig(_Section):
    """Directory logins (Active Directory over LDAPS): docs/directory.md."""

    # domain controllers, tried in turn: ldaps://dc1.corp.example.com (636), or ldap://... with start_tls
    urls: Annotated[list[str], Field(min_length=1)]
    # ldap:// URLs upgrade with StartTLS; without it plain LDAP is refused unless allow_plain (a lab only:
    # passwords would cross the network in clear)
    start_tls: bool = False
    allow_plain: bool = False
    # the CA that signed the domain controllers' certificates (verified by name); required unless plain
    ca_file: Path | None = None
    # a name the domain controllers' certificates may carry instead of the URL's host: the domain's DNS
    # name, for URLs that give the controllers' addresses (a domain controller's certificate names the
    # domain; the host need not resolve it)
    server_name: Annotated[str, Field(min_length=1, max_length=253)] | None = None
    # the UPN suffix: a user signs in as name@domain (or gives the whole UPN)
    domain: Annotated[str, Field(min_length=1)]
    base_dn: Annotated[str, Field(min_length=1)]
    # a read-only service account for look-ups (UPN or DN); its password from a file, or from the systemd
    # credential of that file's name ($CREDENTIALS_DIRECTORY/<name>)
    bind_user: Annotated[str, Field(min_length=1)]
    bind_password_file: Path
    # group DN or name (cn) -> what its members may do; a user in none of them is refused
    groups: Annotated[dict[str, LdapGroupGrant], Field(min_length=1)]
    # seconds for a connection and for an answer
    timeout: Seconds = 5.0
    # how often the owners of personal keys are looked up again (one agent of the fleet at a time)
    revalidate_interval: Interval = 300.0
    # the directory unreachable: personal keys whose owner was confirmed within this keep working
    max_stale: Interval = DEFAULT_MAX_STALE
    # personal keys: the lifetime asked for is capped at key_max_ttl (default key_default_ttl); at most
    # max_keys_per_user active keys per user
    key_default_ttl: Interval = 30 * 86400.0
    key_max_ttl: Interval = 90 * 86400.0
    max_keys_per_user: Annotated[int, Field(ge=1, le=100)] = 10
    # HTTP Basic (directory credentials) accepted on the API routes too, for curl users; a login is kept for
    # basic_cache_ttl so that not every request binds (an account disabled meanwhile works that long)
    basic_on_api: bool = False
    basic_cache_ttl: Interval = 120.0

    @field_validator("urls")
    @classmethod
    def _urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if not _LDAP_URL.match(url):
                raise ValueError(f"{url!r} is not an LDAP URL (ldaps://host[:port] or ldap://host[:port])")
        return value

    @model_validator(mode="after")
    def _transport(self) -> LdapConfig:
        plain = [u for u in self.urls if u.startswith("ldap://")]
        if plain and not self.start_tls and not self.allow_plain:
            raise ValueError(
                f"{plain[0]}: plain LDAP would send passwords in clear; use ldaps://, or start_tls: true"
                " (allow_plain: true only for a lab)"
            )
        if self.ca_file is None and (self.start_tls or len(plain) < len(self.urls)):
            raise ValueError("ca_file: required to verify the domain controllers (LDAPS or StartTLS)")
        if self.key_default_ttl > self.key_max_ttl:
            raise ValueError("key_default_ttl must be at most key_max_ttl")
        return self


Tokens = Annotated[int, Field(ge=1)]


class BudgetLimit(_Section):
    # tokens (prompt + completion) per UTC day and per calendar month (UTC); null: no limit for that period
    day: Tokens | None = None
    month: Tokens | None = None


class BudgetsConfig(_Section):
    """Token budgets per person, counted fleet-wide (docs/budgets.md)."""

    # directory group (DN or name, as in auth.ldap.groups) -> its members' budget; a person in several:
    # the most generous for each period, where a group that sets no limit for a period gives no limit
    groups: dict[str, BudgetLimit] = {}
    # a person (UPN, or a frontend user's e-mail; without regard to case) -> their budget, instead of
    # their groups'
    users: dict[str, BudgetLimit] = {}
    # everyone else who is a person (a frontend's users the directory does not know, say); null: no limit
    default: BudgetLimit | None = None
    # how often the fleet's use is read from the store: another agent's use is seen at most this long
    # after that agent wrote it (it writes every second)
    refresh_interval: Interval = 1.0
    # requests of one person with a budget running at once on an agent: a budget is checked when a
    # request starts, so this bounds what a spent budget can still overrun by
    max_concurrent_per_person: Annotated[int, Field(ge=1, le=1000)] = 4

    @field_validator("users")
    @classmethod
    def _user_names(cls, value: dict[str, BudgetLimit]) -> dict[str, BudgetLimit]:
        seen: dict[str, str] = {}
        for name in value:
            folded = name.strip().lower()
            if not folded:
                raise ValueError("a user's name must not be empty")
            if folded in seen:
                raise ValueError(f"{name!r} and {seen[folded]!r} name the same person (case does not count)")
            seen[folded] = name
        return value


class AuthConfig(_Section):
    # how often the agent re-reads keys from the store (revocations take effect within this time)
    refresh_interval: Seconds = 2.0
    # auth failures are logged and audited once per (address, reason) per window, with their count
    failure_window: Seconds = 60.0
    # directory logins and personal keys (POST /agent/keys with the user's directory credentials)
    ldap: LdapConfig | None = None
    # where the fleet's gateway calls from (addresses or CIDRs): a gateway key (keys create --gateway) is
    # accepted from these only, and acts for the caller it names (gateway_identity.py); empty: from nowhere
    gateway_sources: Networks = []


class StoreConfig(_Section):
    # sqlite:////absolute/path/agent.db (one host, the default), or
    # postgresql://user@host:5432/dbname?sslmode=verify-full&sslrootcert=/path/ca.pem (the fleet's shared
    # store; the password from password_file, never in the URL; see store/urls.py)
    url: str = "sqlite:///" + str(DEFAULT_STATE_DIR / "agent.db")
    # PostgreSQL: the password's file; a systemd credential of that file name, when the service has one
    # ($CREDENTIALS_DIRECTORY/<name>), is read instead (LoadCredential= in the unit)
    password_file: Path | None = None
    # PostgreSQL: connections kept open, and how long a connect or a statement may take before the store
    # counts as away (records then go to the spool)
    pool_size: Annotated[int, Field(ge=1, le=50)] = 4
    connect_timeout: Seconds = 5.0
    statement_timeout: Seconds = 10.0
    # records the store could not take wait here, on local disk, until it can (default: <state_dir>/spool);
    # past spool_max_bytes new records are dropped and counted (llmfleet_spool_dropped_total)
    spool_dir: Path | None = None
    spool_max_bytes: Annotated[int, Field(ge=1024 * 1024)] = 256 * 1024 * 1024
    # records older than this are deleted (at start, then hourly); null: kept for ever. PostgreSQL: usage
    # rows go a whole month at a time (monthly partitions), the daily roll-ups that reports read stay
    audit_retention: Duration | None = 90 * 86400.0
    usage_retention: Duration | None = 400 * 86400.0

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        from .store.urls import url_problem  # the store's own rule for its URLs

        problem = url_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @property
    def sqlite_path(self) -> Path | None:
        if self.url.startswith("sqlite:///"):
            return Path(self.url[len("sqlite:///") :])
        return None


class IdleConfig(_Section):
    # GPU utilisation (percent) above which the GPU counts as activity; null: off
    gpu_activity_threshold: Annotated[float, Field(ge=0, le=100)] | None = None
    # open login sessions (who/utmp) count as activity
    count_logins: bool = False


class ProbesConfig(_Section):
    interval: Seconds = 5.0
    # /readyz is 503 "no GPU visible" while NVML sees no GPU or /dev/nvidia-uvm is missing (a GPU host
    # without its driver, module or device file would run Ollama on the CPU); off by default, so hosts
    # without a GPU (the demo, the tests) work
    require_gpu: bool = False


class LimitsConfig(_Section):
    max_body_bytes: Annotated[int, Field(ge=1024)] = 16 * 1024 * 1024
    # the longest a client may take to send a request body (408 after); for blob uploads, the longest
    # wait for the next piece of the body
    body_timeout: Seconds = 60.0
    # defaults for keys that set none of their own; null: unlimited
    max_concurrent_per_key: Annotated[int, Field(ge=1)] | None = None
    requests_per_minute_per_key: Annotated[int, Field(ge=1)] | None = None


class ProxyConfig(_Section):
    # connections to Ollama on loopback: enough for many parallel streams
    max_connections: Annotated[int, Field(ge=1)] = 1024
    connect_timeout: Seconds = 5.0
    # the longest wait for the next chunk of an answer (a model may take minutes to load); no total limit
    read_timeout: Seconds = 600.0
    # the Retry-After sent with 503 while Ollama is not running or the agent is draining
    retry_after: Seconds = 5.0


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"


class GatewayHost(_Section):
    id: Annotated[str, Field(min_length=1, max_length=64)]
    url: Annotated[str, Field(pattern=r"^https?://[^/\s]+$")]


class WakeConfig(_Section):
    """Wake on request (gateway/wake.py): a request for a model that no running host serves starts a stopped
    host that serves it and waits for it."""

    # EC2 discovery only (a fixed host list has no instances to start)
    enabled: bool = True
    # requests held per model while its host starts; one more is answered 503 with Retry-After
    queue: Annotated[int, Field(ge=1, le=100_000)] = 100
    # how long a request waits for a starting host (EC2's start, the boot, the model's load): then 503
    timeout: Interval = 600.0
    # how often a starting host is looked at
    poll_interval: Interval = 1.0
    # how long a host that this gateway did not start (already running: another gateway woke it, or its
    # agent is broken) may take to get ready before the wake gives up on it and starts another
    boot_grace: Interval = 300.0


class GpuPrice(_Section):
    usd_per_hour: Annotated[float, Field(ge=0)]
    gpus: Annotated[int, Field(ge=0)]


class SweepConfig(_Section):
    """The idle sweep, run by the gateway inside the VPC (gateway/sweep.py): the rules of
    playbooks/idle_shutdown.yml (idle_rules.py, one file for both)."""

    # EC2 discovery only (a fixed host list has no instances to stop)
    enabled: bool = True
    # between two sweeps
    interval: Interval = 60.0
    # the threshold of a host without the tag llmfleet:idle-after (30m, 1800, never, ...)
    default_idle_after: str | float = "30m"
    # the summary of the last sweep, as JSON (default: <state_dir>/idle-summary.json)
    summary_file: Path | None = None
    # per instance type, for the summary's savings (as idle_shutdown_prices)
    prices: dict[str, GpuPrice] = {}

    @field_validator("default_idle_after")
    @classmethod
    def _a_duration(cls, value: str | float) -> str | float:
        parse_duration(value)  # ValueError naming the value
        return value


class GatewayConfig(_Section):
    """`llmfleet-agent gateway`: the fleet's one endpoint (gateway/)."""

    # the gateway's own key (keys create --gateway), in a file or the systemd credential of that name
    key_file: Path
    # the hosts: a fixed list, or discovered from EC2 (instances tagged llmfleet:deployment=<deployment>)
    hosts: list[GatewayHost] = []
    deployment: str | None = None
    region: str | None = None
    # another EC2 endpoint (the emulator)
    endpoint_url: str | None = None
    agent_port: Port = 8443
    agent_scheme: Literal["https", "http"] = "https"
    # verifies the agents' certificates (their self-signed certificates, or the CA that signed them)
    agent_ca_file: Path | None = None
    # an instance tag that gives its agent's address (host:port) instead of its private IP (the tests)
    address_tag: str | None = None
    # how often the hosts are discovered and asked whether they are ready and what they have
    refresh_interval: Interval = 5.0
    # a host whose connections fail this many times in a row gets no traffic for eject_for
    eject_after: Annotated[int, Field(ge=1)] = 3
    eject_for: Interval = 30.0
    wake: WakeConfig = WakeConfig()
    sweep: SweepConfig = SweepConfig()

    @model_validator(mode="after")
    def _some_hosts(self) -> GatewayConfig:
        if not self.hosts and not self.deployment:
            raise ValueError("hosts (a fixed list) or deployment (discovered from EC2) is required")
        https = (
            any(h.url.startswith("https://") for h in self.hosts)
            if self.hosts
            else self.agent_scheme == "https"
        )
        if https and self.agent_ca_file is None:
            raise ValueError(
                "agent_ca_file: required to verify the agents (their certificates, or the CA that signed"
                " them): the gateway sends them its key"
            )
        return self


class Config(_Section):
    listen: ListenConfig = ListenConfig()
    ollama: OllamaConfig = OllamaConfig()
    auth: AuthConfig = AuthConfig()
    store: StoreConfig = StoreConfig()
    idle: IdleConfig = IdleConfig()
    probes: ProbesConfig = ProbesConfig()
    limits: LimitsConfig = LimitsConfig()
    proxy: ProxyConfig = ProxyConfig()
    logging: LoggingConfig = LoggingConfig()
    # token budgets per person (budgets.py); absent: none
    budgets: BudgetsConfig | None = None
    # llmfleet-agent gateway only (the ollama section is not used there)
    gateway: GatewayConfig | None = None
    # where the agent keeps its own files (the Ollama process-group file, the spool); default: beside a
    # SQLite store
    state_dir: Path | None = None
    # this host's name in usage and audit records (the agent role sets the EC2 instance id); default: the
    # machine's host name
    host_id: Annotated[str, Field(min_length=1, max_length=255)] | None = None

    @model_validator(mode="after")
    def _directory_passwords_over_tls(self) -> Config:
        if self.auth.ldap is not None and self.listen.tls is None and not is_loopback(self.listen.host):
            raise ValueError(
                f"auth.ldap: listen.tls is required when listening on {self.listen.host}: people's directory"
                " passwords (HTTP Basic) would cross the network in clear"
            )
        return self

    @model_validator(mode="after")
    def _group_budgets_need_directory(self) -> Config:
        if self.budgets is not None and self.budgets.groups and self.auth.ldap is None:
            raise ValueError(
                "budgets.groups: needs auth.ldap (a person's groups are read from the directory)"
            )
        return self

    @property
    def resolved_host_id(self) -> str:
        return self.host_id or socket.gethostname()

    @property
    def resolved_spool_dir(self) -> Path:
        return self.store.spool_dir or self.resolved_state_dir / "spool"

    @property
    def resolved_state_dir(self) -> Path:
        if self.state_dir is not None:
            return self.state_dir
        sqlite_path = self.store.sqlite_path
        return sqlite_path.parent if sqlite_path is not None else DEFAULT_STATE_DIR


def _location(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _describe(error: dict[str, Any]) -> str:
    key = _location(error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    return f"{key}: {error['msg']} (got {error.get('input')!r})"


def parse_config(data: Any, source: str = "config") -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(err) for err in exc.errors())  # type: ignore[arg-type]
        raise ConfigError(f"{source}: {problems}") from None


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load and validate the file at `path`, else at $LLMFLEET_CONFIG."""
    chosen = path or os.environ.get(CONFIG_ENV)
    if not chosen:
        raise ConfigError(f"no configuration: pass --config FILE or set {CONFIG_ENV}")
    file = Path(chosen)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from None
    return parse_config(data, str(file))
