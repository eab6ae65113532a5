"""The stage configs derived from a profile (no models run here)."""

from __future__ import annotations

from agentlib import pipeline, trajectory
from agentlib.profiles import get_profile


def test_one_trajectory_per_llamacpp_slot():
    # teacher and student on local llama.cpp servers (the cpu profile's pick without native bf16)
    cpu = get_profile("cpu", teacher_backend="llamacpp", student_backend="llamacpp")
    assert pipeline.teacher_backend(cpu) == pipeline.student_backend(cpu) == "llamacpp"
    assert pipeline.teacher_config(cpu).batch_size == cpu.teacher_slots == 1  # one trajectory at a time
    assert (
        pipeline.teacher_config(get_profile("cpu", teacher_slots=4, teacher_backend="llamacpp")).batch_size
        == 4
    )
    # the in-process teacher batches continuously
    assert (
        pipeline.teacher_config(get_profile("cpu", teacher_backend="hf")).batch_size == pipeline.TEACHER_BATCH
    )
    assert pipeline.student_config(cpu).batch_size == pipeline.SLOTS
    # a SAG step asks for N samples, each taking a slot
    assert pipeline.student_config(cpu, sag=True).batch_size == max(1, pipeline.SLOTS // cpu.sag_n)
    assert pipeline.student_config(cpu, sag=True, n_samples=1).batch_size == pipeline.SLOTS
    assert pipeline.student_config(cpu, sag=True, n_samples=64).batch_size == 1
    paper = get_profile("paper")  # vLLM batches any number of conversations
    assert (
        pipeline.teacher_config(paper).batch_size == pipeline.student_config(paper, sag=True).batch_size == 16
    )


def test_passage_length_reaches_the_agent():
    for name in ("smoke", "cpu", "paper"):
        p = get_profile(name)
        assert pipeline.teacher_config(p).search_chars == p.passage_chars
        assert pipeline.student_config(p, sag=True).search_chars == p.passage_chars


def test_agent_methods_batch_all_benchmarks(tmp_path):
    from fakes import ScriptedModel, turn

    from agentlib.data import Example

    sets = {
        "hotpotqa": [Example("0", "Capital?", "Paris")],
        "math500": [Example("0", "1+1?", "2", domain="math")],
    }
    model = ScriptedModel(lambda conv, prefix, i: turn("Answer.", "final_answer('Paris')"))
    recs = pipeline.evaluate_method(
        get_profile("smoke"), "untuned_agent", model, None, sets, tmp_path, progress=False
    )
    assert [(r["id"], r["benchmark"], r["method"]) for r in recs] == [
        ("hotpotqa/0", "hotpotqa", "untuned_agent"),
        ("math500/0", "math500", "untuned_agent"),
    ]
    assert len(model.calls) == 1 and len(model.calls[0]["conversations"]) == 2  # one batch, both benchmarks
    again = pipeline.evaluate_method(
        get_profile("smoke"), "untuned_agent", model, None, sets, tmp_path, progress=False
    )
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

    model.calls.clear()
    monkeypatch.setattr(pipeline, "training_sets", lambda p: {"factual": [], "math": sets["math500"]})
    pipeline.teacher_stage(p, model, None, tmp_path / "teacher", progress=False, runs=("cot",))
    assert [c["max_tokens"] for c in model.calls] == [123]


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


def test_teacher_runs_share_the_batch_when_concurrent_and_give_the_same_records(tmp_path, monkeypatch):
    """In-process (hf) the chunk's runs go together: the first round asks for CoT answers and agent steps at
    once, and the FTP run starts when the greedy CoT answers are in. On llama.cpp one job runs at a time, in the
    order (sample, run). Both give the same records, per run in (sample, question) order."""
    from fakes import ScriptedModel, turn

    from agentlib.data import Example

    qs = [Example("0", "Capital of France?", "Paris"), Example("1", "Capital of Italy?", "Rome")]
    monkeypatch.setattr(pipeline, "training_sets", lambda p: {"factual": qs, "math": []})

    def script(conv, prefix, i):
        if "<answer>" in conv[0]["content"]:  # the CoT prompt
            return "Paris is the capital.\n\n<answer>Paris</answer>"
        return (prefix or "") + turn("I know it.", "final_answer('Paris')")

    def kind(call):
        if "<answer>" in call["conversations"][0][0]["content"]:
            return "cot"
        return "ftp" if any(call["prefixes"]) else "agent"

    out = {}
    for backend in ("hf", "llamacpp"):
        p = get_profile("smoke", teacher_backend=backend, teacher_samples=2, teacher_slots=8)
        model = ScriptedModel(script)
        out[backend] = pipeline.teacher_stage(p, model, None, tmp_path / backend, progress=False)
        out[backend + " calls"] = [kind(c) for c in model.calls]
    assert out["hf calls"][:2] == ["cot", "agent"]  # one round
    assert out["hf calls"].index("ftp") > out["hf calls"].index("cot")
    seq = out["llamacpp calls"]
    assert [k for i, k in enumerate(seq) if i == 0 or k != seq[i - 1]] == ["cot", "agent", "ftp"] * 2
    for run in pipeline.TEACHER_RUNS:
        got = [(r["id"], r["score"], r["prediction"]) for r in out["hf"][run]]
        assert got == [(r["id"], r["score"], r["prediction"]) for r in out["llamacpp"][run]]
        assert got == [("0#s0", 1.0, "Paris"), ("1#s0", 0.0, "Paris"), ("1#s1", 0.0, "Paris")]


def _france_looks_twice(monkeypatch):
    """Two training questions (France, Italy) and a teacher script: every answer is Paris; the plain agent on
    France looks twice before answering, so its trajectory outlasts Italy's."""
    from fakes import turn

    from agentlib.data import Example

    qs = [Example("0", "Capital of France?", "Paris"), Example("1", "Capital of Italy?", "Rome")]
    monkeypatch.setattr(pipeline, "training_sets", lambda p: {"factual": qs, "math": []})

    def script(conv, prefix, i):
        if "<answer>" in conv[0]["content"]:  # the CoT prompt
            return "Paris is the capital.\n\n<answer>Paris</answer>"
        if "France" in conv[1]["content"] and len(conv) < 6:  # two steps of looking first
            return (prefix or "") + turn(f"Look {len(conv)}.", f"print({len(conv)})")
        return (prefix or "") + turn("I know it.", "final_answer('Paris')")

    return script


def test_a_question_moves_on_to_its_retry_while_the_others_still_run(tmp_path, monkeypatch):
    """In-process, a run's next sample takes a question as soon as the last one failed on it, not once the
    whole sample is done: question 1 fails at its first step and its retry decodes while question 0's greedy
    trajectory is still going. The records are those of the one-job-at-a-time order."""
    from fakes import ScriptedModel

    script = _france_looks_twice(monkeypatch)

    def asks(call, question, greedy):
        return (call["temperature"] == 0) == greedy and any(
            question in c[1]["content"] and "<answer>" not in c[0]["content"] and not p_
            for c, p_ in zip(call["conversations"], call["prefixes"], strict=True)
        )

    out = {}
    for backend in ("hf", "llamacpp"):
        p = get_profile(
            "smoke",
            teacher_backend=backend,
            teacher_samples=2,
            teacher_slots=8,
            teacher_temperature=0.7,
            max_steps=4,
        )
        model = ScriptedModel(script)
        out[backend] = pipeline.teacher_stage(
            p, model, None, tmp_path / backend, progress=False, runs=("agent",)
        )
        calls = model.calls
        retry = min(i for i, c in enumerate(calls) if asks(c, "Italy", greedy=False))
        last_greedy = max(i for i, c in enumerate(calls) if asks(c, "France", greedy=True))
        out[backend + " retry first"] = retry < last_greedy
    assert out["hf retry first"] and not out["llamacpp retry first"]
    got = [(r["id"], r["score"], len(r["steps"])) for r in out["hf"]["agent"]]
    assert got == [(r["id"], r["score"], len(r["steps"])) for r in out["llamacpp"]["agent"]]
    assert got == [("0#s0", 1.0, 3), ("1#s0", 0.0, 1), ("1#s1", 0.0, 1)]


def test_the_next_chunk_starts_while_the_last_ones_long_trajectories_finish(tmp_path, monkeypatch):
    """In-process, chunk 2 starts once chunk 1 leaves room in the batch, not once chunk 1 is done; chunks are
    still reported (published) in order, each with the records of the one-chunk-at-a-time order."""
    from fakes import ScriptedModel

    script = _france_looks_twice(monkeypatch)

    def asks(call, question):
        return any(question in c[1]["content"] for c in call["conversations"])

    out = {}
    for backend in ("hf", "llamacpp"):
        p = get_profile("smoke", teacher_backend=backend, teacher_chunk=1, teacher_slots=8, max_steps=4)
        model, told = ScriptedModel(script), []

        def on_chunk(i, n, recs, told=told):
            told.append((i, n, {k: len(v) for k, v in recs.items()}))

        out[backend] = pipeline.teacher_stage(
            p, model, None, tmp_path / backend, progress=False, on_chunk=on_chunk
        )
        calls = model.calls
        first_italy = min(i for i, c in enumerate(calls) if asks(c, "Italy"))
        last_france = max(i for i, c in enumerate(calls) if asks(c, "France"))
        out[backend + " overlap"] = first_italy < last_france
        out[backend + " told"] = told
    assert out["hf overlap"] and not out["llamacpp overlap"]
    assert (
        out["hf told"]
        == out["llamacpp told"]
        == [(1, 2, dict.fromkeys(out["hf"], 1)), (2, 2, dict.fromkeys(out["hf"], 2))]
    )
    for run in pipeline.TEACHER_RUNS:
        got = [(r["id"], r["score"], len(r["steps"])) for r in out["hf"][run]]
        assert got == [(r["id"], r["score"], len(r["steps"])) for r in out["llamacpp"][run]]
    assert [len(r["steps"]) for r in out["hf"]["agent"]] == [3, 1]


def test_an_ftp_trajectory_starts_from_the_first_paragraph_of_a_cot_answer_still_decoding(
    tmp_path, monkeypatch
):
    """In-process, a question's FTP trajectory starts once its greedy CoT answer has its first paragraph (the
    prefix), not once the whole answer is out; its prefix is the one the finished answer gives."""
    from fakes import StreamingModel, turn

    from agentlib.agent import ftp_prefix
    from agentlib.data import Example

    qs = [Example("0", "Capital of France?", "Paris")]
    monkeypatch.setattr(pipeline, "training_sets", lambda p: {"factual": qs, "math": []})
    long_cot = (
        "France's capital is Paris.\n\n" + "It has been so for a long time. " * 20 + "<answer>Paris</answer>"
    )

    def script(conv, prefix, i):
        if "<answer>" in conv[0]["content"]:  # the CoT prompt
            return long_cot
        if not prefix and len(conv) < 6:  # the plain agent looks twice first, ~20 words a step
            return turn(
                f"Look {len(conv)}. " + "Let me think about it some more. " * 3, f"print({len(conv)})"
            )
        return (prefix or "") + turn("I know it.", "final_answer('Paris')")

    p = get_profile("smoke", teacher_backend="hf", max_steps=4)
    model = StreamingModel(script)
    told = []
    out = pipeline.teacher_stage(
        p, model, None, tmp_path, progress=False, on_chunk=lambda i, n, recs: told.append(i)
    )
    ftp_call = next(i for i, c in enumerate(model.calls) if any(c["prefixes"]))
    # cot, agent step 1, then the FTP step 4 words into the CoT answer: before the agent's step 2, which
    # comes ~20 words in, and long before the CoT's ~150 words are out
    assert ftp_call == 2 and len(model.calls) == 5
    (ftp,) = out["agent_ftp"]
    assert (
        ftp["prefix"]
        == ftp_prefix(out["cot"][0]["messages"][-1]["content"])
        == ("Thought: France's capital is Paris.\n\n")
    )
    assert ftp["score"] == 1.0 and told == [1]


def test_training_question_ids_are_unique_across_sets():
    # cpu and paper draw MATH training questions from two files that both number rows from 0
    for name in ("cpu", "paper"):
        p = get_profile(name)
        sets = pipeline.training_sets(p)
        ids = [ex.id for exs in sets.values() for ex in exs]
        assert len(ids) == len(set(ids)) == sum(spec[2] for spec in p.train_factual + p.train_math)
    cpu = pipeline.training_sets(get_profile("cpu"))["math"]
    assert [ex.id for ex in cpu][199:202] == ["199", "math/0", "math/1"]  # the first set keeps its ids
    assert cpu[0].question != cpu[200].question


def test_a_training_spec_with_a_first_row_takes_the_rows_after_it():
    first_ten = pipeline.training_sets(get_profile("cpu", train_factual=(("extra", "hotpotqa_dev300", 10),)))
    p = get_profile(
        "cpu", train_factual=(("extra", "hotpotqa_dev300", 4, 6), ("extra", "hotpotqa_dev300", 2))
    )
    factual = pipeline.training_sets(p)["factual"]
    assert [ex.id for ex in factual[:4]] == [ex.id for ex in first_ten["factual"][6:]]  # rows 6-9
    assert [ex.id for ex in factual[4:]] == [
        ex.id for ex in first_ten["factual"][:2]
    ]  # rows 0-1, ids unchanged
    assert len({ex.question for ex in factual}) == 6


def test_results_table_rows_follow_the_papers_method_order():
    from agentlib.data import Example

    sets = {
        "math500": [Example("0", "q", "1", domain="math")],
        "hotpotqa": [Example("a", "q", "x"), Example("b", "q", "y")],
    }
    recs = [
        {"method": m, "benchmark": b, "score": s, "prediction": "x", "gold": "x"}
        for m in ("zz_custom", "agent_distill", "untuned_cot")
        for b, s in (("hotpotqa", 1.0), ("hotpotqa", 0.0), ("math500", 1.0))
    ]
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


def _teacher_fixture(monkeypatch):
    """Three factual questions and a scripted teacher: France solved at once; Italy's CoT only on its second
    sample and its agent never; Spain's agent at once. CoT answers open with a one-paragraph first thought."""
    from fakes import ScriptedModel, turn

    from agentlib.data import Example

    qs = [
        Example("0", "Capital of France?", "Paris"),
        Example("1", "Capital of Italy?", "Rome"),
        Example("2", "Capital of Spain?", "Madrid"),
    ]
    monkeypatch.setattr(pipeline, "training_sets", lambda p: {"factual": qs, "math": []})
    cot_asked: dict[str, int] = {}
    answers = {"France": "Paris", "Italy": "Milan", "Spain": "Madrid"}

    def script(conv, prefix, i):
        country = next(c for c in answers if c in conv[1]["content"])
        if "final_answer" not in conv[0]["content"]:  # a CoT request
            cot_asked[country] = cot_asked.get(country, 0) + 1
            answer = "Rome" if country == "Italy" and cot_asked[country] > 1 else answers[country]
            return f"The capital of {country} is a city.\nI recall it.\n\nSo it is {answer}.\n<answer>{answer}</answer>"
        return (prefix or "") + turn("I know it.", f"final_answer('{answers[country]}')")

    return qs, ScriptedModel(script)


def test_teacher_stage_builds_ftp_from_the_cot_run_and_resamples_only_unsolved_questions(
    tmp_path, monkeypatch
):
    qs, model = _teacher_fixture(monkeypatch)
    p = get_profile("smoke", teacher_samples=3, teacher_chunk=2)
    chunks = []
    runs = pipeline.teacher_stage(
        p,
        model,
        None,
        tmp_path,
        progress=False,
        on_chunk=lambda done, total, out: chunks.append((done, total, len(out["agent"]))),
    )
    assert chunks == [
        (1, 2, 1),
        (2, 2, 5),
    ]  # France alone, then Italy and Spain; progress published per chunk
    assert [r["id"] for r in runs["cot"]] == [
        "0#s0",
        "1#s0",
        "2#s0",
        "1#s1",
    ]  # Italy's CoT solved by sample 1
    assert [r["id"] for r in runs["agent"]] == [
        "0#s0",
        "1#s0",
        "2#s0",
        "1#s1",
        "1#s2",
    ]  # never solved: 3 samples
    sampled = [c["temperature"] for c in model.calls]
    assert sampled[0] == 0.0 and p.teacher_temperature in sampled  # sample 0 greedy, the others sampled
    # FTP: "Thought: " + the first paragraph of the same question's greedy CoT answer + a blank line
    for r in runs["agent_ftp"]:
        cot = next(c for c in runs["cot"] if c["id"] == pipeline.base_id(r["id"]) + "#s0")
        first = cot["messages"][-1]["content"].split("\n\n")[0]
        assert r["prefix"] == f"Thought: {first}\n\n"
        assert r["messages"][2]["content"].startswith(f"Thought: {first}\n\nThought: I know it.")
    calls = len(model.calls)
    again = pipeline.teacher_stage(
        p, model, None, tmp_path, progress=False
    )  # resumed: nothing is asked again
    assert len(model.calls) == calls and again == runs


def test_published_teacher_set_round_trips_and_is_checked(tmp_path, monkeypatch):
    import gzip
    import json

    import pytest

    qs, model = _teacher_fixture(monkeypatch)
    p = get_profile("smoke", teacher_samples=2)
    runs = pipeline.teacher_stage(p, model, None, tmp_path / "teacher", progress=False)
    dest = trajectory.publish_teacher(p, runs, dest=tmp_path / "t.jsonl.gz", backend="hf")
    manifest = json.loads((tmp_path / "t.manifest.json").read_text())
    assert (
        manifest["backend"] == "hf" and manifest["ftp_source"] == "cot" and manifest["teacher_samples"] == 2
    )
    assert manifest["questions"]["agent_ftp"] == {"factual": 3, "math": 0}
    loaded = trajectory.load_published(p, dest)
    assert {
        k: [{x: r[x] for x in r if x not in ("run", "domain", "backend")} for r in v]
        for k, v in loaded.items()
    } == runs
    # published again by another backend with one more record: the earlier records keep the backend that made them
    more = {**runs, "agent": [*runs["agent"], {**runs["agent"][0], "id": "extra#s0"}]}
    trajectory.publish_teacher(p, more, dest=tmp_path / "t2.jsonl.gz", backend="hf")
    dest2 = trajectory.publish_teacher(p, more, dest=tmp_path / "t2.jsonl.gz", backend="llamacpp")
    again = trajectory.read_published(dest2)
    assert {r["backend"] for r in again["agent"]} == {"hf"}  # all were published by hf first
    (tmp_path / "t2.jsonl.gz").unlink()
    trajectory.publish_teacher(p, runs, dest=tmp_path / "t2.jsonl.gz", backend="hf")
    trajectory.publish_teacher(p, more, dest=tmp_path / "t2.jsonl.gz", backend="llamacpp")
    again = trajectory.read_published(tmp_path / "t2.jsonl.gz")
    assert [r["backend"] for r in again["agent"]] == ["hf"] * len(runs["agent"]) + ["llamacpp"]
    n = sum(len(v) for v in runs.values())
    assert json.loads((tmp_path / "t2.manifest.json").read_text())["backends"] == {"hf": n, "llamacpp": 1}
    assert {r["domain"] for v in loaded.values() for r in v} == {"factual"}
    # the SFT datasets are the same as the generating run's
    a = pipeline.sft_datasets(runs, tmp_path / "teacher")
    b = pipeline.sft_datasets(loaded, tmp_path)
    assert {k: [r["id"] for r in v] for k, v in a.items()} == {k: [r["id"] for r in v] for k, v in b.items()}
    with pytest.raises(trajectory.PublishedMismatch, match="top_k: published 2, profile 5"):
        trajectory.load_published(get_profile("smoke", teacher_samples=2, top_k=5), dest)
    with gzip.open(dest, "ab") as f:
        f.write(b'{"id": "forged", "run": "agent"}\n')
    with pytest.raises(trajectory.PublishedMismatch, match="sha256"):
        trajectory.load_published(p, dest)


def test_the_paper_profile_has_table_2s_four_students_a_4096_token_cot_and_a_judge(tmp_path):
    paper, cpu = get_profile("paper"), get_profile("cpu")
    assert [s.split("-")[1] for s in paper.student_models] == ["0.5B", "1.5B", "3B", "7B"]
    assert paper.cot_tokens == 4096 and paper.judge == ("https://api.openai.com/v1", "gpt-4o-mini")
    assert paper.sag_vote == "logs" and paper.ftp_source == "cot"  # the authors' choices
    assert cpu.student_models == ["qwen2.5-coder-0.5b"] and cpu.judge is None
    assert pipeline.student_dir(cpu, None, tmp_path) == tmp_path  # one student: the folder as before
    assert (
        pipeline.student_dir(paper, "Qwen/Qwen2.5-7B-Instruct", tmp_path) == tmp_path / "Qwen2.5-7B-Instruct"
    )
    assert set(paper.models) >= set(paper.student_models) | {paper.teacher}


def test_the_departures_page_is_the_profiles_table():
    from agentlib.paths import ROOT
    from agentlib.profiles import departures_markdown

    assert (ROOT / "docs" / "departures.md").read_text() == departures_markdown()


def test_a_generation_resumes_from_the_published_set_in_a_fresh_checkout(tmp_path, monkeypatch):
    qs, model = _teacher_fixture(monkeypatch)
    p = get_profile("smoke", teacher_samples=2)
    runs = pipeline.teacher_stage(p, model, None, tmp_path / "old", progress=False)
    dest = trajectory.publish_teacher(p, runs, dest=tmp_path / "t.jsonl.gz")
    monkeypatch.setattr(trajectory, "published_path", lambda p: dest)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert trajectory.seed_from_published(p, fresh) == sum(map(len, runs.values()))
    calls = len(model.calls)
    resumed = pipeline.teacher_stage(p, model, None, fresh, progress=False)  # nothing left to generate
    assert {k: [r.pop("backend") for r in v] for k, v in resumed.items()} == {
        k: [p.teacher_backend] * len(v) for k, v in runs.items()
    }  # a resumed record keeps the backend that made it
    assert resumed == runs
    assert len(model.calls) == calls
    assert trajectory.seed_from_published(p, fresh) == 0  # idempotent
    assert (
        trajectory.seed_from_published(get_profile("smoke", top_k=9), tmp_path / "other") == 0
    )  # other settings


def test_cpu_full_scores_every_benchmark_at_full_n_from_the_cpu_teacher_set():
    from agentlib.trajectory import published_path, teacher_settings

    full, cpu = get_profile("cpu-full"), get_profile("cpu")
    n = {name: count for _, name, count in full.eval_sets}
    assert n["hotpotqa"] + n["musique_train100"] >= 300 and n["math500"] + n["gsm_hard"] >= 200
    assert {"aime", "olymath"} <= set(n) and full.sag_sweep == (1, 2, 4, 8) and full.k_sweep == (1, 3, 5)
    assert published_path(full) == published_path(cpu)
    assert teacher_settings(full) == teacher_settings(cpu)
