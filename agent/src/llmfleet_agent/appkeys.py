"""Typed keys for what the application holds (set up by the cleanup contexts in app.py)."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
from aiohttp import web

from .activity import Activity
from .auth import KeyRing
from .batching import BatchWriter
from .budgets import Budgets
from .config import Config
from .directory import Directory
from .login_throttle import LoginThrottle
from .metrics import Metrics
from .probes import ProbeSampler
from .proxy.gate import Gate
from .proxy.http1 import Client
from .proxy.limits import KeyLimiter
from .proxy.upstream import Upstream
from .store import AuditRecord, Store
from .supervisor import Supervisor
from .usage import UsageRecord

CONFIG = web.AppKey("config", Config)
# this host in usage and audit records (config host_id, else the host name)
HOST_ID = web.AppKey("host_id", str)
STARTED_AT = web.AppKey("started_at", float)
STORE = web.AppKey("store", Store)
AUDIT = web.AppKey("audit", BatchWriter[AuditRecord])
KEYRING = web.AppKey("keyring", KeyRing)
ACTIVITY = web.AppKey("activity", Activity)
SESSION = web.AppKey("session", aiohttp.ClientSession)
# the proxy's client for its hop upstream (proxy/http1.py): to Ollama on an agent, to the hosts on the gateway
UPSTREAM_CLIENT = web.AppKey("upstream_client", Client)
SUPERVISOR = web.AppKey("supervisor", Supervisor)
PROBES = web.AppKey("probes", ProbeSampler)
USAGE = web.AppKey("usage", BatchWriter[UsageRecord])
LIMITER = web.AppKey("limiter", KeyLimiter)
METRICS = web.AppKey("metrics", Metrics)
GATE = web.AppKey("gate", Gate)
# directory logins (auth.ldap); absent when not configured
DIRECTORY = web.AppKey("directory", Directory)
LOGIN_THROTTLE = web.AppKey("login_throttle", LoginThrottle)
# token budgets per person (budgets); absent when not configured
BUDGETS = web.AppKey("budgets", Budgets)
# the gateway: where proxied requests go (a host of the fleet); absent on an agent (its own Ollama)
UPSTREAM = web.AppKey("upstream", Upstream)
# the gateway: the models its hosts have (metric labels: a model no host has is "other")
KNOWN_MODELS = web.AppKey("known_models", Callable[[], set[str]])
