#!/usr/bin/env python3
"""The local AWS emulator: moto's server mode on loopback, with the settings llmfleet needs.

    emulator.py start [--port 5000]    start it (or find it already running) and wait until it answers
    emulator.py stop                   stop the one this script started
    emulator.py status                 say whether it answers
    emulator.py reset                  empty it (POST /moto-api/reset)

It loads AWS's managed IAM policies (the GPU hosts' role may attach CloudWatchAgentServerPolicy),
replaces moto's AMI list with scripts/emulator/amis.json, whose Deep Learning AMIs match the production
filter, and runs moto through scripts/emulator/server.py, which makes it answer like AWS where the
playbooks depend on it. Tests import `start`/`stop` from here too.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AMIS = ROOT / "scripts" / "emulator" / "amis.json"
STATE = ROOT / ".llmfleet" / "emulator"
DEFAULT_PORT = int(os.environ.get("LLMFLEET_EMULATOR_PORT", "5000"))


def url_for(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"{url_for(port)}/moto-api/data.json", timeout=1) as resp:  # noqa: S310
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


SERVER = ROOT / "scripts" / "emulator" / "server.py"


def start(
    port: int = DEFAULT_PORT,
    state_dir: Path = STATE,
    timeout: float = 30.0,
    settings: dict[str, str] | None = None,
) -> subprocess.Popen[bytes] | None:
    """Start the emulator on 127.0.0.1:`port`; None when one already answers there. `settings`: extra
    environment, such as LLMFLEET_EMULATOR_RDS_POSTGRES (scripts/emulator/rds_postgres.py)."""
    if answers(port):
        return None
    state_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "MOTO_IAM_LOAD_MANAGED_POLICIES": "true",
        "MOTO_AMIS_PATH": str(AMIS),
        **(settings or {}),
    }
    log = (state_dir / f"moto-{port}.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, str(SERVER), "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    (state_dir / f"moto-{port}.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}; see {state_dir}/moto-{port}.log")
        if answers(port):
            return proc
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"moto_server did not answer on {url_for(port)} within {timeout:g}s")


def stop(port: int = DEFAULT_PORT, state_dir: Path = STATE) -> bool:
    pid_file = state_dir / f"moto-{port}.pid"
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    pid_file.unlink(missing_ok=True)
    return True


def reset(port: int = DEFAULT_PORT) -> None:
    req = urllib.request.Request(f"{url_for(port)}/moto-api/reset", method="POST")  # noqa: S310
    with urllib.request.urlopen(req, timeout=10):  # noqa: S310 - our own loopback URL
        pass


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("action", choices=["start", "stop", "status", "reset"])
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = parser.parse_args()
    if args.action == "start":
        try:
            proc = start(args.port)
        except RuntimeError as exc:
            print(f"emulator: {exc}", file=sys.stderr)
            return 1
        state = "already running" if proc is None else f"started (pid {proc.pid})"
        print(f"emulator: moto server {state} on {url_for(args.port)}")
    elif args.action == "stop":
        print("emulator: stopped" if stop(args.port) else "emulator: none started by this script")
    elif args.action == "status":
        up = answers(args.port)
        print(f"emulator: {'answers' if up else 'not running'} on {url_for(args.port)}")
        return 0 if up else 1
    else:
        reset(args.port)
        print("emulator: reset")
    return 0


if __name__ == "__main__":
    sys.exit(main())
