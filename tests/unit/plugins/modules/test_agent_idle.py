"""Tests of llmfleet.aws.agent_idle and module_utils/agent_api.py, against real agents.

Three agents (tests/agent_fleet.py: the real llmfleet-agent with the Ollama simulator, on loopback, one
operator key) are started once for the module: `plain`, `slow` (the simulator streams a token every 50 ms,
so a request can be held in flight) and `tls` (a self-signed certificate for 127.0.0.1). Tests that drain
an agent resume it when they end.

The module runs in-process: its arguments go in as Ansible passes them (patch_module_args) to the real
AnsibleModule, whose exit_json and fail_json raise with the result as the module built it (before Ansible
masks no_log values, so a key in a message is caught). One test runs it through the `ansible` CLI, which
proves it (and its module_utils) loads through AnsiballZ.
"""

import json
import math
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import module_runs
import pytest
from agent_fleet import Fleet, fleet, free_port, wait_until
from ansible_collections.llmfleet.aws.plugins.module_utils import agent_api
from ansible_collections.llmfleet.aws.plugins.modules import agent_idle
from module_runs import ansible_json, ansible_module
from support import Stream  # agent/tests/support.py, on sys.path through agent_fleet

REPO = Path(__file__).resolve().parents[4]
SLOW_SIM = {"ollama": {"env": {"LLMFLEET_SIM_TOKEN_DELAY": "0.05"}}}
MODEL = "tinyllama:latest"
FIGURES = ("idle_seconds", "inflight", "last_activity", "draining")


def run_module(args: dict[str, Any], check: bool = False) -> dict[str, Any]:
    """Run agent_idle in-process; its result, or Failed with the failure's."""
    return module_runs.run_module(agent_idle.main, args, check)


def fail_module(args: dict[str, Any], check: bool = False) -> dict[str, Any]:
    """Run the module, which must fail; the failure's result."""
    return module_runs.fail_module(agent_idle.main, args, check)


def chat(agents: Fleet, name: str) -> int:
    """A non-streamed chat with the user key; the HTTP status."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], "stream": False}
    return agents.request(name, "POST", "/api/chat", body, key=agents.user_key)[0]


@pytest.fixture(scope="module")
def agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with fleet(tmp_path_factory.mktemp("agent-idle")) as made:
        made.add("plain")
        made.add("slow", SLOW_SIM)
        made.add("tls", tls=True)
        made.start()
        yield made


@contextmanager
def resumed_afterwards(agents: Fleet, name: str) -> Iterator[None]:
    try:
        yield
    finally:
        code, body = agents.request(name, "POST", "/agent/resume", key=agents.operator_key)
        assert code == 200, body


@pytest.fixture
def plain(agents: Fleet) -> Iterator[Fleet]:
    """The fleet, with its `plain` agent resumed after the test."""
    with resumed_afterwards(agents, "plain"):
        yield agents


def args_for(agents: Fleet, name: str, **extra: Any) -> dict[str, Any]:
    return {"url": agents.agents[name].url, "operator_key": agents.operator_key, **extra}


def idle_for(agents: Fleet, name: str, seconds: float) -> dict[str, Any]:
    """Wait until the agent has been idle `seconds`; its figures."""
    return wait_until(
        lambda: (f := agents.idle(name))["idle_seconds"] >= seconds and f, 10, f"{name} idle {seconds}s"
    )


# --- reading -----------------------------------------------------------------------------------------


def test_report_reads_the_figures_and_changes_nothing(plain: Fleet) -> None:
    before = plain.idle("plain")
    result = run_module(args_for(plain, "plain", url=plain.agents["plain"].url + "/"))

    assert result["changed"] is False
    assert result["status"] == 200
    assert result["agent_unreachable"] is False
    assert result["url"] == plain.agents["plain"].url
    assert (result["drained"], result["resumed"], result["reason"]) == (False, False, "")
    assert "would_drain" not in result
    assert result["inflight"] == 0 and result["draining"] is False
    assert isinstance(result["idle_seconds"], float) and result["idle_seconds"] >= before["idle_seconds"]
    assert result["last_activity"] == before["last_activity"]
    assert plain.idle("plain")["last_activity"] == before["last_activity"]


def test_the_key_can_come_from_the_environment(plain: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMFLEET_OPERATOR_KEY", plain.operator_key)
    result = run_module(dict(url=plain.agents["plain"].url))
    assert result["status"] == 200 and result["draining"] is False


# --- draining ----------------------------------------------------------------------------------------


def test_drain_when_idle_past_the_threshold(plain: Fleet) -> None:
    idle_for(plain, "plain", 0.3)
    result = run_module(args_for(plain, "plain", drain_if_idle_for=0.3))

    assert result["changed"] is True
    assert result["drained"] is True and result["would_drain"] is True
    assert result["draining"] is True and result["inflight"] == 0
    assert result["idle_seconds"] >= 0.3
    assert (result["status"], result["reason"], result["resumed"]) == (200, "", False)
    assert plain.idle("plain")["draining"] is True
    assert chat(plain, "plain") == 503

    # already draining: the agent confirms it (idle, nothing in flight) and nothing changes
    again = run_module(args_for(plain, "plain", drain_if_idle_for=0))
    assert (again["changed"], again["drained"], again["draining"], again["status"]) == (
        False,
        True,
        True,
        200,
    )


def test_no_drain_when_not_idle_long_enough(plain: Fleet) -> None:
    result = run_module(args_for(plain, "plain", drain_if_idle_for=3600))

    assert result["changed"] is False
    assert result["drained"] is False and result["would_drain"] is False
    assert result["status"] == 409
    assert result["reason"].startswith("not drained: idle for ") and "less than 3600s" in result["reason"]
    assert result["draining"] is False
    assert plain.idle("plain")["draining"] is False
    assert chat(plain, "plain") == 200


def test_a_request_in_flight_blocks_the_drain(agents: Fleet) -> None:
    with resumed_afterwards(agents, "slow"):
        words = " ".join(f"word{i}" for i in range(200))  # 10 s of tokens at 50 ms each
        body = {"model": MODEL, "messages": [{"role": "user", "content": words}]}
        stream = Stream(agents.agents["slow"].url, "/api/chat", body, key=agents.user_key)
        try:
            assert stream.status == 200
            next(stream.lines())  # the answer has begun: the request is in flight
            would = run_module(args_for(agents, "slow", drain_if_idle_for=0), check=True)
            result = run_module(args_for(agents, "slow", drain_if_idle_for=0))
            assert next(stream.lines())  # the stream goes on
        finally:
            stream.close()

        assert (would["would_drain"], would["changed"], would["inflight"]) == (False, False, 1)
        assert (result["drained"], result["changed"], result["status"]) == (False, False, 409)
        assert result["reason"] == "not drained: 1 request(s) in flight"
        assert result["inflight"] == 1 and result["draining"] is False

        wait_until(lambda: agents.idle("slow")["inflight"] == 0, 10, "the cut stream to end")
        after = run_module(args_for(agents, "slow", drain_if_idle_for=0))
        assert (after["drained"], after["changed"], after["status"]) == (True, True, 200)


def test_check_mode_never_drains(plain: Fleet) -> None:
    before = idle_for(plain, "plain", 0.2)
    would = run_module(args_for(plain, "plain", drain_if_idle_for=0.2), check=True)
    not_yet = run_module(args_for(plain, "plain", drain_if_idle_for=3600), check=True)
    after = plain.idle("plain")

    assert (would["changed"], would["would_drain"], would["drained"]) == (True, True, False)
    assert would["draining"] is False and would["status"] == 200 and would["reason"] == ""
    assert (not_yet["changed"], not_yet["would_drain"], not_yet["drained"]) == (False, False, False)
    assert after["draining"] is False
    assert after["last_activity"] == before["last_activity"]
    assert after["idle_seconds"] >= before["idle_seconds"]


# --- resuming ----------------------------------------------------------------------------------------


def test_resume(plain: Fleet) -> None:
    code, body = plain.request("plain", "POST", "/agent/drain", {}, key=plain.operator_key)
    assert code == 200 and body["draining"] is True

    would = run_module(args_for(plain, "plain", resume=True), check=True)
    assert (would["changed"], would["resumed"], would["draining"]) == (True, False, True)
    assert plain.idle("plain")["draining"] is True

    first = run_module(args_for(plain, "plain", resume=True))
    assert (first["changed"], first["resumed"], first["draining"], first["status"]) == (
        True,
        True,
        False,
        200,
    )
    assert chat(plain, "plain") == 200

    second = run_module(args_for(plain, "plain", resume=True))
    assert (second["changed"], second["resumed"], second["draining"]) == (False, False, False)


# --- failures ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["unknown", "user"])
def test_a_refused_key_fails_without_showing_it(agents: Fleet, which: str) -> None:
    key = "llmf_not-a-key-of-this-agent-0123456789" if which == "unknown" else agents.user_key
    result = fail_module(dict(url=agents.agents["plain"].url, operator_key=key, drain_if_idle_for=0))

    status = 401 if which == "unknown" else 403
    assert result["msg"].startswith(f"the llmfleet agent at {agents.agents['plain'].url} (GET /agent/idle)")
    assert f"refused the operator key: HTTP {status}" in result["msg"]
    assert result["status"] == status and result["agent_unreachable"] is False
    assert key not in json.dumps(result)
    assert agents.idle("plain")["draining"] is False


def test_unreachable_names_the_url_and_the_cause() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = fail_module(dict(url=url, operator_key="llmf_x", drain_if_idle_for=0))

    assert result["agent_unreachable"] is True
    assert result["msg"] == f"cannot reach the llmfleet agent at {url} (GET /agent/idle): Connection refused"


def test_a_silent_agent_times_out() -> None:
    with socket.socket() as listener:  # accepts connections (the kernel does) and never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        result = fail_module(dict(url=url, operator_key="llmf_x", timeout=0.5))

    assert result["agent_unreachable"] is True
    assert (
        result["msg"] == f"cannot reach the llmfleet agent at {url} (GET /agent/idle): timed out after 0.5s"
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(url="ftp://10.0.1.5:8443"), "url must be an http:// or https:// URL"),
        (dict(url="10.0.1.5:8443"), "url must be an http:// or https:// URL"),
        (dict(url="https://"), "url must be an http:// or https:// URL"),
        (dict(url="http://10.0.1.5:port"), "url must be an http:// or https:// URL"),
        (dict(drain_if_idle_for=-1), "drain_if_idle_for must be a number of seconds >= 0; got -1.0"),
        (dict(drain_if_idle_for=math.nan), "drain_if_idle_for must be a number of seconds >= 0; got nan"),
        (dict(drain_if_idle_for=5, resume=True), "drain_if_idle_for and resume=true cannot be combined"),
        (dict(timeout=0), "timeout must be more than 0 seconds"),
        (dict(operator_key=""), "operator_key is empty"),
        (dict(ca_path="/nonexistent/ca.pem"), "ca_path /nonexistent/ca.pem is not a file"),
    ],
)
def test_bad_parameters_fail_before_any_request(overrides: dict[str, Any], message: str) -> None:
    # nothing listens on port 9: a request would fail as unreachable, not with the message
    params = {"url": "http://127.0.0.1:9", "operator_key": "llmf_x", **overrides}
    result = fail_module(params)
    assert message in result["msg"]
    assert result["agent_unreachable"] is False
    if "url" in overrides:
        assert repr(overrides["url"]) in result["msg"]


def test_resume_false_with_a_threshold_is_a_drain(plain: Fleet) -> None:
    result = run_module(args_for(plain, "plain", drain_if_idle_for=3600, resume=False))
    assert result["status"] == 409 and result["would_drain"] is False


def test_an_answer_that_is_not_the_agents_fails(agents: Fleet) -> None:
    # /healthz answers 200 without the figures: as a server that is not the agent would
    client = agent_api.AgentClient(agents.agents["plain"].url, agents.operator_key)
    answer = client.request("GET", "/healthz")
    with pytest.raises(agent_api.UnexpectedAnswer, match=r"answered HTTP 200 without the idle figures"):
        client._checked(answer, "GET", "/healthz", (200,))
    missing = client.request("GET", "/agent/nothing")
    with pytest.raises(
        agent_api.UnexpectedAnswer, match=r"\(GET /agent/nothing\) answered HTTP 404: no route"
    ):
        client._checked(missing, "GET", "/agent/nothing", (200,))


# --- TLS ---------------------------------------------------------------------------------------------


def test_tls_with_the_agents_certificate_as_ca_path(agents: Fleet) -> None:
    url = agents.agents["tls"].url
    assert url.startswith("https://127.0.0.1:")
    result = run_module(args_for(agents, "tls", ca_path=str(agents.certificates["tls"])))
    assert result["status"] == 200 and result["draining"] is False


def test_tls_without_the_ca_fails_as_unreachable(agents: Fleet) -> None:
    url = agents.agents["tls"].url
    result = fail_module(args_for(agents, "tls"))
    assert result["agent_unreachable"] is True
    assert result["msg"].startswith(f"cannot reach the llmfleet agent at {url} (GET /agent/idle): ")
    assert "TLS certificate verification failed: self-signed certificate" in result["msg"]


def test_tls_without_validation(agents: Fleet) -> None:
    result = run_module(args_for(agents, "tls", validate_certs=False, ca_path="/nonexistent/ca.pem"))
    assert result["status"] == 200 and result["agent_unreachable"] is False


# --- through Ansible ---------------------------------------------------------------------------------


def ansible(args: dict[str, Any], key: str) -> tuple[int, dict[str, Any], str]:
    """The module as an ad hoc command (the key from the environment): (rc, result, output)."""
    return ansible_module("llmfleet.aws.agent_idle", args, key)


def test_through_the_ansible_cli(plain: Fleet) -> None:
    url = plain.agents["plain"].url
    rc, result, output = ansible(dict(url=url, drain_if_idle_for=3600), plain.operator_key)
    assert rc == 0, output
    assert (result["changed"], result["drained"], result["status"]) == (False, False, 409)
    assert result["reason"].startswith("not drained: idle for ")
    assert plain.operator_key not in output

    wrong = "llmf_wrong-key-for-the-cli-0123456789"
    rc, result, output = ansible(dict(url=url), wrong)
    assert rc != 0
    assert result["failed"] is True and result["agent_unreachable"] is False and result["status"] == 401
    assert "refused the operator key" in result["msg"]
    assert wrong not in output


UNREACHABLE_PLAY = """
- hosts: localhost
  gather_facts: false
  tasks:
    - llmfleet.aws.agent_idle:
        url: "{{ url }}"
        drain_if_idle_for: 60
      register: tolerated
      failed_when: false
    - ansible.builtin.assert:
        that:
          - tolerated.agent_unreachable and not (tolerated.drained | default(false))
"""


def test_an_unreachable_agent_leaves_the_host_in_the_play(tmp_path: Path) -> None:
    """An agent that cannot be asked is told apart (agent_unreachable) and the host stays in the play."""
    playbook = tmp_path / "play.yml"
    playbook.write_text(UNREACHABLE_PLAY)
    url = f"http://127.0.0.1:{free_port()}"
    rc, report, output = ansible_json(["ansible-playbook", str(playbook), "-e", f"url={url}"], "llmf_x")
    assert rc == 0, output
    assert report["stats"]["localhost"]["unreachable"] == 0
    assert report["stats"]["localhost"]["failures"] == 0
