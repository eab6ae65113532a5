"""bench/distill_trial.py's paired difference (the trial itself is a 26-minute run, see the README)."""

from __future__ import annotations

import importlib.util

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
