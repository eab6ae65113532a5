"""The stage configs derived from a profile (no models run here)."""

from __future__ import annotations

from agentlib import pipeline
from agentlib.profiles import get_profile


def test_one_trajectory_per_llamacpp_slot():
    cpu = get_profile("cpu")  # teacher and student on local llama.cpp servers
    assert cpu.teacher_backend == cpu.student_backend == "llamacpp"
    assert pipeline.teacher_config(cpu).batch_size == cpu.teacher_slots == 1  # one trajectory at a time
    assert pipeline.teacher_config(get_profile("cpu", teacher_slots=4)).batch_size == 4
    assert pipeline.student_config(cpu).batch_size == pipeline.SLOTS
    # a SAG step asks for N samples, each taking a slot
    assert pipeline.student_config(cpu, sag=True).batch_size == max(1, pipeline.SLOTS // cpu.sag_n)
    assert pipeline.student_config(cpu, sag=True, n_samples=1).batch_size == pipeline.SLOTS
    assert pipeline.student_config(cpu, sag=True, n_samples=64).batch_size == 1
    paper = get_profile("paper")  # vLLM batches any number of conversations
    assert pipeline.teacher_config(paper).batch_size == pipeline.student_config(paper, sag=True).batch_size == 16


def test_passage_length_reaches_the_agent():
    for name in ("smoke", "cpu", "paper"):
        p = get_profile(name)
        assert pipeline.teacher_config(p).search_chars == p.passage_chars
        assert pipeline.student_config(p, sag=True).search_chars == p.passage_chars


def test_agent_methods_batch_all_benchmarks(tmp_path):
    from fakes import ScriptedModel, turn

    from agentlib.data import Example

    sets = {"hotpotqa": [Example("0", "Capital?", "Paris")], "math500": [Example("0", "1+1?", "2", domain="math")]}
    model = ScriptedModel(lambda conv, prefix, i: turn("Answer.", "final_answer('Paris')"))
    recs = pipeline.evaluate_method(get_profile("smoke"), "untuned_agent", model, None, sets, tmp_path, progress=False)
    assert [(r["id"], r["benchmark"], r["method"]) for r in recs] == [
        ("hotpotqa/0", "hotpotqa", "untuned_agent"), ("math500/0", "math500", "untuned_agent")]
    assert len(model.calls) == 1 and len(model.calls[0]["conversations"]) == 2  # one batch, both benchmarks
    again = pipeline.evaluate_method(get_profile("smoke"), "untuned_agent", model, None, sets, tmp_path, progress=False)
    assert again == recs and len(model.calls) == 1  # resumed from untuned_agent__all.jsonl


def test_cot_answers_get_the_profiles_cot_budget_for_teacher_and_student(tmp_path, monkeypatch):
    from fakes import ScriptedModel

    from agentlib.data import Example

    assert get_profile("smoke").cot_tokens == 2 * get_profile("smoke").student_max_tokens  # the default
    p = get_profile("smoke", cot_max_tokens=123)
    sets = {"math500": [Example("0", "1+1?", "2", domain="math")]}
    model = ScriptedModel(lambda conv, prefix, i: "1+1 = 2, so \\boxed{2}")
    recs = pipeline.evaluate_method(p, "untuned_cot", model, None, sets, tmp_path, progress=False)
    assert recs[0]["score"] == 1.0 and [c["max_tokens"] for c in model.calls] == [123]

    seen = {}

    def fake_run_cot(model, questions, **kw):
        seen.update(kw)
        raise StopIteration  # the teacher's CoT is the stage's first call; nothing after it matters here

    monkeypatch.setattr(pipeline, "run_cot", fake_run_cot)
    monkeypatch.setattr(pipeline, "training_sets", lambda p: {"factual": [], "math": sets["math500"]})
    try:
        pipeline.teacher_stage(p, model, None, tmp_path / "teacher", progress=False)
    except StopIteration:
        pass
    assert seen["max_tokens"] == 123


def test_teacher_stage_makes_only_the_runs_asked_for(tmp_path, monkeypatch):
    import pytest
    from fakes import ScriptedModel, turn

    from agentlib.data import Example

    p = get_profile("smoke")
    qs = [Example("0", "Capital of France?", "Paris"), Example("1", "Capital of Italy?", "Rome")]
    monkeypatch.setattr(pipeline, "training_sets", lambda p: {"factual": qs, "math": []})
    model = ScriptedModel(lambda conv, prefix, i: turn("I know it.", "final_answer('Paris')"))
    runs = pipeline.teacher_stage(p, model, None, tmp_path, progress=False, runs=("agent",))
    assert list(runs) == ["agent"]
    assert [(r["id"], r["score"]) for r in runs["agent"]] == [("0#s0", 1.0), ("1#s0", 0.0)]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["agent.jsonl"]  # no CoT answers, no prefixes
    assert all(c["prefixes"] == [None] * len(c["conversations"]) for c in model.calls)
    with pytest.raises(ValueError, match="unknown teacher runs"):
        pipeline.teacher_stage(p, model, None, tmp_path, progress=False, runs=("agent", "ftp"))


def test_training_question_ids_are_unique_across_sets():
    # cpu and paper draw MATH training questions from two files that both number rows from 0
    for name in ("cpu", "paper"):
        p = get_profile(name)
        sets = pipeline.training_sets(p)
        ids = [ex.id for exs in sets.values() for ex in exs]
        assert len(ids) == len(set(ids)) == sum(spec[2] for spec in p.train_factual + p.train_math)
    cpu = pipeline.training_sets(get_profile("cpu"))["math"]
    assert [ex.id for ex in cpu] == ["0", "1", "math/0"]  # the first set keeps its ids (published runs resume)
    assert cpu[0].question != cpu[2].question


def test_a_training_spec_with_a_first_row_takes_the_rows_after_it():
    first_ten = pipeline.training_sets(get_profile("cpu", train_factual=(("extra", "hotpotqa_dev300", 10),)))
    p = get_profile("cpu", train_factual=(("extra", "hotpotqa_dev300", 4, 6), ("extra", "hotpotqa_dev300", 2)))
    factual = pipeline.training_sets(p)["factual"]
    assert [ex.id for ex in factual[:4]] == [ex.id for ex in first_ten["factual"][6:]]  # rows 6-9
    assert [ex.id for ex in factual[4:]] == [ex.id for ex in first_ten["factual"][:2]]  # rows 0-1, ids unchanged
    assert len({ex.question for ex in factual}) == 6


def test_results_table_rows_follow_the_papers_method_order():
    from agentlib.data import Example

    sets = {"math500": [Example("0", "q", "1", domain="math")], "hotpotqa": [Example("a", "q", "x"), Example("b", "q", "y")]}
    recs = [{"method": m, "benchmark": b, "score": s, "prediction": "x", "gold": "x"}
            for m in ("zz_custom", "agent_distill", "untuned_cot")
            for b, s in (("hotpotqa", 1.0), ("hotpotqa", 0.0), ("math500", 1.0))]  # fmt: skip
    t = pipeline.results_table(recs, get_profile("smoke"), sets)
    per_bench = t[~t.benchmark.str.endswith("_avg")]
    assert list(per_bench.method) == ["untuned_cot"] * 2 + ["agent_distill"] * 2 + ["zz_custom"] * 2
    assert list(per_bench.benchmark[:2]) == ["math500", "hotpotqa"]  # the profile's benchmark order
    overall = t[t.benchmark == "overall_avg"].set_index("method")
    assert list(overall.index) == ["untuned_cot", "agent_distill", "zz_custom"]
    assert overall.score["agent_distill"] == 75.0 and overall.n["agent_distill"] == 3  # mean of 50 and 100


def test_a_student_without_data_stays_untuned_instead_of_failing(tmp_path, capsys):
    stale = tmp_path / "agent"
    stale.mkdir()
    (stale / "adapter_config.json").write_text("{}")  # an adapter left by an earlier run with data
    results = pipeline.sft_stage(get_profile("smoke"), {"cot": [], "agent": [], "agent_ftp": []}, tmp_path)
    assert all(r.n_examples == 0 and r.losses == [] for r in results.values())
    assert pipeline.adapter_dirs(tmp_path) == {"cot": None, "agent": None, "agent_ftp": None}
    assert not (stale / "adapter_config.json").exists()
    assert "no agent training trajectory survived filtering" in capsys.readouterr().out
    (tmp_path / "cot" / pipeline.UNTRAINED).unlink()  # what training with data does first
    assert pipeline.adapter_dirs(tmp_path)["cot"] == tmp_path / "cot"


def test_answer_seen_counts_span_questions_whose_observations_hold_the_gold():
    def rec(gold, observations, score):
        return {"gold": gold, "score": score, "steps": [{"observation": o} for o in observations]}

    records = [
        rec(["Wichita"], ["Kapaun Mt. Carmel is in Wichita, Kansas."], 0.0),  # seen, answered wrong
        rec(["Las Vegas"], ["nothing here", "Faith Lutheran ... in Las Vegas"], 1.0),  # seen in step 2, right
        rec(["Argand lamp"], ["a lamp patented in 1780"], 0.0),  # never seen
        rec(["no"], ["no such band"], 1.0),  # yes/no: left out
        {"gold": ["Paris"], "score": 1.0, "steps": []},  # no steps (a CoT record): left out
    ]
    out = pipeline.answer_seen(records)
    assert out["n_span"] == 3
    assert out["seen"] == 200 / 3
    assert out["seen_correct"] == 50.0
    assert pipeline.answer_seen(records[3:])["n_span"] == 0
