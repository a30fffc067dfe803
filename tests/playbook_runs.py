"""ansible-playbook runs for the collection's tests, from the repository root with the local inventory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.MULTILINE)


@dataclass
class PlaybookRun:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def totals(self) -> dict[str, int]:
        """The PLAY RECAP summed over every host (the controller and the GPU hosts)."""
        rows = RECAP.findall(self.stdout)
        if not rows:
            raise AssertionError(f"no PLAY RECAP in:\n{self.output[-3000:]}")
        names = ("ok", "changed", "unreachable", "failed")
        return {name: sum(int(row[i + 1]) for row in rows) for i, name in enumerate(names)}

    def recap(self, host: str = "localhost") -> dict[str, int]:
        for name, ok, changed, unreachable, failed in RECAP.findall(self.stdout):
            if name == host:
                return {
                    "ok": int(ok),
                    "changed": int(changed),
                    "unreachable": int(unreachable),
                    "failed": int(failed),
                }
        raise AssertionError(f"no PLAY RECAP for {host} in:\n{self.output[-3000:]}")


def ansible_playbook(
    playbook: str,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    inventory: str = "inventories/local",
) -> PlaybookRun:
    """Run ansible-playbook from the repository root (so ansible.cfg applies) with the local inventory
    (`inventories/local/hosts.yml` alone: without the aws_ec2 source, which asks the emulator)."""
    command = [str(BIN / "ansible-playbook"), "-i", inventory, playbook, *args]
    full_env = {
        **os.environ,
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_NOCOLOR": "1",
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        **(env or {}),
    }
    res = subprocess.run(
        command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout, check=False
    )
    return PlaybookRun(command, res.returncode, res.stdout, res.stderr)
