"""Secrets in files: a database password, the directory's service account. One rule for both.

A setting names a file (`store.password_file`, `auth.ldap.bind_password_file`). When the service was given
a systemd credential of that file's name (`LoadCredential=` in the unit: $CREDENTIALS_DIRECTORY/<name>),
that is read instead, so the service user need not be able to read the source. Surrounding newlines are
not part of the secret; an empty file is an error.
"""

from __future__ import annotations

import os
from pathlib import Path


class CredentialError(Exception):
    """The secret cannot be read; the message names the setting and the file."""


def read_credential(path: Path, setting: str) -> str:
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials:
        candidate = Path(credentials) / path.name
        try:
            if candidate.is_file():
                path = candidate
        except OSError as exc:  # a credentials directory the service cannot read: say so, by name
            raise CredentialError(
                f"{setting}: cannot read the systemd credential {candidate}: {exc.strerror}"
            ) from None
    try:
        text = path.read_text()
    except OSError as exc:
        raise CredentialError(f"{setting}: cannot read {path}: {exc.strerror}") from None
    secret = text.strip("\r\n")
    if not secret:
        raise CredentialError(f"{setting}: {path} is empty")
    return secret
