"""AWS Managed Microsoft AD's users and groups: the Directory Service Data API (`ds-data`), its switch in
the Directory Service API, and ResetUserPassword, none of which moto has.

As AWS documents them:

- `ds:DescribeDirectoryDataAccess` / `ds:EnableDirectoryDataAccess`: data access starts `Disabled`; enabled,
  it is `Enabling` for a moment, then `Enabled`. While it is not enabled every ds-data call answers
  AccessDeniedException (Reason DATA_DISABLED).
- ds-data (REST-JSON, `POST /Users/CreateUser?DirectoryId=d-...` and so on): CreateUser, DescribeUser,
  CreateGroup, DescribeGroup, AddGroupMember, ListGroupMembers. Users and groups are made in the
  directory's own OU (`OU=Users,OU=<NetBIOS name>,<domain DN>`); a user made here is disabled until its
  password is set; an existing name answers ConflictException, an unknown one ResourceNotFoundException.
- `ds:ResetUserPassword`: sets the password and enables the user (UserDoesNotExistException for an unknown
  one).

With LLMFLEET_EMULATOR_DIRECTORY_SAMBA set (JSON: {"url": "ldaps://127.0.0.1:636", "ca": "/path/ca.pem",
"server_name": "corp.example.com", "user": "Administrator@corp.example.com", "password": "..."}), a new
MicrosoftAD directory of that domain *is* that Samba domain controller, as an RDS instance is a real
PostgreSQL server (rds_postgres.py): its DnsIpAddrs are the controller's address, and users, groups and
passwords are made there, over LDAPS, so an agent can sign people in against what the collection made.
Without it they are kept in memory.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from moto.ds import models as ds_models
from moto.ds import responses as ds_responses
from moto.ds.exceptions import EntityDoesNotExistException, UnsupportedOperationException
from moto.moto_api._internal.models import MotoAPIBackend
from moto.moto_server.werkzeug_app import DomainDispatcherApplication
from werkzeug.wrappers import Request, Response

SETTING = "LLMFLEET_EMULATOR_DIRECTORY_SAMBA"
ENABLING_SECONDS = 1.0
_SAM = re.compile(r"^[\w\-.]{1,20}$")
# groupType of a Global Security group
_GLOBAL_SECURITY = -2147483646
_lock = threading.Lock()


class DataError(Exception):
    def __init__(self, status: int, code: str, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.reason = status, code, message, reason


def _not_found(what: str, name: str) -> DataError:
    return DataError(404, "ResourceNotFoundException", f"{what} {name} not found in the directory")


# --- where users and groups live ---------------------------------------------------------------------------
class Accounts(Protocol):
    def user(self, name: str) -> dict[str, Any] | None: ...
    def group(self, name: str) -> dict[str, Any] | None: ...
    def create_user(self, name: str, email: str | None) -> dict[str, Any]: ...
    def create_group(self, name: str, group_type: str, scope: str) -> dict[str, Any]: ...
    def add_member(self, group: str, member: str) -> None: ...
    def members(self, group: str) -> list[str]: ...
    def reset_password(self, name: str, password: str) -> None: ...


class MemoryAccounts:
    def __init__(self, domain: str, short_name: str) -> None:
        self.domain, self.short_name = domain, short_name
        self.base = ",".join(f"DC={part}" for part in domain.split("."))
        self.users: dict[str, dict[str, Any]] = {}
        self.groups: dict[str, dict[str, Any]] = {}
        self.memberships: dict[str, list[str]] = {}
        self.passwords: dict[str, str] = {}
        self._rid = 1100

    def _sid(self) -> str:
        self._rid += 1
        return f"S-1-5-21-1111111111-2222222222-3333333333-{self._rid}"

    def _dn(self, name: str) -> str:
        return f"CN={name},OU=Users,OU={self.short_name},{self.base}"

    def user(self, name: str) -> dict[str, Any] | None:
        return self.users.get(name.lower())

    def group(self, name: str) -> dict[str, Any] | None:
        return self.groups.get(name.lower())

    def create_user(self, name: str, email: str | None) -> dict[str, Any]:
        user = {
            "SAMAccountName": name,
            "UserPrincipalName": f"{name}@{self.domain.upper()}",
            "DistinguishedName": self._dn(name),
            "SID": self._sid(),
            "Enabled": False,
            **({"EmailAddress": email} if email else {}),
        }
        self.users[name.lower()] = user
        return user

    def create_group(self, name: str, group_type: str, scope: str) -> dict[str, Any]:
        group = {
            "SAMAccountName": name,
            "DistinguishedName": self._dn(name),
            "SID": self._sid(),
            "GroupType": group_type,
            "GroupScope": scope,
        }
        self.groups[name.lower()] = group
        return group

    def add_member(self, group: str, member: str) -> None:
        members = self.memberships.setdefault(group.lower(), [])
        if member.lower() not in [m.lower() for m in members]:
            members.append(member)

    def members(self, group: str) -> list[str]:
        return list(self.memberships.get(group.lower(), []))

    def reset_password(self, name: str, password: str) -> None:
        self.passwords[name.lower()] = password
        self.users[name.lower()]["Enabled"] = True


class SambaAccounts:
    """Users and groups on a real domain controller (LLMFLEET_EMULATOR_DIRECTORY_SAMBA), over LDAPS."""

    def __init__(self, domain: str, short_name: str, settings: dict[str, str]) -> None:
        self.domain, self.short_name, self.settings = domain, short_name, settings
        self.base = ",".join(f"DC={part}" for part in domain.split("."))
        self.ou = f"OU=Users,OU={short_name},{self.base}"

    def _connect(self) -> Any:
        import ssl

        import ldap3

        url = urlsplit(self.settings["url"])
        tls = ldap3.Tls(
            ca_certs_file=self.settings["ca"],
            validate=ssl.CERT_REQUIRED,
            valid_names=[self.settings.get("server_name") or self.domain],
        )
        server = ldap3.Server(
            url.hostname or "", port=url.port or 636, use_ssl=True, tls=tls, connect_timeout=5
        )
        conn = ldap3.Connection(server, self.settings["user"], self.settings["password"], receive_timeout=10)
        if not conn.bind():
            raise DataError(503, "DirectoryUnavailableException", f"the domain controller: {conn.result}")
        for dn, ou in ((f"OU={self.short_name},{self.base}", self.short_name), (self.ou, "Users")):
            conn.add(dn, "organizationalUnit", {"ou": ou})  # already there: entryAlreadyExists, fine
        return conn

    def _find(self, conn: Any, name: str, object_class: str) -> dict[str, Any] | None:
        from ldap3.utils.conv import escape_filter_chars

        conn.search(
            self.base,
            f"(&(objectClass={object_class})(sAMAccountName={escape_filter_chars(name)}))",
            attributes=[
                "sAMAccountName",
                "userPrincipalName",
                "mail",
                "userAccountControl",
                "objectSid",
                "groupType",
            ],
        )
        entries = [e for e in conn.response or [] if e.get("type") == "searchResEntry"]
        return entries[0] if entries else None

    def user(self, name: str) -> dict[str, Any] | None:
        conn = self._connect()
        try:
            entry = self._find(conn, name, "user")
        finally:
            conn.unbind()
        if entry is None:
            return None
        attrs = entry["attributes"]
        uac = int(attrs.get("userAccountControl") or 0)
        return {
            "SAMAccountName": attrs.get("sAMAccountName"),
            "UserPrincipalName": attrs.get("userPrincipalName") or None,
            "DistinguishedName": entry["dn"],
            "SID": str(attrs.get("objectSid")),
            "Enabled": not uac & 0x2,
            **({"EmailAddress": attrs["mail"]} if attrs.get("mail") else {}),
        }

    def group(self, name: str) -> dict[str, Any] | None:
        conn = self._connect()
        try:
            entry = self._find(conn, name, "group")
        finally:
            conn.unbind()
        if entry is None:
            return None
        attrs = entry["attributes"]
        group_type = int(attrs.get("groupType") or 0)
        return {
            "SAMAccountName": attrs.get("sAMAccountName"),
            "DistinguishedName": entry["dn"],
            "SID": str(attrs.get("objectSid")),
            "GroupType": "Security" if group_type & 0x80000000 else "Distribution",
            "GroupScope": "Global",
        }

    def create_user(self, name: str, email: str | None) -> dict[str, Any]:
        conn = self._connect()
        try:
            attributes: dict[str, Any] = {
                "sAMAccountName": name,
                "userPrincipalName": f"{name}@{self.domain.upper()}",
                "userAccountControl": 0x202,  # a normal account, disabled until it has a password
            }
            if email:
                attributes["mail"] = email
            if not conn.add(
                f"CN={name},{self.ou}", ["top", "person", "organizationalPerson", "user"], attributes
            ):
                raise DataError(400, "ValidationException", f"the domain controller: {conn.result}")
        finally:
            conn.unbind()
        user = self.user(name)
        assert user is not None
        return user

    def create_group(self, name: str, group_type: str, scope: str) -> dict[str, Any]:
        conn = self._connect()
        try:
            kind = _GLOBAL_SECURITY if group_type == "Security" else 2
            if not conn.add(
                f"CN={name},{self.ou}", ["top", "group"], {"sAMAccountName": name, "groupType": kind}
            ):
                raise DataError(400, "ValidationException", f"the domain controller: {conn.result}")
        finally:
            conn.unbind()
        group = self.group(name)
        assert group is not None
        return group

    def add_member(self, group: str, member: str) -> None:
        import ldap3

        conn = self._connect()
        try:
            target, who = self._find(conn, group, "group"), self._find(conn, member, "*")
            if target is None or who is None:
                raise _not_found("group or member", f"{group}/{member}")
            conn.modify(target["dn"], {"member": [(ldap3.MODIFY_ADD, [who["dn"]])]})
        finally:
            conn.unbind()

    def members(self, group: str) -> list[str]:
        from ldap3.utils.conv import escape_filter_chars

        conn = self._connect()
        try:
            target = self._find(conn, group, "group")
            if target is None:
                raise _not_found("group", group)
            conn.search(
                self.base, f"(memberOf={escape_filter_chars(target['dn'])})", attributes=["sAMAccountName"]
            )
            return [
                str(e["attributes"]["sAMAccountName"])
                for e in conn.response or []
                if e.get("type") == "searchResEntry"
            ]
        finally:
            conn.unbind()

    def reset_password(self, name: str, password: str) -> None:
        import ldap3

        conn = self._connect()
        try:
            entry = self._find(conn, name, "user")
            if entry is None:
                raise _not_found("user", name)
            encoded = f'"{password}"'.encode("utf-16-le")
            if not conn.modify(entry["dn"], {"unicodePwd": [(ldap3.MODIFY_REPLACE, [encoded])]}):
                raise DataError(400, "InvalidPasswordException", f"the domain controller: {conn.result}")
            uac = int(entry["attributes"].get("userAccountControl") or 0x200) & ~0x2
            conn.modify(entry["dn"], {"userAccountControl": [(ldap3.MODIFY_REPLACE, [uac])]})
        finally:
            conn.unbind()


def samba_settings() -> dict[str, str] | None:
    value = os.environ.get(SETTING)
    return json.loads(value) if value else None


_accounts: dict[str, Accounts] = {}


def accounts_of(directory: Any) -> Accounts:
    with _lock:
        found = _accounts.get(directory.directory_id)
        if found is None:
            settings = samba_settings()
            found = (
                SambaAccounts(directory.name, directory.short_name, settings)
                if settings
                else MemoryAccounts(directory.name, directory.short_name)
            )
            _accounts[directory.directory_id] = found
        return found


# --- the Directory Service API: data access and passwords ---------------------------------------------------
def _data_access(directory: Any) -> str:
    state = getattr(directory, "llmfleet_data_access", ("Disabled", 0.0))
    if state[0] == "Enabling" and time.time() >= state[1]:
        state = ("Enabled", 0.0)
        directory.llmfleet_data_access = state
    return str(state[0])


def _directory(response: Any) -> Any:
    directory_id = response._get_param("DirectoryId")
    backend = response.ds_backend
    backend._validate_directory_id(directory_id)
    directory = backend.directories[directory_id]
    if directory.directory_type != "MicrosoftAD":
        raise UnsupportedOperationException("Directory data access is only for AWS Managed Microsoft AD.")
    return directory


def describe_directory_data_access(self: Any) -> str:
    return json.dumps({"DataAccessStatus": _data_access(_directory(self))})


def enable_directory_data_access(self: Any) -> str:
    directory = _directory(self)
    if _data_access(directory) in ("Disabled", "Failed"):
        directory.llmfleet_data_access = ("Enabling", time.time() + ENABLING_SECONDS)
    return "{}"


def reset_user_password(self: Any) -> str:
    directory = _directory(self)
    name, password = self._get_param("UserName"), self._get_param("NewPassword")
    accounts = accounts_of(directory)
    if accounts.user(name) is None:
        raise EntityDoesNotExistException(f"User {name} does not exist")
    accounts.reset_password(name, password)
    return "{}"


# --- ds-data ------------------------------------------------------------------------------------------------
def _is_ds_data(environ: dict[str, Any]) -> bool:
    return "/ds-data/aws4_request" in str(environ.get("HTTP_AUTHORIZATION", ""))


def _region(environ: dict[str, Any]) -> str:
    match = re.search(r"Credential=[^/]+/[0-9]+/([^/]+)/ds-data/", str(environ.get("HTTP_AUTHORIZATION", "")))
    return match.group(1) if match else "us-east-1"


def _account(environ: dict[str, Any]) -> str:
    from moto.core import DEFAULT_ACCOUNT_ID

    return DEFAULT_ACCOUNT_ID


def _name(body: dict[str, Any], field: str = "SAMAccountName") -> str:
    name = body.get(field)
    if not isinstance(name, str) or not _SAM.match(name):
        raise DataError(
            400, "ValidationException", f"{field}: 1 to 20 letters, digits, - _ or .", "INVALID_PARAMETER"
        )
    return name


def _answer(operation: str, directory: Any, body: dict[str, Any]) -> dict[str, Any]:
    accounts = accounts_of(directory)
    base = {"DirectoryId": directory.directory_id}
    if operation == "/Users/CreateUser":
        name = _name(body)
        if accounts.user(name) is not None or accounts.group(name) is not None:
            raise DataError(409, "ConflictException", f"An object named {name} already exists")
        user = accounts.create_user(name, body.get("EmailAddress"))
        return {**base, "SAMAccountName": user["SAMAccountName"], "SID": user["SID"]}
    if operation == "/Users/DescribeUser":
        name = _name(body)
        user = accounts.user(name)
        if user is None:
            raise _not_found("user", name)
        return {**base, "Realm": directory.name.upper(), **user}
    if operation == "/Groups/CreateGroup":
        name = _name(body)
        if accounts.group(name) is not None or accounts.user(name) is not None:
            raise DataError(409, "ConflictException", f"An object named {name} already exists")
        group = accounts.create_group(
            name, body.get("GroupType", "Security"), body.get("GroupScope", "Global")
        )
        return {**base, "SAMAccountName": group["SAMAccountName"], "SID": group["SID"]}
    if operation == "/Groups/DescribeGroup":
        name = _name(body)
        group = accounts.group(name)
        if group is None:
            raise _not_found("group", name)
        return {**base, "Realm": directory.name.upper(), **group}
    if operation == "/GroupMemberships/AddGroupMember":
        group, member = _name(body, "GroupName"), _name(body, "MemberName")
        if accounts.group(group) is None:
            raise _not_found("group", group)
        if accounts.user(member) is None and accounts.group(member) is None:
            raise _not_found("member", member)
        accounts.add_member(group, member)
        return {}
    if operation == "/GroupMemberships/ListGroupMembers":
        name = _name(body)
        if accounts.group(name) is None:
            raise _not_found("group", name)
        members = [
            {"SAMAccountName": m, "MemberType": "USER" if accounts.user(m) else "GROUP", "SID": ""}
            for m in accounts.members(name)
        ]
        return {
            **base,
            "Realm": directory.name.upper(),
            "MemberRealm": directory.name.upper(),
            "Members": members,
        }
    raise DataError(
        400, "ValidationException", f"the emulator does not answer {operation}", "INVALID_PARAMETER"
    )


def handle(environ: dict[str, Any], start_response: Any) -> Any:
    request = Request(environ)
    try:
        directory_id = (parse_qs(request.query_string.decode()).get("DirectoryId") or [""])[0]
        backend = ds_models.ds_backends[_account(environ)][_region(environ)]
        directory = backend.directories.get(directory_id)
        if directory is None:
            raise _not_found("directory", directory_id or "(none)")
        if _data_access(directory) != "Enabled":
            raise DataError(
                403,
                "AccessDeniedException",
                "Directory data access is not enabled for this directory (EnableDirectoryDataAccess)",
                "DATA_DISABLED",
            )
        body = json.loads(request.get_data(as_text=True) or "{}")
        response = Response(
            json.dumps(_answer(request.path, directory, body)), 200, mimetype="application/json"
        )
    except DataError as exc:
        error: dict[str, Any] = {"Message": exc.message, **({"Reason": exc.reason} if exc.reason else {})}
        response = Response(json.dumps(error), exc.status, mimetype="application/json")
        response.headers["x-amzn-ErrorType"] = exc.code
    return response(environ, start_response)


# --- wiring ---------------------------------------------------------------------------------------------
def _directory_init(original: Any) -> Any:
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        settings = samba_settings()
        if settings and self.directory_type == "MicrosoftAD":
            if self.name.lower() != (settings.get("server_name") or self.name).lower():
                raise ValueError(
                    f"{SETTING}: the domain controller serves {settings.get('server_name')}, not {self.name}"
                )
            host = urlsplit(settings["url"]).hostname or "127.0.0.1"
            self.dns_ip_addrs = [host for _ in self.dns_ip_addrs]

    return init


def _dispatch(original: Any) -> Any:
    def call(self: Any, environ: dict[str, Any], start_response: Any) -> Any:
        if _is_ds_data(environ):
            return handle(environ, start_response)
        return original(self, environ, start_response)

    return call


def _reset(original: Any) -> Any:
    def reset_all(self: Any) -> None:
        original(self)
        with _lock:
            _accounts.clear()

    return reset_all


def apply() -> None:
    response = ds_responses.DirectoryServiceResponse
    response.describe_directory_data_access = describe_directory_data_access  # type: ignore[attr-defined]
    response.enable_directory_data_access = enable_directory_data_access  # type: ignore[attr-defined]
    response.reset_user_password = reset_user_password  # type: ignore[attr-defined]
    ds_models.Directory.__init__ = _directory_init(ds_models.Directory.__init__)  # type: ignore[method-assign]
    DomainDispatcherApplication.__call__ = _dispatch(DomainDispatcherApplication.__call__)  # type: ignore[method-assign]
    MotoAPIBackend.reset = _reset(MotoAPIBackend.reset)  # type: ignore[method-assign]
