"""Process plumbing for the Ollama child: parent-death signal and reaping a process group left behind.

The child runs in a session (and process group) of its own. It gets SIGKILL when the agent dies, through
Linux's parent-death signal; and the agent records the group in a file so that, should anything of it
survive (a grandchild of `ollama serve`, say), the next start of the agent kills it before spawning anew.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import psutil

_PR_SET_PDEATHSIG = 1
_prctl: Callable[..., int] | None = None
if sys.platform.startswith("linux"):
    # resolved now, not in the forked child, where as little as possible may run
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    _prctl = _libc.prctl


def child_setup(parent_pid: int) -> Callable[[], None]:
    """A `preexec_fn`: SIGKILL this child when its parent dies (Linux); exit if it already has."""

    def _setup() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:
            os._exit(1)

    return _setup


def record_group(path: Path, pgid: int) -> None:
    """Remember the child's process group (with its leader's start time, so a reused pid is not hit)."""
    try:
        created = psutil.Process(pgid).create_time()
    except psutil.Error:
        created = 0.0
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pgid": pgid, "created": created}))
    tmp.replace(path)


def forget_group(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def group_members(pgid: int, not_before: float) -> list[psutil.Process]:
    members = []
    for proc in psutil.process_iter(["pid", "create_time"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["create_time"] >= not_before - 1:
                members.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def reap_recorded_group(path: Path) -> list[int]:
    """Kill what survives of a recorded process group; return the pids that were killed."""
    try:
        data = json.loads(path.read_text())
        pgid, created = int(data["pgid"]), float(data["created"])
    except (OSError, ValueError, KeyError, TypeError):
        forget_group(path)
        return []
    if pgid == os.getpgid(0):  # never our own group
        forget_group(path)
        return []
    members = group_members(pgid, created)
    for proc in members:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(members, timeout=5)
    forget_group(path)
    return [proc.pid for proc in members]


def signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to a process group; False when it no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True
