"""Test doubles for agent logic: a scripted chat model (fixed replies) and a spy around the real sandbox.

The real model and retriever are exercised in ``test_agent_real.py``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from agentlib.models import ChatModel, Sampling, Usage, cut_at_stop
from agentlib.sandbox import Sandbox


@dataclass
class Ex:
    """The fields of ``agentlib.data.Example`` the agent uses."""

    id: str
    question: str
    answer: str
    domain: str = "factual"
    source: str = "fake"
    aliases: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def exact_score(pred: str | None, example: Any) -> float:
    return float(pred is not None and pred.strip().lower() == example.answer.strip().lower())


def turn(thought: str, code: str) -> str:
    """A well-formed CodeAct turn as a model would write it (the stop string excluded)."""
    return f"Thought: {thought}\nCode:\n```py\n{code}\n```"


class ScriptedModel(ChatModel):
    """A chat model whose replies come from ``script(conversation, prefix, sample_index) -> str``.

    The reply is the *full* assistant text; when a prefix is forced and the reply starts with it, the
    continuation is returned (as real backends do). Stop strings are cut. Every call is logged.
    """

    def __init__(self, script: Callable[[list[dict], str | None, int], str], fail_on_call: int | None = None):
        self.script = script
        self.calls: list[dict] = []
        self.usage = Usage()
        self.fail_on_call = fail_on_call
        self.primed: list[list[dict]] = []

    def prime(self, messages: list[dict]) -> None:
        self.primed.append(list(messages))

    def generate(
        self, conversations: list[list[dict]], prefixes: list[str | None], sampling: Sampling
    ) -> list[list[str]]:
        if self.fail_on_call is not None and len(self.calls) + 1 == self.fail_on_call:
            raise RuntimeError("simulated crash")
        n, stop = sampling.n, sampling.stop
        self.calls.append(
            {"conversations": [list(c) for c in conversations], "prefixes": prefixes, **vars(sampling)}
        )
        out = []
        for conv, prefix in zip(conversations, prefixes, strict=True):
            samples = []
            for i in range(n):
                text = self.script(conv, prefix, i)
                if prefix and text.startswith(prefix):
                    text = text[len(prefix) :]
                samples.append(cut_at_stop(text, stop))
                self.usage.completion_tokens += len(text.split())
            self.usage.prompt_tokens += sum(len(m["content"].split()) for m in conv)
            out.append(samples)
        self.usage.calls += 1
        return out


class StreamingModel(ScriptedModel):
    """A ScriptedModel whose session decodes as ``HFSession`` does: each request grows by one word a step, so
    answers end at different steps, and ``watch`` sees the text so far after every step it goes on."""

    def session(self, **kw: Any) -> _StreamingSession:
        return _StreamingSession(self)


class _StreamingSession:
    def __init__(self, model: StreamingModel):
        self.model, self.live = model, []

    def submit(self, key, messages, prefix=None, sampling=None, watch=None) -> None:
        texts = self.model.generate([messages], [prefix], sampling or Sampling())[0]
        self.live.append({"key": key, "texts": texts, "words": texts[0].split(" "), "n": 0, "watch": watch})

    def run(self, refill=None):
        while True:
            if refill is not None:
                refill()
            if not self.live:
                return
            for req in list(self.live):
                req["n"] += 1
                if req["n"] >= len(req["words"]):
                    self.live.remove(req)
                    yield req["key"], req["texts"], {"gen_s": 0.0, "prompt_tokens": 1, "completion_tokens": 1}
                elif req["watch"] is not None and req["watch"](" ".join(req["words"][: req["n"]])):
                    req["watch"] = None


def by_question(replies: dict[str, list[str] | Callable[[int], list[str]]]) -> Callable:
    """A script: for the question whose text contains a key, step s gets ``replies[key][s]`` (the last
    one repeats); a callable value gives the n samples of a step: ``value(step) -> list[str]``."""

    def script(conv: list[dict], prefix: str | None, i: int) -> str:
        task = conv[1]["content"]
        step = sum(m["role"] == "assistant" for m in conv)
        for key, value in replies.items():
            if key in task:
                if callable(value):
                    return value(step)[i]
                return value[min(step, len(value) - 1)]
        raise KeyError(task)

    return script


class SpySandbox(Sandbox):
    """The real sandbox, recording what the agent asks of it."""

    instances: list[SpySandbox] = []

    def __init__(self, tools: dict[str, Callable] | None = None, **kw: Any):
        super().__init__(tools=tools, timeout_s=kw.pop("timeout_s", 5.0), **kw)
        self.runs: list[str] = []
        self.candidate_batches: list[list[str]] = []
        self.commits = 0
        self.closed = False
        SpySandbox.instances.append(self)

    def run(self, code: str) -> Any:
        self.runs.append(code)
        return super().run(code)

    def run_candidates(self, codes: Sequence[str]) -> list[Any]:
        self.candidate_batches.append(list(codes))
        return super().run_candidates(codes)

    def commit(self, result: Any) -> None:
        self.commits += 1
        super().commit(result)

    def close(self) -> None:
        self.closed = True
        super().close()


class JsonHandler(BaseHTTPRequestHandler):
    """A quiet HTTP handler for fake servers on 127.0.0.1 that answer JSON (``_send``)."""

    def log_message(self, *a):
        pass

    def _send(self, code: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class FakeServers:
    """Fake HTTP servers on 127.0.0.1, each in a daemon thread; ``close()`` stops them (the ``fake_servers``
    fixture does)."""

    def __init__(self) -> None:
        self.made: list[ThreadingHTTPServer] = []

    def start(self, handler: type, **attrs: Any) -> tuple[type, str]:
        """A server of a fresh subclass of ``handler`` with class attributes ``attrs``; (subclass, root URL)."""
        cls = type(handler.__name__, (handler,), attrs)
        srv = ThreadingHTTPServer(("127.0.0.1", 0), cls)
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        self.made.append(srv)
        return cls, f"http://127.0.0.1:{srv.server_address[1]}"

    def close(self) -> None:
        for srv in self.made:
            srv.shutdown()
            srv.server_close()
