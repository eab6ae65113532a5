"""The full agent loop with real parts: SmolLM2-135M (transformers, bf16), the BM25 retriever over the mini
corpus, and the sandbox process. The 135M model rarely follows the CodeAct format; the test checks the loop's
contract (records, messages, observations, resume), not the model's accuracy."""

from __future__ import annotations

import pytest

from agentlib.agent import AgentConfig, prefixes_from_cot, run_agent, run_cot
from agentlib.data import load_benchmark
from agentlib.trajectory import read_records, summarize

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model():
    from agentlib.models import load_model

    return load_model("smollm2-135m", backend="hf")


@pytest.fixture(scope="module")
def retriever():
    from agentlib.retrieval import BM25Retriever

    return BM25Retriever.default()


def test_real_loop_with_retriever_sandbox_ftp_and_sag(model, retriever, tmp_path, data_root):
    examples = load_benchmark("hotpotqa", "test", limit=2) + load_benchmark("math500", "test", limit=1)
    cot = run_cot(model, examples[:1], max_tokens=32, progress=False)  # FTP as the authors build it
    prefixes = prefixes_from_cot(cot)
    assert set(prefixes) == {examples[0].id} and prefixes[examples[0].id].startswith("Thought: ")
    out = tmp_path / "traj.jsonl"
    config = AgentConfig.sag(n_samples=2, max_steps=2, max_tokens=48, temperature=0.7)
    recs = run_agent(
        model, examples, config, out_path=out, retriever=retriever, prefixes=prefixes, progress=False
    )
    assert [r["id"] for r in recs] == [ex.id for ex in examples]
    assert sorted(r["id"] for r in read_records(out)) == sorted(ex.id for ex in examples)
    for r in recs:
        msgs = r["messages"]
        assert msgs[0]["role"] == "system" and "def search(query: str)" in msgs[0]["content"]
        assert msgs[1]["role"] == "user" and r["question"] in msgs[1]["content"]
        assert 1 <= len(r["steps"]) <= config.max_steps + 1
        assert r["hit_step_limit"] == (len(r["steps"]) == config.max_steps + 1)
        assert sum(m["role"] == "assistant" for m in msgs) == len(r["steps"])
        for s in r["steps"]:
            assert (s["code"] is None) == (s["parse_error"] is not None)
            assert len(s["candidates"]) == 2 and sum(c["chosen"] for c in s["candidates"]) == 1
            assert s["completion_tokens"] > 0 and s["duration_s"] > 0
        for m in msgs[2:]:
            assert m["role"] == "assistant" or m["content"].startswith("Observation:")
        assert r["score"] in (0.0, 1.0)
    first = recs[0]
    assert first["used_prefix"] and first["messages"][2]["content"].startswith(first["prefix"])
    s = summarize(recs)
    assert s["n"] == 3 and 0.0 <= s["accuracy"] <= 1.0 and s["tokens_per_s"] > 0
    # resume: nothing left to do, the model is not called again
    calls = model.usage.calls
    assert run_agent(model, examples, config, out_path=out, retriever=retriever, progress=False) == recs
    assert model.usage.calls == calls


def test_real_search_observation_reaches_the_model(model, retriever, data_root):
    """A scripted first turn (forced as the prefix) runs a real search in the sandbox; its passages come back
    as the observation the model sees next."""
    from agentlib.data import Example

    ex = Example(id="x", question="Who directed the film Ed Wood?", answer="Tim Burton")
    forced = 'I will search.\nCode:\n```py\nprint(search("Ed Wood film director"))\n```'
    config = AgentConfig(max_steps=1, max_tokens=1, short_prompt=True)
    (r,) = run_agent(model, [ex], config, retriever=retriever, prefixes={"x": forced}, progress=False)
    obs = r["messages"][3]["content"]
    assert obs.startswith("Observation:\nExecution logs:\nDoc 1 (Title: ")
    assert (
        r["steps"][0]["code"].startswith('print(search("Ed Wood film director"))')
        and r["steps"][0]["error"] is None
    )
