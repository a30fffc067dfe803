"""A real Active Directory domain controller for tests: Samba, provisioned into its own directory as the
domain CORP (realm corp.example.com), serving only LDAP on 127.0.0.1 - LDAPS on 636 and StartTLS on 389,
with a certificate from a test CA that names what a real domain controller's certificate names: its own
DNS name (dc1.corp.example.com) and the domain's (corp.example.com), not its address. Clients reach it by
address and verify the domain's name (`auth.ldap.server_name`), as agents reach AWS Managed AD.

`SambaDC(dir).start()`; `.add_user()`, `.add_group()`, `.add_member()` (nested groups too),
`.disable_user()` ... change the directory (samba-tool on its database, while it runs); `.stop()` /
`.start()` again simulate an outage (same data); `.destroy()` removes it. Samba's LDAP ports are fixed,
so only one test domain controller runs on a machine at a time: start() fails saying so when 636 is
taken. Samba must run as root. With CI=true a missing Samba fails the test instead of skipping it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from postgres import make_ca_and_cert

HOST = "127.0.0.1"
LDAP_PORT, LDAPS_PORT = 389, 636
NETBIOS_DOMAIN = "CORP"
PROVISION_DIR = Path("/usr/share/samba/setup")  # samba-ad-provision: provisioning fails without it


def require_samba() -> tuple[str, str]:
    """(samba, samba-tool); skip (fail with CI=true) when Samba's AD DC cannot run here."""
    samba, tool = shutil.which("samba") or "/usr/sbin/samba", shutil.which("samba-tool")
    if not Path(samba).exists() or tool is None or not PROVISION_DIR.is_dir():
        message = "Samba's AD DC is not installed (make system-deps installs samba-ad-dc, samba-ad-provision)"
    elif os.geteuid() != 0:
        message = "a Samba domain controller runs only as root"
    else:
        return samba, tool
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def _port_taken(port: int) -> bool:
    with socket.socket() as sock:
        # like Samba itself: a closed port still in TIME_WAIT does not count
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return True
    return False


class SambaDC:
    realm = "corp.example.com"  # the DNS domain: users' UPN suffix
    base_dn = "DC=corp,DC=example,DC=com"

    def __init__(self, directory: Path) -> None:
        self.samba, self.tool = require_samba()
        self.dir = directory / "samba-dc"
        self.conf = self.dir / "etc" / "smb.conf"
        self.sam = self.dir / "private" / "sam.ldb"
        self.log = self.dir / "samba.log"
        self.ca = self.dir / "tls" / "ca.pem"
        self.ldaps_url = f"ldaps://{HOST}:{LDAPS_PORT}"
        self.ldap_url = f"ldap://{HOST}:{LDAP_PORT}"
        # password complexity is on: upper, lower, digit and symbol
        self.admin_password = f"Adm1n-{secrets.token_hex(8)}-X"
        self.admin_upn = f"Administrator@{self.realm}"
        self._proc: subprocess.Popen[bytes] | None = None

    # the server

    def _provision(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self._run(
            [
                self.tool,
                "domain",
                "provision",
                f"--realm={self.realm.upper()}",
                f"--domain={NETBIOS_DOMAIN}",
                "--host-name=DC1",
                "--server-role=dc",
                "--dns-backend=SAMBA_INTERNAL",
                f"--adminpass={self.admin_password}",
                f"--targetdir={self.dir}",
                f"--host-ip={HOST}",
                f"--option=interfaces={HOST}",
                "--option=bind interfaces only=yes",
            ],
            timeout=180,
        )
        _, cert, key = make_ca_and_cert(self.dir / "tls", (f"dc1.{self.realm}", self.realm))
        key.chmod(0o600)  # Samba refuses a key others can read
        (self.dir / "run").mkdir()
        d = self.dir
        # only what the provisioned configuration needs, and only the LDAP service: with the default
        # services smbd, the KDC, DNS ... start too (smbd's death takes samba down), slowly, on fixed ports
        self.conf.write_text(
            f"""[global]
	netbios name = DC1
	workgroup = {NETBIOS_DOMAIN}
	realm = {self.realm.upper()}
	server role = active directory domain controller
	server services = ldap
	interfaces = {HOST}
	bind interfaces only = yes
	disable netbios = yes
	prefork children = 1
	private dir = {d}/private
	binddns dir = {d}/bind-dns
	lock directory = {d}
	state directory = {d}/state
	cache directory = {d}/cache
	pid directory = {d}/run
	ncalrpc dir = {d}/run/ncalrpc
	winbindd socket directory = {d}/run/winbindd
	ntp signd socket directory = {d}/run/ntp_signd
	dns update command = /bin/true
	spn update command = /bin/true
	tls enabled = yes
	tls keyfile = {key}
	tls certfile = {cert}
	tls cafile = {self.ca}
	logging = file
	log file = {self.log}
	log level = 1
"""
        )

    def start(self) -> SambaDC:
        """Provision on the first start, then run Samba until an LDAPS bind as Administrator succeeds."""
        if self._proc is not None and self._proc.poll() is None:
            return self
        for port in (LDAPS_PORT, LDAP_PORT):
            if _port_taken(port):
                raise RuntimeError(
                    f"port {port} on {HOST} is taken (`ss -ltnp 'sport = {port}'` tells by whom): Samba's "
                    "LDAP ports are fixed: only one test domain controller can run on this machine at a time"
                )
        if not self.conf.exists():
            self._provision()
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                [self.samba, "-s", str(self.conf), "--foreground", "--no-process-group"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() ends all its workers
            )
        deadline = time.monotonic() + 60
        error: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                raise RuntimeError(f"samba exited while starting:\n{self._log_tail()}")
            try:
                self._admin_bind()
                return self
            except Exception as exc:  # not listening yet, or not ready to authenticate
                error = exc
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"samba did not answer an LDAPS bind within 60 s ({error!r}):\n{self._log_tail()}")

    def _admin(self) -> Any:
        """A connection bound as Administrator over LDAPS (the caller unbinds it)."""
        import ldap3

        tls = ldap3.Tls(ca_certs_file=str(self.ca), validate=ssl.CERT_REQUIRED, valid_names=[self.realm])
        server = ldap3.Server(HOST, port=LDAPS_PORT, use_ssl=True, tls=tls, connect_timeout=2)
        conn = ldap3.Connection(server, self.admin_upn, self.admin_password, receive_timeout=5)
        if not conn.bind():
            conn.unbind()
            raise RuntimeError(f"bind refused: {conn.result}")
        return conn

    def _admin_bind(self) -> None:
        self._admin().unbind()

    def search(self, ldap_filter: str, attribute: str = "dn") -> list[str]:
        """The `attribute` (or DN) of every entry under the base DN that matches `ldap_filter`."""
        conn = self._admin()
        try:
            conn.search(self.base_dn, ldap_filter, attributes=[] if attribute == "dn" else [attribute])
            entries = [e for e in conn.response or [] if e.get("type") == "searchResEntry"]
            return [str(e["dn"] if attribute == "dn" else e["attributes"][attribute]) for e in entries]
        finally:
            conn.unbind()

    def stop(self) -> None:
        """Stop Samba (SIGTERM, then whatever of its process group is left); start() brings it back."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # its workers
        # the killed workers close their sockets as they go: wait for the ports, so start() can follow
        deadline = time.monotonic() + 15
        while any(_port_taken(port) for port in (LDAPS_PORT, LDAP_PORT)) and time.monotonic() < deadline:
            time.sleep(0.05)

    def destroy(self) -> None:
        """Stop Samba for good and remove its files."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _run(self, argv: list[str], timeout: float = 60) -> str:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if result.returncode != 0:
            shown = " ".join(a if not a.startswith("--adminpass") else "--adminpass=..." for a in argv)
            raise RuntimeError(
                f"{shown}: exit {result.returncode}: {(result.stderr or result.stdout).strip()}"
            )
        return result.stdout

    # the directory (samba-tool on the database itself: works while samba runs)

    def _samba_tool(self, *args: str) -> str:
        return self._run([self.tool, *args, "-H", str(self.sam), "-s", str(self.conf)])

    def user_dn(self, name: str) -> str:
        return f"CN={name},CN=Users,{self.base_dn}"

    def add_user(self, name: str, password: str, mail: str | None = None, given: str | None = None) -> str:
        """Create an enabled user (CN and sAMAccountName `name`); returns the UPN, name@corp.example.com."""
        extra = [f"--mail-address={mail}"] if mail else []
        extra += [f"--given-name={given}"] if given else []
        self._samba_tool("user", "create", name, password, "--use-username-as-cn", *extra)
        return f"{name}@{self.realm}"

    def add_group(self, name: str) -> str:
        """Create a global security group; returns its DN."""
        self._samba_tool("group", "add", name)
        return f"CN={name},CN=Users,{self.base_dn}"

    def add_member(self, group: str, member: str) -> None:
        """Put a user or a group (by name) into `group`."""
        self._samba_tool("group", "addmembers", group, member)

    def remove_member(self, group: str, member: str) -> None:
        self._samba_tool("group", "removemembers", group, member)

    def disable_user(self, name: str) -> None:
        self._samba_tool("user", "disable", name)

    def enable_user(self, name: str) -> None:
        self._samba_tool("user", "enable", name)

    def delete_user(self, name: str) -> None:
        self._samba_tool("user", "delete", name)
