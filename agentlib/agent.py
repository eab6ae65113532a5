"""The CodeAct agent of the paper (smolagents' CodeAgent), first-thought prefix, SAG, and a CoT baseline.

Loop (per question): system prompt (teacher: long, with examples; student: short) + "New task" user turn;
each step the model writes ``Thought: ... Code: ```py ... ```<end_code>``; the code runs in the
question's own :class:`agentlib.sandbox.Sandbox`; the observation (stdout, error) is the next user
turn, starting with ``Observation:``. At most ``max_steps`` steps; then the model is asked once more for
a final answer and the record is marked ``hit_step_limit``. Parse failures become observations.
With ``stop_on_repeat`` (a departure from the paper, on in the CPU profiles), a step that repeats the
previous one -- the same code (or unparseable text) and the same observation -- ends the loop the same
way: the model is asked once for a final answer and the record is marked ``stopped_on_repeat``.

Batched stepping: up to ``batch_size`` unfinished questions are in flight, their model calls going through
one ``model.session``: a server model answers each round of calls as one concurrent batch; ``HFModel``
batches continuously (a question whose action has run rejoins the decoding batch at the next token). A
finished question's slot is refilled from the queue.

SAG (self-consistent action generation): ``n_samples`` candidates per step in the same call; the
parseable ones run with ``Sandbox.run_candidates`` (independent copies of the state); failures are
dropped; survivors are grouped by their normalized outcome (stdout *and* final answer); the largest
group wins, ties going to the group whose first member came first; the winner's state is committed
without re-running. With no survivor, the first executed (else the first) candidate is kept so its
error becomes the observation.

Record (one JSON line per question): id, benchmark, question, gold, method, messages (OpenAI chat
format), steps [{thought, code, observation, error, parse_error, duration_s, gen_s, exec_s,
prompt_tokens, completion_tokens, candidates [{code, outcome, error, votes, chosen}]}], prediction,
score, parse_errors, hit_step_limit, stopped_on_repeat, used_prefix, prefix, sag_n. Per-step token counts and
generation time come from the session (``agentlib.models.RoundSession``): exact for ``HFModel`` (time: its own
prompt encoding plus a share of each decoding step it was in), shared out of each call's totals for servers.
"""

from __future__ import annotations

import ast
import importlib.resources
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any

import yaml

from agentlib.data import last_boxed
from agentlib.models import RoundSession, Sampling
from agentlib.retrieval import DEFAULT_MAX_CHARS, format_passages, make_search_tool
from agentlib.trajectory import JsonlWriter, filter_trajectories, read_records, summarize

__all__ = [
    "STOP",
    "AgentConfig",
    "ParseError",
    "Step",
    "extract_answer",
    "filter_trajectories",
    "first_thought_prefix",
    "ftp_prefix",
    "prefixes_from_cot",
    "make_prefixes",
    "parse_step",
    "run_agent",
    "run_cot",
    "AgentRun",
    "CotRun",
    "drive",
    "select_action",
    "summarize",
    "OBS_MAX_CHARS",
    "prompts",
    "render",
    "system_prompt",
    "SAG_VOTES",
    "outcome_key",
    "Action",
    "vote",
    "observation",
    "repeats_previous",
]

STOP = ["<end_code>", "Observation:", "Calling tools:"]  # smolagents' stop sequences for CodeAgent
OBS_MAX_CHARS = 4000


# ----------------------------------------------------------------------------- prompts


@cache
def prompts(name: str) -> dict:
    """A prompt file of ``agentlib/prompts`` (``codeact`` or ``cot``) as a dict."""
    text = importlib.resources.files("agentlib.prompts").joinpath(f"{name}.yaml").read_text("utf-8")
    return yaml.safe_load(text)


def render(template: str, **values: str) -> str:
    """Fill ``{{name}}`` placeholders (braces elsewhere, e.g. in code or LaTeX, are left alone)."""
    for key, value in values.items():
        template = template.replace("{{" + key + "}}", str(value))
    return template


def system_prompt(tool_names: Sequence[str], short: bool = False) -> str:
    """The CodeAct system prompt (teacher: long with examples; ``short``: the student's), listing the tools
    and the modules the sandbox lets the code import."""
    from agentlib.sandbox import ALLOWED_IMPORTS

    p = prompts("codeact")
    names = [t for t in tool_names if t != "final_answer"] + ["final_answer"]
    tools = "\n\n".join(p["tools"][t] for t in names if t in p["tools"])
    return render(
        p["system_prompt_short" if short else "system_prompt"],
        tools=tools,
        authorized_imports=str(sorted(ALLOWED_IMPORTS)),
    )


# ----------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Step:
    """One parsed assistant turn: the thought and the Python code to run."""

    thought: str
    code: str


class ParseError(ValueError):
    """No runnable code could be recovered from a model turn. ``kind``: "empty", "no_code", "empty_code"."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\r?\n(.*?)```", re.DOTALL | re.IGNORECASE)
_OPEN_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\r?\n(.*)\Z", re.DOTALL | re.IGNORECASE)
_THOUGHT = re.compile(r"^\s*(?:\*\*)?thoughts?\s*:?(?:\*\*)?\s*", re.IGNORECASE)
_CODE_LABEL = re.compile(r"(?:\*\*)?code\s*:(?:\*\*)?\s*$", re.IGNORECASE)


def _clean_thought(text: str) -> str:
    text = _THOUGHT.sub("", text.strip(), count=1)
    return _CODE_LABEL.sub("", text).strip()


def _looks_like_code(text: str) -> bool:
    try:
        tree = ast.parse(text)
    except Exception:  # SyntaxError, ValueError (NUL bytes), RecursionError, MemoryError on deep nesting
        return False
    return any(isinstance(node, ast.Call) for node in ast.walk(tree))


def parse_step(text: str) -> Step:
    """Parse ``Thought: ... Code: ```py ... ```<end_code>`` into a :class:`Step`; raise :class:`ParseError`.

    Lenient: ```py / ```python / bare fences, several blocks (joined, as smolagents does), a missing
    closing fence (generation stopped at ``<end_code>``), stray backticks in the thought, and unfenced
    code after ``Code:`` or as the whole turn when it parses as Python and calls something.
    Syntax errors inside a fenced block are not parse errors: they surface as execution errors.
    """
    if not isinstance(text, str) or not text.strip():
        raise ParseError("empty", "The model output is empty.")
    text = text.split("<end_code>", 1)[0]
    blocks = _FENCE.findall(text)
    if blocks:
        thought = text[: _FENCE.search(text).start()]
        code = "\n\n".join(b.strip("\n") for b in blocks)
    elif m := _OPEN_FENCE.search(text):
        thought, code = text[: m.start()], m.group(1)
    else:
        parts = re.split(r"(?:\*\*)?code\s*:(?:\*\*)?[ \t]*\r?\n", text, maxsplit=1, flags=re.IGNORECASE)
        if len(parts) == 2 and _looks_like_code(parts[1].strip()):
            thought, code = parts[0], parts[1]
        elif _looks_like_code(text.strip()):
            thought, code = "", text
        else:
            raise ParseError(
                "no_code",
                "Your code snippet is invalid, because the regex pattern ```(?:py|python)?\\n(.*?)\\n``` "
                "was not found in it.",
            )
    code = code.strip("\n").rstrip()
    if not code.strip():
        raise ParseError("empty_code", "The code block is empty.")
    return Step(thought=_clean_thought(thought), code=code)


# ----------------------------------------------------------------------------- configuration


@dataclass
class AgentConfig:
    """How an agent run samples and steps. Teacher: greedy, long prompt. Student with SAG: see ``sag()``."""

    max_steps: int = 5
    n_samples: int = 1  # SAG's N; 1 = plain decoding
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 512
    short_prompt: bool = False  # the student's short system prompt
    batch_size: int = 16  # questions advanced together
    search_k: int = 3
    search_chars: int = DEFAULT_MAX_CHARS  # characters kept per retrieved passage
    exec_timeout_s: float = 10.0
    memory_mb: int = 1024
    method: str = "agent"
    stop_on_repeat: bool = False  # end a loop that repeats its previous step (not in the paper)
    sag_vote: str = (
        "logs"  # SAG groups candidates by printed logs ("logs", the authors') or "logs+answer" (ours)
    )
    last_output: str = "always"  # smolagents' "Last output from code snippet" line; "not_none": only a value

    @classmethod
    def teacher(cls, **kw: Any) -> AgentConfig:
        return cls(**kw)

    @classmethod
    def student(cls, **kw: Any) -> AgentConfig:
        return cls(**{"short_prompt": True, "method": "agent_student", **kw})

    @classmethod
    def sag(cls, **kw: Any) -> AgentConfig:
        """The paper's SAG setting: N=8, temperature 0.4, top-p 0.8, short prompt."""
        kw = {"n_samples": 8, "temperature": 0.4, "top_p": 0.8, "method": "agent_sag", **kw}
        return cls.student(**kw)


# ----------------------------------------------------------------------------- SAG


def _norm(text: Any) -> str:
    return " ".join(str(text).split()).lower()


SAG_VOTES = ("logs", "logs+answer")


def outcome_key(result: Any, vote_on: str = "logs+answer") -> str:
    """The normalized outcome SAG votes on: the printed output (``"logs"``, the authors' key) and, with
    ``"logs+answer"``, the final answer too (two candidates that print nothing but answer differently
    differ)."""
    if vote_on not in SAG_VOTES:
        raise ValueError(f"unknown SAG vote key {vote_on!r}; choose from {SAG_VOTES}")
    key = _norm(result.stdout)
    if vote_on == "logs+answer" and result.called_final_answer:
        key += " || final_answer=" + _norm(result.final_answer)
    return key


def _failed(result: Any) -> bool:
    return result.error is not None or bool(getattr(result, "timed_out", False))


@dataclass
class Action:
    """What one step did: the chosen text, its parse, its execution result and the candidate table."""

    text: str
    step: Step | None
    parse_error: ParseError | None
    result: Any | None
    candidates: list[dict]
    exec_s: float = 0.0  # wall time of executing all candidates


def _run_safely(fn: Callable[[], Any], n: int) -> list[Any]:
    try:
        return fn()
    except Exception as e:  # a sandbox failure becomes an error observation, never an exception
        from types import SimpleNamespace

        return [
            SimpleNamespace(
                stdout="",
                error=f"SandboxError: {type(e).__name__}: {e}",
                final_answer=None,
                called_final_answer=False,
                last_output=None,
                duration_s=0.0,
                timed_out=False,
                candidate=None,
            )
            for _ in range(n)
        ]


def vote(outcomes: Sequence[str | None]) -> int | None:
    """SAG's choice: the first member of the largest group of equal outcomes (``None`` = failed).

    Ties go to the group whose first member comes first; ``None`` when every candidate failed.
    """
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(outcomes):
        if key is not None:
            groups.setdefault(key, []).append(i)
    if not groups:
        return None
    return max(groups.values(), key=lambda g: (len(g), -g[0]))[0]


def select_action(texts: Sequence[str], sb: Any, vote_on: str = "logs+answer") -> Action:
    """Self-consistent action generation over candidate turns ``texts`` (a single text: plain execution).

    ``vote_on``: the outcome key candidates are grouped by (see :func:`outcome_key`)."""
    parsed: list[Step | ParseError] = []
    for t in texts:
        try:
            parsed.append(parse_step(t))
        except ParseError as e:
            parsed.append(e)
    runnable = [i for i, p in enumerate(parsed) if isinstance(p, Step)]
    results: dict[int, Any] = {}
    t0 = time.perf_counter()
    if len(runnable) == 1 and len(texts) == 1:
        results[runnable[0]] = _run_safely(lambda: [sb.run(parsed[runnable[0]].code)], 1)[0]
    elif runnable:
        out = _run_safely(lambda: sb.run_candidates([parsed[i].code for i in runnable]), len(runnable))
        results = dict(zip(runnable, out, strict=True))
    keys = [
        outcome_key(results[i], vote_on) if i in results and not _failed(results[i]) else None
        for i in range(len(texts))
    ]
    groups = Counter(k for k in keys if k is not None)
    chosen = vote(keys)
    if chosen is None:
        chosen = runnable[0] if runnable else 0
    chosen_result = results.get(chosen)
    if (
        len(texts) > 1
        and chosen_result is not None
        and getattr(chosen_result, "candidate", None) is not None
        and not getattr(chosen_result, "timed_out", False)
    ):
        # a failed (not timed-out) candidate keeps its partial effects, like run(); a result the sandbox
        # could not produce (it failed itself) has no candidate to adopt
        _run_safely(lambda: [sb.commit(chosen_result)], 1)
    candidates = []
    for i, p in enumerate(parsed):
        r = results.get(i)
        if isinstance(p, ParseError):
            cand = {"code": None, "outcome": "parse_error", "error": str(p), "votes": 0}
        elif _failed(r):
            cand = {"code": p.code, "outcome": "error", "error": r.error or "timed out", "votes": 0}
        else:
            key = outcome_key(r, vote_on)
            cand = {"code": p.code, "outcome": key, "error": None, "votes": groups[key]}
        candidates.append({**cand, "chosen": i == chosen})
    p = parsed[chosen]
    return Action(
        text=texts[chosen],
        step=p if isinstance(p, Step) else None,
        parse_error=p if isinstance(p, ParseError) else None,
        result=results.get(chosen),
        candidates=candidates,
        exec_s=time.perf_counter() - t0,
    )


LAST_OUTPUTS = ("always", "not_none")


def observation(action: Action, max_chars: int = OBS_MAX_CHARS, last_output: str = "always") -> str:
    """The text of the next user turn for an action (smolagents' wording).

    ``last_output``: ``"always"`` ends a successful step's observation with the value of the code's last
    statement, ``None`` after a ``print`` (smolagents, the authors'); ``"not_none"`` leaves that line out when
    the value is ``None`` (a departure: the 1.5B teacher read the ``None`` after its print as a failed step and
    ran the same code again)."""
    if last_output not in LAST_OUTPUTS:
        raise ValueError(f"unknown last_output {last_output!r}; choose from {LAST_OUTPUTS}")
    p = prompts("codeact")
    if action.parse_error is not None:
        body = "Error:\n" + render(p["parse_error"], error=str(action.parse_error)) + "\n" + p["retry"]
    else:
        r = action.result
        stdout = _truncate(r.stdout, max_chars)
        body = "Execution logs:\n" + stdout
        if _failed(r):
            body += ("\n" if stdout and not stdout.endswith("\n") else "") + "Error:\n"
            body += (r.error or "Code execution timed out.") + "\n" + p["retry"]
        elif r.called_final_answer:
            body += ("\n" if stdout and not stdout.endswith("\n") else "") + f"Final answer: {r.final_answer}"
        elif getattr(r, "last_output", None) is not None or last_output == "always":
            # smolagents' observation: the logs, then the value of the code's last statement
            last = getattr(r, "last_output", None)
            last = "None" if last is None else _truncate(last, max_chars)
            body += (
                ("\n" if stdout and not stdout.endswith("\n") else "")
                + "Last output from code snippet:\n"
                + last
            )
    return render(p["observation"], body=body)


def _truncate(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[:max_chars] + "\n..._This content has been truncated_..."


# ----------------------------------------------------------------------------- the agent loop


def _default_sandbox(config: AgentConfig) -> Callable[[dict], Any]:
    from agentlib.sandbox import Sandbox

    return lambda tools: Sandbox(tools=tools, timeout_s=config.exec_timeout_s, memory_mb=config.memory_mb)


def _default_score() -> Callable[[str | None, Any], float]:
    from agentlib.metrics import score

    return score


def _close(sb: Any) -> None:
    try:
        if hasattr(sb, "close"):
            sb.close()
        else:
            sb.__exit__(None, None, None)
    except Exception:
        pass


class _Trajectory:
    """A question being solved: its messages, steps and sandbox."""

    def __init__(self, example: Any, system: str, sandbox: Any, prefix: str | None):
        self.example = example
        task = render(prompts("codeact")["task"], question=example.question)
        self.messages = [{"role": "system", "content": system}, {"role": "user", "content": task}]
        self.sb = sandbox
        self.prefix = prefix or None
        self.steps: list[dict] = []
        self.prediction: str | None = None
        self.parse_errors = 0
        self.hit_step_limit = False
        self.stopped_on_repeat = False
        self.final_round = False
        self.done = False

    def step_prefix(self) -> str | None:
        """The forced start of the first step (the first-thought prefix), verbatim."""
        return self.prefix if self.prefix and not self.steps else None


def _free_text_answer(text: str) -> str | None:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return None
    last = re.sub(r"^(?:thought|final answer|answer)\s*:\s*", "", lines[-1], flags=re.IGNORECASE)
    return last or None


def _apply(t: _Trajectory, action: Action, config: AgentConfig) -> dict:
    """Record an action on trajectory ``t`` and decide whether it is finished."""
    content = action.text.strip()
    if content.endswith("```"):
        content += "<end_code>"  # as smolagents stores it: nudges later turns to stop at <end_code>
    t.messages.append({"role": "assistant", "content": content})
    r = action.result
    obs = observation(action, last_output=config.last_output)
    if action.parse_error is not None:
        t.parse_errors += 1
    finished = r is not None and not _failed(r) and r.called_final_answer
    if finished:
        t.prediction = None if r.final_answer is None else str(r.final_answer)
    elif t.final_round:  # the extra turn after the step limit: take what it gives
        if r is not None and r.called_final_answer:
            t.prediction = None if r.final_answer is None else str(r.final_answer)
        elif action.parse_error is not None:
            t.prediction = _free_text_answer(action.text)
        finished = True
    else:
        t.messages.append({"role": "user", "content": obs})
    step = {
        "thought": action.step.thought if action.step else _clean_thought(action.text),
        "code": action.step.code if action.step else None,
        "observation": obs.split("\n", 1)[1] if "\n" in obs else obs,
        "error": (r.error or "timed out") if r is not None and _failed(r) else None,
        "parse_error": str(action.parse_error) if action.parse_error is not None else None,
        "exec_s": action.exec_s,
        "candidates": action.candidates,
    }
    t.steps.append(step)
    if finished:
        t.done = True
    elif len(t.steps) >= config.max_steps:
        t.hit_step_limit = True
        _ask_for_final_answer(t, "max_steps")
    elif config.stop_on_repeat and repeats_previous(t.steps):
        t.stopped_on_repeat = True
        _ask_for_final_answer(t, "repeated_step")
    return step


def _ask_for_final_answer(t: _Trajectory, prompt: str) -> None:
    """One last turn: the request goes into the same user turn as the observation (roles alternate)."""
    t.final_round = True
    t.messages[-1]["content"] += "\n\n" + prompts("codeact")[prompt]


def repeats_previous(steps: Sequence[dict]) -> bool:
    """Whether the last step repeats the one before: same code (or, unparsed, same text), same observation."""
    if len(steps) < 2:
        return False

    def key(s: dict) -> tuple:
        return (s.get("code") or s.get("thought") or "").strip(), s.get("observation")

    return key(steps[-1]) == key(steps[-2])


def _record(t: _Trajectory, config: AgentConfig, score_fn: Callable) -> dict:
    ex = t.example
    return {
        "id": str(ex.id),
        "benchmark": getattr(ex, "source", ""),
        "question": ex.question,
        "gold": ex.answer,
        "method": config.method,
        "messages": t.messages,
        "steps": t.steps,
        "prediction": t.prediction,
        "score": float(score_fn(t.prediction, ex)),
        "parse_errors": t.parse_errors,
        "hit_step_limit": t.hit_step_limit,
        "stopped_on_repeat": t.stopped_on_repeat,
        "used_prefix": t.prefix is not None,
        "prefix": t.prefix,
        "sag_n": config.n_samples,
    }


class _Run:
    """What a job over ``examples`` keeps: the queue of those not yet on disk at ``out_path`` (their records are
    read back), the records as they finish (appended to ``out_path``), a progress bar.

    A job may be ``open``: more examples come later (``add``), and it is not finished until it is closed
    (``open = False``). ``settled()`` hands out each example's record once, as it is read back or made, so a
    scheduler can start follow-up work per question (the teacher stage's retries and first-thought prefixes).
    """

    def __init__(self, examples: Sequence[Any], out_path: str | Path | None, progress: bool):
        self.examples: list[Any] = []
        self.done = {r["id"]: r for r in read_records(out_path)} if out_path else {}
        self.queue: deque = deque()
        self.open = False
        self._settled: list[dict] = []
        self._handed = 0
        self.add(examples)
        self.writer = JsonlWriter(out_path) if out_path else None
        self.bar = _progress(len(self.queue), progress)

    def add(self, examples: Sequence[Any]) -> None:
        """More examples: queued, unless their records are on disk already (then they are settled)."""
        known = {str(ex.id) for ex in self.examples}
        for ex in {str(ex.id): ex for ex in examples}.values():
            if str(ex.id) in known:
                continue
            self.examples.append(ex)
            if str(ex.id) in self.done:
                self._settled.append(self.done[str(ex.id)])
            else:
                self.queue.append(ex)

    def settled(self) -> list[dict]:
        """The records settled since the last call."""
        out = self._settled[self._handed :]
        self._handed = len(self._settled)
        return out

    def _finish(self, rec: dict) -> None:
        self.done[rec["id"]] = rec
        self._settled.append(rec)
        if self.writer:
            self.writer.write(rec)
        self.bar.update(1)

    def records(self) -> list[dict]:
        return [self.done[str(ex.id)] for ex in self.examples]

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        self.bar.close()


class AgentRun(_Run):
    """The agent on ``examples`` as a job (see :func:`drive`): up to ``config.batch_size`` questions in flight,
    each step one request; ``records()`` once ``finished``. :func:`run_agent` drives one; the teacher stage
    drives several at once on one model, so their requests decode in the same batch."""

    def __init__(
        self,
        model: Any,
        examples: Sequence[Any],
        config: AgentConfig | None = None,
        out_path: str | Path | None = None,
        tools: dict[str, Callable] | None = None,
        retriever: Any = None,
        prefixes: dict[str, str] | None = None,
        progress: bool = True,
        sandbox_factory: Callable[[dict], Any] | None = None,
        score_fn: Callable[[str | None, Any], float] | None = None,
    ):
        self.config = config = config or AgentConfig()
        if tools is None:
            tools = {}
            if retriever is not None:
                tools = {
                    "search": make_search_tool(retriever, k=config.search_k, max_chars=config.search_chars)
                }
        self.tools, self.prefixes = tools, prefixes or {}
        self.factory = sandbox_factory or _default_sandbox(config)
        self.score_fn = score_fn or _default_score()
        self.system = system_prompt(list(tools), short=config.short_prompt)
        super().__init__(examples, out_path, progress)
        self.model, self.primed = model, False
        self._prime()
        self.sampling = Sampling(config.n_samples, config.temperature, config.top_p, config.max_tokens, STOP)
        self.active: list[_Trajectory] = []

    def _prime(self) -> None:
        """Every trajectory opens with the same system prompt: encode it once, before the first question."""
        if self.queue and not self.primed and hasattr(self.model, "prime"):
            self.model.prime([{"role": "system", "content": self.system}])
            self.primed = True

    @property
    def finished(self) -> bool:
        return not self.open and not self.queue and not self.active

    def refill(self, submit: Callable[..., None]) -> None:
        """Start questions from the queue while fewer than ``batch_size`` are in flight."""
        self._prime()
        while self.queue and len(self.active) < self.config.batch_size:
            ex = self.queue.popleft()
            t = _Trajectory(ex, self.system, self.factory(dict(self.tools)), self.prefixes.get(str(ex.id)))
            self.active.append(t)
            submit(t, t.messages, t.step_prefix(), self.sampling)

    def take(self, t: _Trajectory, cands: list[str], info: dict, submit: Callable[..., None]) -> None:
        """A step's completions came back: run the chosen action; ask for the next step or record the question."""
        prefix = t.step_prefix() or ""
        step = _apply(t, select_action([prefix + c for c in cands], t.sb, self.config.sag_vote), self.config)
        step.update(info)
        step["duration_s"] = step["gen_s"] + step["exec_s"]
        if not t.done:
            submit(t, t.messages, t.step_prefix(), self.sampling)
            return
        _close(t.sb)
        self.active.remove(t)
        self._finish(_record(t, self.config, self.score_fn))

    def close(self) -> None:
        for t in self.active:
            _close(t.sb)
        super().close()


def drive(model: Any, jobs: Sequence[Any]) -> None:
    """Advance ``jobs`` (:class:`AgentRun`, :class:`CotRun`, or anything with ``refill(submit)``,
    ``take(key, texts, info, submit)`` and ``close()``) on one session of ``model`` until none submits more: their
    requests share the model's batch. ``submit(key, messages, prefix, sampling[, watch])``; answers go back to the
    job that asked. Single-threaded, so a run's order of requests, and so its batches, are reproducible."""
    session = model.session() if hasattr(model, "session") else RoundSession(model, Sampling())

    def refill() -> None:
        for job in jobs:
            job.refill(partial(_submit_for, session, job))

    try:
        for (job, key), texts, info in session.run(refill):
            job.take(key, texts, info, partial(_submit_for, session, job))
    finally:
        for job in jobs:
            job.close()


def _submit_for(
    session: Any, job: Any, key: Any, messages: Any, prefix: Any, sampling: Any, watch: Any = None
) -> None:
    if watch is None:
        session.submit((job, key), messages, prefix, sampling)
    else:
        session.submit((job, key), messages, prefix, sampling, watch=watch)


def run_agent(
    model: Any, examples: Sequence[Any], config: AgentConfig | None = None, **kw: Any
) -> list[dict]:
    """Run the CodeAct agent on ``examples`` with batched stepping; return one record per example.

    Keywords (:class:`AgentRun`): ``tools``: name -> callable given to each sandbox (else
    ``{"search": make_search_tool(retriever)}`` when a ``retriever`` is given); ``prefixes``: example id ->
    first-thought prefix; ``out_path``: JSONL written append-only with fsync, ids already there are skipped and
    their records returned as is; ``progress``, ``sandbox_factory``, ``score_fn``.
    """
    job = AgentRun(model, examples, config, **kw)
    drive(model, [job])
    return job.records()


class _NoBar:
    def update(self, n: int) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, enabled: bool) -> Any:
    if not enabled or total == 0:
        return _NoBar()
    from agentlib.viz import progress_bar

    return progress_bar(total=total, desc="questions")


# ----------------------------------------------------------------------------- first-thought prefix


def ftp_prefix(cot_answer: str) -> str:
    """The first-thought prefix as the authors build it (``exps_research/build_prefix_memory.py``): the
    first paragraph of the teacher's own chain-of-thought answer, ``"Thought: " + first + "\n\n"``.

    Leading whitespace is dropped first, so an answer that opens with a blank line still gives its first
    paragraph. The agent's first step starts with this text verbatim and the model continues it.
    """
    return "Thought: " + (cot_answer or "").lstrip().split("\n\n")[0] + "\n\n"


def prefixes_from_cot(records: Sequence[dict]) -> dict[str, str]:
    """FTP prefixes from CoT records (``run_cot`` output): id -> :func:`ftp_prefix` of the chosen answer."""
    return {r["id"]: ftp_prefix(r["messages"][-1]["content"]) for r in records if r.get("messages")}


def first_thought_prefix(text: str, max_chars: int = 800) -> str:
    """The first paragraph (up to the first blank line) of a chain-of-thought, without a ``Thought:``/
    ``<think>`` lead-in; cut at a sentence end if longer than ``max_chars`` (the plan-prompted variant)."""
    text = re.sub(r"^\s*(?:<think>|thought\s*:)\s*", "", text or "", flags=re.IGNORECASE)
    para = re.split(r"\n[ \t]*\n", text.strip(), maxsplit=1)[0].strip()
    if len(para) > max_chars:
        cut = para[:max_chars]
        end = max(cut.rfind(". "), cut.rfind(".\n"))
        para = cut[: end + 1] if end > 0 else cut
    return para


def make_prefixes(
    model: Any,
    examples: Sequence[Any],
    max_tokens: int = 256,
    batch_size: int = 16,
    temperature: float = 0.0,
) -> dict[str, str]:
    """The plan-prompted FTP variant (an ablation; the authors' FTP is :func:`prefixes_from_cot`): the
    teacher is asked how it will approach each question (``cot.yaml`` ftp prompt); returns id -> first-step
    prefix ``"Thought: <first paragraph>"`` (ids whose paragraph is empty are left out)."""
    p = prompts("cot")
    out: dict[str, str] = {}
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        convs = [
            [
                {"role": "system", "content": p["ftp_system"]},
                {"role": "user", "content": render(p["ftp_user"], question=ex.question)},
            ]
            for ex in chunk
        ]
        # only the first paragraph is kept, so generation stops at the first blank line (unless it opens with one)
        texts = model.chat_batch(convs, n=1, temperature=temperature, max_tokens=max_tokens, stop=["\n\n"])
        empty = [i for i, t in enumerate(texts) if not t[0].strip()]
        if empty:
            again = model.chat_batch(
                [convs[i] for i in empty], n=1, temperature=temperature, max_tokens=max_tokens
            )
            for i, t in zip(empty, again, strict=True):
                texts[i] = t
        for ex, t in zip(chunk, texts, strict=True):
            if prefix := first_thought_prefix(t[0]):
                out[str(ex.id)] = f"Thought: {prefix}"
    return out


# ----------------------------------------------------------------------------- CoT baseline


def extract_answer(text: str, domain: str) -> str | None:
    """The answer of a CoT completion: last ``<answer>...</answer>`` (factual) or last ``\\boxed{}`` (math,
    falling back to ``<answer>``)."""
    tags = re.findall(r"<answer>(.*?)</answer>", text or "", flags=re.DOTALL | re.IGNORECASE)
    tagged = tags[-1].strip() if tags else None
    if domain == "math":
        return last_boxed(text or "") or tagged
    return tagged


def _vote_key(answer: str, domain: str) -> str:
    if domain == "math":
        a = re.sub(r"\\left|\\right|\\!|\\,|\$|\s", "", answer)
        return a.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return _norm(answer).strip(" .")


class CotRun(_Run):
    """:func:`run_cot` as a job (see :func:`drive`): one request of ``sampling.n`` samples per question, up to
    ``batch_size`` in flight."""

    def __init__(
        self,
        examples: Sequence[Any],
        sampling: Sampling,
        batch_size: int = 16,
        out_path: str | Path | None = None,
        rag_retriever: Any = None,
        k: int = 3,
        passage_chars: int = DEFAULT_MAX_CHARS,
        progress: bool = True,
        score_fn: Callable[[str | None, Any], float] | None = None,
        watch: Callable[[Any, str], bool] | None = None,
    ):
        self.sampling, self.watch = sampling, watch  # watch(example, answer so far): see Decoder.submit
        self.batch_size, self.rag, self.k, self.passage_chars = batch_size, rag_retriever, k, passage_chars
        self.score_fn = score_fn or _default_score()
        self.method = "cot_rag" if rag_retriever is not None else "cot"
        super().__init__(examples, out_path, progress)
        self.in_flight = 0

    @property
    def finished(self) -> bool:
        return not self.open and not self.queue and not self.in_flight

    def refill(self, submit: Callable[..., None]) -> None:
        """Ask for the next questions' answers (retrieving their passages first, in one batch, for RAG)."""
        free = self.batch_size - self.in_flight
        if free <= 0 or not self.queue:
            return
        chunk = [self.queue.popleft() for _ in range(min(free, len(self.queue)))]
        passages: list[str | None] = [None] * len(chunk)
        if self.rag is not None:
            hits = self.rag.batch_search([ex.question for ex in chunk], k=self.k)
            passages = [format_passages(h, self.passage_chars) for h in hits]
        p = prompts("cot")
        for ex, ps in zip(chunk, passages, strict=True):
            system = p["system_math" if ex.domain == "math" else "system_factual"]
            user = (
                render(p["user_rag"], passages=ps, question=ex.question)
                if ps is not None
                else render(p["user"], question=ex.question)
            )
            conv = [{"role": "system", "content": system}, {"role": "user", "content": user}]
            if self.watch is None:
                submit((ex, conv), conv, None, self.sampling)
            else:
                submit((ex, conv), conv, None, self.sampling, partial(self.watch, ex))
        self.in_flight += len(chunk)

    def take(self, key: tuple, texts: list[str], info: dict, submit: Callable[..., None]) -> None:
        """A question's samples came back: vote, score and record it."""
        ex, conv = key
        self.in_flight -= 1
        answers = [extract_answer(t, ex.domain) for t in texts]
        keys = [_vote_key(a, ex.domain) if a is not None else None for a in answers]
        votes = Counter(k_ for k_ in keys if k_ is not None)
        chosen = keys.index(max(votes, key=lambda k_: (votes[k_], -keys.index(k_)))) if votes else 0
        rec = {
            "id": str(ex.id),
            "benchmark": getattr(ex, "source", ""),
            "question": ex.question,
            "gold": ex.answer,
            "method": self.method,
            "messages": [*conv, {"role": "assistant", "content": texts[chosen]}],
            "steps": [],
            "prediction": answers[chosen],
            "score": float(self.score_fn(answers[chosen], ex)),
            "parse_errors": int(answers[chosen] is None),
            "hit_step_limit": False,
            "used_prefix": False,
            "prefix": None,
            "sag_n": self.sampling.n,
            "gen_s": info["gen_s"],
            "cut": info["cut"][chosen] if "cut" in info else None,  # by the token budget (None: not known)
            "samples": [{"text": t, "answer": a} for t, a in zip(texts, answers, strict=True)],
            "votes": dict(votes),
        }
        self._finish(rec)


def run_cot(
    model: Any,
    examples: Sequence[Any],
    n: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_tokens: int = 1024,
    **kw: Any,
) -> list[dict]:
    """Chain-of-thought baseline (``cot``) or CoT+RAG (``cot_rag``: top-``k`` passages retrieved once for
    the question, each cut at ``passage_chars``, put in the prompt). With ``n > 1`` the answer is the
    majority vote (ties: the first). Records follow the agent's schema (``steps`` empty; ``samples`` and
    ``votes`` added). Keywords: :class:`CotRun`'s (``batch_size``, ``out_path``, ``rag_retriever``, ``k``,
    ``passage_chars``, ``progress``, ``score_fn``)."""
    job = CotRun(examples, Sampling(n, temperature, top_p, max_tokens), **kw)
    drive(model, [job])
    return job.records()
