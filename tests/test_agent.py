"""Agent logic with a scripted model: parsing, loop, step limit, FTP, SAG, resume, filtering, CoT."""

from __future__ import annotations

import json

import pytest
from fakes import Ex, ScriptedModel, SpySandbox, by_question, exact_score, turn
from hypothesis import given, settings
from hypothesis import strategies as st

from agentlib.agent import (
    AgentConfig,
    ParseError,
    Step,
    extract_answer,
    first_thought_prefix,
    ftp_prefix,
    make_prefixes,
    observation,
    parse_step,
    prefixes_from_cot,
    repeats_previous,
    run_agent,
    run_cot,
    select_action,
    system_prompt,
)
from agentlib.trajectory import JsonlWriter, filter_trajectories, read_records, summarize


def run(model, examples, config=None, **kw):
    kw.setdefault("tools", {"search": lambda q: f"[1] {q}: passage about {q}"})
    return run_agent(
        model,
        examples,
        config or AgentConfig(),
        sandbox_factory=lambda tools: SpySandbox(tools),
        score_fn=exact_score,
        progress=False,
        **kw,
    )


# ----------------------------------------------------------------------------- parsing


def test_parse_canonical_turn():
    s = parse_step("Thought: I will search.\nCode:\n```py\nprint(search('x'))\n```<end_code>")
    assert s == Step(thought="I will search.", code="print(search('x'))")


@pytest.mark.parametrize("fence", ["```py", "```python", "```Python", "```", "```python3"])
def test_parse_fence_variants(fence):
    assert parse_step(f"Thought: t\n{fence}\nx = 1\nprint(x)\n```").code == "x = 1\nprint(x)"


def test_parse_missing_closing_fence_at_stop_string():
    s = parse_step("Thought: compute\nCode:\n```py\nfinal_answer(2 + 2)\n")
    assert s.code == "final_answer(2 + 2)" and s.thought == "compute"


def test_parse_stray_backticks_in_thought_and_multiple_blocks():
    text = (
        "Thought: I'll use `search` and ```search``` twice.\nCode:\n```py\na = 1\n```\n"
        "More.\n```python\nprint(a)\n```"
    )
    s = parse_step(text)
    assert s.code == "a = 1\n\nprint(a)"
    assert s.thought == "I'll use `search` and ```search``` twice."


def test_parse_unfenced_code_after_label_and_bare_call():
    assert parse_step("Thought: done\nCode:\nfinal_answer('Paris')").code == "final_answer('Paris')"
    assert parse_step("final_answer('Paris')") == Step("", "final_answer('Paris')")


@pytest.mark.parametrize(
    "text,kind",
    [
        ("", "empty"),
        ("   \n", "empty"),
        ("The answer is Paris.", "no_code"),
        ("Thought: x\n```py\n\n```", "empty_code"),
        ("Paris", "no_code"),
    ],
)
def test_parse_errors_are_typed(text, kind):
    with pytest.raises(ParseError) as e:
        parse_step(text)
    assert e.value.kind == kind


def test_parse_syntax_error_is_left_to_execution():
    assert parse_step("```py\nprint((1\n```").code == "print((1"


@settings(max_examples=400, deadline=None)
@given(st.text() | st.builds(lambda a, b: a + "```py\n" + b, st.text(), st.text()))
def test_parse_fuzz_returns_step_or_parse_error(text):
    try:
        s = parse_step(text)
    except ParseError as e:
        assert e.kind in {"empty", "no_code", "empty_code"}
    else:
        assert isinstance(s, Step) and s.code.strip()


# ----------------------------------------------------------------------------- prompts


def test_system_prompts_list_tools_and_differ():
    long, short = system_prompt(["search"]), system_prompt(["search"], short=True)
    for p in (long, short):
        assert "def search(query: str) -> str:" in p and "def final_answer(" in p and "{{" not in p
    assert len(long) > 3 * len(short) and "Observation:" in long
    assert "def search(" not in system_prompt([])


# ----------------------------------------------------------------------------- the loop


def test_loop_search_then_answer_batched():
    model = ScriptedModel(
        by_question(
            {
                "capital of France": [
                    turn("search", "print(search('France capital'))"),
                    turn("answer", "final_answer('Paris')"),
                ],
                "2+3": [turn("compute", "final_answer(2 + 3)")],
            }
        )
    )
    exs = [Ex("a", "What is the capital of France?", "Paris"), Ex("b", "What is 2+3?", "5", domain="math")]
    recs = run(model, exs)
    assert [r["id"] for r in recs] == ["a", "b"]
    a, b = recs
    assert a["prediction"] == "Paris" and a["score"] == 1.0 and len(a["steps"]) == 2
    assert b["prediction"] == "5" and b["score"] == 1.0 and len(b["steps"]) == 1
    # one batched call per step: both questions in call 1, only the unfinished one in call 2
    assert [len(c["conversations"]) for c in model.calls] == [2, 1]
    roles = [m["role"] for m in a["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert a["messages"][2]["content"].endswith("```<end_code>")
    obs = a["messages"][3]["content"]
    assert obs.startswith("Observation:\nExecution logs:\n[1] France capital: passage about France capital")
    assert a["steps"][0]["code"] == "print(search('France capital'))" and a["steps"][0]["error"] is None
    assert not a["hit_step_limit"] and a["parse_errors"] == 0 and a["sag_n"] == 1
    assert all(sb.closed for sb in SpySandbox.instances[-2:])
    assert model.calls[0]["stop"][0] == "<end_code>"


def test_parse_and_execution_errors_become_observations():
    model = ScriptedModel(
        by_question(
            {"q": ["I think the answer is 4.", turn("oops", "print(1/0)"), turn("fix", "final_answer('4')")]}
        )
    )
    (r,) = run(model, [Ex("1", "q", "4")])
    assert r["prediction"] == "4" and r["parse_errors"] == 1 and len(r["steps"]) == 3
    assert r["steps"][0]["parse_error"] and r["steps"][0]["code"] is None
    assert "Error in code parsing" in r["messages"][3]["content"]
    assert r["steps"][1]["error"].endswith("ZeroDivisionError: division by zero")
    assert (
        "ZeroDivisionError" in r["messages"][5]["content"]
        and "Now let's retry" in r["messages"][5]["content"]
    )


def test_state_persists_between_steps():
    model = ScriptedModel(by_question({"q": [turn("a", "x = 20"), turn("b", "final_answer(x + 1)")]}))
    assert run(model, [Ex("1", "q", "21")])[0]["prediction"] == "21"


def test_step_limit_asks_once_more_and_marks():
    model = ScriptedModel(
        lambda conv, prefix, i: (
            turn("give up", "final_answer('late')")
            if "maximum number of steps" in conv[-1]["content"]
            else turn("again", "print(search('x'))")
        )
    )
    (r,) = run(model, [Ex("1", "q", "late")], AgentConfig(max_steps=3))
    assert r["hit_step_limit"] and r["prediction"] == "late" and len(r["steps"]) == 4
    assert len(model.calls) == 4
    assert "maximum number of steps" in r["messages"][-2]["content"]
    assert r["messages"][-2]["content"].startswith("Observation:")
    roles = [m["role"] for m in r["messages"][1:]]
    assert roles == ["user", "assistant"] * 4  # one observation turn carries the step-limit request
    assert filter_trajectories([r]) == []  # correct, but hit the step limit


def test_step_limit_free_text_answer():
    model = ScriptedModel(
        lambda conv, prefix, i: (
            "Final answer: Paris"
            if "maximum number of steps" in conv[-1]["content"]
            else turn("t", "print(1)")
        )
    )
    (r,) = run(model, [Ex("1", "q", "Paris")], AgentConfig(max_steps=1))
    assert r["prediction"] == "Paris" and r["hit_step_limit"] and r["parse_errors"] == 1


def test_repeated_step_stops_the_loop_when_asked():
    def reply(conv, prefix, i):
        if "repeated the previous one" in conv[-1]["content"]:
            return turn("done", "final_answer('late')")
        return turn("again", "print(search('x'))")

    (r,) = run(ScriptedModel(reply), [Ex("1", "q", "late")], AgentConfig(max_steps=5, stop_on_repeat=True))
    assert r["stopped_on_repeat"] and not r["hit_step_limit"]
    assert r["prediction"] == "late" and len(r["steps"]) == 3  # two identical steps, then the answer
    assert r["messages"][-2]["content"].startswith("Observation:")
    assert r["messages"][-2]["content"].endswith("calls final_answer(...).")
    assert filter_trajectories([r]) == []  # correct, but looped
    (off,) = run(ScriptedModel(reply), [Ex("1", "q", "late")], AgentConfig(max_steps=5))
    assert not off["stopped_on_repeat"] and off["hit_step_limit"] and len(off["steps"]) == 6


def test_same_code_with_a_new_observation_is_not_a_repeat():
    code = "try:\n    n += 1\nexcept NameError:\n    n = 1\nprint(n)"
    model = ScriptedModel(
        lambda conv, prefix, i: turn("count", code) if len(conv) < 7 else turn("t", "final_answer(n)")
    )
    (r,) = run(model, [Ex("1", "q", "3")], AgentConfig(stop_on_repeat=True))
    assert [s["observation"].split()[:3] for s in r["steps"][:3]] == [
        ["Execution", "logs:", str(i)] for i in (1, 2, 3)
    ]
    assert r["prediction"] == "3" and not r["stopped_on_repeat"] and len(r["steps"]) == 4


def test_repeats_previous_compares_code_or_unparsed_text_and_observation():
    a = {"code": "print(1)", "thought": "x", "observation": "1"}
    assert repeats_previous([a, {**a, "thought": "other words"}])
    assert not repeats_previous([a]) and not repeats_previous([a, {**a, "observation": "2"}])
    bad = {"code": None, "thought": "no code here", "observation": "Error in code parsing"}
    assert repeats_previous([bad, dict(bad)]) and not repeats_previous([bad, {**bad, "thought": "other"}])


def test_batch_size_refills_slots():
    model = ScriptedModel(
        by_question(
            {f"q{i}": [turn("t", "print(1)")] * i + [turn("t", f"final_answer({i})")] for i in range(1, 5)}
        )
    )
    recs = run(model, [Ex(str(i), f"q{i}", str(i)) for i in range(1, 5)], AgentConfig(batch_size=2))
    assert [r["prediction"] for r in recs] == ["1", "2", "3", "4"]
    assert max(len(c["conversations"]) for c in model.calls) == 2
    # q1 finishes after 2 steps, q3 takes its slot while q2 is still running
    assert sum(len(c["conversations"]) for c in model.calls) == sum(len(r["steps"]) for r in recs)


def test_batch_token_counts_give_every_completion_at_least_one_token():
    """A batch's completion tokens are split by text length, but an empty completion still cost its EOS token
    (the 135M model in test_agent_real samples EOS first now and then)."""

    class EosCountingModel(ScriptedModel):  # counts the EOS token as real backends do
        def chat_batch(self, conversations, n=1, **kw):
            out = super().chat_batch(conversations, n=n, **kw)
            self.usage.completion_tokens += len(conversations) * n
            return out

    long = turn("a long thought " * 20, "final_answer(1)")
    model = EosCountingModel(by_question({"q1": [""], "q2": [long]}))
    recs = run(model, [Ex("1", "q1", "1"), Ex("2", "q2", "1")], AgentConfig.sag(n_samples=2, max_steps=1))
    firsts = [r["steps"][0]["completion_tokens"] for r in recs]
    assert firsts[0] >= 2 and firsts[1] > firsts[0]
    assert sum(firsts) == 2 * len(long.split()) + 4


# ----------------------------------------------------------------------------- FTP


def test_first_thought_prefix():
    assert first_thought_prefix("First, find X.\nThen Y.\n\nSecond para.") == "First, find X.\nThen Y."
    assert first_thought_prefix("Thought: plan it\n \nrest") == "plan it"
    assert first_thought_prefix("<think>\nstep one\n\nmore") == "step one"
    long = "A sentence. " * 200
    assert len(first_thought_prefix(long, max_chars=100)) <= 100 and first_thought_prefix(long).endswith(".")


def test_run_primes_the_shared_system_prompt_once_and_not_when_all_done(tmp_path):
    model = ScriptedModel(lambda conv, prefix, i: turn("done", "final_answer('x')"))
    examples = [Ex(str(i), f"Question {i}?", "x") for i in range(3)]
    run(model, examples, out_path=tmp_path / "t.jsonl")
    assert model.primed == [[model.calls[0]["conversations"][0][0]]]  # the system message, once
    assert model.primed[0][0]["role"] == "system"
    run(model, examples, out_path=tmp_path / "t.jsonl")  # resumed: nothing left to run, nothing primed
    assert len(model.primed) == 1


def test_make_prefixes_stops_at_the_blank_line_and_retries_a_leading_one():
    model = ScriptedModel(
        lambda conv, prefix, i: (
            "\n\nLate start.\n\nrest" if "Bob" in conv[-1]["content"] else "Plan: look it up.\n\nrest"
        )
    )
    prefixes = make_prefixes(model, [Ex("1", "When was Ada born?", "1815"), Ex("2", "Who is Bob?", "b")])
    assert prefixes == {"1": "Thought: Plan: look it up.", "2": "Thought: Late start."}
    assert model.calls[0]["stop"] == ["\n\n"] and model.calls[1]["stop"] is None
    assert len(model.calls[1]["conversations"]) == 1  # only the empty one is asked again


def test_ftp_prefix_is_the_authors_first_paragraph_of_the_cot_answer():
    assert (
        ftp_prefix("I need X.\nThen Y.\n\nSecond para.\n\n<answer>1</answer>")
        == "Thought: I need X.\nThen Y.\n\n"
    )
    assert (
        ftp_prefix("\n\nLate start.\n\nrest") == "Thought: Late start.\n\n"
    )  # a leading blank line is skipped
    assert ftp_prefix("one paragraph only") == "Thought: one paragraph only\n\n"
    cot = [
        {
            "id": "1#s0",
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "A.\n\nB."}],
        }
    ]
    assert prefixes_from_cot(cot) == {"1#s0": "Thought: A.\n\n"}


def test_ftp_prefix_forced_in_first_turn_only():
    para = "I need the birth year of Ada Lovelace."
    cot = ScriptedModel(lambda conv, prefix, i: f"{para}\n\nShe was born in 1815.\n<answer>1815</answer>")
    (c,) = run_cot(cot, [Ex("1", "When was Ada born?", "1815")], score_fn=exact_score, progress=False)
    prefixes = prefixes_from_cot([c])
    assert prefixes == {"1": f"Thought: {para}\n\n"}

    rest = "I will search.\nCode:\n```py\nprint(search('Ada Lovelace'))\n```"
    model = ScriptedModel(by_question({"Ada": [rest, turn("done", "final_answer('1815')")]}))
    (r,) = run(model, [Ex("1", "When was Ada born?", "1815")], prefixes=prefixes)
    assert model.calls[0]["prefixes"] == [f"Thought: {para}\n\n"]
    assert model.calls[1]["prefixes"] == [None]
    # the first assistant turn is the prefix, verbatim, then what the model wrote after it
    assert r["messages"][2]["content"] == f"Thought: {para}\n\n" + rest + "<end_code>"
    assert r["steps"][0]["thought"].startswith(para) and r["used_prefix"] and r["prefix"] == prefixes["1"]
    assert r["method"] == "agent" and r["prediction"] == "1815"


# ----------------------------------------------------------------------------- SAG


def test_sag_votes_on_stdout_and_final_answer():
    texts = [
        turn("a", "print('x')\nfinal_answer('A')"),
        turn("b", "print('x')\nfinal_answer('B')"),  # same stdout, different answer: another group
        "no code here",
        turn("c", "print( 'x' )\nfinal_answer('B')"),
        turn("d", "raise ValueError('bad')"),
    ]
    with SpySandbox({}) as sb:
        act = select_action(texts, sb)
        assert act.text == texts[1] and act.result.final_answer == "B"
        assert [c["votes"] for c in act.candidates] == [1, 2, 0, 2, 0]
        assert [c["chosen"] for c in act.candidates] == [False, True, False, False, False]
        assert act.candidates[2]["outcome"] == "parse_error" and "ValueError" in act.candidates[4]["error"]
        assert len(sb.candidate_batches[0]) == 4 and sb.commits == 1


def test_sag_tie_goes_to_first_group_and_commit_does_not_rerun():
    with SpySandbox({}) as sb:
        sb.run("import random\nseen = []")
        codes = [
            "y = random.random()\nseen.append(y)\nprint('one')",
            "y = -1.0\nseen.append(y)\nprint('two')",
        ]
        act = select_action([turn("a", codes[0]), turn("b", codes[1])], sb)
        assert act.candidates[0]["chosen"] and sb.commits == 1 and len(sb.runs) == 1
        # the committed state is the candidate's own (a re-run would draw another random number)
        check = sb.run("print(len(seen), seen[0] == y, 0 <= y < 1)")
        assert check.stdout == "1 True True\n"


def test_sag_no_survivor_keeps_failed_candidate_error():
    with SpySandbox({}) as sb:
        act = select_action(["prose", turn("a", "z = 5\nprint(undefined_name)")], sb)
        assert act.step is not None and "NameError" in act.result.error and act.candidates[1]["chosen"]
        assert "NameError" in observation(act) and observation(act).startswith("Observation:")
        assert sb.run("print(z)").stdout == "5\n"  # as with one sample, the failed step's effects stay
        act2 = select_action(["prose", "more prose"], sb)
        assert act2.parse_error is not None and act2.candidates[0]["chosen"] and act2.result is None


def test_sag_in_loop_one_call_per_step():
    def samples(step):
        if step == 0:
            return [turn("s", "print(search('a'))")] * 6 + ["junk", turn("e", "1/0")]
        return [turn("f", "final_answer('A')")] * 5 + [turn("f", "final_answer('B')")] * 3

    model = ScriptedModel(by_question({"q": samples}))
    (r,) = run(model, [Ex("1", "q", "A")], AgentConfig.sag(max_steps=5))
    assert [c["n"] for c in model.calls] == [8, 8]
    assert model.calls[0]["temperature"] == 0.4 and model.calls[0]["top_p"] == 0.8
    assert r["prediction"] == "A" and r["sag_n"] == 8 and r["parse_errors"] == 0
    assert [c["votes"] for c in r["steps"][0]["candidates"]] == [6] * 6 + [0, 0]
    assert sum(c["chosen"] for c in r["steps"][1]["candidates"]) == 1
    assert r["method"] == "agent_sag" and "def search" in r["messages"][0]["content"]


# ----------------------------------------------------------------------------- trajectories and resume


def test_resume_after_crash_no_loss_no_duplicates(tmp_path):
    out = tmp_path / "run.jsonl"
    exs = [Ex(str(i), f"question {i}?", str(i)) for i in range(6)]
    replies = {
        f"question {i}?": [turn("t", "print(1)")] * (i % 3) + [turn("a", f"final_answer('{i}')")]
        for i in range(6)
    }
    crashing = ScriptedModel(by_question(replies), fail_on_call=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(crashing, exs, AgentConfig(batch_size=3), out_path=out)
    first = read_records(out)
    assert 0 < len(first) < 6
    with out.open("a") as f:
        f.write('{"id": "torn')  # a write interrupted by the crash
    model = ScriptedModel(by_question(replies))
    recs = run(model, exs, AgentConfig(batch_size=3), out_path=out)
    lines = read_records(out)
    assert sorted(r["id"] for r in lines) == [str(i) for i in range(6)]  # 0 lost, 0 duplicated
    assert [r["prediction"] for r in recs] == [str(i) for i in range(6)]
    done_first = {r["id"] for r in first}
    asked = {c[1]["content"] for call in model.calls for c in call["conversations"]}
    assert not any(f"question {i}?" in a for i in map(int, done_first) for a in asked)
    assert out.read_text().endswith("\n")
    # a third run does nothing
    idle = ScriptedModel(by_question(replies))
    assert run(idle, exs, out_path=out) == recs and idle.calls == []


def test_read_records_reads_gzipped_files_and_skips_a_torn_line(tmp_path):
    import gzip

    path = tmp_path / "t.jsonl.gz"
    with gzip.open(path, "wb") as f:
        f.write(b'{"id": "1", "q": "caf\xc3\xa9"}\n{"id": "2"}\n{"id": "to')
    assert read_records(path) == [{"id": "1", "q": "café"}, {"id": "2"}]


def test_jsonl_writer_fsyncs_each_record(tmp_path, monkeypatch):
    import os

    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    with JsonlWriter(tmp_path / "x.jsonl") as w:
        w.write({"id": "1", "v": object.__name__})
        w.write({"id": "2"})
    assert len(synced) == 2
    assert [json.loads(x)["id"] for x in (tmp_path / "x.jsonl").read_text().splitlines()] == ["1", "2"]


# ----------------------------------------------------------------------------- filtering and summary


def _rec(score=1.0, parse_errors=0, hit=False, errors=(None,), prediction="x", repeat=False):
    steps = [
        {"code": "print(search('a'))", "error": e, "completion_tokens": 10, "gen_s": 1.0} for e in errors
    ]
    return {
        "id": "r",
        "score": score,
        "parse_errors": parse_errors,
        "hit_step_limit": hit,
        "steps": steps,
        "prediction": prediction,
        "stopped_on_repeat": repeat,
    }


def test_filter_trajectories():
    keep = _rec(errors=("NameError: x", None))  # recovered execution error: kept
    recs = [
        keep,
        _rec(score=0.0),
        _rec(parse_errors=1),
        _rec(hit=True),
        _rec(prediction=None),
        _rec(repeat=True),
        _rec(),
    ]
    assert filter_trajectories(recs) == [keep, recs[-1]]
    assert filter_trajectories(recs, require_correct=False) == [
        keep,
        recs[1],
        recs[-1],
    ]  # the wrong answer too


def test_summarize():
    s = summarize(
        [
            _rec(errors=("E", None)),
            _rec(score=0.0, parse_errors=2, hit=True),
            _rec(repeat=True, score=0.0),
            _rec(score=0.0, errors=()),
        ]
    )
    assert s["accuracy"] == 0.25 and s["parse_error_rate"] == 0.25 and s["step_limit_rate"] == 0.25
    assert s["repeat_stop_rate"] == 0.25
    assert s["mean_steps"] == 1.0 and s["mean_search_calls"] == 1.0
    assert s["exec_error_rate"] == 0.25 and s["tokens_per_s"] == 10.0


# ----------------------------------------------------------------------------- CoT


def test_extract_answer():
    assert extract_answer("so <answer>Paris</answer>. <answer> Lyon </answer>", "factual") == "Lyon"
    assert extract_answer("x = \\boxed{\\frac{1}{2}} and \\boxed{3}", "math") == "3"
    assert extract_answer("nested \\boxed{\\sqrt{x^{2}}}", "math") == "\\sqrt{x^{2}}"
    assert extract_answer("no answer", "factual") is None and extract_answer("\\boxed{1", "math") is None


def test_cot_majority_vote_and_rag(tmp_path):
    outs = ["r1 \\boxed{\\dfrac{1}{2}}", "r2 \\boxed{3}", "r3 \\boxed{\\frac{1}{2}}", "nothing"]
    model = ScriptedModel(lambda conv, prefix, i: outs[i])
    (r,) = run_cot(
        model,
        [Ex("m", "half?", "\\frac{1}{2}", domain="math")],
        n=4,
        temperature=0.7,
        score_fn=lambda p, e: float(p is not None and p.replace("d", "") == e.answer),
        progress=False,
    )
    assert r["prediction"] == "\\dfrac{1}{2}" and r["votes"] == {"\\frac{1}{2}": 2, "3": 1}
    assert r["messages"][-1]["content"] == outs[0] and r["score"] == 1.0 and r["method"] == "cot"
    assert r["cut"] is None  # a session that gets whole answers cannot tell
    assert "boxed" in r["messages"][0]["content"]

    class Retriever:
        def batch_search(self, qs, k=3):
            from agentlib.retrieval import Passage

            return [
                [Passage(id="p1", title="France", text="Paris is the capital of France.", score=1.0)]
                for _ in qs
            ]

    model = ScriptedModel(lambda conv, prefix, i: "It is Paris. <answer>Paris</answer>")
    out = tmp_path / "cot.jsonl"
    (r,) = run_cot(
        model,
        [Ex("f", "Capital of France?", "Paris")],
        rag_retriever=Retriever(),
        out_path=out,
        score_fn=exact_score,
        progress=False,
    )
    user = model.calls[0]["conversations"][0][1]["content"]
    assert "Paris is the capital of France." in user and "Capital of France?" in user
    assert r["method"] == "cot_rag" and r["score"] == 1.0 and read_records(out)[0]["id"] == "f"


def test_passages_are_cut_at_the_configured_length():
    from agentlib.retrieval import Passage

    text = "Paris is the capital of France. " * 40  # 1,280 characters

    class Retriever:
        def search(self, query, k=3):
            return [Passage(id="p1", title="France", text=text, score=1.0)]

        def batch_search(self, qs, k=3):
            return [self.search(q, k) for q in qs]

    model = ScriptedModel(
        by_question(
            {"Capital?": [turn("Search.", "print(search('France'))"), turn("Done.", "final_answer('Paris')")]}
        )
    )
    (r,) = run_agent(
        model,
        [Ex("f", "Capital?", "Paris")],
        AgentConfig(search_chars=100),
        retriever=Retriever(),
        sandbox_factory=lambda tools: SpySandbox(tools),
        score_fn=exact_score,
        progress=False,
    )
    obs = r["messages"][3]["content"]
    assert "Paris is the capital" in obs and 100 <= len(obs) < 300 and r["score"] == 1.0

    model = ScriptedModel(lambda conv, prefix, i: "<answer>Paris</answer>")
    run_cot(
        model,
        [Ex("f", "Capital?", "Paris")],
        rag_retriever=Retriever(),
        passage_chars=100,
        score_fn=exact_score,
        progress=False,
    )
    user = model.calls[0]["conversations"][0][1]["content"]
    assert user.count("Paris is the capital") == 3  # 100 characters: three of the forty sentences


def test_sag_turns_a_failing_sandbox_into_an_error_observation():
    class Broken(SpySandbox):
        def run_candidates(self, codes):
            raise OSError("no more processes")

    sb = Broken({})
    try:
        action = select_action([turn("a", "print(1)"), turn("b", "print(2)")], sb)
        assert sb.commits == 0  # nothing to adopt: the sandbox produced no candidate
        assert action.result.error.startswith("SandboxError: OSError: no more processes")
        assert "Error:\nSandboxError" in observation(action)
        assert [c["outcome"] for c in action.candidates] == ["error", "error"]
    finally:
        sb.close()


def test_sag_vote_key_is_a_switch_between_the_authors_logs_and_ours():
    texts = [turn("a", "final_answer('A')"), turn("b", "final_answer('B')"), turn("c", "final_answer('B')")]
    with SpySandbox({}) as sb:
        authors = select_action(texts, sb, vote_on="logs")  # nothing printed: one group, the first wins
        assert authors.result.final_answer == "A" and [c["votes"] for c in authors.candidates] == [3, 3, 3]
    with SpySandbox({}) as sb:
        ours = select_action(texts, sb, vote_on="logs+answer")  # the answers split the group: B has two
        assert ours.result.final_answer == "B" and [c["votes"] for c in ours.candidates] == [1, 2, 2]


def test_observation_carries_the_last_output_as_smolagents_does():
    with SpySandbox({}) as sb:
        a = select_action([turn("t", "x = 6 * 7\nprint('logs')\nx")], sb)
        assert observation(a) == "Observation:\nExecution logs:\nlogs\nLast output from code snippet:\n42"
        b = select_action([turn("t", "print('only logs')")], sb)
        assert observation(b).endswith("only logs\nLast output from code snippet:\nNone")


def test_the_last_output_line_can_be_left_out_when_it_is_none():
    with SpySandbox({}) as sb:
        printed = select_action([turn("t", "print('logs')")], sb)
        valued = select_action([turn("t", "6 * 7")], sb)
    assert observation(printed, last_output="not_none") == "Observation:\nExecution logs:\nlogs\n"
    assert observation(valued, last_output="not_none").endswith("Last output from code snippet:\n42")
    assert observation(printed).endswith("Last output from code snippet:\nNone")  # the authors' default
    with pytest.raises(ValueError, match="unknown last_output"):
        observation(printed, last_output="sometimes")
    (r,) = run(
        ScriptedModel(
            lambda conv, prefix, i: turn("t", "print(1)") if len(conv) < 3 else turn("d", "final_answer(1)")
        ),
        [Ex("1", "q", "1")],
        AgentConfig(last_output="not_none"),
    )
    assert r["messages"][3]["content"] == "Observation:\nExecution logs:\n1\n"
