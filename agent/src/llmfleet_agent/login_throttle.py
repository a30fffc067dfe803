"""Failed directory logins, throttled: each one is a real bind against a domain controller, and a domain
locks an account out after a few wrong passwords. After `per_login` failures for one login name, or
`per_address` from one client address, within `window` seconds, further attempts are refused (429) without
any bind until the window has passed. A success clears the login's count. Memory is bounded: at most
`max_entries` names and addresses are remembered (past that the oldest are forgotten).
"""

from __future__ import annotations

import time
from collections import OrderedDict


class LoginThrottle:
    def __init__(
        self, per_login: int = 5, per_address: int = 20, window: float = 300.0, max_entries: int = 10_000
    ) -> None:
        self.per_login, self.per_address, self.window = per_login, per_address, window
        self._max = max_entries
        self._seen: OrderedDict[str, tuple[int, float]] = OrderedDict()  # key -> (failures, first failure)

    def retry_after(self, login: str, address: str | None, now: float | None = None) -> float | None:
        """Seconds until `login` from `address` may try again, or None when it may now."""
        now = time.monotonic() if now is None else now
        waits = [
            self._wait(key, limit, now)
            for key, limit in ((self._login_key(login), self.per_login), (f"a:{address}", self.per_address))
        ]
        blocked = [w for w in waits if w is not None]
        return max(blocked) if blocked else None

    def failed(self, login: str, address: str | None, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for key in (self._login_key(login), f"a:{address}"):
            count, first = self._seen.pop(key, (0, now))
            if now - first >= self.window:
                count, first = 0, now
            self._seen[key] = (count + 1, first)
        while len(self._seen) > self._max:
            self._seen.popitem(last=False)

    def succeeded(self, login: str) -> None:
        self._seen.pop(self._login_key(login), None)

    def _wait(self, key: str, limit: int, now: float) -> float | None:
        count, first = self._seen.get(key, (0, now))
        if count < limit or now - first >= self.window:
            return None
        return self.window - (now - first)

    @staticmethod
    def _login_key(login: str) -> str:
        # one account whatever the case or the form: alice, ALICE, alice@corp.example.com
        return "l:" + login.strip().lower().split("@", 1)[0]
