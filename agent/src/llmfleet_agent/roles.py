"""Roles, from least to most: a role has every right of the roles below it."""

from __future__ import annotations

import enum


class Role(str, enum.Enum):
    USER = "user"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


_RANK = {Role.USER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}
