"""bench/distill_trial.py's paired difference and bench/teacher_trial.py's teacher margin (the trials themselves are long runs, see the README)."""

from __future__ import annotations

import importlib.util

from agentlib.metrics import questions_to_separate
from agentlib.paths import ROOT

spec = importlib.util.spec_from_file_location("distill_trial", ROOT / "bench" / "distill_trial.py")
distill_trial = importlib.util.module_from_spec(spec)
spec.loader.exec_module(distill_trial)


def rec(method: str, bench: str, qid: str, score: float) -> dict:
    return {"method": method, "benchmark": bench, "id": f"{bench}/{qid}" if method == "agent" else qid, "score": score}


def test_paired_difference_pairs_by_question_and_weights_benchmarks_equally():
    records = [rec("agent", "h", "1", 1), rec("agent", "h", "2", 1), rec("cot", "h", "1", 0), rec("cot", "h", "2", 1),
               rec("agent", "m", "9", 0), rec("cot", "m", "9", 0),
               rec("agent", "m", "only-agent", 1)]  # fmt: skip
    mean, lo, hi, n = distill_trial.paired_difference(records, "agent", "cot", ["h", "m"])
    assert n == 3  # the unpaired question is left out
    assert mean == 25.0  # (h: +0.5, m: 0) / 2, in points
    assert 0.0 <= lo <= mean <= hi <= 50.0
    assert distill_trial.paired_difference(records, "cot", "agent", ["h", "m"])[0] == -25.0


def test_teacher_margin_counts_greedy_factual_answers_only():
    spec = importlib.util.spec_from_file_location("teacher_trial", ROOT / "bench" / "teacher_trial.py")
    teacher_trial = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(teacher_trial)
    domains = {f"h{i}": "factual" for i in range(10)} | {"m0": "math"}
    runs = {
        "cot": [{"id": f"h{i}", "score": float(i < 2)} for i in range(10)] + [{"id": "m0", "score": 1.0}],
        "agent": [{"id": f"h{i}#s0", "score": float(i < 6)} for i in range(10)]
        + [{"id": f"h{i}#s1", "score": 1.0} for i in range(10)]  # a sampled copy: not counted
        + [{"id": "m0#s0", "score": 0.0}],
    }
    note = teacher_trial.separation(runs, domains)
    assert note.startswith("factual, teacher agent: 6 of 10 [31.3, 83.2]; factual, teacher cot: 2 of 10 [5.7, 51.0]")
    assert note.endswith(f"stop overlapping at {questions_to_separate(0.6, 0.2)} questions per arm.")
    assert teacher_trial.separation({"agent": runs["agent"]}, domains) is None
