"""What a directory user may do: their groups (nested membership counts) mapped by `auth.ldap.groups`.

A mapping key is a group's DN (it has a `=`; compared without regard to case) or its name (its
sAMAccountName, unique in the domain, without regard to case); only security groups count (directory.py).
Several groups: the highest role, and the union of their model patterns, where a group with no patterns
grants every model. A user in none of the mapped groups gets nothing (None).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .config import LdapGroupGrant
from .keys import normalize_pattern
from .roles import Role


@dataclass(frozen=True)
class Grant:
    role: Role
    models: tuple[str, ...]  # empty: every model


def in_group(key: str, groups: Iterable[tuple[str, str]]) -> bool:
    """Whether a mapping key (a group's DN or name) names one of `groups` ((DN, name) pairs): the one rule
    for auth.ldap.groups and budgets.groups."""
    key = key.strip().lower()
    if "=" in key:
        key = key.replace(", ", ",")
        return any(key == dn.lower().replace(", ", ",") for dn, _ in groups)
    return any(key == name.lower() for _, name in groups)


def grant_for(groups: Iterable[tuple[str, str]], mapping: Mapping[str, LdapGroupGrant]) -> Grant | None:
    """The grant of a user in `groups` ((DN, name) pairs), or None when no mapped group holds them."""
    groups = tuple(groups)
    grants = [grant for key, grant in mapping.items() if in_group(key, groups)]
    if not grants:
        return None
    role = max((Role(g.role) for g in grants), key=lambda r: r.rank)
    if any(not g.models for g in grants):
        return Grant(role, ())
    patterns = sorted({normalize_pattern(p) for g in grants for p in g.models})
    return Grant(role, tuple(patterns))


# a personal key is never more than operator: the deployment's admin keys are the operators' to make (with
# the database owner's credential); an admin of the directory acts as one with their directory login
PERSONAL_KEY_MAX_ROLE = Role.OPERATOR


def key_grant(grant: Grant) -> Grant:
    """What a personal key minted under `grant` may do."""
    role = grant.role if grant.role.rank <= PERSONAL_KEY_MAX_ROLE.rank else PERSONAL_KEY_MAX_ROLE
    return Grant(role, grant.models)


def narrowed(current: Grant, now: Grant) -> Grant | None:
    """A key's grant after its owner's rights became `now`: never more than it had (a promotion of the owner
    does not widen their old keys), less when they lost rights; None when no model is left to it."""
    allowed = key_grant(now)
    role = current.role if current.role.rank <= allowed.role.rank else allowed.role
    if not allowed.models:
        return Grant(role, current.models)
    if not current.models:
        return Grant(role, allowed.models)
    models = tuple(m for m in current.models if m in allowed.models)
    return Grant(role, models) if models else None
