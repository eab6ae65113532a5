"""The LLM judge against a fake OpenAI-compatible server on 127.0.0.1 that records every request: the authors'
prompt and JSON schema, one request per distinct question (on disk and in flight), none on a rerun."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import ThreadingHTTPServer

import pytest
from fakes import JsonHandler

from agentlib.metrics import JUDGE_PROMPT, LLMJudge, judge_records, parse_verdict


class _JudgeServer(JsonHandler):
    """Says score 1 when the predicted answer equals the gold answer (case-insensitive), else 0."""

    requests: list = []
    reject_schema = False  # answer 400 to requests with response_format (servers without structured output)
    delay_s = 0.0
    reply = None  # a fixed reply text, if set

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **req})
        if self.reject_schema and "response_format" in req:
            return self._send(400, {"error": "response_format is not supported"})
        time.sleep(self.delay_s)
        prompt = req["messages"][-1]["content"]
        pred = re.search(r"^Predicted answer: (.*)$", prompt, re.M)[1]
        gold = re.search(r"^Gold answer: (.*)$", prompt, re.M)[1]
        ok = int(pred.strip().lower() == gold.strip().lower())
        text = self.reply if self.reply is not None else json.dumps({"explanation": "compared", "score": ok})
        self._send(
            200,
            {
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 200, "completion_tokens": 12},
            },
        )


@pytest.fixture
def server(fake_servers):
    def make(**attrs):
        handler, root = fake_servers.start(_JudgeServer, requests=[], **attrs)
        return handler, root + "/v1"

    return make


def test_judge_sends_the_authors_prompt_and_schema_and_caches(server, tmp_path):
    handler, url = server()
    cache = tmp_path / "judge" / "verdicts.jsonl"
    judge = LLMJudge(url, "gpt-4o-mini", cache, api_key="sk-test")
    assert judge("Who wrote Hamlet?", "William Shakespeare", "william shakespeare") is True
    assert judge("Who wrote Hamlet?", "William Shakespeare", "william shakespeare") is True  # cached
    assert len(handler.requests) == 1
    req = handler.requests[0]
    assert (
        req["path"] == "/v1/chat/completions"
        and req["model"] == "gpt-4o-mini"
        and req["auth"] == "Bearer sk-test"
    )
    assert req["temperature"] == 0.0
    assert req["response_format"]["type"] == "json_schema"
    assert req["response_format"]["json_schema"]["schema"]["required"] == ["explanation", "score"]
    content = req["messages"][0]["content"]
    assert content == JUDGE_PROMPT.format(
        question="Who wrote Hamlet?", predicted="william shakespeare", gold="William Shakespeare"
    )
    assert "Be reasonable - phrasing differences are okay if the core meaning is the same." in content
    assert judge("Who wrote Hamlet?", "William Shakespeare", "Marlowe") is False
    assert len(handler.requests) == 2
    # a second judge on the same cache file sends nothing
    again = LLMJudge(url, "gpt-4o-mini", cache)
    assert again("Who wrote Hamlet?", "William Shakespeare", "william shakespeare") is True
    assert again("Who wrote Hamlet?", "William Shakespeare", "Marlowe") is False
    assert len(handler.requests) == 2 and again.requests == 0
    lines = [json.loads(x) for x in cache.read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["explanation"] == "compared" and lines[1]["verdict"] is False
    # another model is another verdict
    other = LLMJudge(url, "qwen2.5-7b", cache)
    assert other("Who wrote Hamlet?", "William Shakespeare", "william shakespeare") is True
    assert len(handler.requests) == 3


def test_two_identical_questions_make_one_request_even_at_once(server, tmp_path):
    handler, url = server(delay_s=0.3)
    judge = LLMJudge(url, "gpt-4o-mini", tmp_path / "v.jsonl")
    records = [
        {"question": "Capital of France?", "gold": "Paris", "prediction": "Paris"},
        {
            "question": "Capital of France?",
            "gold": "Paris",
            "prediction": "Paris",
        },  # the same, in flight together
        {"question": "Capital of Italy?", "gold": "Rome", "prediction": "Milan"},
        {"question": "Capital of Spain?", "answer": "Madrid", "prediction": "madrid"},  # an Example-like dict
        {"question": "Capital of Peru?", "gold": "Lima", "prediction": None},  # no prediction: no request
    ]
    assert judge_records(records, judge, max_workers=5) == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert len(handler.requests) == 3 and judge.requests == 3
    assert judge_records(records, LLMJudge(url, "gpt-4o-mini", tmp_path / "v.jsonl")) == [
        1.0,
        1.0,
        0.0,
        1.0,
        0.0,
    ]
    assert len(handler.requests) == 3
    assert judge_records([], judge) == []


def test_judge_falls_back_without_structured_output(server, tmp_path):
    handler, url = server(reject_schema=True)
    judge = LLMJudge(url, "local-teacher", tmp_path / "v.jsonl")
    assert judge("q?", ["Paris", "City of Light"], "paris") is True  # a list of aliases: the answer is graded
    assert [("response_format" in r) for r in handler.requests] == [True, False]
    assert judge("q2?", "Rome", "rome") is True
    assert len(handler.requests) == 3  # it asks plainly from then on


def test_unparsable_reply_is_false_and_parse_verdict_forms(server, tmp_path):
    handler, url = server(reply="I think they match.")
    assert LLMJudge(url, "m", tmp_path / "v.jsonl")("q?", "a", "a") is False
    assert parse_verdict('{"explanation": "same person", "score": 1}') == (True, "same person")
    assert parse_verdict('```json\n{"explanation": "no", "score": 0}\n```') == (False, "no")
    assert parse_verdict("score: 1") == (True, "score: 1")
    assert parse_verdict("yes") is None


def test_judge_raises_on_a_client_error(server, tmp_path):
    class _Forbidden(_JudgeServer):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self._send(401, {"error": "bad key"})

    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Forbidden)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        judge = LLMJudge(f"http://127.0.0.1:{srv.server_address[1]}", "m", tmp_path / "v.jsonl")
        with pytest.raises(RuntimeError, match="HTTP 401"):
            judge("q?", "a", "a")
        assert not (tmp_path / "v.jsonl").exists()  # nothing cached
    finally:
        srv.shutdown()
        srv.server_close()
