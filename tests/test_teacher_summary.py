"""The teacher summary notebook 01 shows and the closing notes quote: per run and domain, the greedy accuracy,
the yield with and without rejection sampling, the greedy answers that carry no answer, and those the token
budget cut off."""

from __future__ import annotations

from agentlib import pipeline


def _rec(
    qid: str, sample: int, domain: str, score: float, prediction: str | None = "x", cut: bool | None = None
) -> dict:
    return {
        "cut": cut,
        "id": f"{qid}#s{sample}",
        "domain": domain,
        "score": score,
        "prediction": prediction,
        "steps": [],
        "parse_errors": 0,
        "hit_step_limit": False,
    }


def test_yield_with_and_without_rejection_sampling_per_run_and_domain():
    runs = {
        "cot": [
            _rec("a", 0, "math", 1.0),
            _rec("b", 0, "math", 0.0, None),
            _rec("b", 1, "math", 1.0),
            _rec("c", 0, "factual", 0.0),
            _rec("c", 1, "factual", 0.0),
        ]
    }
    kept = {"cot": [r for r in runs["cot"] if r["score"] >= 1.0]}
    rows = {r["domain"]: r for r in pipeline.teacher_summary(runs, kept)}
    assert rows["math"]["accuracy_greedy"] == 50.0 and rows["math"]["yield_greedy_pct"] == 50.0
    assert rows["math"]["yield_pct"] == 100.0 and rows["math"]["no_answer_pct"] == 50.0
    assert rows["factual"]["yield_pct"] == 0.0 and rows["factual"]["questions"] == 1
    assert rows["factual"]["trajectories"] == 2
    assert rows["math"]["cut_pct"] is None  # no record says


def test_the_cut_rate_counts_greedy_answers_the_budget_cut_off_not_unparsable_ones():
    runs = {
        "cot": [
            _rec("a", 0, "math", 0.0, None, cut=True),
            _rec("b", 0, "math", 0.0, None, cut=False),  # ended without a parsable answer: not cut
            _rec("c", 0, "math", 1.0, cut=False),
            _rec("d", 0, "math", 1.0, cut=None),  # made before records said (left out)
            _rec("a", 1, "math", 0.0, None, cut=True),  # a resample: not greedy
        ]
    }
    (row,) = pipeline.teacher_summary(runs, {"cot": []})
    assert row["cut_pct"] == 100 / 3 and row["no_answer_pct"] == 50.0
