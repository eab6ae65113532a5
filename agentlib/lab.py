"""Course-lab mode: the student writes the paper's key mechanisms, ``check`` runs them on hidden cases.

Each exercise's reference solution *is* the agentlib function the pipeline runs, and the lab notebook
(``notebooks/labs/lab_mechanisms.ipynb``) is generated from this module and from the main notebooks'
own prose (``python -m agentlib.lab build``), so the lab and the library never drift.

``check(name, fn)`` prints one verdict: ✅ when every hidden case passes; otherwise "not yet" with the
first failing case (its input, what it tests, expected vs got). It never shows a traceback from inside
agentlib: when the student's function raises, only the student's own lines are shown.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
import sys
import sysconfig
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentlib.sft import IGNORE

__all__ = [
    "Case",
    "Exercise",
    "EXERCISES",
    "check",
    "reference",
    "reveal",
    "LAB_ORDER",
    "LAB_PATH",
    "KERNELSPEC",
    "shared_text",
    "build_notebook",
    "notebook_text",
    "write_notebook",
    "EXAMPLE_TRAJECTORY",
    "published_trajectories",
    "filter_with",
    "compare_parsers",
    "show_training_example",
]

_PACKAGE = Path(__file__).resolve().parent.as_posix() + "/"


@dataclass
class Case:
    """One hidden case: the arguments, the reference's answer, what it tests, and how to show the input."""

    args: tuple
    want: Any
    why: str = ""
    show: str = ""  # replaces repr(args) in messages (e.g. for token-id lists)
    context: dict = field(default_factory=dict)


@dataclass
class Exercise:
    name: str
    title: str
    minutes: int
    reference: Callable[..., Any]  # the agentlib implementation behind a stub-shaped signature
    cases: Callable[[], list[Case]]
    stub: str  # the code cell the student starts from
    goal: str
    reveal: Callable[[], list[Callable]]  # the agentlib functions whose source ``reveal`` prints
    context: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (main notebook, paragraph openings) to quote
    compare: Callable[[Any, Any], bool] = lambda got, want: got == want
    explain: Callable[[Case, Any], str] | None = None  # extra words on a wrong answer


# ------------------------------------------------------------------ references (the library, stub-shaped)
def _parse_step_ref(text: str) -> tuple[str, str]:
    from agentlib.agent import parse_step

    step = parse_step(text)
    return step.thought, step.code


def _ftp_ref(cot_text: str) -> str:
    from agentlib.agent import ftp_prefix

    return ftp_prefix(cot_text)


def _vote_ref(outcomes: list[str | None]) -> int | None:
    from agentlib.agent import vote

    return vote(outcomes)


def _keep_ref(record: dict) -> bool:
    from agentlib.trajectory import filter_trajectories

    return bool(filter_trajectories([record]))


def _normalize_ref(s: str) -> str:
    from agentlib.metrics import normalize_answer

    return normalize_answer(s)


def _f1_ref(pred: str, gold: str) -> float:
    from agentlib.metrics import f1

    return f1(pred, [gold])


def _labels_ref(
    input_ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int, int]], roles: list[str]
) -> list[int]:
    from agentlib.sft import assistant_labels

    return assistant_labels(input_ids, offsets, spans, roles)


# ------------------------------------------------------------------ hidden cases
def _expect(fn: Callable, *args: Any) -> Any:
    """The reference's result, or the ValueError it raised (the student must raise one too)."""
    try:
        return fn(*args)
    except ValueError as e:  # agent.ParseError is a ValueError
        return ValueError(str(e))


def _step(thought: str, code: str, fence: str = "py", close: bool = True) -> str:
    return f"Thought: {thought}\nCode:\n```{fence}\n{code}\n" + ("```<end_code>" if close else "")


def _parse_cases() -> list[Case]:
    texts = [
        (_step("I need the birth year.", 'r = search("Ada Lovelace born")\nprint(r)'), "a well-formed step"),
        (_step("Compute it.", "print(2**10)", fence="python"), "a ```python fence instead of ```py"),
        (
            _step("Answer now.", 'final_answer("Paris")', close=False),
            "no closing fence (generation stopped at <end_code>)",
        ),
        ("Thought: no code here, just talk.", "no code at all: raise ValueError"),
        (
            "Thought: stray `backticks` in the thought.\nCode:\n```py\nx = 3\nprint(x)\n```<end_code>",
            "single backticks inside the thought",
        ),
        ("```py\nprint('no thought')\n```<end_code>", "no 'Thought:' at all: the thought is empty"),
        ("Thought: empty block\nCode:\n```py\n\n```<end_code>", "an empty code block: raise ValueError"),
        (
            "Thought: first\nCode:\n```py\nprint(1)\n```<end_code>\nObservation:\n```py\nprint(2)\n```",
            "text after <end_code> is not part of the step",
        ),
        (
            "Thought: multiply.\nCode:\n```py\nprint(6 * 7)\n<end_code>\nObservation:\n42",
            "no closing fence: the code stops at <end_code>, the text after it is not code",
        ),
        (
            "Thought: I will search next.<end_code>\nObservation:\n```py\nprint(search('x'))\n```",
            "the turn ended at <end_code> before any code: raise ValueError",
        ),
    ]
    return [Case((t,), _expect(_parse_step_ref, t), why) for t, why in texts]


def _same_step(got: Any, want: Any) -> bool:
    if isinstance(want, Exception):
        return False  # a raised ValueError is accepted in ``check``; any returned value is wrong
    if not isinstance(got, tuple) or len(got) != 2:
        return False
    return (
        " ".join(str(got[0]).split()) == " ".join(want[0].split()) and str(got[1]).strip() == want[1].strip()
    )


def _ftp_cases() -> list[Case]:
    texts = [
        (
            "First I find the director of the film, then his birthplace.\n\nThe film is ...",
            "a plain first paragraph",
        ),
        (
            "  We need the sum of the roots.\nVieta gives it directly.\n\nBy Vieta, ...",
            "leading spaces (dropped), and a paragraph of two lines (keep both)",
        ),
        (
            "\n\nLook up both bands and compare their founding years.\n\nBand A ...",
            "the answer opens with a blank line: the first paragraph is the one after it",
        ),
        ("A single paragraph answer without any blank line.", "no blank line: the whole text"),
        (
            "Split the problem in two.\n   \nThen ...",
            "a line of spaces is not '\\n\\n': the authors split on '\\n\\n' only",
        ),
    ]
    return [Case((t,), _ftp_ref(t), why) for t, why in texts]


def _vote_cases() -> list[Case]:
    outs = [
        (["4", "4", "5", None], "a clear majority: the index of its *first* member"),
        ([None, "a", "b", "b"], "a failed candidate (None) never wins"),
        (["x", None, None], "several failures do not form a group"),
        (["x", "y"], "a tie: the group whose first member comes first"),
        ([None, None, None], "every candidate failed: None"),
        (["7"], "a single candidate"),
        (["a", "b", "b", "a", "c"], "a tie of two groups of two"),
        (["q", "r", "r"], "the majority does not start at index 0"),
        (["b", "a"], "a tie: the first group wins, though its outcome sorts last"),
        (
            ["9", None, "10", "10", "9"],
            "a tie of two groups of two: the first group wins, whatever the values",
        ),
    ]
    return [Case((o,), _vote_ref(o), why) for o, why in outs]


def _record(
    score: float = 1.0,
    parse_errors: int = 0,
    hit: bool = False,
    pred: str | None = "x",
    error: bool = False,
    repeat: bool = False,
) -> dict:
    steps = [
        {"code": "print(y)", "error": "NameError: name 'y' is not defined" if error else None},
        {"code": f"final_answer({pred!r})", "error": None},
    ]
    return {
        "id": "q1",
        "prediction": pred,
        "score": score,
        "parse_errors": parse_errors,
        "hit_step_limit": hit,
        "stopped_on_repeat": repeat,
        "steps": steps,
    }


def _keep_cases() -> list[Case]:
    recs = [
        (_record(), "correct, clean: keep"),
        (_record(score=0.0), "a wrong answer"),
        (_record(score=0.5), "a partly right answer (score 0.5) is not correct"),
        (_record(parse_errors=1), "a step whose code could not be parsed"),
        (_record(hit=True), "the step limit was hit"),
        (_record(repeat=True), "the loop was stopped at a repeated step"),
        (_record(pred=None), "no prediction"),
        (_record(error=True), "an execution error the agent recovered from: keep"),
    ]
    return [Case((r,), _keep_ref(r), why) for r, why in recs]


def _normalize_cases() -> list[Case]:
    texts = [
        ("The Eiffel Tower!", "case, an article and punctuation"),
        ("  an  apple, a day ", "extra whitespace"),
        ("U.S.A.", "punctuation is removed, not replaced by spaces"),
        ("Theatre of the Absurd", "'the' inside a word is not an article"),
        ("Yes", "a single word"),
        (
            "Santa Ana, Panama",
            "words ending in 'a' or 'an' keep those letters: only whole words are articles",
        ),
        ("Goethe and Thoreau", "a word ending in 'the' is not an article"),
        ("Another anthem", "a word starting with 'an' is not an article"),
    ]
    return [Case((t,), _normalize_ref(t), why) for t, why in texts]


def _f1_cases() -> list[Case]:
    pairs = [
        (("President Richard Nixon", "Richard Nixon"), "precision 2/3, recall 1"),
        (("The Cat", "cat"), "normalise both sides first"),
        (("yes", "yes indeed"), "yes/no rule: 'yes' vs anything else scores 0"),
        (("yes it is", "yes"), "the yes/no rule applies when the gold side is yes/no too"),
        (("paris paris", "paris"), "repeated tokens count once per match (a multiset, not a set)"),
        (("Paris France", "Paris"), "precision 1/2, recall 1"),
        (("blue", "red"), "no common token"),
        (("the", "a"), "both empty after normalisation: 0, not a division by zero"),
    ]
    return [Case(p, _f1_ref(*p), why) for p, why in pairs]


_CHATS = [
    [
        {"role": "system", "content": "You are an agent."},
        {"role": "user", "content": "Who wrote Emma?"},
        {
            "role": "assistant",
            "content": 'Thought: search.\nCode:\n```py\nprint(search("Emma novel"))\n```<end_code>',
        },
        {"role": "user", "content": "Observation:\nThought: Emma is a novel by Jane Austen."},
        {
            "role": "assistant",
            "content": 'Thought: done.\nCode:\n```py\nfinal_answer("Jane Austen")\n```<end_code>',
        },
    ],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    [
        {"role": "system", "content": "Solve it with code."},
        {"role": "user", "content": "Café prices: 3€ + 4€?"},
        {"role": "assistant", "content": "Thought: add them 🙂\nCode:\n```py\nprint(3 + 4)\n```<end_code>"},
        {"role": "user", "content": "Observation:\nNameError: name 'prnt' is not defined"},
        {"role": "assistant", "content": "Thought: again.\nCode:\n```py\nprint(3 + 4)\n```<end_code>"},
        {"role": "user", "content": "Observation:\n7"},
        {"role": "assistant", "content": 'Thought: 7 €.\nCode:\n```py\nfinal_answer("7 €")\n```<end_code>'},
    ],
    [
        {"role": "user", "content": "Say hi twice."},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "Again, with the assistant's words: assistant: hi"},
        {"role": "assistant", "content": "hi"},
    ],
]


def _tokenizer() -> Any:
    from transformers import AutoTokenizer

    from agentlib.sft import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))


def _label_cases() -> list[Case]:
    from agentlib.sft import message_spans

    tok, cases = _tokenizer(), []
    for chat in _CHATS:
        text, spans = message_spans(chat, tok)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        roles = [m["role"] for m in chat]
        args = (list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]], spans, roles)
        show = f"a chat of {len(chat)} messages ({', '.join(roles)}), {len(args[0])} tokens"
        cases.append(
            Case(
                args,
                _labels_ref(*args),
                "assistant turns only, each with its end-of-turn marker",
                show,
                {"text": text},
            )
        )
    return cases


def _as_list(x: Any) -> Any:
    return x.tolist() if hasattr(x, "tolist") else x


def _same_labels(got: Any, want: list[int]) -> bool:
    got = _as_list(got)
    return (
        isinstance(got, list)
        and len(got) == len(want)
        and all(int(g) == w for g, w in zip(got, want, strict=True))
    )


def _where(case: Case, j: int) -> str:
    """Where token ``j`` of a label case sits in the chat, in words."""
    ids, offsets, spans, roles = case.args
    a, b = offsets[j]
    tok = case.context["text"][a:b]
    for i, (role, (start, end, turn_end)) in enumerate(zip(roles, spans, strict=True)):
        if start <= a < end:
            return f"token {j} {tok!r} lies in the content of message {i} ({role})"
        if end <= a < turn_end:
            return (
                f"token {j} {tok!r} lies after the content of message {i} ({role}), before the next message"
            )
    return f"token {j} {tok!r} is chat-template text outside any message"


def _explain_labels(case: Case, got: Any) -> str:
    want, got = case.want, _as_list(got)
    if not isinstance(got, list) or len(got) != len(want):
        n = len(got) if isinstance(got, list) else type(got).__name__
        return f"expected one label per token: a list of {len(want)}, got {n}"
    j = next(j for j, (g, w) in enumerate(zip(got, want, strict=True)) if int(g) != w)
    say = {True: "trained (its id)", False: "masked (-100)"}
    return (
        f"{_where(case, j)}: it should be {say[want[j] != IGNORE]}, yours is {say[int(got[j]) != IGNORE]}\n"
        + _label_window(case, got, j)
    )


def _label_window(case: Case, got: list, j: int, before: int = 4, after: int = 4) -> str:
    """The tokens around token ``j`` with the expected and the student's label (``→`` marks ``j``)."""
    offsets, text, want = case.args[1], case.context["text"], case.want

    def kind(label: Any) -> str:
        return "masked" if int(label) == IGNORE else "trained"

    rows = [f"   {'':1} {'':>6}  {'token':<24}  {'expected':<8}  yours"]
    for k in range(max(0, j - before), min(len(want), j + after + 1)):
        a, b = offsets[k]
        mark = "→" if k == j else ("≠" if int(got[k]) != want[k] else " ")
        rows.append(f"   {mark} {k:>6}  {text[a:b]!r:<24.24}  {kind(want[k]):<8}  {kind(got[k])}")
    return "   around it:\n" + "\n".join(rows)


def _close(got: Any, want: Any) -> bool:
    return isinstance(got, (int, float)) and abs(got - want) < 1e-6


def _refs(*names: str) -> Callable[[], list[Callable]]:
    def get() -> list[Callable]:
        import importlib

        return [
            getattr(importlib.import_module(f"agentlib.{n.split('.')[0]}"), n.split(".")[1]) for n in names
        ]

    return get


_NB01, _NB02, _NB03 = "01_teacher_trajectories.ipynb", "02_sft_qlora.ipynb", "03_evaluation.ipynb"

EXERCISES: dict[str, Exercise] = {
    "normalize_answer": Exercise(
        "normalize_answer",
        "Exact-match normalisation (HotpotQA)",
        10,
        _normalize_ref,
        _normalize_cases,
        stub="def normalize_answer(s: str) -> str:\n    # your code here\n    raise NotImplementedError\n",
        goal="Write the official HotpotQA normalisation: lowercase, remove every punctuation character "
        "(`string.punctuation`), remove the articles *a*, *an*, *the* as whole words, collapse whitespace. "
        "Two answers match exactly when their normalised forms are equal.",
        reveal=_refs("metrics.normalize_answer"),
        context=((_NB03, ("Scores:",)),),
    ),
    "f1": Exercise(
        "f1",
        "Token F1 with the yes/no rule",
        15,
        _f1_ref,
        _f1_cases,
        compare=_close,
        stub="def f1(pred: str, gold: str) -> float:\n    # your code here (you may call your normalize_answer)\n"
        "    raise NotImplementedError\n",
        goal="Token-level F1 between the normalised prediction and gold (count common tokens as a multiset). "
        "Official rule: if either normalised side is *yes*, *no* or *noanswer* and they differ, the score "
        "is 0. No common token: 0.",
        reveal=_refs("metrics.token_f1"),
    ),
    "parse_step": Exercise(
        "parse_step",
        "Parse a CodeAct step",
        20,
        _parse_step_ref,
        _parse_cases,
        compare=_same_step,
        stub="def parse_step(text: str) -> tuple[str, str]:\n    # your code here\n    raise NotImplementedError\n",
        goal="Return `(thought, code)` from one raw model turn; raise `ValueError` when there is no runnable "
        "code. The thought is the text before the code without its `Thought:` and `Code:` labels (empty "
        "when missing). Accept ```` ```py ```` and ```` ```python ```` fences and a missing closing fence; "
        "ignore everything after `<end_code>`; an empty code block is no code.",
        reveal=_refs("agent.parse_step"),
        context=((_NB01, ("**Agent distillation**", "```\nThought:", "The code runs in a sandbox")),),
    ),
    "first_thought_prefix": Exercise(
        "first_thought_prefix",
        "First-thought prefix",
        15,
        _ftp_ref,
        _ftp_cases,
        stub="def ftp_start(cot_text: str) -> str:\n    # your code here\n    raise NotImplementedError\n",
        goal="From the teacher's own CoT answer, take the first paragraph as the authors do: drop leading "
        "whitespace, then keep everything before the first `'\\n\\n'`. Return the forced start of the "
        "agent's first turn: `'Thought: ' + paragraph + '\\n\\n'` (the model continues after it).",
        reveal=_refs("agent.ftp_prefix"),
        context=((_NB01, ("1. **CoT**",)),),
    ),
    "vote": Exercise(
        "vote",
        "Self-consistent action generation: the vote",
        20,
        _vote_ref,
        _vote_cases,
        stub="def vote(outcomes: list[str | None]) -> int | None:\n    # your code here\n"
        "    raise NotImplementedError\n",
        goal="`outcomes[i]` is candidate *i*'s normalised outcome, or `None` if it failed to parse or raised. "
        "Return the index of the first member of the largest group of equal outcomes (ties: the group "
        "whose first member comes first); `None` when every candidate failed.",
        reveal=_refs("agent.vote", "agent.outcome_key"),
        context=((_NB03, ("**SAG**",)),),
    ),
    "keep": Exercise(
        "keep",
        "Which trajectories become training data?",
        10,
        _keep_ref,
        _keep_cases,
        stub="def keep(record: dict) -> bool:\n    # your code here\n    raise NotImplementedError\n",
        goal="A record has `prediction`, `score` (1.0 = correct), `parse_errors`, `hit_step_limit`, "
        "`stopped_on_repeat` and `steps` (each with an `error`). Keep it only if it has a prediction, is "
        "correct, had no parse error, did not hit the step limit and was not stopped at a repeated step.",
        reveal=_refs("trajectory.filter_trajectories"),
        context=((_NB01, ("Then it **filters**",)),),
    ),
    "assistant_labels": Exercise(
        "assistant_labels",
        "The SFT loss mask",
        25,
        _labels_ref,
        _label_cases,
        compare=_same_labels,
        explain=_explain_labels,
        stub="def assistant_labels(input_ids, offsets, spans, roles) -> list[int]:\n    # your code here\n"
        "    raise NotImplementedError\n",
        goal="`offsets[j] = (start, end)` are token *j*'s characters in the rendered chat; `spans[i] = "
        "(content_start, content_end, turn_end)` and `roles[i]` describe message *i*. Token *j* is trained "
        "(label = `input_ids[j]`) if it is non-empty and starts inside an assistant message's content, or "
        "if it is the first token starting in `[content_end, turn_end)` of an assistant message (its "
        "end-of-turn marker). Every other label is -100.",
        reveal=_refs("sft.assistant_labels"),
        context=((_NB02, ("The student learns",)), (_NB02, ("## What the loss sees",))),
    ),
}


# ------------------------------------------------------------------ the checks
def _library_file(filename: str) -> bool:
    """True for agentlib's own files and for the standard library / installed packages."""
    path = filename.replace("\\", "/")
    if path.startswith(_PACKAGE):
        return True
    roots = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    return any(path.startswith(r.replace("\\", "/")) for r in roots) or path.startswith("<frozen")


def _student_lines(tb: Any) -> str:
    """The traceback lines of the student's own code (never agentlib's, the stdlib's or a package's)."""
    frames = [f for f in traceback.extract_tb(tb) if not _library_file(f.filename)]
    return "\n".join(
        f"   at line {f.lineno} of {f.name}" + (f": {f.line.strip()}" if f.line else "") for f in frames[-3:]
    )


def _short(x: Any, n: int = 200) -> str:
    try:
        s = json.dumps(x) if isinstance(x, dict) else repr(x)
    except (TypeError, ValueError):
        s = repr(x)
    return s if len(s) <= n else s[: n - 3] + "..."


def _input(case: Case) -> str:
    return case.show or ", ".join(_short(a) for a in case.args)


def _verdict(ex: Exercise, i: int, n: int, case: Case, body: str) -> str:
    why = f"\n   this case: {case.why}" if case.why else ""
    return f"❌ {ex.title}: not yet — hidden case {i}/{n} fails.\n   input:    {_input(case)}{why}\n{body}"


def check(name: str, fn: Callable[..., Any]) -> bool:
    """Run ``fn`` on the hidden cases of exercise ``name``; print one verdict; return True if all pass."""
    if name not in EXERCISES:
        print(f"❓ no exercise {name!r}; the exercises are: {', '.join(EXERCISES)}")
        return False
    ex = EXERCISES[name]
    if not callable(fn):
        print(f"❌ {ex.title}: not yet — pass your function itself, not {_short(fn)}.")
        return False
    cases = ex.cases()
    for i, case in enumerate(cases, 1):
        try:
            got = fn(*copy.deepcopy(case.args))  # a function that mutates its input cannot corrupt the case
        except NotImplementedError:
            print(f"⏳ {ex.title}: not yet — {getattr(fn, '__name__', 'the function')} is still a stub.")
            return False
        except Exception as e:  # noqa: BLE001 - the student's code may raise anything
            if isinstance(case.want, Exception) and isinstance(e, ValueError):
                continue
            expected = _expected(case.want)
            where = _student_lines(e.__traceback__)
            print(
                _verdict(
                    ex,
                    i,
                    len(cases),
                    case,
                    f"   expected: {expected}\n   raised:   {type(e).__name__}: {e}"
                    + (f"\n{where}" if where else ""),
                )
            )
            return False
        if not _safe(ex.compare, got, case.want):
            body = f"   expected: {_expected(case.want)}\n   got:      {_short(got)}"
            if ex.explain is not None and (why := _safe(ex.explain, case, got)):
                body += f"\n   why:      {why}"
            print(_verdict(ex, i, len(cases), case, body))
            return False
    print(f"✅ {ex.title}: correct — all {len(cases)} hidden cases pass.")
    return True


def _safe(fn: Callable, *args: Any) -> Any:
    """``fn(*args)``, or ``False`` when an odd value from the student (a None in a list...) makes it raise."""
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001
        return False


def _expected(want: Any) -> str:
    return f"a ValueError ({want})" if isinstance(want, Exception) else _short(want)


def reference(name: str) -> Callable[..., Any]:
    """The reference solution of exercise ``name``: a callable with the stub's signature."""
    return EXERCISES[name].reference


def reveal(name: str) -> None:
    """Print the source of the reference solution (the agentlib function(s) behind it)."""
    for fn in EXERCISES[name].reveal():
        print(f"# {fn.__module__}.{fn.__name__}\n{inspect.getsource(fn)}")


# ------------------------------------------------------------------ the lab notebook (generated)
LAB_ORDER = (
    "normalize_answer",
    "f1",
    "parse_step",
    "first_thought_prefix",
    "vote",
    "keep",
    "assistant_labels",
)
LAB_PATH = "notebooks/labs/lab_mechanisms.ipynb"
KERNELSPEC = {"display_name": "Python (agentlib)", "language": "python", "name": "agentlib"}

_INTRO = """# Lab · The mechanisms of agent distillation

You will build, one by one, the pieces that turn a teacher's agent runs into a student's training data and
make the student robust at test time (Kang et al., 2025, *Distilling LLM Agent into Small Models with
Retrieval and Code Tools*). Each exercise quotes the main notebook it comes from, gives a stub to fill in,
and a check cell: it runs your function on hidden cases and tells you at once whether it is right — and if
not, on which input and why. `lab.reveal(...)` prints the reference solution (the library's own code):
try first.

The last section runs your functions on the **published teacher trajectories** (`TEACHER = "published"`):
no GPU, no model run, no teacher needed. Everything here runs on a laptop CPU in a few minutes.

*This notebook is generated by `python -m agentlib.lab build`; edit `agentlib/lab.py`, not this file.*"""

_END = """## Put it together on the teacher's trajectories

The teacher trajectories published with this suite are filtered with *your* `keep`, every assistant turn
in them is parsed with *your* `parse_step` and compared with the library's parser, and one kept trajectory
(the first one if none is kept) is shown the way the student's loss sees it with *your* mask (green:
trained). While a function is still a stub, the reference stands in for it."""


def _paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text) if p.strip()]


def shared_text(notebook: str, openings: tuple[str, ...]) -> str:
    """The paragraphs of the main notebook ``notebook`` that begin with ``openings`` (in that order).

    The lab quotes the main notebooks instead of restating them; a missing paragraph raises, so a change
    of the main notebooks' prose is caught when the lab is generated (and by the test that the committed
    lab equals the generated one).
    """
    import nbformat

    from agentlib.paths import ROOT

    nb = nbformat.read(str(ROOT / "notebooks" / notebook), as_version=4)
    paras = [p for c in nb.cells if c.cell_type == "markdown" for p in _paragraphs(c.source)]
    out = []
    for opening in openings:
        found = [p for p in paras if p.startswith(opening)]
        if not found:
            raise LookupError(
                f"notebooks/{notebook} has no paragraph starting with {opening!r}: update agentlib.lab"
            )
        out.append(found[0])
    return "\n\n".join(out)


def _quote(notebook: str, text: str) -> str:
    lines = "\n".join(("> " + line).rstrip() for line in text.splitlines())
    return f"> *From [{notebook}](../{notebook}):*\n>\n{lines}"


def _cell(kind: str, cell_id: str, text: str, tags: list[str] | None = None) -> Any:
    import nbformat

    cell = nbformat.v4.new_markdown_cell(text) if kind == "md" else nbformat.v4.new_code_cell(text)
    cell.id = cell_id  # stable ids: the committed notebook is byte-identical to a fresh build
    if tags:
        cell.metadata["tags"] = tags
    return cell


def _fn_name(stub: str) -> str:
    return stub.split("def ", 1)[1].split("(", 1)[0]


def build_notebook() -> Any:
    """The lab notebook: intro, parameters, then per exercise its context, goal, stub, check and reveal."""
    import nbformat

    cells = [
        _cell("md", "intro", _INTRO),
        _cell(
            "code",
            "parameters",
            'TEACHER = "published"  # "published" (data/), or a profile whose runs/<profile>/teacher to use\n'
            'profile = "cpu"  # which published file: data/teacher_trajectories_<profile>.jsonl.gz\n'
            "use_reference = False  # True swaps in the reference solutions (used to test the lab)",
            tags=["parameters"],
        ),
        _cell("code", "setup", "from agentlib import lab"),
    ]
    for i, name in enumerate(LAB_ORDER, 1):
        ex = EXERCISES[name]
        fn = _fn_name(ex.stub)
        quotes = [_quote(nb_name, shared_text(nb_name, openings)) for nb_name, openings in ex.context]
        text = "\n\n".join(
            [f"## Exercise {i} · {ex.title} (~{ex.minutes} min)", *quotes, f"**Your task.** {ex.goal}"]
        )
        cells += [
            _cell("md", f"{name}-text", text),
            _cell(
                "code", f"{name}-stub", ex.stub + f"\n\nif use_reference:\n    {fn} = lab.reference({name!r})"
            ),
            _cell("code", f"{name}-check", f"lab.check({name!r}, {fn});"),
            _cell(
                "code", f"{name}-reveal", f"# lab.reveal({name!r})  # uncomment to see the reference solution"
            ),
        ]
    cells += [
        _cell("md", "together-text", _END),
        _cell(
            "code",
            "together-load",
            "records = lab.published_trajectories(TEACHER, profile)\n"
            "kept = lab.filter_with(records, keep)\nprint(f'{len(kept)} of {len(records)} trajectories kept')",
        ),
        _cell("code", "together-parse", "lab.compare_parsers(records, parse_step)"),
        _cell("code", "together-mask", "lab.show_training_example(kept or records, assistant_labels)"),
    ]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def notebook_text() -> str:
    """The generated lab notebook as the exact text written to ``LAB_PATH``."""
    import nbformat

    return nbformat.writes(build_notebook()) + "\n"


def write_notebook(path: str | Path | None = None) -> Path:
    """Write the generated lab notebook (``python -m agentlib.lab build``)."""
    from agentlib.paths import ROOT

    out = Path(path) if path else ROOT / LAB_PATH
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(notebook_text(), encoding="utf-8")
    return out


# ------------------------------------------------------------------ the last section: real trajectories
EXAMPLE_TRAJECTORY = {
    "id": "lab-example",
    "question": "Which novel by Jane Austen was published in 1815?",
    "gold": "Emma",
    "prediction": "Emma",
    "score": 1.0,
    "parse_errors": 0,
    "hit_step_limit": False,
    "method": "lab_example",
    "messages": [
        {"role": "system", "content": "You are an expert assistant who can solve any task using code blobs."},
        {"role": "user", "content": "New task:\nWhich novel by Jane Austen was published in 1815?"},
        {
            "role": "assistant",
            "content": "Thought: I will search for Jane Austen's novels and their years.\nCode:\n"
            '```py\nprint(search("Jane Austen novel published 1815"))\n```<end_code>',
        },
        {
            "role": "user",
            "content": "Observation:\nDoc 1 (Title: Emma (novel)) Emma is a novel by Jane Austen, "
            "first published in December 1815 ...",
        },
        {
            "role": "assistant",
            "content": "Thought: Emma was published in 1815.\nCode:\n```py\n"
            'final_answer("Emma")\n```<end_code>',
        },
    ],
    "steps": [
        {"code": 'print(search("Jane Austen novel published 1815"))', "error": None},
        {"code": 'final_answer("Emma")', "error": None},
    ],
}


def published_trajectories(teacher: str = "published", profile: str = "cpu") -> list[dict]:
    """Teacher trajectory records to start the lab from, with a printed note on where they came from.

    ``teacher="published"``: ``data/teacher_trajectories_<profile>.jsonl.gz`` (tracked, described by its
    manifest), else any other published profile's file. Otherwise (or when nothing is published yet) the
    records of ``runs/<teacher or profile>/teacher`` and then ``runs/smoke/teacher`` (``runs/`` as
    ``paths.runs_dir`` finds it); failing all of those, a
    small built-in example trajectory, so the lab's last section always runs.
    """
    from agentlib.paths import ROOT, runs_dir
    from agentlib.trajectory import read_records

    data = ROOT / "data"
    if teacher == "published":
        files = [data / f"teacher_trajectories_{profile}.jsonl.gz"] + sorted(
            data.glob("teacher_trajectories_*.jsonl.gz")
        )
        for path in dict.fromkeys(files):
            if not path.exists():
                continue
            # the agent runs (± FTP); the file also holds the CoT run
            if records := [r for r in read_records(path) if r.get("messages") and r.get("run") != "cot"]:
                print(f"published teacher trajectories: {path.relative_to(ROOT)} ({len(records)} records)")
                return records
        print(
            f"no published teacher trajectories yet (data/teacher_trajectories_{profile}.jsonl.gz)", end="; "
        )
    for name in dict.fromkeys([profile if teacher == "published" else teacher, "smoke"]):
        folder = runs_dir(name, "teacher", create=False)
        records = [
            r
            for run in ("agent_ftp", "agent")
            if (folder / f"{run}.jsonl").exists()
            for r in read_records(folder / f"{run}.jsonl")
            if r.get("messages")
        ]
        if records:
            shown = folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder
            print(f"using the teacher run in {shown} ({len(records)} records)")
            return records
    print("no teacher run found either: using the built-in example trajectory")
    return [copy.deepcopy(EXAMPLE_TRAJECTORY)]


def _run_student(fn: Callable, what: str, *args: Any) -> tuple[bool, Any]:
    """``(True, fn(*args))``, or ``(False, None)`` after a one-line note when ``fn`` is a stub or raises."""
    try:
        return True, fn(*copy.deepcopy(args))
    except NotImplementedError:
        print(f"⏳ {what} is still a stub: using the reference.")
    except Exception as e:  # noqa: BLE001 - the student's code may raise anything
        where = _student_lines(e.__traceback__)
        print(
            f"❌ your {what} raised {type(e).__name__}: {e}"
            + (f"\n{where}" if where else "")
            + "\n   using the reference instead (run its check above)."
        )
    return False, None


def filter_with(records: list[dict], keep_fn: Callable[[dict], bool]) -> list[dict]:
    """``[r for r in records if keep_fn(r)]``; while ``keep_fn`` is a stub, the reference filter is used."""
    ok, kept = _run_student(lambda rs: [r for r in rs if keep_fn(r)], "keep", records)
    return kept if ok else [r for r in records if _keep_ref(r)]


def compare_parsers(records: list[dict], parse_fn: Callable[[str], tuple[str, str]]) -> tuple[int, int]:
    """Parse every assistant turn of ``records`` with ``parse_fn`` and with the library; print the agreement."""
    turns = [m["content"] for r in records for m in r.get("messages", []) if m["role"] == "assistant"]
    try:
        parse_fn("Thought: t\nCode:\n```py\nprint(1)\n```<end_code>")
    except NotImplementedError:
        print("⏳ parse_step is still a stub: using the reference.")
        parse_fn = _parse_step_ref
    except Exception:  # noqa: BLE001 - judged turn by turn below
        pass
    same, first_diff = 0, None
    for t in turns:
        want, got = _expect(_parse_step_ref, t), _expect_any(parse_fn, t)
        ok = isinstance(got, ValueError) if isinstance(want, Exception) else _same_step(got, want)
        same += ok
        if not ok and first_diff is None:
            first_diff = (t, want, got)
    print(f"your parser agrees with the library on {same} of {len(turns)} teacher turns")
    if first_diff:
        t, want, got = first_diff
        print(
            f"first disagreement:\n   turn:     {_short(t)}\n   library:  {_expected(want)}\n   yours:    {_short(got)}"
        )
    return same, len(turns)


def _expect_any(fn: Callable, *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - the student's parser may raise anything
        return e


def show_training_example(records: list[dict], labels_fn: Callable[..., list[int]]) -> None:
    """Render one trajectory as the student's loss sees it, with the mask from ``labels_fn``."""
    from agentlib import sft, viz
    from agentlib.agent import system_prompt

    tok = _tokenizer()
    chat = None
    for record in records:
        try:
            chat = sft.trajectory_to_chat(record, system_prompt(["search"], short=True))
            break
        except ValueError:
            continue
    if chat is None:
        print("no record with an assistant turn: showing the built-in example")
        chat = sft.trajectory_to_chat(EXAMPLE_TRAJECTORY, system_prompt(["search"], short=True))
    text, spans = sft.message_spans(chat, tok)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    args = (
        list(enc["input_ids"]),
        [tuple(o) for o in enc["offset_mapping"]],
        spans,
        [m["role"] for m in chat],
    )
    ok, labels = _run_student(labels_fn, "assistant_labels", *args)
    want = _labels_ref(*args)
    if not ok:
        labels = want
    elif not _same_labels(labels, want):
        print(
            "⚠ your mask differs from the library's on this example (run its check above); showing the library's"
        )
        labels = want
    viz.show_mask({"input_ids": args[0], "labels": labels}, tok)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["build"]:
        print("usage: python -m agentlib.lab build", file=sys.stderr)
        return 2
    print(write_notebook())
    return 0


if __name__ == "__main__":
    sys.exit(main())
