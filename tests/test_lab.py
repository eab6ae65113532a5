"""Course lab: checks discriminate (naive solutions fail, references pass), errors show the student's line only,
the committed lab notebook is the generated one, and the notebook runs under papermill with stubs and references."""

from __future__ import annotations

import re
import string
from collections import Counter

import pytest

from agentlib import lab
from agentlib.paths import ROOT

CHECK_CELLS = [f"{name}-check" for name in lab.LAB_ORDER]


# ------------------------------------------------------------------ naive (wrong) solutions a student might write
def naive_normalize(s):
    return s.lower().strip()


def naive_normalize_spaces(s):  # punctuation replaced by spaces: "U.S.A." -> "u s a"
    s = re.sub(r"[^\w\s]", " ", s.lower())
    return " ".join(w for w in s.split() if w not in ("a", "an", "the"))


def naive_f1(pred, gold):  # sets instead of multisets, no yes/no rule
    p, g = (
        set(lab.reference("normalize_answer")(pred).split()),
        set(lab.reference("normalize_answer")(gold).split()),
    )
    same = len(p & g)
    if same == 0:
        return 0.0
    prec, rec = same / len(p), same / len(g)
    return 2 * prec * rec / (prec + rec)


def naive_f1_sets(pred, gold):  # the yes/no rule, but sets instead of multisets
    norm = lab.reference("normalize_answer")
    if {norm(pred), norm(gold)} & {"yes", "no", "noanswer"} and norm(pred) != norm(gold):
        return 0.0
    return naive_f1(pred, gold)


def naive_parse(text):
    m = re.search(r"```py\n(.*?)```", text, re.DOTALL)
    if not m:
        raise ValueError("no code")
    return text[: m.start()].replace("Thought:", "").replace("Code:", "").strip(), m.group(1)


def naive_ftp(cot):  # forgets the blank line after the paragraph and does not drop leading whitespace
    return "Thought: " + cot.split("\n\n")[0]


def naive_vote(outcomes):  # counts the failures (None) as a group
    if not outcomes or all(o is None for o in outcomes):
        return None
    winner = Counter(outcomes).most_common(1)[0][0]
    return outcomes.index(winner)


def naive_keep(record):  # drops trajectories with recovered execution errors too
    return (
        record["prediction"] is not None
        and record["score"] == 1
        and record["parse_errors"] == 0
        and not record["hit_step_limit"]
        and all(s["error"] is None for s in record["steps"])
    )


def naive_labels(input_ids, offsets, spans, roles):  # the assistant content only: no end-of-turn marker
    labels = [-100] * len(input_ids)
    for role, (start, end, _) in zip(roles, spans, strict=True):
        for j, (a, b) in enumerate(offsets):
            if role == "assistant" and start <= a < end and b > a:
                labels[j] = input_ids[j]
    return labels


# ------------------------------------------------------------------ subtle mutants: right on the easy cases
def vote_ties_by_value(
    outcomes,
):  # the largest group, ties to the smallest outcome (sorted), not the first index
    groups = {}
    for i, o in enumerate(outcomes):
        if o is not None:
            groups.setdefault(o, []).append(i)
    if not groups:
        return None
    return groups[max(sorted(groups), key=lambda k: len(groups[k]))][0]


def vote_ties_by_last_value(outcomes):  # ties to the largest outcome
    groups = {}
    for i, o in enumerate(outcomes):
        if o is not None:
            groups.setdefault(o, []).append(i)
    return groups[max(groups, key=lambda k: (len(groups[k]), k))][0] if groups else None


def normalize_not_whole_word(s):  # "(a|an|the) ": also strips the end of "Santa ", "Goethe "
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"(a|an|the)\s", " ", s).split())


def parse_ignoring_end_code(text):  # the first fenced block wherever it is; an open fence runs to the end
    m = re.search(r"```(?:py|python)?\n(.*?)(?:```|\Z)", text, re.DOTALL)
    if not m or not m.group(1).strip():
        raise ValueError("no code")
    thought = re.sub(r"^\s*Thought:\s*", "", text[: m.start()]).replace("Code:", "").strip()
    return thought, m.group(1).strip()


WRONG = {  # exercise: (subtle wrong solutions, right on all but a case or two; naive ones)
    "vote": ([vote_ties_by_value, vote_ties_by_last_value], [naive_vote]),
    "normalize_answer": ([normalize_not_whole_word], [naive_normalize, naive_normalize_spaces]),
    "parse_step": ([parse_ignoring_end_code], [naive_parse]),
    "f1": ([], [naive_f1, naive_f1_sets]),
    "first_thought_prefix": ([], [naive_ftp]),
    "keep": ([], [naive_keep]),
    "assistant_labels": ([], [naive_labels]),
}
MUTANTS = [(name, fn) for name, (subtle, _) in WRONG.items() for fn in subtle]
NAIVE = [(name, fn) for name, (_, naive) in WRONG.items() for fn in naive]


@pytest.mark.parametrize(("name", "fn"), MUTANTS, ids=[f"{n}-{f.__name__}" for n, f in MUTANTS])
def test_subtle_mutants_are_rejected(name, fn, capsys):
    cases = lab.EXERCISES[name].cases()
    passed = sum(
        lab._safe(lab.EXERCISES[name].compare, lab._expect(fn, *c.args), c.want)
        or (isinstance(c.want, Exception) and isinstance(lab._expect(fn, *c.args), ValueError))
        for c in cases
    )
    assert passed >= len(cases) - 2, f"{fn.__name__} should be right on most cases ({passed}/{len(cases)})"
    assert lab.check(name, fn) is False
    assert "not yet — hidden case" in capsys.readouterr().out
    assert lab.check(name, lab.reference(name)) is True


def test_mutants_fail_on_the_cases_made_for_them(capsys):
    lab.check("vote", vote_ties_by_value)
    assert "the first group wins" in capsys.readouterr().out
    lab.check("normalize_answer", normalize_not_whole_word)
    assert "only whole words are articles" in capsys.readouterr().out
    lab.check("parse_step", parse_ignoring_end_code)
    assert "<end_code>" in capsys.readouterr().out


@pytest.mark.parametrize(("name", "fn"), NAIVE, ids=[f"{n}-{f.__name__}" for n, f in NAIVE])
def test_naive_solutions_fail_with_the_first_failing_case(name, fn, capsys):
    assert lab.check(name, fn) is False
    out = capsys.readouterr().out
    assert out.startswith(f"❌ {lab.EXERCISES[name].title}: not yet — hidden case ")
    assert "input:" in out and "expected:" in out and "this case:" in out
    assert "Traceback" not in out


@pytest.mark.parametrize("name", lab.LAB_ORDER)
def test_reference_passes_and_stub_is_not_yet(name, capsys):
    n = len(lab.EXERCISES[name].cases())
    assert lab.check(name, lab.reference(name)) is True
    assert (
        capsys.readouterr().out.strip()
        == f"✅ {lab.EXERCISES[name].title}: correct — all {n} hidden cases pass."
    )

    def stub(*args):
        raise NotImplementedError

    assert lab.check(name, stub) is False
    assert "not yet — stub is still a stub." in capsys.readouterr().out


def test_wrong_answer_names_input_expected_and_got(capsys):
    assert lab.check("vote", naive_vote) is False
    out = capsys.readouterr().out
    assert "hidden case 3/" in out  # ["x", None, None]: the first case the naive vote gets wrong
    assert "input:    ['x', None, None]" in out
    assert "expected: 0" in out and "got:      1" in out
    assert "several failures do not form a group" in out


def test_mask_mistake_is_explained_in_words(capsys):
    assert lab.check("assistant_labels", naive_labels) is False
    out = capsys.readouterr().out
    assert "input:    a chat of 5 messages (system, user, assistant, user, assistant)" in out
    assert "it should be trained (its id), yours is masked (-100)" in out
    assert "lies after the content of message 2 (assistant)" in out  # the end-of-turn marker
    window = out.split("around it:\n", 1)[1].splitlines()
    assert "expected" in window[0] and "yours" in window[0]
    first = [row for row in window if row.lstrip().startswith("→")]
    assert len(first) == 1 and first[0].split()[-2:] == ["trained", "masked"]
    assert 5 <= len(window) <= 10  # a few tokens either side, not the whole chat


def test_more_mask_chats():
    cases = lab.EXERCISES["assistant_labels"].cases()
    assert len(cases) >= 4
    roles = [c.args[3] for c in cases]
    assert max(r.count("assistant") for r in roles) >= 3  # several assistant turns after error observations
    assert any(r[0] != "system" for r in roles)  # the template's own system prompt


def test_check_cells_do_not_echo_the_boolean():
    import nbformat

    nb = nbformat.reads(lab.notebook_text(), as_version=4)
    checks = [c.source for c in nb.cells if c.get("id", "").endswith("-check")]
    assert checks and all(src.rstrip().endswith(";") for src in checks)


def test_raising_solution_shows_only_the_students_line(capsys):
    def f1(pred, gold):
        p = pred.split()
        ratio = len(p) / (len(gold.split()) - 2)  # the student's bug: ZeroDivisionError on case 1
        return ratio

    assert lab.check("f1", f1) is False
    out = capsys.readouterr().out
    assert "hidden case 1/" in out and "raised:   ZeroDivisionError: division by zero" in out
    assert "at line" in out and "of f1: ratio = len(p) / (len(gold.split()) - 2)" in out
    assert "Traceback" not in out and "agentlib" not in out


def test_error_inside_library_call_shows_the_students_line_not_agentlib(capsys):
    from agentlib.metrics import normalize_answer

    def student_normalize(s):
        return normalize_answer(None)  # raises AttributeError inside agentlib.metrics

    assert lab.check("normalize_answer", student_normalize) is False
    out = capsys.readouterr().out
    assert "raised:   AttributeError" in out
    assert "of student_normalize: return normalize_answer(None)" in out
    assert "metrics.py" not in out and "s.lower()" not in out  # agentlib's own line is never shown


def test_parse_step_must_raise_where_there_is_no_code(capsys):
    def never_raises(text):
        try:
            return lab.reference("parse_step")(text)
        except ValueError:
            return "", ""

    assert lab.check("parse_step", never_raises) is False
    out = capsys.readouterr().out
    assert "hidden case 4/" in out and "expected: a ValueError" in out and "got:      ('', '')" in out


def test_mutating_the_input_cannot_corrupt_a_case(capsys):
    def clears(outcomes):
        ref = lab.reference("vote")(list(outcomes))
        outcomes.clear()
        return ref

    assert lab.check("vote", clears) is True
    assert lab.check("vote", lab.reference("vote")) is True


def test_odd_return_values_are_wrong_answers_not_crashes(capsys):
    assert lab.check("assistant_labels", lambda *a: [None] * len(a[0])) is False
    assert lab.check("f1", lambda p, g: "1.0") is False
    assert lab.check("nope", lambda: 0) is False
    out = capsys.readouterr().out
    assert out.count("not yet") == 2 and "no exercise 'nope'" in out


@pytest.mark.parametrize("name", lab.LAB_ORDER)
def test_reveal_prints_the_library_source(name, capsys):
    lab.reveal(name)
    out = capsys.readouterr().out
    assert out.startswith("# agentlib.") and "\ndef " in out


def test_committed_lab_notebook_is_the_generated_one():
    committed = (ROOT / lab.LAB_PATH).read_text(encoding="utf-8")
    assert committed == lab.notebook_text(), "stale lab notebook: run `python -m agentlib.lab build`"


def test_lab_quotes_the_main_notebooks():
    text = lab.notebook_text()
    for name in lab.LAB_ORDER:
        for nb_name, openings in lab.EXERCISES[name].context:
            assert lab.shared_text(nb_name, openings).splitlines()[0] in text
    with pytest.raises(LookupError, match="no paragraph starting with"):
        lab.shared_text("01_teacher_trajectories.ipynb", ("A paragraph that is not there",))


def test_generated_notebook_is_commit_ready():
    import nbformat

    nb = nbformat.reads(lab.notebook_text(), as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "agentlib"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    assert [c.id for c in code if c.id.endswith("-check")] == CHECK_CELLS


def test_published_trajectories_falls_back_to_something_usable(capsys):
    records = lab.published_trajectories("no-such-profile", "no-such-profile")
    assert records and all("messages" in r for r in records)
    out = capsys.readouterr().out
    assert "runs/smoke/teacher" in out or "built-in example" in out
    kept = lab.filter_with([lab.EXAMPLE_TRAJECTORY], lab.reference("keep"))
    assert kept == [lab.EXAMPLE_TRAJECTORY]


def test_published_file_first_then_the_built_in_example(tmp_path, monkeypatch, capsys):
    import gzip
    import json

    import agentlib.paths

    monkeypatch.setattr(agentlib.paths, "ROOT", tmp_path)
    monkeypatch.delenv("AGENTLIB_RUNS_DIR", raising=False)
    assert lab.published_trajectories("published", "cpu") == [lab.EXAMPLE_TRAJECTORY]
    assert "built-in example" in capsys.readouterr().out
    (tmp_path / "data").mkdir()
    rec = {**lab.EXAMPLE_TRAJECTORY, "id": "published-1"}
    with gzip.open(tmp_path / "data" / "teacher_trajectories_cpu.jsonl.gz", "wt") as f:
        f.write(json.dumps(rec) + "\n")
    assert lab.published_trajectories("published", "cpu") == [rec]
    assert "data/teacher_trajectories_cpu.jsonl.gz (1 records)" in capsys.readouterr().out


def test_a_teacher_run_under_agentlib_runs_dir_is_found(tmp_path, monkeypatch, capsys):
    import json

    monkeypatch.setenv("AGENTLIB_RUNS_DIR", str(tmp_path / "runs"))
    folder = tmp_path / "runs" / "myprofile" / "teacher"
    folder.mkdir(parents=True)
    rec = {**lab.EXAMPLE_TRAJECTORY, "id": "from-runs-dir"}
    (folder / "agent.jsonl").write_text(json.dumps(rec) + "\n")
    assert lab.published_trajectories("myprofile", "myprofile") == [rec]
    assert f"using the teacher run in {folder} (1 records)" in capsys.readouterr().out


def test_compare_parsers_counts_agreement(capsys):
    same, n = lab.compare_parsers([lab.EXAMPLE_TRAJECTORY], lab.reference("parse_step"))
    assert (same, n) == (2, 2)
    same, n = lab.compare_parsers([lab.EXAMPLE_TRAJECTORY], lambda t: ("", ""))
    assert (same, n) == (0, 2)
    assert "first disagreement" in capsys.readouterr().out


# ------------------------------------------------------------------ the notebook under papermill
def _run_lab(tmp_path, **params):
    import nbformat
    import papermill

    out = tmp_path / "lab_out.ipynb"
    papermill.execute_notebook(
        str(ROOT / lab.LAB_PATH),
        str(out),
        parameters=params,
        kernel_name="agentlib",
        cwd=str(ROOT / "notebooks" / "labs"),
        progress_bar=False,
    )
    nb = nbformat.read(str(out), as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors[:1]
    return nb


def _stdout(nb, cell_id):
    cell = next(c for c in nb.cells if c.get("id") == cell_id)
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


@pytest.mark.slow
def test_lab_notebook_with_stubs_reports_not_yet_everywhere(tmp_path):
    nb = _run_lab(tmp_path)
    for cell_id in CHECK_CELLS:
        out = _stdout(nb, cell_id)
        assert out.startswith("⏳ ") and "not yet" in out and "still a stub" in out, (cell_id, out)
    assert "trajectories kept" in _stdout(nb, "together-load")
    assert "parse_step is still a stub" in _stdout(nb, "together-parse")
    mask = next(c for c in nb.cells if c.get("id") == "together-mask")
    assert "still a stub" in _stdout(nb, "together-mask")
    assert any("tokens trained" in o.get("data", {}).get("text/html", "") for o in mask.outputs)


@pytest.mark.slow
def test_lab_notebook_with_the_references_passes_every_check(tmp_path):
    nb = _run_lab(tmp_path, use_reference=True)
    for name, cell_id in zip(lab.LAB_ORDER, CHECK_CELLS, strict=True):
        out = _stdout(nb, cell_id)
        assert out.startswith(f"✅ {lab.EXERCISES[name].title}: correct — all "), (cell_id, out)
    m = re.search(r"agrees with the library on (\d+) of (\d+) teacher turns", _stdout(nb, "together-parse"))
    assert m and m.group(1) == m.group(2) and int(m.group(2)) > 0
    assert "stub" not in _stdout(nb, "together-mask") and "differs" not in _stdout(nb, "together-mask")
