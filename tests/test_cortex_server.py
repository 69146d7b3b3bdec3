"""The OpenAI-compatible server, driven by a real HTTP client against a live server on localhost: whole and
streamed answers, several neurons at once, a client that leaves mid-answer, and every bad input."""

import http.client
import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from conch_dna.cortex import Cortex, NeuronRegistry
from conch_dna.cortex.server import make_server
from tests.conftest import random_adapter

NEURONS = ("thinking", "action", "memory")


@pytest.fixture(scope="module")
def served(tiny_pair, tmp_path_factory):
    _, student = tiny_pair
    root = tmp_path_factory.mktemp("served")
    registry = NeuronRegistry(root / "registry", base_model=student)
    for seed, name in enumerate(NEURONS):
        registry.register(name, random_adapter(student, root / name, seed=seed, rank=2 + seed))
    cortex = Cortex(registry, str(student), max_batch=8)
    server = make_server(cortex, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], cortex, str(student)
    server.shutdown()
    server.server_close()
    cortex.close()


def call(port, method, path, body=None, raw: bytes | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, payload


def chat(port, model, text, **kw):
    status, payload = call(port, "POST", "/v1/chat/completions",
                           {"model": model, "messages": [{"role": "user", "content": text}], **kw})
    return status, json.loads(payload)


def events(payload: bytes) -> list:
    lines = [x[len(b"data: "):] for x in payload.split(b"\n\n") if x.startswith(b"data: ")]
    assert lines[-1] == b"[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_models_lists_active_neurons_and_the_base(served):
    port, cortex, student = served
    status, payload = call(port, "GET", "/v1/models")
    data = json.loads(payload)["data"]
    assert status == 200 and {m["id"]: m["version"] for m in data} == {student: None, **dict.fromkeys(NEURONS, 1)}


def test_chat_whole_and_streamed_equal_cortex(served):
    port, cortex, _ = served
    expected = cortex.generate("thinking", "plan a small task", max_tokens=10)
    status, reply = chat(port, "thinking", "plan a small task", max_tokens=10)
    assert status == 200 and reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"]["content"] == expected.text
    assert reply["choices"][0]["finish_reason"] == "length" and reply["system_fingerprint"] == "thinking-v1"
    assert reply["usage"]["completion_tokens"] == 10 and reply["usage"]["prompt_tokens"] == expected.prompt_tokens
    status, payload = call(port, "POST", "/v1/chat/completions", {"model": "thinking", "max_tokens": 10, "stream": True,
                                                                 "messages": [{"role": "user", "content": "plan a small task"}]})
    chunks = events(payload)
    assert status == 200 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected.text
    assert len(chunks) > 3 and chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_text_completions_use_the_prompt_as_it_is(served):
    port, cortex, _ = served
    ids = list(cortex.tokenizer.encode("once upon a time"))
    expected = cortex.generate("memory", ids, max_tokens=8).text
    status, payload = call(port, "POST", "/v1/completions", {"model": "memory", "prompt": "once upon a time", "max_tokens": 8})
    reply = json.loads(payload)
    assert status == 200 and reply["choices"][0]["text"] == expected
    status, payload = call(port, "POST", "/v1/completions", {"model": "memory", "prompt": "once upon a time",
                                                           "max_tokens": 8, "stream": True})
    assert "".join(c["choices"][0]["text"] for c in events(payload)) == expected


def test_several_neurons_at_once(served):
    port, cortex, student = served
    jobs = [(m, q) for m in (*NEURONS, student) for q in ("why is the sky blue", "count to ten")] * 2
    got = [None] * len(jobs)

    def ask(i, model, q):
        got[i] = chat(port, model, q, max_tokens=8)

    threads = [threading.Thread(target=ask, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for (model, q), (status, reply) in zip(jobs, got):
        assert status == 200
        assert reply["choices"][0]["message"]["content"] == cortex.generate(model, q, max_tokens=8).text


def test_a_client_that_leaves_mid_stream_frees_its_slot(served):
    port, cortex, _ = served
    body = json.dumps({"model": "action", "stream": True, "max_tokens": 1500,
                       "messages": [{"role": "user", "content": "tell a long story"}]}).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    received = b""
    while received.count(b"data: ") < 3:  # decoding has begun (the headers may come in a packet of their own)
        received += sock.recv(4096)
    sock.close()
    deadline = time.monotonic() + 30
    while cortex.engine.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cortex.engine.in_flight == 0
    status, payload = call(port, "GET", "/health")
    assert status == 200 and json.loads(payload)["in_flight"] == 0


@pytest.mark.parametrize("body, status, says", [
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "known: "),
    ({"model": "../registry.json", "messages": [{"role": "user", "content": "hi"}]}, 404, "not served here"),
    ({"model": "/etc/passwd", "messages": [{"role": "user", "content": "hi"}]}, 404, "not served here"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model must name"),
    ({"model": "thinking"}, 400, "messages must be"),
    ({"model": "thinking", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ({"model": "thinking", "messages": [{"role": "user", "content": 3}]}, 400, "content must be text"),
    ({"model": "thinking", "messages": [{"role": "user", "content": "hi"}], "temperature": 9}, 400, "temperature"),
    ({"model": "thinking", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "thinking", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": "thinking", "messages": [{"role": "user", "content": "hi"}], "stop": [1]}, 400, "stop"),
    ({"model": "thinking", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream"),
    ({"model": "thinking", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2048}, 400, "context"),
])
def test_bad_requests(served, body, status, says):
    port, cortex, _ = served
    got, payload = call(port, "POST", "/v1/chat/completions", body)
    error = json.loads(payload)["error"]
    assert got == status and says in error["message"], error
    assert cortex.engine.in_flight == 0


def test_a_request_reads_the_registry_once(served, monkeypatch):
    """One stat of the registry per request: the cortex decides whether the model is served."""
    port, cortex, _ = served
    reads = []
    refresh = cortex.registry.refresh
    monkeypatch.setattr(cortex.registry, "refresh", lambda: reads.append(1) or refresh())
    status, _ = chat(port, "thinking", "hi", max_tokens=2)
    assert status == 200 and len(reads) == 1
    status, payload = chat(port, "nope", "hi")
    assert status == 404 and "thinking" in payload["error"]["message"]


def test_malformed_bodies_and_routes(served):
    port, _, _ = served
    status, payload = call(port, "POST", "/v1/chat/completions", raw=b"{not json")
    assert status == 400 and "not valid JSON" in json.loads(payload)["error"]["message"]
    status, payload = call(port, "POST", "/v1/chat/completions", raw=b"[1, 2]")
    assert status == 400 and "JSON object" in json.loads(payload)["error"]["message"]
    status, _ = call(port, "POST", "/v1/../../registry.json", {"model": "thinking"})
    assert status == 404
    status, _ = call(port, "GET", "/registry.json")
    assert status == 404
    status, payload = call(port, "POST", "/v1/completions", {"model": "thinking", "prompt": ""})
    assert status == 400 and json.loads(payload)["error"]["param"] == "prompt"


def test_cli_serves_a_registry_and_refuses_bad_input(served, tiny_pair, tmp_path):
    port, cortex, student = served
    cli = [sys.executable, "-m", "conch_dna.cortex.server", "serve"]
    missing = subprocess.run([*cli, "--registry", str(tmp_path / "none")], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "not a neuron registry" in missing.stderr and not (tmp_path / "none").exists()
    taken = subprocess.run([*cli, "--registry", str(cortex.registry.root), "--port", str(port)],
                           capture_output=True, text=True, timeout=60)
    assert taken.returncode == 2 and "error:" in taken.stderr
    proc = subprocess.Popen([*cli, "--registry", str(cortex.registry.root), "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving") and "thinking" in line
        live = int(line.rsplit(":", 1)[1].split("/")[0])
        status, reply = chat(live, "thinking", "plan a small task", max_tokens=6)
        assert status == 200
        assert reply["choices"][0]["message"]["content"] == cortex.generate("thinking", "plan a small task", max_tokens=6).text
    finally:
        proc.terminate()
        proc.wait(30)


def test_the_openai_client_talks_to_it(served):
    """The official OpenAI Python client, as a user would point it at the server."""
    from openai import NotFoundError, OpenAI

    port, cortex, _ = served
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    assert {m.id for m in client.models.list()} >= set(NEURONS)
    expected = cortex.generate("thinking", "plan a small task", max_tokens=10).text
    reply = client.chat.completions.create(model="thinking", max_tokens=10,
                                           messages=[{"role": "user", "content": "plan a small task"}])
    assert reply.choices[0].message.content == expected and reply.system_fingerprint == "thinking-v1"
    stream = client.chat.completions.create(model="thinking", max_tokens=10, stream=True,
                                            messages=[{"role": "user", "content": "plan a small task"}])
    assert "".join(c.choices[0].delta.content or "" for c in stream) == expected
    with pytest.raises(NotFoundError, match="known: "):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
