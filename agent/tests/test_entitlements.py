"""The rules of directory logins that need no directory: group grants, account states, the settings."""

from __future__ import annotations

import re
import time

import pytest

from llmfleet_agent.config import ConfigError, LdapGroupGrant, parse_config
from llmfleet_agent.directory import (
    ACCOUNTDISABLE,
    LOCKOUT,
    NEVER_EXPIRES,
    PASSWORD_EXPIRED,
    Directory,
    InvalidCredentials,
    account_refusal,
)
from llmfleet_agent.entitlements import Grant, grant_for
from llmfleet_agent.roles import Role

USERS_DN = "CN=llmfleet-users,OU=Groups,DC=corp,DC=example,DC=com"
MAPPING = {
    "llmfleet-users": LdapGroupGrant(role="user", models=["llama3.1*", "mistral"]),
    "CN=llmfleet-operators,OU=Groups,DC=corp,DC=example,DC=com": LdapGroupGrant(
        role="operator", models=["qwen*"]
    ),
    "llmfleet-admins": LdapGroupGrant(role="admin"),
}


def group(cn: str) -> tuple[str, str]:
    return (f"CN={cn},OU=Groups,DC=corp,DC=example,DC=com", cn)


def test_the_highest_role_and_the_union_of_the_patterns() -> None:
    assert grant_for([group("llmfleet-users")], MAPPING) == Grant(Role.USER, ("llama3.1*", "mistral:latest"))
    both = grant_for([group("llmfleet-users"), group("llmfleet-operators")], MAPPING)
    assert both == Grant(Role.OPERATOR, ("llama3.1*", "mistral:latest", "qwen*"))
    # a group with no patterns grants every model, whatever the others say
    assert grant_for([group("llmfleet-users"), group("llmfleet-admins")], MAPPING) == Grant(Role.ADMIN, ())


def test_names_and_dns_match_without_regard_to_case_and_unmapped_groups_grant_nothing() -> None:
    assert grant_for([(USERS_DN.lower(), "LLMFLEET-USERS")], MAPPING) is not None
    operators_dn = "cn=LLMfleet-operators, ou=groups, dc=corp, dc=example, dc=com"
    assert grant_for([(operators_dn, "x")], MAPPING) == Grant(Role.OPERATOR, ("qwen*",))
    assert grant_for([group("engineering"), group("domain users")], MAPPING) is None
    assert grant_for([], MAPPING) is None


def filetime(at: float) -> int:
    return int(at * 10_000_000) + 116444736000000000


@pytest.mark.parametrize(
    ("attributes", "refusal"),
    [
        ({"userAccountControl": 512}, None),
        ({"userAccountControl": 512 | ACCOUNTDISABLE}, "the account is disabled"),
        (
            {"userAccountControl": 512, "msDS-User-Account-Control-Computed": LOCKOUT},
            "the account is locked out",
        ),
        (
            {"userAccountControl": 512, "msDS-User-Account-Control-Computed": PASSWORD_EXPIRED},
            "the account's password has expired",
        ),
        ({"userAccountControl": 512, "accountExpires": NEVER_EXPIRES}, None),
        ({"userAccountControl": 512, "accountExpires": 0}, None),
        (
            {"userAccountControl": 512, "accountExpires": filetime(time.time() - 60)},
            "the account has expired",
        ),
        ({"userAccountControl": 512, "accountExpires": filetime(time.time() + 3600)}, None),
        ({"userAccountControl": ["514"]}, "the account is disabled"),  # as a directory may answer: text
    ],
)
def test_an_account_that_may_not_be_used_says_why(attributes: dict[str, object], refusal: str | None) -> None:
    assert account_refusal(attributes) == refusal


LDAP = {
    "urls": ["ldaps://dc1.corp.example.com"],
    "ca_file": "/etc/llmfleet/ad-ca.pem",
    "domain": "corp.example.com",
    "base_dn": "DC=corp,DC=example,DC=com",
    "bind_user": "svc-llmfleet@corp.example.com",
    "bind_password_file": "/etc/llmfleet/credentials/ldap-password",
    "groups": {"llmfleet-users": {"role": "user"}},
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"urls": ["ldap://dc1"]}, "plain LDAP would send passwords in clear"),
        ({"urls": ["http://dc1"]}, "is not an LDAP URL"),
        ({"urls": []}, "auth.ldap.urls"),
        ({"ca_file": None}, "ca_file: required"),
        ({"groups": {}}, "auth.ldap.groups"),
        ({"groups": {"g": {"role": "root"}}}, "auth.ldap.groups.g.role"),
        ({"key_default_ttl": "100d"}, "key_default_ttl must be at most key_max_ttl"),
        ({"bind_password": "inline"}, "auth.ldap.bind_password: unknown key"),
    ],
)
def test_bad_directory_settings_are_named(change: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"auth": {"ldap": {**LDAP, **change}}})


def test_starttls_and_a_lab_without_tls_are_explicit() -> None:
    starttls = parse_config({"auth": {"ldap": {**LDAP, "urls": ["ldap://dc1"], "start_tls": True}}})
    assert starttls.auth.ldap is not None and starttls.auth.ldap.start_tls
    lab = {**LDAP, "urls": ["ldap://dc1"], "allow_plain": True, "ca_file": None}
    assert parse_config({"auth": {"ldap": lab}}).auth.ldap is not None


def test_a_login_is_a_upn_and_nothing_else_gets_through() -> None:
    cfg = parse_config({"auth": {"ldap": LDAP}}).auth.ldap
    assert cfg is not None
    directory = Directory(cfg)
    assert directory.login_name("alice") == "alice@corp.example.com"
    assert directory.login_name(" alice@corp.example.com ") == "alice@corp.example.com"
    for bad in ("", "   ", "a\nb", "x" * 300):
        with pytest.raises(InvalidCredentials):
            directory.login_name(bad)


async def test_directory_operations_at_once_are_bounded_and_the_rest_refused_at_once() -> None:
    """A client sending many logins cannot tie up more than MAX_AT_ONCE threads and directory connections."""
    import asyncio
    import threading

    from llmfleet_agent.directory import MAX_AT_ONCE, DirectoryBusy

    cfg = parse_config({"auth": {"ldap": LDAP}}).auth.ldap
    assert cfg is not None
    directory = Directory(cfg)
    release = threading.Event()
    started = threading.Semaphore(0)

    def slow_bind(upn: str, password: str, match: str) -> object:
        started.release()
        release.wait(10)
        raise InvalidCredentials(upn)

    directory._authenticate = slow_bind  # type: ignore[method-assign]
    held = [asyncio.create_task(directory.authenticate(f"u{i}", "pw")) for i in range(MAX_AT_ONCE)]
    for _ in range(MAX_AT_ONCE):
        await asyncio.to_thread(started.acquire, True, 10)
    with pytest.raises(DirectoryBusy):
        await directory.authenticate("one-more", "pw")
    release.set()
    for task in held:
        with pytest.raises(InvalidCredentials):
            await task
    directory.close()


def test_directory_passwords_never_cross_the_network_without_tls() -> None:
    with pytest.raises(ConfigError, match=re.escape("listen.tls is required when listening on 0.0.0.0")):
        parse_config({"listen": {"host": "0.0.0.0"}, "auth": {"ldap": LDAP}})
    assert parse_config({"listen": {"host": "127.0.0.1"}, "auth": {"ldap": LDAP}}).auth.ldap is not None


def test_failed_logins_are_throttled_per_account_and_per_address() -> None:
    from llmfleet_agent.login_throttle import LoginThrottle

    throttle = LoginThrottle(per_login=3, per_address=5, window=60, max_entries=100)
    for _ in range(3):
        assert throttle.retry_after("alice", "10.0.0.1", now=0) is None
        throttle.failed("Alice@corp.example.com", "10.0.0.1", now=0)
    assert throttle.retry_after("ALICE", "10.0.0.9", now=10) == 50  # the account, from anywhere
    assert throttle.retry_after("bob", "10.0.0.2", now=10) is None
    for name in ("bob", "carol"):  # an address that tries many accounts
        throttle.failed(name, "10.0.0.1", now=1)
    assert throttle.retry_after("dave", "10.0.0.1", now=10) == 50
    assert throttle.retry_after("alice", "10.0.0.9", now=61) is None  # the window passed
    throttle.succeeded("bob")
    assert throttle.retry_after("bob", "10.0.0.3", now=11) is None
    for i in range(500):  # memory stays bounded whatever a client sends
        throttle.failed(f"user{i}", f"10.1.{i // 250}.{i % 250}", now=20)
    assert len(throttle._seen) <= 100
