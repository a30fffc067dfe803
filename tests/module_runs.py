"""Running the collection's modules in tests: in-process (their real AnsibleModule, the result as the module
built it) or through the Ansible CLIs (AnsiballZ, the json callback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from ansible.module_utils import basic
from ansible.module_utils.testing import patch_module_args

REPO = Path(__file__).resolve().parents[1]


class Exited(Exception):
    """AnsibleModule.exit_json was called."""

    def __init__(self, result: dict[str, Any]) -> None:
        super().__init__(result)
        self.result = result


class Failed(Exception):
    """AnsibleModule.fail_json was called."""

    def __init__(self, result: dict[str, Any]) -> None:
        super().__init__(result.get("msg"))
        self.result = result


def _exit_json(module: basic.AnsibleModule, **kwargs: Any) -> None:
    raise Exited(kwargs)


def _fail_json(module: basic.AnsibleModule, msg: str, **kwargs: Any) -> None:
    raise Failed(dict(msg=msg, failed=True, **kwargs))


def run_module(main: Callable[[], None], args: dict[str, Any], check: bool = False) -> dict[str, Any]:
    """Run a module's main() in-process with `args` as Ansible passes them; its result, or Failed with the
    failure's (before Ansible masks no_log values, so a key in a message is caught)."""
    module_args = dict(args, _ansible_check_mode=check)
    with (
        patch_module_args(module_args),
        mock.patch.object(basic.AnsibleModule, "exit_json", _exit_json),
        mock.patch.object(basic.AnsibleModule, "fail_json", _fail_json),
        pytest.raises(Exited) as exited,
    ):
        main()
    return exited.value.result


def fail_module(main: Callable[[], None], args: dict[str, Any], check: bool = False) -> dict[str, Any]:
    """Run a module that must fail; the failure's result."""
    with pytest.raises(Failed) as failed:
        run_module(main, args, check)
    return failed.value.result


def ansible_json(command: list[str], key: str = "") -> tuple[int, dict[str, Any], str]:
    """An Ansible CLI run on localhost, json callback, LLMFLEET_OPERATOR_KEY=key: (rc, report, output)."""
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
        "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1",
        "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.json",
        "LLMFLEET_OPERATOR_KEY": key,
    }
    argv = [str(Path(sys.executable).parent / command[0]), *command[1:]]
    argv += ["-i", "localhost,", "-c", "local", "-e", f"ansible_python_interpreter={sys.executable}"]
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    output = proc.stdout + proc.stderr
    return proc.returncode, json.loads(proc.stdout[proc.stdout.index("{") :]), output


def ansible_module(module: str, args: dict[str, Any], key: str) -> tuple[int, dict[str, Any], str]:
    """A module as an ad hoc command (the key from the environment): (rc, result, output)."""
    rc, report, output = ansible_json(["ansible", "localhost", "-m", module, "-a", json.dumps(args)], key)
    return rc, report["plays"][0]["tasks"][0]["hosts"]["localhost"], output
