"""An OpenAI-compatible HTTP server for CORTEX: `conch-cortex serve --registry DIR`.

`/v1/chat/completions` and `/v1/completions` answer with the neuron named by `model` (or the bare base, by its
id), streamed by server-sent events when `stream` is true; `/v1/models` lists the active neurons and their
versions. Built on the standard library's `ThreadingHTTPServer`, as `mlx_lm.server` is: each connection's
thread blocks on its own answer while the engine's thread batches them all, so there is no event loop to bridge
to and no dependency to add. A `model` is only ever looked up in the registry's manifest, never used as a path,
so nothing a client sends reaches outside the registry.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import structlog

from conch_dna.cortex.cortex import Cortex, PromptTooLongError
from conch_dna.cortex.registry import MANIFEST, NeuronNotFoundError, NeuronRegistry, RegistryError

log = structlog.get_logger(__name__)

MAX_BODY_BYTES = 4 << 20
MAX_STOP_STRINGS = 4


class BadRequest(Exception):
    """The client's request is unusable: an HTTP status and what to change."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


# --------------------------------------------------------------------------------------- requests


def _number(body: dict, name: str, default, lo: float, hi: float, kind=float):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not isinstance(value, int)):
        raise BadRequest(400, f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}", name)
    if not lo <= value <= hi:
        raise BadRequest(400, f"{name} must be between {lo} and {hi}, got {value}", name)
    return kind(value)


def sampling(body: dict) -> dict:
    """The request's generation settings, each checked: max_tokens, temperature, top_p, stop."""
    max_tokens = _number(body, "max_completion_tokens", None, 1, 1 << 20, int)
    max_tokens = max_tokens or _number(body, "max_tokens", 256, 1, 1 << 20, int)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest(400, f"stop must be a string or a list of up to {MAX_STOP_STRINGS} non-empty strings", "stop")
    if not isinstance(body.get("stream", False), bool):
        raise BadRequest(400, "stream must be true or false", "stream")
    return dict(max_tokens=max_tokens, temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
                top_p=_number(body, "top_p", 1.0, 0.0, 1.0), stop=stop)


def chat_messages(body: dict) -> list[dict]:
    """The conversation, as the chat template takes it; text parts of a content list are joined."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest(400, "messages must be a non-empty list of {role, content}", "messages")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise BadRequest(400, f"messages[{i}] needs a role of system, user or assistant", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise BadRequest(400, f"messages[{i}].content must be text", f"messages[{i}].content")
        turns.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return turns


def completion_prompt(body: dict, tokenizer) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest(400, "prompt must be a non-empty string", "prompt")
    return list(tokenizer.encode(prompt))


# --------------------------------------------------------------------------------------- handler


class CortexHandler(BaseHTTPRequestHandler):
    server_version = "conch-cortex"
    cortex: Cortex  # set on the server class by `make_server`

    def log_message(self, format, *args):  # noqa: A002 - the standard library's signature
        log.debug("http", client=self.client_address[0], line=format % args)

    def do_GET(self):
        if self.path.rstrip("/") == "/v1/models":
            return self._json(200, {"object": "list", "data": self._models()})
        if self.path.rstrip("/") == "/health":
            return self._json(200, {"status": "ok", "in_flight": self.cortex.engine.in_flight})
        self._error(BadRequest(404, f"no route {self.path}; try /v1/models, /v1/chat/completions, /v1/completions", code="not_found"))

    def do_POST(self):
        route = self.path.rstrip("/")
        try:
            if route not in ("/v1/chat/completions", "/v1/completions"):
                raise BadRequest(404, f"no route {self.path}; try /v1/chat/completions or /v1/completions", code="not_found")
            body = self._body()
            model = self._model(body)
            settings = sampling(body)
            prompt = chat_messages(body) if route == "/v1/chat/completions" else completion_prompt(body, self.cortex.tokenizer)
            try:
                answer = self.cortex.stream(model, prompt, **settings)
            except PromptTooLongError as e:
                raise BadRequest(400, str(e), "messages" if route.endswith("chat/completions") else "prompt",
                                 code="context_length_exceeded") from e
            except NeuronNotFoundError as e:  # checked here, where the registry is read once per request
                known = ", ".join(m["id"] for m in self._models())
                raise BadRequest(404, f"model {model!r} is not served here; known: {known}", "model",
                                 code="model_not_found") from e
        except BadRequest as e:
            return self._error(e)
        chat = route == "/v1/chat/completions"
        reply = _Reply(model, chat)
        with answer:
            if body.get("stream"):
                self._stream(answer, reply)
            else:
                try:
                    text = "".join(answer)
                except Exception as e:  # noqa: BLE001 - the client is told; the server goes on
                    log.exception("answer failed", model=model)
                    return self._error(BadRequest(500, f"the answer failed: {e}", code="server_error"))
                self._json(200, reply.whole(text, answer))

    # ----------------------------------------------------------------------------------- parts

    def _models(self) -> list[dict]:
        self.cortex.registry.refresh()
        served = [{"id": self.cortex.base_model_id, "object": "model", "owned_by": "conch_dna", "version": None}]
        for name in self.cortex.registry.neurons():
            v = self.cortex.registry.active(name)
            if v is not None:
                served.append({"id": name, "object": "model", "owned_by": "conch_dna", "version": v.version,
                               "created": v.created})
        return served

    def _model(self, body: dict) -> str:
        """The model asked for; whether it is served is the cortex's answer (`Cortex.version_for`)."""
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest(400, "model must name a neuron or the base model (see /v1/models)", "model")
        return model

    def _body(self) -> dict:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise BadRequest(411, "send the body with a Content-Length header") from None
        if not 0 < length <= MAX_BODY_BYTES:
            raise BadRequest(413 if length > 0 else 400, f"the body must be 1 byte to {MAX_BODY_BYTES} bytes, got {length}")
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest(400, "the body must be a JSON object")
        return body

    def _stream(self, answer, reply: _Reply) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        try:
            self._event(reply.chunk(None, None, first=True))
            for piece in answer:
                self._event(reply.chunk(piece, None))
            self._event(reply.chunk(None, answer.finish_reason, usage=answer))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            log.info("client left mid-answer; its slot is freed", model=reply.model)  # `with answer` cancels it
        except Exception as e:  # noqa: BLE001 - the headers are sent: say it in the stream
            log.exception("answer failed", model=reply.model)
            self._event({"error": {"message": f"the answer failed: {e}", "type": "server_error"}})

    def _event(self, payload: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        self.wfile.flush()

    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: BadRequest) -> None:
        self._json(e.status, {"error": {"message": e.message, "type": "invalid_request_error" if e.status < 500
                                        else "server_error", "param": e.param, "code": e.code}})


class _Reply:
    """The OpenAI response objects of one answer (chat or text completion, whole or in chunks)."""

    def __init__(self, model: str, chat: bool):
        self.model, self.chat = model, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    @staticmethod
    def usage(answer) -> dict:
        return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
                "total_tokens": answer.prompt_tokens + answer.completion_tokens}

    def whole(self, text: str, answer) -> dict:
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if self.chat
                  else {"index": 0, "text": text, "logprobs": None})
        choice["finish_reason"] = answer.finish_reason
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": [choice],
                "usage": self.usage(answer), "system_fingerprint": _fingerprint(answer)}

    def chunk(self, text: str | None, finish_reason: str | None, *, first: bool = False, usage=None) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        out = {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}
        if usage is not None:
            out["usage"] = self.usage(usage)
            out["system_fingerprint"] = _fingerprint(usage)
        return out


def _fingerprint(answer) -> str:
    """Which version answered: `<neuron>-v<N>`, or the base model's id."""
    return answer.neuron if answer.version is None else f"{answer.neuron}-v{answer.version}"


# --------------------------------------------------------------------------------------- entry point


def make_server(cortex: Cortex, host: str = "127.0.0.1", port: int = 8080) -> ThreadingHTTPServer:
    """An HTTP server for `cortex` bound to host:port (port 0: any free port; see `server.server_port`)."""
    handler = type("Handler", (CortexHandler,), {"cortex": cortex})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def open_registry(root: str) -> NeuronRegistry:
    """The registry to serve: it must exist already (serving never creates one)."""
    if not (Path(root) / MANIFEST).is_file():
        raise RegistryError(f"{root} is not a neuron registry (no {MANIFEST}); distil a neuron into it first "
                            "(conch-distill --registry DIR) or point --registry at one")
    return NeuronRegistry(root)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="conch-cortex", description="Serve CORTEX neurons over HTTP.")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="an OpenAI-compatible server of a registry's active neurons",
                           description="Serve a registry's active neurons on one base model: /v1/chat/completions, "
                                       "/v1/completions (model = a neuron or the base model's id), /v1/models.")
    serve.add_argument("--registry", required=True, help="the neuron registry folder (holds registry.json)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8080, help="port to listen on; 0 picks a free one (default: %(default)s)")
    serve.add_argument("--max-batch", type=int, default=32, help="requests decoded at once (default: %(default)s)")
    serve.add_argument("--adapter-memory-mb", type=int, default=256,
                       help="adapters kept loaded, least recently used evicted (default: %(default)s MB)")
    return p


def main(argv: list[str] | None = None) -> int:
    from conch_dna.log_setup import configure_logging

    args = parser().parse_args(argv)
    configure_logging()
    if not 0 <= args.port <= 65535 or args.max_batch < 1 or args.adapter_memory_mb < 1:
        print("error: --port must be 0-65535, --max-batch and --adapter-memory-mb at least 1", file=sys.stderr)
        return 2
    try:
        registry = open_registry(args.registry)
        server = make_server(None, args.host, args.port)  # bind before loading the model: a taken port fails fast
    except (RegistryError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        server.RequestHandlerClass.cortex = Cortex(registry, max_batch=args.max_batch, adapter_memory_mb=args.adapter_memory_mb)
    except (RegistryError, OSError, ValueError) as e:  # the base model cannot be loaded
        server.server_close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    log.info("serving", url=f"http://{host}:{port}/v1", registry=str(registry.root), neurons=registry.neurons())
    print(f"serving {', '.join(registry.neurons()) or 'no neurons yet'} at http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.RequestHandlerClass.cortex.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
