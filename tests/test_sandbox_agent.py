"""The agent loop over the real sandbox with answers Python cannot print: a 5,000-digit ``final_answer``
(``str(int)`` raises beyond 4,300 digits) and hostile values must end as a prediction, never an exception
that aborts the batch."""

from __future__ import annotations

import math

from fakes import Ex, ScriptedModel, by_question, exact_score, turn

from agentlib._sandbox_worker import int_text
from agentlib.agent import AgentConfig, run_agent

BIG = int_text(10**4999 + 7)  # 5,000 digits


def test_the_agent_handles_a_5000_digit_final_answer():
    model = ScriptedModel(
        by_question(
            {
                "big power": [turn("compute", "final_answer(10**4999 + 7)")],
                "factorial": [
                    turn("compute", "import math\nn = math.factorial(2000)\nprint(str(n)[:5])"),
                    turn("answer", "final_answer(n)"),
                ],
                "nested": [turn("compute", "final_answer({'n': [10**5000] * 3, 'self': None})")],
                "ordinary": [turn("compute", "final_answer(6 * 7)")],
            }
        )
    )
    exs = [
        Ex("a", "What is the big power?", BIG, domain="math"),
        Ex("b", "What is the factorial of 2000?", int_text(math.factorial(2000)), domain="math"),
        Ex("c", "A nested answer?", "x", domain="math"),
        Ex("d", "An ordinary question?", "42", domain="math"),
    ]
    recs = run_agent(model, exs, AgentConfig(), score_fn=exact_score, progress=False)  # the default sandbox
    by_id = {r["id"]: r for r in recs}
    assert by_id["a"]["prediction"] == BIG and by_id["a"]["score"] == 1.0
    assert by_id["b"]["prediction"] == int_text(math.factorial(2000)) and by_id["b"]["score"] == 1.0
    assert "int_max_str_digits" in by_id["b"]["steps"][0]["observation"]  # printing it raises, as in Python
    assert by_id["c"]["prediction"].startswith("{'n': ['1000") and len(by_id["c"]["prediction"]) < 100_000
    assert by_id["d"]["prediction"] == "42"


def test_sag_candidates_with_big_answers():
    model = ScriptedModel(by_question({"big": lambda step: [turn("c", "final_answer(10**4999 + 7)")] * 2}))
    recs = run_agent(
        model,
        [Ex("a", "big?", BIG, domain="math")],
        AgentConfig.sag(n_samples=2),
        score_fn=exact_score,
        progress=False,
    )
    assert recs[0]["prediction"] == BIG
