"""`edgekv serve`, a real uvicorn server in its own process, talked to by the official `openai` client and by
raw HTTP (httpx): replies, KV reuse across requests, bad input, API keys, disconnects, a full queue, SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from conftest import EDGEKV, error_line, run_edgekv

START_TIMEOUT_S = 180


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path

    def client(self, api_key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=300)

    def metric(self, name: str) -> float:
        """The sum of a Prometheus metric's samples (over its labels) from GET /metrics."""
        text = httpx.get(f"{self.url}/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and not line.startswith("#"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serving(artifact: Path, tmp_path: Path, *args: str, env: dict[str, str] | None = None, headers: dict | None = None):
    port = free_port()
    log = tmp_path / f"serve-{port}.log"
    with log.open("w") as out:
        process = subprocess.Popen([EDGEKV, "serve", str(artifact), "--port", str(port), *args], stdout=out,
                                   stderr=subprocess.STDOUT, env=os.environ | (env or {}))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise AssertionError(f"edgekv serve exited with {process.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/health", headers=headers).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield Server(process, url, log)
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(60)


@pytest.fixture(scope="module")
def tiny_server(tiny_artifacts, tmp_path_factory):
    with serving(tiny_artifacts["llama"], tmp_path_factory.mktemp("serve"), "--max-tokens", "16") as server:
        yield server


def tiny_model_name(server: Server) -> str:
    return server.client().models.list().data[0].id


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_the_openai_client_gets_the_greedy_reply_of_edgekv_generate(default_artifact, tmp_path):
    question = "What is the capital of France? Answer in one sentence."
    expected = json.loads(run_edgekv("generate", str(default_artifact), "--prompt", question, "--max-new-tokens",
                                     "24", "--temperature", "0", "--json", check=True).stdout)
    with serving(default_artifact, tmp_path) as server:
        client = server.client()
        (model,) = client.models.list().data
        assert model.id == "smollm2-135m-instruct"
        reply = client.chat.completions.create(model=model.id, messages=ask(question), max_tokens=24, temperature=0)
        assert reply.choices[0].message.content == expected["text"]
        assert reply.choices[0].finish_reason == expected["finish_reason"]
        assert reply.usage.completion_tokens == len(expected["token_ids"])
        prompt_tokens = reply.usage.prompt_tokens
        assert prompt_tokens == expected["stats"]["prompt_tokens"]
        pieces, usage = [], None
        for chunk in client.chat.completions.create(model=model.id, messages=ask(question), max_tokens=24,
                                                    temperature=0, stream=True, stream_options={"include_usage": True}):
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
            usage = chunk.usage or usage
        assert "".join(pieces) == expected["text"]
        # the same request again: all of its prompt but the last token comes from the cache
        assert usage.prompt_tokens == prompt_tokens and usage.prompt_tokens_details.cached_tokens == prompt_tokens - 1


def test_a_conversation_prefills_only_its_new_turn_and_replies_as_if_fed_whole(tiny_server):
    client, name = tiny_server.client(), tiny_model_name(tiny_server)
    history = ask("the quick brown fox")
    first = client.chat.completions.create(model=name, messages=history, max_tokens=6, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens in (0, first.usage.prompt_tokens - 1)
    history += [{"role": "assistant", "content": first.choices[0].message.content}, *ask("jumps over")]
    second = client.chat.completions.create(model=name, messages=history, max_tokens=6, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens  # the whole first turn, its reply included
    other = client.chat.completions.create(model=name, messages=ask("a different story"), max_tokens=6,
                                           temperature=0)
    assert other.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens - 3  # the template's start
    # back to the first conversation, now stored beside the live one: reused again, reply unchanged
    again = client.chat.completions.create(model=name, messages=history, max_tokens=6, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens - 1
    assert again.choices[0].message.content == second.choices[0].message.content
    assert tiny_server.metric("edgekv_cache_hits_total") >= 2
    assert tiny_server.metric('edgekv_stored_conversation_bytes{tier="memory"}') > 0  # "a different story", kept


@pytest.mark.parametrize("body, reason", [
    ("{not json", "malformed JSON"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "colour": "red"}, "unknown field 'colour'"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, "max_tokens"),
    ({"model": "M", "messages": []}, "messages"),
    ({"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}, "unknown model 'gpt-5'"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, "--max-context"),
    ({"model": "M", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
])
def test_a_bad_request_gets_a_400_with_its_reason_and_the_server_carries_on(tiny_server, body, reason):
    name = tiny_model_name(tiny_server)
    content = body if isinstance(body, str) else json.dumps(body).replace('"M"', json.dumps(name))
    response = httpx.post(f"{tiny_server.url}/v1/chat/completions", content=content,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert reason in response.json()["error"]["message"]
    ok = tiny_server.client().chat.completions.create(model=name, messages=ask("hello"), max_tokens=2)
    assert ok.choices[0].message.content is not None


def test_the_api_key_is_checked_on_every_request(tiny_artifacts, tmp_path):
    key = "s3cret"
    with serving(tiny_artifacts["llama"], tmp_path, env={"EDGEKV_API_KEY": key},
                 headers={"Authorization": f"Bearer {key}"}) as server:
        for path in ("/health", "/v1/models", "/metrics"):
            assert httpx.get(f"{server.url}{path}").status_code == 401
            assert httpx.get(f"{server.url}{path}", headers={"Authorization": "Bearer wrong"}).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            server.client("wrong").models.list()
        name = server.client(key).models.list().data[0].id
        reply = server.client(key).chat.completions.create(model=name, messages=ask("hi"), max_tokens=2)
        assert reply.usage.completion_tokens >= 1


STREAMING_CLIENT = """
import json, sys, httpx
with httpx.stream("POST", sys.argv[1], json=json.loads(sys.argv[2]), timeout=60) as response:
    for line in response.iter_lines():
        print(line, flush=True)
"""


def test_a_client_killed_mid_stream_stops_its_generation_and_the_next_request_is_served(tiny_server):
    name = tiny_model_name(tiny_server)
    body = {"model": name, "messages": ask("tell me a long story"), "max_tokens": 400, "stream": True,
            "temperature": 1.0, "seed": 1}
    client = subprocess.Popen([sys.executable, "-c", STREAMING_CLIENT, f"{tiny_server.url}/v1/chat/completions",
                               json.dumps(body)], stdout=subprocess.PIPE, text=True)
    assert client.stdout.readline().startswith("data: ")  # the first chunk arrived
    client.kill()
    client.wait()
    deadline = time.monotonic() + 30
    while not (stopped := re.search(r"stopped after (\d+) tokens \(cancelled\)", tiny_server.log.read_text())):
        assert time.monotonic() < deadline, "the server never noticed the client had gone"
        time.sleep(0.2)
    assert int(stopped.group(1)) < 400  # stopped at the next token, not at the end of the reply
    assert tiny_server.metric('edgekv_requests_total{status="cancelled"}') == 1
    reply = tiny_server.client().chat.completions.create(model=name, messages=ask("tell me a long story"),
                                                         max_tokens=3, temperature=0)
    assert reply.usage.completion_tokens >= 1


def test_a_full_queue_refuses_with_503_and_retry_after(tiny_artifacts, tmp_path):
    with serving(tiny_artifacts["llama"], tmp_path, "--queue-size", "1") as server:
        name = tiny_model_name(server)
        body = {"model": name, "messages": ask("count to a thousand"), "max_tokens": 300, "temperature": 1.0}
        statuses, retry_after = [], []

        def post() -> None:
            response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300)
            statuses.append(response.status_code)
            retry_after.append(response.headers.get("retry-after"))

        threads = [threading.Thread(target=post) for _ in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert statuses.count(200) >= 1 and 503 in statuses, statuses
        assert all(r is not None for s, r in zip(statuses, retry_after) if s == 503)


def test_a_request_past_its_timeout_ends_with_504_and_the_next_is_served(tiny_artifacts, tmp_path):
    # Greedy, the tiny model writes all 4000 tokens (no end token: a sampled reply ended early, within the
    # timeout, on a fast machine): several seconds on any machine, while a 1-token reply takes well under
    # the 1 s timeout even beside other work (it took over 0.05 s with three busy processes on 2 cores).
    with serving(tiny_artifacts["llama"], tmp_path, "--timeout", "1", "--max-context", "4096") as server:
        name = tiny_model_name(server)
        body = {"model": name, "messages": ask("a long story"), "max_tokens": 4000, "temperature": 0}
        response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 504 and "timed out" in response.json()["error"]["message"]
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body | {"stream": True},
                          timeout=60) as response:
            streamed = [line for line in response.iter_lines() if line]
        assert "timed out" in streamed[-2] and streamed[-1] == "data: [DONE]"
        reply = server.client().chat.completions.create(model=name, messages=ask("hi"), max_tokens=1)
        assert reply.usage.completion_tokens == 1


def test_sigterm_during_a_stream_exits_0_and_leaves_no_files(tiny_artifacts, tmp_path):
    spill = tmp_path / "spill"
    spill.mkdir()
    with serving(tiny_artifacts["llama"], tmp_path, "--spill-dir", str(spill)) as server:
        name = tiny_model_name(server)
        assert list(spill.iterdir())  # the session directory exists while it serves
        body = {"model": name, "messages": ask("a long story"), "max_tokens": 400, "stream": True,
                "temperature": 1.0}
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            next(lines)
            server.process.send_signal(signal.SIGTERM)
            for _ in lines:  # the stream ends (finished or cancelled) rather than hanging
                pass
        assert server.process.wait(60) == 0, server.log.read_text()
    assert list(spill.iterdir()) == []


def test_a_port_in_use_is_a_one_line_error(tiny_artifacts):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run_edgekv("serve", str(tiny_artifacts["llama"]), "--port", str(taken.getsockname()[1]))
    assert "pick another with --port" in error_line(result)
