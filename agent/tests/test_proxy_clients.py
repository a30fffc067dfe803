"""The official `ollama` and `openai` clients through the agent give what they get from Ollama directly."""

from __future__ import annotations

from collections.abc import Iterator

import ollama
import openai
import pytest
from conftest import AgentHandle

MESSAGES = [{"role": "user", "content": "why is the sky blue on a clear day"}]
PROMPT = "tell me about the proxy in front of ollama"


@pytest.fixture(scope="module")
def clients(ready_agent: AgentHandle) -> Iterator[dict[str, ollama.Client]]:
    key = ready_agent.key("admin")
    yield {
        "agent": ollama.Client(host=ready_agent.url, headers={"Authorization": f"Bearer {key}"}),
        "direct": ollama.Client(host=f"http://127.0.0.1:{ready_agent.config['ollama']['port']}"),
    }


@pytest.fixture(scope="module")
def oai(ready_agent: AgentHandle) -> dict[str, openai.OpenAI]:
    return {
        "agent": openai.OpenAI(base_url=f"{ready_agent.url}/v1", api_key=ready_agent.key("user")),
        "direct": openai.OpenAI(
            base_url=f"http://127.0.0.1:{ready_agent.config['ollama']['port']}/v1", api_key="unused"
        ),
    }


def both(fn, clients):  # type: ignore[no-untyped-def]
    return fn(clients["agent"]), fn(clients["direct"])


def test_chat_not_streamed(clients) -> None:  # type: ignore[no-untyped-def]
    via, direct = both(lambda c: c.chat(model="tinyllama", messages=MESSAGES), clients)
    assert via.message.content == direct.message.content != ""
    assert (via.prompt_eval_count, via.eval_count) == (direct.prompt_eval_count, direct.eval_count)
    assert via.done_reason == direct.done_reason == "stop"


def test_chat_streamed(clients) -> None:  # type: ignore[no-untyped-def]
    via, direct = both(lambda c: list(c.chat(model="tinyllama", messages=MESSAGES, stream=True)), clients)
    assert [p.message.content for p in via] == [p.message.content for p in direct]
    assert via[-1].done and via[-1].eval_count == direct[-1].eval_count == len(via) - 1


def test_generate_streamed_and_not(clients) -> None:  # type: ignore[no-untyped-def]
    via, direct = both(lambda c: c.generate(model="tinyllama", prompt=PROMPT), clients)
    assert via.response == direct.response != ""
    streamed = list(clients["agent"].generate(model="tinyllama", prompt=PROMPT, stream=True))
    assert "".join(p.response for p in streamed) == direct.response
    assert streamed[-1].eval_count == direct.eval_count


def test_embed_and_legacy_embeddings(clients) -> None:  # type: ignore[no-untyped-def]
    via, direct = both(lambda c: c.embed(model="tinyllama", input=["one", "two words"]), clients)
    assert via.embeddings == direct.embeddings and len(via.embeddings) == 2
    via_old, direct_old = both(lambda c: c.embeddings(model="tinyllama", prompt="one"), clients)
    assert via_old.embedding == direct_old.embedding


def test_list_ps_show_version(clients, ready_agent: AgentHandle) -> None:  # type: ignore[no-untyped-def]
    via, direct = both(lambda c: c.list(), clients)
    assert [m.model for m in via.models] == [m.model for m in direct.models]
    assert "tinyllama:latest" in [m.model for m in via.models]
    via_ps, direct_ps = both(lambda c: c.ps(), clients)
    assert [m.model for m in via_ps.models] == [m.model for m in direct_ps.models]
    via_show, direct_show = both(lambda c: c.show("tinyllama"), clients)
    assert via_show.modelfile == direct_show.modelfile and via_show.details == direct_show.details
    code, body, _ = ready_agent.get("/api/version", ready_agent.key("user"))
    assert code == 200 and body["version"]


def test_pull_with_progress_copy_create_delete(clients) -> None:  # type: ignore[no-untyped-def]
    agent = clients["agent"]
    progress = list(agent.pull("smollm:135m", stream=True))
    assert progress[-1].status == "success"
    assert any(p.completed for p in progress if p.total)
    agent.copy("smollm:135m", "smollm-copy:latest")
    agent.create(model="smollm-custom", from_="smollm:135m")
    names = {m.model for m in clients["direct"].list().models}
    assert {"smollm:135m", "smollm-copy:latest", "smollm-custom:latest"} <= names
    for name in ("smollm-copy", "smollm-custom", "smollm:135m"):
        agent.delete(name)
    assert not {"smollm:135m", "smollm-copy:latest"} & {m.model for m in clients["direct"].list().models}
    with pytest.raises(ollama.ResponseError) as err:
        agent.delete("never-pulled")
    assert err.value.status_code == 404


def test_openai_chat_not_streamed(oai) -> None:  # type: ignore[no-untyped-def]
    via, direct = both(lambda c: c.chat.completions.create(model="tinyllama", messages=MESSAGES), oai)
    assert via.choices[0].message.content == direct.choices[0].message.content
    assert via.usage == direct.usage


def test_openai_chat_streamed_without_and_with_usage(oai) -> None:  # type: ignore[no-untyped-def]
    def run(c, **kw):  # type: ignore[no-untyped-def]
        return list(c.chat.completions.create(model="tinyllama", messages=MESSAGES, stream=True, **kw))

    via, direct = both(run, oai)
    # the agent asks Ollama for usage but the client did not: the client sees exactly what Ollama sends
    assert [c.choices[0].delta.content for c in via] == [c.choices[0].delta.content for c in direct]
    assert all(c.choices for c in via)
    via_u, direct_u = both(lambda c: run(c, stream_options={"include_usage": True}), oai)
    assert via_u[-1].usage == direct_u[-1].usage and via_u[-1].usage.completion_tokens > 0


def test_openai_completions_embeddings_models(oai) -> None:  # type: ignore[no-untyped-def]
    via, direct = both(lambda c: c.completions.create(model="tinyllama", prompt=PROMPT), oai)
    assert via.choices[0].text == direct.choices[0].text
    via_e, direct_e = both(lambda c: c.embeddings.create(model="tinyllama", input="a b c"), oai)
    assert via_e.data[0].embedding == direct_e.data[0].embedding
    via_m, direct_m = both(lambda c: [m.id for m in c.models.list()], oai)
    assert via_m == direct_m and "tinyllama:latest" in via_m
    assert oai["agent"].models.retrieve("tinyllama:latest").id == "tinyllama:latest"
