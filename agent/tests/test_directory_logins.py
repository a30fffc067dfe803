"""Directory logins against Samba as a real AD domain controller: personal keys minted with directory
credentials, group rights through nested groups, keys that follow their owner's account (revalidation),
and the directory going away."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from agents import AgentHandle, agent_cli, new_agent
from samba import SambaDC
from support import bearer, http, wait_until
from test_shared_store import FleetDB

pytestmark = pytest.mark.slow

PASSWORDS = {
    "alice": "Alice-Pass-123",
    "bob": "Bob-Pass-123",
    "carol": "Carol-Pass-123",
    "dave": "Dave-Pass-123",
    "erin": "Erin-Pass-123",
}
SERVICE, SERVICE_PASSWORD = "llmfleet-svc", "Svc-Pass-123-x"


@pytest.fixture(scope="module")
def dc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SambaDC]:
    directory = SambaDC(tmp_path_factory.mktemp("ad")).start()
    directory.add_user(SERVICE, SERVICE_PASSWORD)
    for name, password in PASSWORDS.items():
        directory.add_user(name, password, mail=f"{name}@corp.example.com")
    for group in ("llmfleet-users", "llmfleet-admins", "engineering"):
        directory.add_group(group)
    directory.add_member("llmfleet-users", "engineering")  # alice is a user through a nested group
    directory.add_member("engineering", "alice")
    directory.add_member("llmfleet-admins", "carol")
    for name in ("dave", "erin"):
        directory.add_member("llmfleet-users", name)
    yield directory
    directory.destroy()


def ldap_settings(dc: SambaDC, home: Path) -> dict[str, Any]:
    secret = home / "ldap-password"
    secret.write_text(SERVICE_PASSWORD + "\n")
    secret.chmod(0o600)
    return {
        "urls": [dc.ldaps_url],
        "ca_file": str(dc.ca),
        "server_name": dc.realm,  # the certificate names the domain, not the address
        "domain": dc.realm,
        "base_dn": dc.base_dn,
        "bind_user": f"{SERVICE}@{dc.realm}",
        "bind_password_file": str(secret),
        "groups": {
            "llmfleet-users": {"role": "user", "models": ["tinyllama*"]},
            dc.base_dn.join(["CN=llmfleet-admins,CN=Users,", ""]): {"role": "admin"},
        },
        "revalidate_interval": 1,
        "max_stale": 3600,
    }


@pytest.fixture(scope="module")
def agent(dc: SambaDC, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentHandle]:
    home = tmp_path_factory.mktemp("agent")
    ldap = ldap_settings(dc, home)
    ldap["basic_on_api"] = True
    handle = new_agent(home, {"auth": {"refresh_interval": 0.5, "ldap": ldap}}).start()
    handle.wait_ready()
    yield handle
    assert handle.proc is not None
    handle.proc.stop()


def basic(user: str, password: str | None = None) -> dict[str, str]:
    return basic_for(user, PASSWORDS[user] if password is None else password)


def mint(agent: AgentHandle, user: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    code, answer, _ = http("POST", agent.url + "/agent/keys", body or {"name": f"{user}-laptop"}, basic(user))
    assert code == 201, answer
    return dict(answer)


def test_a_user_in_a_nested_group_mints_a_key_and_uses_it_with_openai(agent: AgentHandle) -> None:
    minted = mint(agent, "alice")
    assert minted["owner"] == "alice@corp.example.com" and minted["role"] == "user"
    assert minted["models"] == ["tinyllama*"] and minted["expires"] is not None
    client = openai.OpenAI(base_url=f"{agent.url}/v1", api_key=minted["key"])
    reply = client.chat.completions.create(
        model="tinyllama:latest", messages=[{"role": "user", "content": "hello"}], max_tokens=3
    )
    assert reply.choices[0].message.content
    # the key's own listing shows the owner's personal keys only, never a secret
    code, listed, _ = http("GET", agent.url + "/agent/keys", headers=bearer(minted["key"]))
    assert code == 200 and [k["id"] for k in listed["keys"]] == [minted["id"]]
    assert "key" not in listed["keys"][0] and "hash" not in listed["keys"][0]
    # the same list with the directory password
    code, listed, _ = http("GET", agent.url + "/agent/keys", headers=basic("alice"))
    assert code == 200 and [k["id"] for k in listed["keys"]] == [minted["id"]]
    # her use is recorded for her, not for a key

    def alices_requests() -> int:
        code, report, _ = http(
            "GET", agent.url + "/agent/usage?since=1h&by=user", headers=bearer(agent.key("operator"))
        )
        assert code == 200, report
        return sum(row["requests"] for row in report["rows"] if row["group"] == "alice@corp.example.com")

    wait_until(lambda: alices_requests() == 1, 10, "alice's request in the report by user")


def test_wrong_password_not_entitled_and_no_credentials_are_refused(agent: AgentHandle) -> None:
    url = agent.url + "/agent/keys"
    code, answer, headers = http("POST", url, {}, basic("alice", "wrong-Pass-1"))
    assert code == 401 and answer["error"] == "invalid directory credentials"
    assert headers["WWW-Authenticate"].startswith("Basic")
    code, answer, _ = http("POST", url, {}, basic("alice", ""))  # an empty password is no anonymous bind
    assert code == 401
    code, answer, _ = http("POST", url, {}, basic("bob"))
    assert (
        code == 403
        and answer["error"] == "bob@corp.example.com is in none of the groups that may use this service"
    )
    code, answer, _ = http("POST", url, {})
    assert code == 401 and "directory credentials" in answer["error"]
    code, answer, _ = http("POST", url, {"expires": "400d"}, basic("alice"))
    assert code == 400 and "auth.ldap.key_max_ttl" in answer["error"]
    # a key of the deployment that is not personal may not list personal keys unless it is an admin's
    code, answer, _ = http("GET", url, headers=bearer(agent.key("user")))
    assert code == 403 and "not a personal key" in answer["error"]


def test_an_admin_lists_and_revokes_anyones_key_and_a_user_cannot(agent: AgentHandle) -> None:
    alices = mint(agent, "alice", {"name": "ci"})
    carols = mint(agent, "carol")
    # a personal key is never more than operator, even an admin's: admin work is done with the directory
    # login (or the deployment's admin key)
    assert carols["role"] == "operator" and carols["models"] == []
    code, _, _ = http("DELETE", f"{agent.url}/agent/keys/{carols['id']}", headers=bearer(alices["key"]))
    assert code == 404  # not hers: as if it did not exist
    code, listed, _ = http("GET", agent.url + "/agent/keys", headers=bearer(carols["key"]))
    assert [k["id"] for k in listed["keys"]] == [carols["id"]]  # her key lists her keys only
    code, listed, _ = http("GET", agent.url + "/agent/keys", headers=basic("carol"))
    assert {alices["id"], carols["id"]} <= {k["id"] for k in listed["keys"]}
    code, revoked, _ = http("DELETE", f"{agent.url}/agent/keys/{alices['id']}", headers=basic("carol"))
    assert code == 200 and revoked["revoked"] is not None

    def refused() -> bool:
        return http("GET", agent.url + "/api/tags", headers=bearer(alices["key"]))[0] == 401

    wait_until(refused, 10, "the revoked key to be refused")


def test_a_disabled_account_or_one_out_of_its_group_loses_its_keys(dc: SambaDC, agent: AgentHandle) -> None:
    daves, erins = mint(agent, "dave")["key"], mint(agent, "erin")["key"]
    for key in (daves, erins):
        assert http("GET", agent.url + "/api/tags", headers=bearer(key))[0] == 200
    dc.disable_user("dave")
    dc.remove_member("llmfleet-users", "erin")

    def answer(key: str) -> tuple[int, Any]:
        code, body, _ = http("GET", agent.url + "/api/tags", headers=bearer(key))
        return code, body

    wait_until(lambda: answer(daves)[0] == 401, 15, "the disabled account's key to be refused")
    assert "the account is disabled" in answer(daves)[1]["error"]
    wait_until(lambda: answer(erins)[0] == 401, 15, "the key of a user out of the group to be refused")
    assert "no longer in a group" in answer(erins)[1]["error"]
    dc.enable_user("dave")  # a suspension is lifted when the account may be used again
    wait_until(lambda: answer(daves)[0] == 200, 15, "the key of the enabled account to work again")


def test_with_the_directory_away_keys_keep_working_and_minting_answers_503(
    dc: SambaDC, agent: AgentHandle, tmp_path: Path
) -> None:
    minted = mint(agent, "alice", {"name": "before-outage"})
    dc.stop()
    try:
        assert http("GET", agent.url + "/api/tags", headers=bearer(minted["key"]))[0] == 200
        code, answer, headers = http("POST", agent.url + "/agent/keys", {}, basic("alice"), timeout=60)
        assert code == 503 and "directory is unreachable" in answer["error"] and headers["Retry-After"]
        # revalidation cannot confirm the owner meanwhile, and changes nothing
        assert http("GET", agent.url + "/api/tags", headers=bearer(minted["key"]))[0] == 200
    finally:
        dc.start()
    mint(agent, "alice", {"name": "after-outage"})


def test_on_a_shared_store_a_key_minted_on_one_agent_works_and_ends_on_both(
    dc: SambaDC, agent: AgentHandle, postgres: Any, pg_database: str, tmp_path: Path, make_agent: Any
) -> None:
    """Personal keys on PostgreSQL: minted with the agent role's own credential (through the database's
    llmfleet_put_personal_key, the only way it may write keys), honoured by every agent, and suspended
    for all when the owner's account is disabled (one agent revalidates at a time, by lease)."""
    fleet = FleetDB(postgres, pg_database, tmp_path / "fleet")
    assert json.loads(fleet_upgrade(fleet, tmp_path))["to"] >= 3
    ldap = ldap_settings(dc, tmp_path)
    a, b = (
        make_agent(
            {**fleet.agent_overrides(name), "auth": {"refresh_interval": 0.5, "ldap": ldap}}, name=name
        )
        for name in ("i-aaa", "i-bbb")
    )
    a.start(), b.start()
    a.wait_ready(30), b.wait_ready(30)
    dc.add_user("frank", "Frank-Pass-123")
    dc.add_member("llmfleet-users", "frank")
    code, minted, _ = http(
        "POST", a.url + "/agent/keys", {"name": "fleet"}, basic_for("frank", "Frank-Pass-123")
    )
    assert code == 201, minted
    for handle in (a, b):
        assert http("GET", handle.url + "/api/tags", headers=bearer(minted["key"]))[0] == 200
    # without basic_on_api a directory password is no credential for the API
    assert http("GET", a.url + "/api/tags", headers=basic_for("frank", "Frank-Pass-123"))[0] == 401
    owners = postgres.psql(f"SELECT owner, role FROM keys WHERE id = '{minted['id']}'", pg_database)
    assert owners == "frank@corp.example.com|user"
    dc.disable_user("frank")
    for handle in (a, b):
        wait_until(
            lambda handle=handle: (
                http("GET", handle.url + "/api/tags", headers=bearer(minted["key"]))[0] == 401
            ),
            15,
            f"{handle.dir.name} to refuse the disabled account's key",
        )
    assert postgres.psql("SELECT holder FROM llmfleet_leases", pg_database) in ("i-aaa", "i-bbb")


def fleet_upgrade(fleet: FleetDB, tmp_path: Path) -> str:
    config = tmp_path / "owner.yaml"
    config.write_text(json.dumps({"store": fleet.store()}))
    done = agent_cli(config, "db", "upgrade", "--stdin-json", stdin=fleet.owner_stdin())
    assert done.returncode == 0, done.stderr
    return done.stdout


def basic_for(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_the_served_document_describes_the_personal_key_routes(agent: AgentHandle) -> None:
    code, document, _ = http("GET", agent.url + "/openapi.json", headers=bearer(agent.key("operator")))
    assert code == 200
    mint_op = document["paths"]["/agent/keys"]["post"]
    assert mint_op["security"] == [{"basic": []}, {"bearer": []}] and "409" in mint_op["responses"]
    assert "delete" in document["paths"]["/agent/keys/{key_id}"]


def test_wrong_passwords_for_an_account_are_throttled_before_the_directory_locks_it(
    agent: AgentHandle,
) -> None:
    """Each failed login is a real bind; after five for one account the agent refuses without binding."""
    url = agent.url + "/agent/keys"
    for _ in range(5):
        assert http("POST", url, {}, basic("bob", "Wrong-Pass-9"))[0] == 401
    code, answer, headers = http("POST", url, {}, basic("BOB", "Bob-Pass-123"))  # even the right password
    assert code == 429 and "too many failed directory logins" in answer["error"]
    assert 0 < int(headers["Retry-After"]) <= 300
    # a Basic header that is not base64 text is a failed login, not an error of the agent
    code, _, _ = http("POST", url, {}, {"Authorization": "Basic \u00e9t\u00e9"})
    assert code == 401


def test_with_basic_on_api_a_person_uses_the_api_with_their_directory_password(agent: AgentHandle) -> None:
    """curl -u alice: her grant (her group's models), her records; wrong passwords and outsiders refused."""
    code, tags, _ = http("GET", agent.url + "/api/tags", headers=basic("alice"))
    assert code == 200 and [m["name"] for m in tags["models"]] == ["tinyllama:latest"]
    chat = {"model": "tinyllama", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    assert http("POST", agent.url + "/api/chat", chat, basic("alice"))[0] == 200
    code, answer, _ = http("POST", agent.url + "/api/pull", {"model": "x"}, basic("alice"))
    assert code == 403 and "needs admin" in answer["error"]  # her role is user
    assert http("GET", agent.url + "/api/tags", headers=basic("alice", "Wrong-Pass-1"))[0] == 401
    assert http("GET", agent.url + "/api/tags", headers=basic("carol", "Wrong-Pass-1"))[0] == 401
    code, _, _ = http("GET", agent.url + "/api/tags", headers=basic("carol"))
    assert code == 200  # an admin of the directory is an operator on the API, like her personal keys

    def chats_by_alice() -> int:
        code, report, _ = http(
            "GET", agent.url + "/agent/usage?since=1h&by=user", headers=bearer(agent.key("operator"))
        )
        assert code == 200, report
        rows = {row["group"]: row["requests"] for row in report["rows"]}
        return rows.get("alice@corp.example.com", 0)

    wait_until(lambda: chats_by_alice() >= 2, 10, "her API request recorded for her")


def test_a_group_budget_holds_for_a_person_whichever_way_they_come_in(
    dc: SambaDC, make_agent: Any, tmp_path: Path
) -> None:
    """budgets.groups: alice is in `engineering` (directly) and `llmfleet-users` (nested); only engineering
    has a budget. Her personal key, her password on the API and a frontend naming her by e-mail draw on
    the one budget; dave (not in engineering) has none."""
    ldap = {**ldap_settings(dc, tmp_path), "basic_on_api": True}
    budgets = {"groups": {"engineering": {"day": 6}}, "refresh_interval": 0.2}
    agent = make_agent({"auth": {"ldap": ldap}, "budgets": budgets}, name="budgets")
    made = agent.cli("keys", "create", "--name", "webui", "--role", "user", "--frontend", "--json")
    assert made.returncode == 0, made.stderr
    frontend = json.loads(made.stdout)["key"]
    agent.start().wait_ready(30)
    alices, daves = mint(agent, "alice")["key"], mint(agent, "dave")["key"]
    chat = {"model": "tinyllama", "messages": [{"role": "user", "content": "hi"}], "stream": False}

    def ask(headers: dict[str, str]) -> tuple[int, Any]:
        code, body, _ = http("POST", agent.url + "/api/chat", chat, headers, timeout=30)
        return code, body

    used = 0
    while (answer := ask(bearer(alices)))[0] == 200:
        used += answer[1]["prompt_eval_count"] + answer[1]["eval_count"]
    code, body = answer
    assert code == 429 and "daily budget of 6 tokens (group engineering) is spent" in body["error"], body
    assert used >= 6
    for headers in (basic("alice"), {**bearer(frontend), "X-OpenWebUI-User-Email": "alice@corp.example.com"}):
        code, body = ask(headers)
        assert code == 429 and "alice@corp.example.com: the daily budget" in body["error"], body
    assert ask(bearer(daves))[0] == 200
    code, me, _ = http("GET", agent.url + "/agent/keys/me", headers=bearer(alices))
    assert code == 200 and me["user"] == "alice@corp.example.com" and me["key"]["owner"] == me["user"]
    assert me["budget"]["source"] == "group engineering"
    assert me["budget"]["day"]["limit"] == 6 and me["budget"]["day"]["left"] == 0
    code, me, _ = http("GET", agent.url + "/agent/keys/me", headers=basic("alice"))
    assert code == 200 and me["key"] is None and me["budget"]["day"]["used"] == used
    # the directory away: a person whose groups this agent never read gets the smallest group budget,
    # not none
    dc.stop()
    try:
        erin = {**bearer(frontend), "X-OpenWebUI-User-Email": "erin@corp.example.com"}
        for _ in range(20):
            code, body = ask(erin)
            if code != 200:
                break
        assert code == 429 and "daily budget of 6 tokens (the smallest group budget" in body["error"], body
    finally:
        dc.start()


def test_ldap_check_reaches_the_directory_as_the_agent_will(
    dc: SambaDC, make_agent: Any, tmp_path: Path
) -> None:
    """`llmfleet-agent ldap check`: TLS verified against the domain's name, the service account's bind,
    every mapped group found; each failure named."""
    ldap = ldap_settings(dc, tmp_path)
    agent = make_agent({"auth": {"ldap": ldap}}, name="check")
    done = agent.cli("ldap", "check", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["server"] == "127.0.0.1:636" and report["problems"] == []
    assert report["groups"]["llmfleet-users"] == f"CN=llmfleet-users,CN=Users,{dc.base_dn}"

    def fails(**change: Any) -> str:
        broken = make_agent(
            {"auth": {"ldap": {**ldap, **change}}}, name=f"check-{len(change)}-{sorted(change)[0]}"
        )
        done = broken.cli("ldap", "check")
        assert done.returncode == 1, done.stdout
        return done.stderr

    # the certificate names the domain, not the address: without server_name it does not verify
    assert "doesn't match any name" in fails(server_name=None)
    wrong = tmp_path / "wrong-password"
    wrong.write_text("Wrong-Pass-123\n")
    assert "the directory refused the service account" in fails(bind_password_file=str(wrong))
    assert "no group llmfleet-nobody" in fails(groups={"llmfleet-nobody": {"role": "user"}})
