"""System tests of `llmfleet-ollama-sim`: the real executable as a child process, driven with the
official `ollama` and `openai` clients and plain HTTP."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from http.client import HTTPConnection, HTTPException, HTTPResponse
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import ollama
import openai
import pytest
from support import Proc, free_port, http, wait_until

SIM = Path(sys.executable).parent / "llmfleet-ollama-sim"
READY_TIMEOUT = 15.0
MODEL = "tinyllama"
PROMPT = "the quick brown fox jumps over the lazy dog"


@dataclass
class Sim:
    proc: Proc
    url: str
    models: Path


def is_ready(url: str) -> bool:
    status, body, _ = http("GET", f"{url}/api/version", timeout=2)
    return status == 200 and "version" in body


def launch(
    stack: ExitStack,
    models: Path,
    log: Path,
    *args: str,
    env: dict[str, str] | None = None,
    scheme: str = "",
    wait: bool = True,
) -> Sim:
    """Start the simulator; wait until it answers unless `wait` is False. Stopped when `stack` closes.

    `scheme` ("http://") is put before OLLAMA_HOST's host:port, which Ollama accepts too."""
    port = free_port()
    full_env = {"OLLAMA_HOST": f"{scheme}127.0.0.1:{port}", "OLLAMA_MODELS": str(models), **(env or {})}
    proc = Proc([str(SIM), "serve", *args], log, full_env)
    stack.callback(proc.stop)
    sim = Sim(proc, f"http://127.0.0.1:{port}", models)
    if wait:
        wait_until(lambda: is_ready(sim.url), READY_TIMEOUT, f"the simulator on {sim.url}")
    return sim


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    """One simulator for the tests that do not care about its state, with tinyllama pulled."""
    root = tmp_path_factory.mktemp("sim")
    with ExitStack() as stack:
        server = launch(stack, root / "models", root / "sim.log")
        status, body, _ = http("POST", f"{server.url}/api/pull", {"model": MODEL, "stream": False})
        assert (status, body) == (200, {"status": "success"})
        yield server


@pytest.fixture(scope="module")
def slow_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    """A simulator with a token delay of 50 ms."""
    root = tmp_path_factory.mktemp("slow")
    with ExitStack() as stack:
        server = launch(
            stack, root / "models", root / "sim.log", "--token-delay", "0.05", "--pull-delay", "0"
        )
        http("POST", f"{server.url}/api/pull", {"model": MODEL, "stream": False})
        yield server


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as s:
        yield s


@pytest.fixture
def client(sim: Sim) -> ollama.Client:
    return ollama.Client(host=sim.url)


@pytest.fixture
def oai(sim: Sim) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{sim.url}/v1", api_key="unused", max_retries=0)


def raw_request(method: str, url: str, data: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def open_stream(url: str, path: str, body: dict[str, Any]) -> tuple[HTTPConnection, HTTPResponse]:
    """POST `body` and return the connection and the response, to be read line by line."""
    parts = urlsplit(url)
    conn = HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    return conn, conn.getresponse()


def read_lines(resp: HTTPResponse) -> tuple[list[bytes], bool]:
    """Every line until the stream ends; True as the second value if it ended cleanly."""
    lines: list[bytes] = []
    try:
        while line := resp.readline():
            lines.append(line)
    except (HTTPException, OSError):
        return lines, False
    return lines, True


def rfc3339(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# --- basics --------------------------------------------------------------------------------------


def test_root_and_version(sim: Sim) -> None:
    assert raw_request("GET", f"{sim.url}/") == (200, b"Ollama is running")
    assert raw_request("HEAD", f"{sim.url}/")[0] == 200
    status, body, _ = http("GET", f"{sim.url}/api/version")
    assert status == 200
    assert body["version"].endswith("-llmfleet-sim")
    log = sim.proc.output()
    assert "Listening on 127.0.0.1:" in log
    assert 'GET     "/api/version"' in log


def test_unknown_model_is_404_json(sim: Sim) -> None:
    want = {"error": 'model "nope" not found, try pulling it first'}
    for path, body in [
        ("/api/generate", {"model": "nope", "prompt": "hi"}),
        ("/api/chat", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
        ("/api/embed", {"model": "nope", "input": "hi"}),
        ("/api/show", {"model": "nope"}),
    ]:
        assert http("POST", f"{sim.url}{path}", body)[:2] == (404, want), path
    status, body, _ = http("POST", f"{sim.url}/v1/chat/completions", {"model": "nope", "messages": []})
    assert status == 404
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_bad_requests_are_400(sim: Sim) -> None:
    status, body = raw_request("POST", f"{sim.url}/api/generate", b"{not json")
    assert status == 400
    assert "error" in json.loads(body)
    assert http("POST", f"{sim.url}/api/chat", {"messages": []})[:2] == (400, {"error": "model is required"})
    assert http("POST", f"{sim.url}/api/pull", {"model": "bad name!"})[0] == 400
    status, body = raw_request("POST", f"{sim.url}/v1/chat/completions", b"[")
    assert status == 400
    assert json.loads(body)["error"]["type"] == "invalid_request_error"


# --- model management with the ollama client -------------------------------------------------------


def test_pull_reports_progress_and_lists_the_model(client: ollama.Client) -> None:
    events = list(client.pull("pullme:1b", stream=True))
    statuses = [e.status for e in events]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    layer = [e for e in events if e.digest and e.total and e.total > 1_000_000]
    assert len(layer) >= 3
    assert [e.completed for e in layer] == sorted(e.completed for e in layer)
    assert layer[-1].completed == layer[-1].total
    assert all(e.status == f"pulling {e.digest[7:19]}" for e in layer)
    listed = {m.model: m for m in client.list().models}
    assert "pullme:1b" in listed
    entry = listed["pullme:1b"]
    assert entry.digest == hashlib.sha256(b"pullme:1b").hexdigest()
    assert entry.details.format == "gguf"
    assert entry.details.quantization_level == "Q4_0"


def test_pull_of_a_missing_model_fails(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError, match="file does not exist"):
        list(client.pull("nonexistent-model", stream=True))
    with pytest.raises(ollama.ResponseError, match="file does not exist"):
        client.pull("nonexistent-model")
    assert "nonexistent-model:latest" not in {m.model for m in client.list().models}


def test_names_default_to_latest(sim: Sim, client: ollama.Client) -> None:
    assert client.show("tinyllama").details.family == "llama"
    assert client.show("tinyllama:latest").details.family == "llama"
    assert client.generate("tinyllama:latest", "a b", stream=False).response == "a b"


def test_show(client: ollama.Client) -> None:
    shown = client.show(MODEL)
    assert shown.details.parameter_size == "1B"
    assert shown.modelinfo["general.architecture"] == "llama"
    assert "FROM" in shown.modelfile
    with pytest.raises(ollama.ResponseError) as err:
        client.show("nope")
    assert err.value.status_code == 404


def test_copy_and_delete(client: ollama.Client) -> None:
    assert client.copy(MODEL, "mycopy").status == "success"
    assert "mycopy:latest" in {m.model for m in client.list().models}
    assert client.generate("mycopy", "copied fine", stream=False).response == "copied fine"
    with pytest.raises(ollama.ResponseError) as err:
        client.copy("nope", "other")
    assert err.value.status_code == 404
    assert client.delete("mycopy").status == "success"
    assert "mycopy:latest" not in {m.model for m in client.list().models}
    with pytest.raises(ollama.ResponseError) as err:
        client.delete("mycopy")
    assert err.value.status_code == 404


def test_create_from_a_model(sim: Sim, client: ollama.Client) -> None:
    events = list(client.create("terse", from_=MODEL, system="You are terse.", stream=True))
    assert events[-1].status == "success"
    assert any(e.status == "writing manifest" for e in events)
    assert "terse:latest" in {m.model for m in client.list().models}
    shown = client.show("terse")
    assert "You are terse." in shown.modelfile
    assert shown.details.parent_model == "tinyllama:latest"
    assert client.generate("terse", "still echoes", stream=False).response == "still echoes"
    with pytest.raises(ollama.ResponseError) as err:
        client.create("broken", from_="nope")
    assert err.value.status_code == 404
    status, _, _ = http("POST", f"{sim.url}/api/create", {"model": "nothing"})
    assert status == 400


def test_create_from_a_modelfile(sim: Sim) -> None:
    modelfile = f'FROM {MODEL}\nSYSTEM """Be brief."""\nPARAMETER temperature 0.2\n'
    body = {"model": "fromfile", "modelfile": modelfile, "stream": False}
    assert http("POST", f"{sim.url}/api/create", body)[:2] == (200, {"status": "success"})
    status, shown, _ = http("POST", f"{sim.url}/api/show", {"model": "fromfile"})
    assert status == 200
    assert "temperature" in shown["parameters"]
    assert shown["system"] == "Be brief."


def test_push(client: ollama.Client) -> None:
    events = list(client.push(MODEL, stream=True))
    assert events[0].status == "retrieving manifest"
    assert events[-1].status == "success"
    with pytest.raises(ollama.ResponseError) as err:
        client.push("nope")
    assert err.value.status_code == 404


def test_blobs(sim: Sim, client: ollama.Client, tmp_path: Path) -> None:
    data = b"GGUF pretend weights"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    url = f"{sim.url}/api/blobs/{digest}"
    assert raw_request("HEAD", url)[0] == 404
    assert raw_request("POST", f"{sim.url}/api/blobs/sha256:{'0' * 64}", data)[0] == 400
    assert raw_request("HEAD", f"{sim.url}/api/blobs/sha256:{'0' * 64}")[0] == 404
    assert raw_request("POST", url, data)[0] == 201
    assert raw_request("HEAD", url)[0] == 200
    assert (sim.models / "llmfleet-sim" / "blobs" / f"sha256-{digest[7:]}").read_bytes() == data
    path = tmp_path / "other.gguf"
    path.write_bytes(b"other weights")
    other = client.create_blob(path)
    assert raw_request("HEAD", f"{sim.url}/api/blobs/{other}")[0] == 200
    assert client.create("fromblob", files={"model.gguf": other}).status == "success"
    assert "fromblob:latest" in {m.model for m in client.list().models}


# --- inference with the ollama client --------------------------------------------------------------


def test_generate_streamed_equals_not_streamed(client: ollama.Client) -> None:
    chunks = list(client.generate(MODEL, PROMPT, system="be kind", stream=True))
    pieces = [c.response for c in chunks if not c.done]
    final = chunks[-1]
    whole = client.generate(MODEL, PROMPT, system="be kind", stream=False)
    assert "".join(pieces) == whole.response == PROMPT
    assert pieces[1].startswith(" ")
    assert final.done and final.done_reason == "stop"
    assert final.eval_count == len(pieces) == whole.eval_count == 9
    assert final.prompt_eval_count == whole.prompt_eval_count == 9 + 2
    for value in (final.total_duration, final.load_duration, final.prompt_eval_duration, final.eval_duration):
        assert value and value > 0
    assert final.total_duration >= final.eval_duration
    assert final.context and len(final.context) == 9 + 9


def test_generate_num_predict_caps_the_answer(client: ollama.Client) -> None:
    capped = client.generate(MODEL, PROMPT, options={"num_predict": 3}, stream=False)
    assert capped.response == "the quick brown"
    assert (capped.eval_count, capped.done_reason) == (3, "length")
    assert (
        client.generate(MODEL, "two words", options={"num_predict": 10}, stream=False).done_reason == "stop"
    )


def test_chat_streamed_equals_not_streamed(client: ollama.Client) -> None:
    messages = [
        {"role": "system", "content": "You answer briefly"},
        {"role": "user", "content": "first question here"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "what is a llama"},
    ]
    chunks = list(client.chat(MODEL, messages=messages, stream=True))
    pieces = [c.message.content for c in chunks if not c.done]
    whole = client.chat(MODEL, messages=messages, stream=False)
    assert "".join(pieces) == whole.message.content == "what is a llama"
    assert whole.message.role == "assistant"
    assert chunks[-1].eval_count == len(pieces) == 4
    assert whole.prompt_eval_count == 3 + 3 + 2 + 4
    assert chunks[-1].done_reason == "stop"


def test_load_unload_and_ps(client: ollama.Client) -> None:
    client.pull("psmodel")
    loaded = client.generate("psmodel", "", keep_alive="30s")
    assert (loaded.done, loaded.done_reason) == (True, "load")
    entry = {m.model: m for m in client.ps().models}["psmodel:latest"]
    left = (entry.expires_at - datetime.now(timezone.utc)).total_seconds()
    assert 20 < left <= 31
    assert entry.size_vram and entry.size_vram > 0
    client.chat("psmodel", messages=[{"role": "user", "content": "hi"}], keep_alive=-1)
    forever = {m.model: m for m in client.ps().models}["psmodel:latest"]
    assert forever.expires_at.year > 2200
    unloaded = client.generate("psmodel", "", keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert "psmodel:latest" not in {m.model for m in client.ps().models}
    client.generate("psmodel", "used once more", keep_alive=0)
    assert "psmodel:latest" not in {m.model for m in client.ps().models}
    client.generate(MODEL, "default keep alive")
    entry = {m.model: m for m in client.ps().models}[f"{MODEL}:latest"]
    assert 280 < (entry.expires_at - datetime.now(timezone.utc)).total_seconds() <= 301


def test_embed(client: ollama.Client, sim: Sim) -> None:
    one = client.embed(MODEL, "hello world")
    many = client.embed(MODEL, ["hello world", "something else entirely"])
    assert len(one.embeddings) == 1 and len(many.embeddings) == 2
    vector = one.embeddings[0]
    assert len(vector) == 32
    assert math.isclose(math.fsum(v * v for v in vector), 1.0, rel_tol=1e-9)
    assert many.embeddings[0] == vector
    assert many.embeddings[1] != vector
    assert many.prompt_eval_count == 2 + 3
    legacy = client.embeddings(MODEL, "hello world")
    assert list(legacy.embedding) == vector


async def test_parallel_requests(sim: Sim) -> None:
    client = ollama.AsyncClient(host=sim.url)
    prompts = [f"request number {i} of many" for i in range(30)]
    answers = await asyncio.gather(*(client.generate(MODEL, p, stream=False) for p in prompts))
    assert [a.response for a in answers] == prompts


# --- the OpenAI-compatible endpoints with the openai client -------------------------------------------


def test_openai_chat(oai: openai.OpenAI) -> None:
    messages: list[Any] = [
        {"role": "system", "content": "be short"},
        {"role": "user", "content": "tell me a story"},
    ]
    whole = oai.chat.completions.create(model=MODEL, messages=messages)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.content == "tell me a story"
    assert whole.choices[0].finish_reason == "stop"
    assert whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (6, 4, 10)
    chunks = list(
        oai.chat.completions.create(
            model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True}
        )
    )
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(pieces)
    capped = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert (capped.choices[0].message.content, capped.choices[0].finish_reason) == ("tell me", "length")


def test_openai_chat_stream_without_usage(sim: Sim) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a b c"}], "stream": True}
    conn, resp = open_stream(sim.url, "/v1/chat/completions", body)
    assert resp.getheader("Content-Type").startswith("text/event-stream")
    lines, clean = read_lines(resp)
    conn.close()
    events = [line for line in lines if line.strip()]
    assert clean
    assert all(e.startswith(b"data: ") for e in events)
    assert events[-1] == b"data: [DONE]\n"
    assert len(events) == 3 + 1 + 1  # three tokens, the finish chunk, [DONE]
    assert b"usage" not in b"".join(events)


def test_openai_completions(oai: openai.OpenAI) -> None:
    whole = oai.completions.create(model=MODEL, prompt="once upon a time")
    assert whole.object == "text_completion"
    assert whole.choices[0].text == "once upon a time"
    assert whole.usage is not None and whole.usage.completion_tokens == 4
    chunks = list(oai.completions.create(model=MODEL, prompt="once upon a time", stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "once upon a time"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_openai_embeddings(oai: openai.OpenAI, client: ollama.Client, sim: Sim) -> None:
    result = oai.embeddings.create(model=MODEL, input=["hello world", "more text here"])
    assert [d.index for d in result.data] == [0, 1]
    assert len(result.data[0].embedding) == 32
    native = client.embed(MODEL, "hello world").embeddings[0]
    # the client may ask for base64 (float32) and decode it: equal to float32 precision
    assert all(
        math.isclose(a, b, abs_tol=1e-6) for a, b in zip(result.data[0].embedding, native, strict=True)
    )
    assert result.usage.prompt_tokens == 5
    status, body, _ = http(
        "POST",
        f"{sim.url}/v1/embeddings",
        {"model": MODEL, "input": "hello world", "encoding_format": "base64"},
    )
    assert status == 200
    decoded = struct.unpack("<32f", base64.b64decode(body["data"][0]["embedding"]))
    assert all(
        math.isclose(a, b, abs_tol=1e-6) for a, b in zip(decoded, result.data[0].embedding, strict=True)
    )


def test_openai_models(oai: openai.OpenAI) -> None:
    ids = [m.id for m in oai.models.list()]
    assert "tinyllama:latest" in ids
    model = oai.models.retrieve("tinyllama:latest")
    assert (model.id, model.object, model.owned_by) == ("tinyllama:latest", "model", "library")
    with pytest.raises(openai.NotFoundError) as err:
        oai.models.retrieve("nope:latest")
    assert err.value.status_code == 404
    assert "not found" in str(err.value)


# --- streaming behaviour -------------------------------------------------------------------------


def test_token_delay_is_visible(slow_sim: Sim) -> None:
    client = ollama.Client(host=slow_sim.url)
    prompt, delay = "one two three four five six", 0.05
    started = time.monotonic()
    arrivals = []
    for chunk in client.generate(MODEL, prompt, stream=True):
        arrivals.append(time.monotonic())
        assert chunk.done or chunk.response
    assert time.monotonic() - started >= 6 * delay
    assert arrivals[5] - arrivals[0] >= 5 * delay * 0.9  # the pieces really arrive one by one
    started = time.monotonic()
    assert client.generate(MODEL, prompt, stream=False).eval_count == 6
    assert time.monotonic() - started >= 6 * delay


def test_client_disconnect_stops_generation(slow_sim: Sim) -> None:
    words = " ".join(f"w{i}" for i in range(100))  # 100 tokens x 50 ms: 5 s if nobody stopped it
    conn, resp = open_stream(slow_sim.url, "/api/generate", {"model": MODEL, "prompt": words})
    assert resp.getheader("Content-Type") == "application/x-ndjson"
    first = [json.loads(resp.readline()) for _ in range(2)]
    assert [c["response"] for c in first] == ["w0", " w1"]
    resp.close()
    conn.close()
    wait_until(
        lambda: "client disconnected, generation cancelled" in slow_sim.proc.output(),
        2.5,
        "the simulator to notice the disconnect",
    )


# --- lifecycle and faults --------------------------------------------------------------------------


def test_state_persists_across_a_restart(stack: ExitStack, tmp_path: Path) -> None:
    models = tmp_path / "models"
    first = launch(stack, models, tmp_path / "first.log", "--pull-delay", "0")
    client = ollama.Client(host=first.url)
    client.pull("keepme")
    client.copy("keepme", "keepme:copy")
    first.proc.signal(signal.SIGTERM)
    assert first.proc.wait(timeout=10) == 0
    second = launch(stack, models, tmp_path / "second.log", scheme="http://")
    names = {m.model for m in ollama.Client(host=second.url).list().models}
    assert {"keepme:latest", "keepme:copy"} <= names
    state_dir = models / "llmfleet-sim"
    assert json.loads((state_dir / "models.json").read_text())["models"]
    assert not [p for p in state_dir.iterdir() if p.name.endswith(".tmp")]
    second.proc.signal(signal.SIGINT)
    assert second.proc.wait(timeout=10) == 0


def test_sigterm_during_a_stream_exits_0_promptly(stack: ExitStack, tmp_path: Path) -> None:
    sim = launch(stack, tmp_path, tmp_path / "sim.log", "--token-delay", "0.2", "--pull-delay", "0")
    ollama.Client(host=sim.url).pull(MODEL)
    conn, resp = open_stream(
        sim.url, "/api/generate", {"model": MODEL, "prompt": "w " * 50}
    )  # 10 s of tokens
    assert json.loads(resp.readline())["response"] == "w"
    started = time.monotonic()
    sim.proc.signal(signal.SIGTERM)
    assert sim.proc.wait(timeout=10) == 0
    assert time.monotonic() - started < 3
    conn.close()


def test_exit_at_once(stack: ExitStack, tmp_path: Path) -> None:
    sim = launch(stack, tmp_path, tmp_path / "sim.log", env={"LLMFLEET_SIM_EXIT_AT_ONCE": "1"}, wait=False)
    assert sim.proc.wait(timeout=15) == 1
    assert "simulated crash" in sim.proc.output()


def test_exit_after_tokens_kills_mid_stream(stack: ExitStack, tmp_path: Path) -> None:
    env = {"LLMFLEET_SIM_EXIT_AFTER_TOKENS": "3", "LLMFLEET_SIM_PULL_DELAY": "0"}
    sim = launch(stack, tmp_path, tmp_path / "sim.log", env=env)
    client = ollama.Client(host=sim.url)
    client.pull(MODEL)
    assert client.generate(MODEL, "short one", stream=False).eval_count == 2  # under the limit: fine
    conn, resp = open_stream(sim.url, "/api/generate", {"model": MODEL, "prompt": PROMPT})
    lines, _ = read_lines(resp)
    conn.close()
    chunks = [json.loads(line) for line in lines]
    # the stream broke off after the third token: no more pieces and no final chunk
    assert [c["response"] for c in chunks] == ["the", " quick", " brown"]
    assert not any(c["done"] for c in chunks)
    assert sim.proc.wait(timeout=10) == 1
    assert "exit after 3 tokens" in sim.proc.output()


def test_start_delay_delays_readiness(stack: ExitStack, tmp_path: Path) -> None:
    delay = 1.0
    started = time.monotonic()
    sim = launch(stack, tmp_path, tmp_path / "sim.log", "--start-delay", str(delay), wait=False)
    wait_until(lambda: "slow start" in sim.proc.output(), READY_TIMEOUT, "the slow-start log line")
    with pytest.raises(OSError):
        http("GET", f"{sim.url}/api/version", timeout=1)
    wait_until(lambda: is_ready(sim.url), READY_TIMEOUT + delay, "the slow simulator")
    assert time.monotonic() - started >= delay


def test_refuse_start_stays_alive_without_listening(stack: ExitStack, tmp_path: Path) -> None:
    env = {"LLMFLEET_SIM_REFUSE_START": "1"}
    sim = launch(stack, tmp_path, tmp_path / "sim.log", env=env, wait=False)
    wait_until(lambda: "refusing to start" in sim.proc.output(), READY_TIMEOUT, "the refuse-start log line")
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:  # for a while: never listening, always alive
        with pytest.raises(OSError):
            http("GET", f"{sim.url}/api/version", timeout=1)
        assert sim.proc.alive()
        time.sleep(0.05)
    sim.proc.signal(signal.SIGTERM)
    assert sim.proc.wait(timeout=10) == 0


BAD_SETTINGS: list[tuple[dict[str, str], list[str], str]] = [
    ({"LLMFLEET_SIM_TOKEN_DELAY": "fast"}, [], "LLMFLEET_SIM_TOKEN_DELAY"),
    ({"LLMFLEET_SIM_EXIT_AFTER_TOKENS": "0"}, [], "LLMFLEET_SIM_EXIT_AFTER_TOKENS"),
    ({"LLMFLEET_SIM_REFUSE_START": "perhaps"}, [], "LLMFLEET_SIM_REFUSE_START"),
    ({"OLLAMA_HOST": "127.0.0.1:99999"}, [], "OLLAMA_HOST"),
    ({"OLLAMA_KEEP_ALIVE": "for ever"}, [], "OLLAMA_KEEP_ALIVE"),
    ({}, ["--token-delay", "-1"], "--token-delay"),
]


@pytest.mark.parametrize(("env", "args", "named"), BAD_SETTINGS, ids=[b[2] for b in BAD_SETTINGS])
def test_bad_setting_exits_2_naming_it(
    tmp_path: Path, env: dict[str, str], args: list[str], named: str
) -> None:
    full_env = {
        **os.environ,
        "OLLAMA_HOST": f"127.0.0.1:{free_port()}",
        "OLLAMA_MODELS": str(tmp_path),
        **env,
    }
    done = subprocess.run(
        [str(SIM), "serve", *args], env=full_env, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 2
    assert named in done.stderr
