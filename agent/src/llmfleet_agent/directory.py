"""The directory (Active Directory over LDAPS or StartTLS): who a user is, whether their account may be
used, and which groups they are in, nested groups included.

A user proves who they are by binding as themselves (`name@domain`); everything else is read with the
read-only service account (`auth.ldap.bind_user`), also when the user is not there (revalidation of
personal keys, by the user's immutable objectGUID). Domain controllers are tried in turn; one that does not
answer within `auth.ldap.timeout` is skipped. ldap3 is synchronous: every call runs in a worker thread.

Errors: `InvalidCredentials` (a wrong name or password: the directory said so), `DirectoryUnavailable`
(no domain controller answered, or TLS failed: nothing was decided; or DirectoryBusy: MAX_AT_ONCE
operations under way, refused at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import ssl
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from ldap3 import SIMPLE, SUBTREE, Connection, Server, Tls
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars

from .config import LdapConfig
from .credentials import CredentialError, read_credential

T = TypeVar("T")

# LDAP_MATCHING_RULE_IN_CHAIN: membership through any depth of nested groups, resolved by the DC
IN_CHAIN = "1.2.840.113556.1.4.1941"
# LDAP_MATCHING_RULE_BIT_AND, and groupType's bit of a security group
AND_BITS = "1.2.840.113556.1.4.803"
SECURITY_GROUP = 0x80000000
# userAccountControl and msDS-User-Account-Control-Computed bits
ACCOUNTDISABLE = 0x2
LOCKOUT = 0x10
PASSWORD_EXPIRED = 0x800000
# accountExpires: 100-ns intervals since 1601-01-01; 0 and this value mean never
NEVER_EXPIRES = 0x7FFFFFFFFFFFFFFF
_EPOCH_AS_FILETIME = 116444736000000000
USER_ATTRIBUTES = [
    "objectGUID",
    "userPrincipalName",
    "displayName",
    "mail",
    "userAccountControl",
    "msDS-User-Account-Control-Computed",
    "accountExpires",
]
MAX_LOGIN = 256
# directory operations at once (each holds a worker thread and a connection to a domain controller); more
# are refused at once (503): a client sending many logins costs the directory little
MAX_AT_ONCE = 8


class DirectoryUnavailable(Exception):
    """No domain controller answered (or TLS failed): nothing was decided."""


class DirectoryBusy(DirectoryUnavailable):
    """MAX_AT_ONCE operations are already under way."""


class InvalidCredentials(Exception):
    """The directory refused the name and password."""


@dataclass(frozen=True)
class DirectoryUser:
    guid: str  # objectGUID, as a UUID string: the account's immutable id
    upn: str
    dn: str
    display_name: str | None
    mail: str | None
    groups: tuple[tuple[str, str], ...]  # (DN, sAMAccountName) of every security group, nested included
    unusable: str | None  # why the account may not be used now (disabled, locked, expired), or None


@dataclass(frozen=True)
class DirectoryCheck:
    server: str  # the domain controller that answered (host:port)
    groups: dict[str, str | None]  # each mapped group -> its DN, None when not found
    problems: list[str]


def account_refusal(attributes: dict[str, Any], now: float | None = None) -> str | None:
    """Why an account may not be used, from its attributes (None: it may)."""
    uac = _int(attributes.get("userAccountControl"))
    computed = _int(attributes.get("msDS-User-Account-Control-Computed"))
    if uac & ACCOUNTDISABLE:
        return "the account is disabled"
    if computed & LOCKOUT:
        return "the account is locked out"
    if computed & PASSWORD_EXPIRED:
        return "the account's password has expired"
    expires = _int(attributes.get("accountExpires"))
    if expires not in (0, NEVER_EXPIRES):
        now = time.time() if now is None else now
        if (expires - _EPOCH_AS_FILETIME) / 10_000_000 <= now:
            return "the account has expired"
    return None


def _int(value: Any) -> int:
    if isinstance(value, list):
        value = value[0] if value else 0
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _first(value: Any) -> str | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return str(value) if value not in (None, "") else None


class _Slots:
    """Worker threads for directory calls. A slot is held until the thread is done, even when the caller
    gave up (a client that hung up): the count is of real work. Full: refuse (DirectoryBusy) or queue."""

    def __init__(self, size: int, name: str, refuse: bool) -> None:
        self._size, self._refuse = size, refuse
        self._busy = 0
        self._executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix=name)

    async def run(self, fn: Callable[[], T]) -> T:
        if self._refuse and self._busy >= self._size:
            raise DirectoryBusy(f"{self._size} directory logins are under way")
        loop = asyncio.get_running_loop()
        self._busy += 1
        future = self._executor.submit(fn)
        future.add_done_callback(lambda _: self._finished(loop))
        return await asyncio.wrap_future(future)

    def _finished(self, loop: asyncio.AbstractEventLoop) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the agent stopped first
            loop.call_soon_threadsafe(self._done)

    def _done(self) -> None:
        self._busy -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class Directory:
    def __init__(self, cfg: LdapConfig) -> None:
        self.cfg = cfg
        # ldap3 packs its socket timeouts as whole seconds
        self._timeout = max(1, math.ceil(cfg.timeout))
        # logins: at most MAX_AT_ONCE, more refused at once; look-ups (revalidation): a worker of their
        # own that they queue for, so logins never crowd them out
        self._logins = _Slots(MAX_AT_ONCE, "directory-login", refuse=True)
        self._lookups = _Slots(1, "directory-lookup", refuse=False)
        # look-ups of the people behind requests (their groups decide their budget): two workers of their
        # own, so a burst of new frontend users waits neither for revalidation nor for logins
        self._people = _Slots(2, "directory-people", refuse=False)

    def login_name(self, login: str) -> str:
        """The name a user binds with: `name` means `name@<domain>`; a whole UPN is taken as it is."""
        login = login.strip()
        if not login or len(login) > MAX_LOGIN or any(ord(ch) < 32 for ch in login):
            raise InvalidCredentials("not a user name")
        return login if "@" in login else f"{login}@{self.cfg.domain}"

    async def authenticate(self, login: str, password: str) -> DirectoryUser:
        """Bind as the user (InvalidCredentials when refused), then read who they are."""
        bind_name = self.login_name(login)
        if not password:  # an empty password would be an anonymous bind, which succeeds
            raise InvalidCredentials("empty password")
        # a short name is the account name (sAMAccountName): AD binds name@domain as that account,
        # whatever its UPN; a whole UPN is looked up as a UPN
        match = (
            f"(userPrincipalName={escape_filter_chars(bind_name)})"
            if "@" in login
            else f"(sAMAccountName={escape_filter_chars(login.strip())})"
        )
        return await self._logins.run(lambda: self._authenticate(bind_name, password, match))

    async def lookup(self, guid: str) -> DirectoryUser | None:
        """The account with this objectGUID, or None when the directory no longer has it."""
        try:
            raw = uuid.UUID(guid).bytes_le
        except ValueError:
            return None  # not an objectGUID: no account has it
        escaped = "".join(f"\\{b:02x}" for b in raw)
        return await self._lookups.run(lambda: self._lookup(f"(objectGUID={escaped})"))

    async def find(self, name: str) -> DirectoryUser | None:
        """The account whose UPN or e-mail (`mail`) is `name`, or None (none, or more than one)."""
        name = name.strip()
        if not name or len(name) > MAX_LOGIN or any(ord(ch) < 32 for ch in name):
            return None
        value = escape_filter_chars(name)
        return await self._people.run(lambda: self._lookup(f"(|(userPrincipalName={value})(mail={value}))"))

    async def check(self) -> DirectoryCheck:
        """Bind as the service account and find every mapped group (`llmfleet-agent ldap check`)."""
        return await self._lookups.run(self._check)

    def close(self) -> None:
        self._logins.close()
        self._lookups.close()
        self._people.close()

    # --- in a worker thread ------------------------------------------------------------------------------

    def _servers(self) -> list[Server]:
        # built for each connection: a CA file replaced on disk (a renewed CA) is read again
        tls = (
            Tls(
                ca_certs_file=str(self.cfg.ca_file),
                validate=ssl.CERT_REQUIRED,
                version=ssl.PROTOCOL_TLS_CLIENT,
                valid_names=[self.cfg.server_name] if self.cfg.server_name else None,
            )
            if self.cfg.ca_file is not None
            else None
        )
        servers = []
        for url in self.cfg.urls:
            parts = urlsplit(url)
            secure = parts.scheme == "ldaps"
            servers.append(
                Server(
                    parts.hostname or "",
                    port=parts.port or (636 if secure else 389),
                    use_ssl=secure,
                    tls=tls,
                    connect_timeout=self._timeout,
                    get_info="NO_INFO",
                )
            )
        return servers

    def _connect(self, user: str, password: str) -> Connection:
        """A connection bound as `user` on the first domain controller that answers."""
        errors = []
        for server in self._servers():
            conn = Connection(
                server,
                user=user,
                password=password,
                authentication=SIMPLE,
                receive_timeout=self._timeout,
                raise_exceptions=False,
            )
            try:
                conn.open()
                if not server.ssl and self.cfg.start_tls and not conn.start_tls():
                    errors.append(f"{server.host}:{server.port}: StartTLS refused: {conn.result}")
                    conn.unbind()
                    continue
                if conn.bind():
                    return conn
                result = conn.result or {}
            except (LDAPException, ssl.SSLError, OSError) as exc:
                errors.append(f"{server.host}:{server.port}: {exc}")
                with contextlib.suppress(Exception):
                    conn.unbind()
                continue
            conn.unbind()
            if result.get("description") == "invalidCredentials":
                raise InvalidCredentials(user)
            errors.append(
                f"{server.host}:{server.port}: bind: {result.get('description')} {result.get('message')}"
            )
        raise DirectoryUnavailable("; ".join(errors) or "no domain controller configured")

    def _service(self) -> Connection:
        try:
            password = read_credential(self.cfg.bind_password_file, "auth.ldap.bind_password_file")
        except CredentialError as exc:
            raise DirectoryUnavailable(str(exc)) from None
        try:
            return self._connect(self.cfg.bind_user, password)
        except InvalidCredentials:
            raise DirectoryUnavailable(
                f"auth.ldap.bind_user {self.cfg.bind_user}: the directory refused the service account"
            ) from None

    def _check(self) -> DirectoryCheck:
        service = self._service()
        try:
            groups: dict[str, str | None] = {}
            problems: list[str] = []
            for key in self.cfg.groups:
                by = "distinguishedName" if "=" in key else "sAMAccountName"
                service.search(
                    self.cfg.base_dn,
                    f"(&(objectClass=group)({by}={escape_filter_chars(key)}))",
                    SUBTREE,
                    attributes=["groupType"],
                    size_limit=2,
                )
                found = [e for e in service.response or [] if e.get("type") == "searchResEntry"]
                if len(found) != 1:
                    groups[key] = None
                    problems.append(f"auth.ldap.groups: no group {key} under {self.cfg.base_dn}")
                    continue
                groups[key] = found[0]["dn"]
                if not _int(found[0]["attributes"].get("groupType")) & SECURITY_GROUP:
                    problems.append(f"auth.ldap.groups: {key} is a distribution group, which grants nothing")
            server = service.server
            return DirectoryCheck(f"{server.host}:{server.port}", groups, problems)
        except LDAPException as exc:
            raise DirectoryUnavailable(f"search: {exc}") from None
        finally:
            with contextlib.suppress(Exception):
                service.unbind()

    def _authenticate(self, bind_name: str, password: str, match: str) -> DirectoryUser:
        self._connect(bind_name, password).unbind()
        user = self._lookup(match)
        if user is None:  # bound, yet not found under base_dn: not an account this service knows
            raise InvalidCredentials(bind_name)
        return user

    def _lookup(self, match: str) -> DirectoryUser | None:
        service = self._service()
        try:
            return self._find(service, match)
        except LDAPException as exc:  # the connection failed half-way: nothing was decided
            raise DirectoryUnavailable(f"search: {exc}") from None
        finally:
            with contextlib.suppress(Exception):
                service.unbind()

    def _find(self, conn: Connection, match: str) -> DirectoryUser | None:
        ok = conn.search(
            self.cfg.base_dn,
            f"(&(objectCategory=person)(objectClass=user){match})",
            SUBTREE,
            attributes=USER_ATTRIBUTES,
            size_limit=2,
        )
        entries = [e for e in conn.response or [] if e.get("type") == "searchResEntry"]
        if not ok and conn.result.get("description") not in ("success", "noSuchObject", "sizeLimitExceeded"):
            raise DirectoryUnavailable(
                f"search: {conn.result.get('description')} {conn.result.get('message')}"
            )
        if len(entries) != 1:
            return None
        entry = entries[0]
        attributes = entry["attributes"]
        guid_raw = entry["raw_attributes"].get("objectGUID") or [b""]
        dn = entry["dn"]
        # security groups only (distribution lists grant nothing), named by sAMAccountName (unique in the
        # domain, unlike cn), paged (AD answers at most 1000 entries a page); a failed search decides nothing
        groups: list[tuple[str, str]] = []
        for found in conn.extend.standard.paged_search(
            self.cfg.base_dn,
            f"(&(objectClass=group)(groupType:{AND_BITS}:={SECURITY_GROUP})"
            f"(member:{IN_CHAIN}:={escape_filter_chars(dn)}))",
            SUBTREE,
            attributes=["sAMAccountName"],
            paged_size=500,
            generator=True,
        ):
            if found.get("type") == "searchResEntry":
                groups.append((found["dn"], _first(found["attributes"].get("sAMAccountName")) or ""))
        if (conn.result or {}).get("description") not in ("success", None):
            raise DirectoryUnavailable(
                f"group search: {conn.result.get('description')} {conn.result.get('message')}"
            )
        return DirectoryUser(
            guid=str(uuid.UUID(bytes_le=bytes(guid_raw[0]))),
            upn=_first(attributes.get("userPrincipalName")) or "",
            dn=dn,
            display_name=_first(attributes.get("displayName")),
            mail=_first(attributes.get("mail")),
            groups=tuple(groups),
            unusable=account_refusal(attributes),
        )
