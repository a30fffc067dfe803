"""Token budgets per person (issue 13, part 3): the rules that pick a person's budget, 429 with Retry-After
until the period resets, GET /agent/keys/me, the use surviving a restart, and the fleet-wide bound: two
agents on one PostgreSQL stop a person within one writer interval plus one refresh interval.

Group budgets (a person's directory groups) are shown against Samba in test_directory_logins.py."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any

import pytest
from agents import AgentHandle
from support import Stream, bearer, http, wait_until
from test_shared_store import FleetDB, upgrade

from llmfleet_agent import periods
from llmfleet_agent.budgets import budget_for
from llmfleet_agent.config import BudgetsConfig, ConfigError, parse_config

CHAT = {"model": "tinyllama", "messages": [{"role": "user", "content": "hi"}], "stream": False}
EMAIL = "X-OpenWebUI-User-Email"
# the usage writer's interval (batching.BatchWriter): how long a record may wait before the store has it
WRITER_INTERVAL = 1.0


# --- the rules --------------------------------------------------------------------------------------------
def test_whose_budget_applies() -> None:
    cfg = BudgetsConfig.model_validate(
        {
            "groups": {
                "llmfleet-users": {"day": 1000, "month": 20000},
                "CN=Research,OU=Groups,DC=corp,DC=example,DC=com": {"day": 5000},
                "llmfleet-admins": {},
            },
            "users": {"Alice@Corp.example.com": {"day": 10}},
            "default": {"month": 300},
        }
    )
    users = (("CN=llmfleet-users,OU=Groups,DC=corp,DC=example,DC=com", "llmfleet-users"),)
    research = (("cn=research,ou=groups,dc=corp,dc=example,dc=com", "research"),)
    admins = (("CN=llmfleet-admins,DC=corp,DC=example,DC=com", "llmfleet-admins"),)
    # a person's own entry wins, without regard to case
    alice = budget_for(" alice@corp.example.COM", users, cfg)
    assert alice is not None and (alice.day, alice.month) == (10, None) and "Alice@" in alice.source
    # one group
    bob = budget_for("bob@corp.example.com", users, cfg)
    assert bob is not None and (bob.day, bob.month) == (1000, 20000) and bob.source == "group llmfleet-users"
    # several: the most generous per period; a group that sets no month limit gives none
    both = budget_for("carol@corp.example.com", users + research, cfg)
    assert both is not None and (both.day, both.month) == (5000, None) and both.source.startswith("groups ")
    # a group with no limits at all: none
    assert budget_for("dave@corp.example.com", users + admins, cfg) is None
    # in no budget group, or groups unknown (a frontend user the directory does not know): the default
    for groups in ((("CN=other,DC=x", "other"),), None):
        default = budget_for("erin@example.com", groups, cfg)
        assert default is not None and (default.day, default.month) == (None, 300)
    assert budget_for("erin@example.com", None, BudgetsConfig()) is None


def test_periods_end_at_utc_midnight_and_the_first_of_the_month() -> None:
    def at(text: str) -> float:
        return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()

    assert periods.end("day", at("2026-12-05T23:59:59")) == at("2026-12-06T00:00:00")
    assert periods.start("day", at("2026-12-05T00:00:00")) == at("2026-12-05T00:00:00")
    assert periods.end("month", at("2026-12-31T12:00:00")) == at("2027-01-01T00:00:00")
    assert periods.end("month", at("2028-02-10T00:00:00")) == at("2028-03-01T00:00:00")  # a leap year
    assert periods.start("month", at("2027-01-01T00:00:00")) == at("2027-01-01T00:00:00")


def test_budget_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"budgets\.groups: .*needs auth\.ldap"):
        parse_config({"budgets": {"groups": {"llmfleet-users": {"day": 10}}}})
    with pytest.raises(ConfigError, match=r"budgets\.users: .*name the same person"):
        parse_config({"budgets": {"users": {"a@x.com": {"day": 1}, "A@X.com": {"day": 2}}}})
    with pytest.raises(ConfigError, match=r"budgets\.default\.day: .*greater than or equal to 1"):
        parse_config({"budgets": {"default": {"day": 0}}})
    with pytest.raises(ConfigError, match=r"budgets\.default\.week: unknown key"):
        parse_config({"budgets": {"default": {"week": 10}}})


# --- on an agent ------------------------------------------------------------------------------------------
def frontend_key(agent: AgentHandle, stdin: str | None = None) -> str:
    """A key marked frontend (Open WebUI's), made with the CLI (the owner's credential on stdin, if any)."""
    extra = ("--stdin-json",) if stdin else ()
    made = agent.cli(
        "keys",
        "create",
        "--name",
        "open-webui",
        "--role",
        "user",
        "--frontend",
        "--json",
        *extra,
        stdin=stdin,
    )
    assert made.returncode == 0, made.stderr
    return str(json.loads(made.stdout)["key"])


def chat_as(agent: AgentHandle, key: str, person: str | None) -> tuple[int, Any, Any]:
    headers = {**bearer(key), **({EMAIL: person} if person else {})}
    return http("POST", agent.url + "/api/chat", CHAT, headers, timeout=30)


def tokens(body: Any) -> int:
    return int(body["prompt_eval_count"]) + int(body["eval_count"])


def test_a_spent_budget_answers_429_until_the_period_resets(make_agent: Any) -> None:
    agent = make_agent(
        {
            "budgets": {
                "users": {"ann@example.com": {"day": 100}, "max@example.com": {"month": 60}},
                "refresh_interval": 0.2,
            }
        }
    )
    key = frontend_key(agent)
    agent.start().wait_ready(30)

    # a request costs some tokens; requests go on while anything is left, the one that crosses included
    used = 0
    while True:
        status, body, headers = chat_as(agent, key, "Ann@Example.com")
        if status != 200:
            break
        used += tokens(body)
        assert used < 100 + tokens(body), "a request was served after the budget was spent"
    assert used >= 100
    assert status == 429, body
    assert "daily budget of 100 tokens (user ann@example.com) is spent" in body["error"], body
    now = time.time()
    assert abs(int(headers["Retry-After"]) - (periods.end("day", now) - now)) <= 5
    # only inference is counted and refused: the model list still answers
    assert http("GET", agent.url + "/api/tags", headers={**bearer(key), EMAIL: "ann@example.com"})[0] == 200

    # the caller's view: used, limit, nothing left, when it resets
    code, me, _ = http("GET", agent.url + "/agent/keys/me", headers={**bearer(key), EMAIL: "ann@example.com"})
    assert code == 200, me
    assert me["user"] == "ann@example.com" and me["key"]["frontend"] is True
    assert me["budget"]["day"] == {
        "used": used,
        "limit": 100,
        "left": 0,
        "resets": periods.iso(periods.end("day", now)),
    }
    assert me["budget"]["month"]["limit"] is None

    # someone else is not held back; a monthly budget says when the month ends
    assert chat_as(agent, key, "someone@example.com")[0] == 200
    while (answer := chat_as(agent, key, "max@example.com"))[0] == 200:
        pass
    status, body, headers = answer
    assert status == 429 and "monthly budget of 60 tokens" in body["error"], body
    assert abs(int(headers["Retry-After"]) - (periods.end("month", now) - now)) <= 5

    # a key that is not a frontend's names no person: its requests have no budget
    plain = agent.create_key("user", "plain")[0]
    assert chat_as(agent, plain, "ann@example.com")[0] == 200
    code, me, _ = http(
        "GET", agent.url + "/agent/keys/me", headers={**bearer(plain), EMAIL: "ann@example.com"}
    )
    assert code == 200 and me["user"] is None and me["budget"] is None

    # what was used counts after a restart (read back from the store)
    assert agent.proc is not None
    agent.proc.stop()
    agent.start().wait_ready(30)
    status, body, _ = chat_as(agent, key, "ann@example.com")
    assert status == 429 and "daily budget" in body["error"], body


def test_refusals_are_recorded_and_counted(make_agent: Any) -> None:
    agent = make_agent({"budgets": {"default": {"day": 1}}})
    key = frontend_key(agent)
    agent.start().wait_ready(30)
    assert chat_as(agent, key, "pat@example.com")[0] == 200
    assert chat_as(agent, key, "pat@example.com")[0] == 429
    # budgets are per person: a frontend's request that names nobody (or a name past 256 characters) is
    # refused, not let through unbudgeted
    for nobody in (None, "x" * 300 + "@example.com"):
        code, body, _ = chat_as(agent, key, nobody)
        assert code == 400 and "must name its user" in body["error"], body
    code, metrics, _ = http("GET", agent.url + "/metrics", headers=bearer(agent.key("operator")))
    assert code == 200
    assert 'llmfleet_refused_requests_total{reason="over_budget"} 1.0' in metrics
    report = agent.cli("usage", "--by", "user", "--json")
    rows = {row["group"]: row for row in json.loads(report.stdout)["rows"]}
    assert rows["pat@example.com"]["requests"] == 2 and rows["pat@example.com"]["errors"] == 1
    # the deployment's own keys name no person: no budget
    assert chat_as(agent, agent.key("user"), None)[0] == 200


def me(agent: AgentHandle, key: str, person: str) -> dict[str, Any]:
    code, body, _ = http("GET", agent.url + "/agent/keys/me", headers={**bearer(key), EMAIL: person})
    assert code == 200, body
    return dict(body["budget"])


def test_what_a_client_cannot_dodge(make_agent: Any) -> None:
    """A stream the client hangs up on is charged what it got; one person's requests at once are capped;
    answers without counts are charged an estimate."""
    agent = make_agent(
        {
            "ollama": {"env": {"LLMFLEET_SIM_TOKEN_DELAY": "0.02"}},
            "budgets": {"default": {"day": 100000}, "max_concurrent_per_person": 2},
        }
    )
    key = frontend_key(agent)
    agent.start().wait_ready(30)
    # the simulator answers as many words as the prompt has
    words = [{"role": "user", "content": " ".join(["word"] * 400)}]
    long = {**CHAT, "messages": words, "stream": True}

    # read ten pieces of a long answer, then hang up: those pieces (and the prompt) are charged
    stream = Stream(agent.url, "/api/chat", long, key, headers={EMAIL: "cut@example.com"})
    assert stream.status == 200
    pieces = stream.lines()
    for _ in range(10):
        next(pieces)
    stream.close()
    wait_until(lambda: me(agent, key, "cut@example.com")["day"]["used"] >= 10, 10, "the cut stream charged")

    def report() -> dict[str, Any]:
        rows = agent.cli("usage", "--by", "user", "--json")
        return {r["group"]: r for r in json.loads(rows.stdout)["rows"]}

    wait_until(lambda: "cut@example.com" in report(), 10, "the cut stream's record in the store")
    row = report()["cut@example.com"]
    # what it got (and what was in the pipes), not the whole answer; the prompt estimated from the body
    assert 10 <= row["completion_tokens"] < 400 and row["prompt_tokens"] == -(-len(json.dumps(long)) // 4)
    assert me(agent, key, "cut@example.com")["day"]["used"] == row["completion_tokens"] + row["prompt_tokens"]

    # two at once per person: a third waits its turn (429), another person is not held back
    first = Stream(agent.url, "/api/chat", long, key, headers={EMAIL: "busy@example.com"})
    second = Stream(agent.url, "/api/chat", long, key, headers={EMAIL: "busy@example.com"})
    assert first.status == second.status == 200
    code, body, headers = chat_as(agent, key, "busy@example.com")
    assert code == 429 and "budgets.max_concurrent_per_person" in body["error"] and headers["Retry-After"]
    assert chat_as(agent, key, "other@example.com")[0] == 200
    first.close(), second.close()
    wait_until(lambda: chat_as(agent, key, "busy@example.com")[0] == 200, 10, "a turn once they ended")

    # the legacy embeddings route gives no counts: a token per 4 bytes of the body is charged
    legacy = {"model": "tinyllama", "prompt": "x" * 400}
    headers = {**bearer(key), EMAIL: "embed@example.com"}
    assert http("POST", agent.url + "/api/embeddings", legacy, headers)[0] == 200
    wait_until(lambda: me(agent, key, "embed@example.com")["day"]["used"] >= 100, 10, "the embedding charged")


# --- fleet-wide -------------------------------------------------------------------------------------------
REFRESH = 0.3
BUDGET = 400


@pytest.mark.slow
def test_two_agents_hold_a_budget_within_the_documented_bound(make_agent: Any, fleet_db: FleetDB) -> None:
    """A person's requests alternate between two agents on one database. Each agent counts its own use as
    it happens and sees the other's within one writer interval plus one refresh interval (docs/budgets.md):
    once the budget is spent, both refuse within that time, so the overshoot is at most what they served
    in it."""
    budgets = {"users": {"kim@example.com": {"day": BUDGET}}, "refresh_interval": REFRESH}
    a = make_agent(fleet_db.agent_overrides("i-aaa", budgets=budgets), name="a")
    b = make_agent(fleet_db.agent_overrides("i-bbb", budgets=budgets), name="b")
    upgrade(a, fleet_db)
    key = frontend_key(a, fleet_db.owner_stdin())
    a.start(), b.start()
    a.wait_ready(30), b.wait_ready(30)

    served = 0
    crossed_at: float | None = None  # when the request that spent the budget ended
    late: list[tuple[str, float, int]] = []  # requests served after the crossing: (agent, started, tokens)
    refused = {"a": False, "b": False}
    deadline = time.monotonic() + 60
    turn = 0
    while not all(refused.values()):
        assert time.monotonic() < deadline, f"not both refused within 60 s: {refused}, {served} tokens served"
        name, agent = (("a", a), ("b", b))[turn % 2]
        turn += 1
        if refused[name]:
            continue
        started = time.monotonic()
        status, body, _ = chat_as(agent, key, "kim@example.com")
        if status == 429:
            assert "daily budget of 400 tokens" in body["error"], body
            assert crossed_at is not None, f"refused after {served} of {BUDGET} tokens"
            refused[name] = True
            continue
        assert status == 200, body
        if crossed_at is not None:
            late.append((name, started - crossed_at, tokens(body)))
        served += tokens(body)
        if crossed_at is None and served >= BUDGET:
            crossed_at = time.monotonic()
    bound = WRITER_INTERVAL + REFRESH
    slack = 1.0  # a write and a read taking their time on a loaded machine
    assert all(after <= bound + slack for _, after, _ in late), (bound, late)
    print(f"budget {BUDGET}: {served} tokens served, {len(late)} requests after it was spent")

    # every agent ends with the same figure for the person: the store's
    def views() -> list[int]:
        figures = []
        for agent in (a, b):
            code, me, _ = http(
                "GET", agent.url + "/agent/keys/me", headers={**bearer(key), EMAIL: "kim@example.com"}
            )
            assert code == 200, me
            figures.append(me["budget"]["day"]["used"])
        return figures

    wait_until(lambda: views() == [served, served], 10, f"both agents to count {served} tokens: {views()}")
