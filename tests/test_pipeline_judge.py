"""The profile's judge wired into evaluation: factual records gain the judge's verdict beside exact match,
the table gains a judge column, and a rerun asks the server nothing (verdicts cached under runs/)."""

from __future__ import annotations

from test_judge import _JudgeServer

from agentlib import pipeline
from agentlib.data import Example
from agentlib.profiles import get_profile


def _record(question: str, gold: str, prediction: str, benchmark: str = "hotpotqa") -> dict:
    score = float(prediction.lower() == gold.lower())
    return {
        "benchmark": benchmark,
        "method": "x",
        "question": question,
        "gold": gold,
        "prediction": prediction,
        "score": score,
    }


def test_factual_cells_carry_the_judge_beside_exact_match(tmp_path, monkeypatch, fake_servers):
    handler, root = fake_servers.start(_JudgeServer, requests=[])
    monkeypatch.setenv("AGENTLIB_RUNS_DIR", str(tmp_path))
    p = get_profile("smoke", judge=(root + "/v1", "judge-model"))
    sets = {
        "hotpotqa": [Example("a", "Capital of France?", "Paris"), Example("b", "Capital of Peru?", "Lima")],
        "math500": [Example("m", "1+1?", "2", domain="math")],
    }
    records = [
        _record("Capital of France?", "Paris", "paris"),
        _record("Capital of Peru?", "Lima", "Cusco"),
        _record("1+1?", "2", "2", benchmark="math500"),
    ]
    judged = pipeline.judge_factual(p, [dict(r) for r in records], sets)
    assert [r.get("judge") for r in judged] == [1.0, 0.0, None]  # math is not judged
    assert [r["model"] for r in handler.requests] == ["judge-model", "judge-model"]
    table = pipeline.results_table(judged, p, sets)
    assert table.set_index("benchmark").loc["hotpotqa", "judge"] == 50.0
    pipeline.judge_factual(p, [dict(r) for r in records], sets)  # a rerun: from the cache on disk
    assert len(handler.requests) == 2
    assert pipeline.judge_factual(get_profile("smoke"), [dict(records[0])], sets)[0].get("judge") is None
