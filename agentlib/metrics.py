"""Answer scoring: HotpotQA exact match / F1, math equivalence (numbers, percentages and lists here; the rest
through math-verify), an LLM judge for factual answers (the authors' prompt, verdicts cached on disk).

``math_equal`` runs math-verify in a persistent worker process with math-verify's own SIGALRM
timeouts disabled (they fail off the main thread, e.g. in Jupyter); a comparison that runs past
``timeout_s`` kills the worker, counts as not equal, and the next call starts a fresh worker.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import select
import string
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Sequence
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agentlib.data import Example

__all__ = [
    "normalize_answer",
    "token_f1",
    "exact_match",
    "f1",
    "is_span_question",
    "answer_in_text",
    "math_equal",
    "score",
    "bootstrap_ci",
    "stratified_ci",
    "paired_difference",
    "mean_f1",
    "answer_seen",
    "wilson_interval",
    "questions_to_separate",
    "JUDGE_PROMPT",
    "JUDGE_SCHEMA",
    "parse_verdict",
    "LLMJudge",
    "judge_records",
]


# ---------------------------------------------------------------- factual (official HotpotQA)
def normalize_answer(s: str) -> str:
    """Lowercase, drop punctuation, drop articles (a, an, the), collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def token_f1(pred: str, gold: str) -> float:
    """Token F1 of one prediction against one gold answer (official HotpotQA rule: a yes/no/noanswer that differs
    scores 0)."""
    p, g = normalize_answer(pred), normalize_answer(gold)
    special = ("yes", "no", "noanswer")
    if (p in special or g in special) and p != g:
        return 0.0
    p_tokens, g_tokens = p.split(), g.split()
    common = Counter(p_tokens) & Counter(g_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p_tokens), same / len(g_tokens)
    return 2 * precision * recall / (precision + recall)


def _golds(golds: str | Sequence[str]) -> list[str]:
    return [golds] if isinstance(golds, str) else [str(g) for g in golds]


def exact_match(pred: str | None, golds: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold alias."""
    if pred is None:
        return 0.0
    return float(any(normalize_answer(str(pred)) == normalize_answer(g) for g in _golds(golds)))


def f1(pred: str | None, golds: str | Sequence[str]) -> float:
    """Token F1 (official HotpotQA rule for yes/no/noanswer), max over gold aliases."""
    if pred is None:
        return 0.0
    return max((token_f1(str(pred), g) for g in _golds(golds)), default=0.0)


def _span_golds(golds: str | Sequence[str]) -> list[str]:
    return [g for g in map(normalize_answer, _golds(golds)) if g not in ("", "yes", "no")]


def is_span_question(golds: str | Sequence[str]) -> bool:
    """Whether some gold alias is a span of text, not yes/no."""
    return bool(_span_golds(golds))


def answer_in_text(text: str, golds: str | Sequence[str]) -> bool:
    """Whether a normalised gold span occurs in the normalised text as whole words (yes/no golds never count:
    those words are in most texts)."""
    padded = f" {normalize_answer(text)} "
    return any(f" {g} " in padded for g in _span_golds(golds))


# ---------------------------------------------------------------- math
# The grader, class by class (tests/test_metrics.py has a case for each):
# - ``\boxed{}``: the last one is graded; ``\$`` (an escaped dollar sign) and ``$`` delimiters are dropped.
# - Plain numbers are compared here, as decimals, never through floats: ``1,000``, ``12,345`` and ``10,\!080``
#   are numbers (commas only in groups of three); an integer gold must be matched exactly (``28801`` is not
#   ``28800``); a non-integer gold (GSM-Hard's ``5031.9785714286``) is matched by the gold rounded to the
#   prediction's own decimals when the prediction states at least 4 significant digits (``5031.98``, ``5032``,
#   ``5.333``; not ``5.33``, ``40`` for ``39.9999834113`` or ``2.01e-06`` for ``2.0107e-06``), else within a
#   relative 1e-9 (float noise such as ``9189480.000000002``).
# - A percent sign (``50%``, ``50\%``) on one side: the other side may be the number or its hundredth
#   (``50`` or ``0.5``); on both sides the numbers are compared. No percent sign: no scaling by 100.
# - Lists (top-level commas that are not thousands separators: ``3, 1``, ``1,-2``, ``x=1, x=3``): equal when
#   the elements match one to one in any order (a multiset), each element graded by ``math_equal``; ``13`` is
#   not ``1,3``.
# - Everything else goes to math-verify (numbers in e-notation are rewritten as ``m\times10^{e}`` first:
#   math-verify reads the ``e`` of ``2e-06`` as Euler's number).
_NUM = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_NUM_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_PERCENT = re.compile(r"\\?%$")
_ENOTATION = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)[eE]([+-]?\d+)(?![\w.])")
_OPEN, _CLOSE = "([{", ")]}"


def _last_boxed(text: str) -> str | None:
    from agentlib.data import last_boxed

    return last_boxed(text)


def _prepare(s: str) -> str:
    """The answer to grade: the last ``\\boxed{}``'s content if any; escaped dollar signs dropped."""
    s = str(s).strip()
    boxed = _last_boxed(s) if ("\\boxed" in s or "\\fbox" in s) else None
    if boxed is not None:
        s = boxed
    return s.replace("\\$", "").strip()


def _strip_math(s: str) -> str:
    s = str(s).strip().strip("$").strip()
    s = re.sub(r"\\(?:d|t)frac", r"\\frac", s)
    s = (
        s.replace("{,}", ",")
        .replace("\\left", "")
        .replace("\\right", "")
        .replace("\\!", "")
        .replace("\\,", "")
    )
    return s.replace(" ", "").rstrip(".")


def _number(s: str) -> tuple[Decimal, bool] | None:
    """(value, has a percent sign) for a plain number such as ``-1,000.5``, ``2.0107e-06`` or ``50\\%``."""
    t = _strip_math(s).replace("\u2212", "-")
    pct = bool(_PERCENT.search(t))
    t = _PERCENT.sub("", t)
    if _NUM_THOUSANDS.fullmatch(t):
        t = t.replace(",", "")
    elif not _NUM.fullmatch(t):
        return None
    try:
        return Decimal(t), pct
    except InvalidOperation:
        return None


def _decimal_equal(a: Decimal, b: Decimal) -> bool:
    """Prediction ``a`` against gold ``b`` (see the rules above)."""
    if a == b:
        return True
    if b == b.to_integral_value():
        return False  # an integer gold is matched exactly
    if abs(a - b) <= abs(b) * Decimal("1e-9"):
        return True
    _, digits, exponent = a.as_tuple()
    if len(digits) < 4 or not isinstance(exponent, int):
        return False
    try:
        return any(
            b.quantize(Decimal(1).scaleb(exponent), rounding=r) == a for r in (ROUND_HALF_UP, ROUND_HALF_EVEN)
        )
    except InvalidOperation:
        return False


def _numbers_equal(pred: tuple[Decimal, bool], gold: tuple[Decimal, bool]) -> bool:
    (a, a_pct), (b, b_pct) = pred, gold
    preds = [a, a.scaleb(-2)] if a_pct and not b_pct else [a]
    golds = [b, b.scaleb(-2)] if b_pct and not a_pct else [b]
    return any(_decimal_equal(x, y) for x in preds for y in golds)


def _split_list(s: str) -> list[str] | None:
    """The elements of a comma-separated list at the top level (outside brackets), or None."""
    t = _strip_math(s)
    if _number(s) is not None or "," not in t:
        return None
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(t):
        if ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(t[start:i])
            start = i + 1
    parts.append(t[start:])
    parts = [re.sub(r"^(?:and|or)(?=[-+\d\\(\[{.])", "", p) for p in parts]  # "1, 2, and 3"
    return parts if len(parts) > 1 and all(parts) else None


def _lists_equal(pred: list[str], gold: list[str], timeout_s: float) -> bool:
    """One-to-one in any order (greedy is enough: equality is transitive)."""
    if len(pred) != len(gold):
        return False
    left = list(gold)
    for p in pred:
        hit = next((i for i, g in enumerate(left) if math_equal(p, g, timeout_s)), None)
        if hit is None:
            return False
        left.pop(hit)
    return True


def _for_math_verify(s: str) -> str:
    return _ENOTATION.sub(lambda m: f"{m[1]}\\times10^{{{int(m[2])}}}", s)


class _MathVerifier:
    """One long-lived worker process (``agentlib._verify_worker``); restarted after a timeout."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None

    def _start(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "agentlib._verify_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        if not self._readline(60.0):  # importing sympy/math-verify takes ~1-2 s
            self._kill()
            raise RuntimeError("math-verify worker did not start")

    def _readline(self, timeout_s: float) -> str | None:
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout_s)
        return self._proc.stdout.readline() if ready else None

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for stream in (self._proc.stdin, self._proc.stdout):
                stream.close()
        self._proc = None

    def __call__(self, pred: str, gold: str, timeout_s: float) -> bool:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            try:
                self._proc.stdin.write(json.dumps([pred, gold]) + "\n")
                self._proc.stdin.flush()
                line = self._readline(timeout_s)
            except (BrokenPipeError, OSError):
                line = None
            if line:
                return json.loads(line) is True
            self._kill()  # timed out or died: the next call starts a fresh worker
            return False

    def close(self) -> None:
        with self._lock:
            self._kill()


_VERIFIER = _MathVerifier()


def math_equal(pred: str | None, gold: str, timeout_s: float = 5.0) -> bool:
    """Is ``pred`` mathematically equal to ``gold``? ``\\boxed{}`` is extracted; numbers, percentages and lists
    are compared here (rules above), the rest by math-verify (LaTeX, expressions, sets, intervals).

    Never hangs: a comparison past ``timeout_s`` seconds returns False.
    """
    if pred is None or str(pred).strip() == "" or str(gold).strip() == "":
        return False
    pred, gold = _prepare(str(pred)), _prepare(str(gold))
    if not pred or not gold:
        return False
    if _strip_math(pred) == _strip_math(gold):
        return True
    a, b = _number(pred), _number(gold)
    if a is not None and b is not None:
        return _numbers_equal(a, b)
    pl, gl = _split_list(pred), _split_list(gold)
    if pl is not None and gl is not None:
        return _lists_equal(pl, gl, timeout_s)
    return _VERIFIER(_for_math_verify(pred), _for_math_verify(gold), timeout_s)


# ---------------------------------------------------------------- one entry point
def score(pred: str | None, example: Example) -> float:
    """1.0/0.0: exact match for factual questions, ``math_equal`` for math."""
    if example.domain == "math":
        return float(math_equal(pred, example.answer))
    return exact_match(pred, example.golds)


def bootstrap_ci(values: Sequence[float], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> tuple:
    """Mean and percentile-bootstrap (1 - alpha) interval of ``values``: (mean, low, high)."""
    vals = [float(v) for v in values]
    if not vals:
        return (float("nan"), float("nan"), float("nan"))
    rng = random.Random(seed)
    n = len(vals)
    means = sorted(sum(rng.choices(vals, k=n)) / n for _ in range(n_boot))
    lo = means[int(alpha / 2 * n_boot)]
    hi = means[min(n_boot - 1, int((1 - alpha / 2) * n_boot))]
    return (sum(vals) / n, lo, hi)


def stratified_ci(groups: list[list[float]], n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-benchmark means, with a bootstrap that resamples questions within each benchmark."""
    rng = random.Random(seed)
    point = sum(sum(g) / len(g) for g in groups) / len(groups)
    stats = sorted(
        sum(sum(rng.choices(g, k=len(g))) / len(g) for g in groups) / len(groups) for _ in range(n_boot)
    )
    return point, stats[int(0.025 * n_boot)], stats[int(0.975 * n_boot) - 1]


def paired_difference(
    records: Sequence[dict], a: str, b: str, benches: Sequence[str]
) -> tuple[float, float, float, int]:
    """Mean of per-benchmark mean score differences a - b over the questions both methods answered, in points,
    with the stratified bootstrap interval (questions resampled within benchmarks, pairs kept together) and
    the number of pairs. Records carry ``method``, ``benchmark``, ``id`` (``<benchmark>/<id>`` counts as
    ``<id>``) and ``score``."""
    score = {(r["method"], r["benchmark"], r["id"].split("/", 1)[-1]): float(r["score"]) for r in records}
    groups = []
    for bench in benches:
        ids = sorted(
            {k[2] for k in score if k[:2] == (a, bench)} & {k[2] for k in score if k[:2] == (b, bench)}
        )
        if ids:
            groups.append([score[(a, bench, i)] - score[(b, bench, i)] for i in ids])
    mean, lo, hi = stratified_ci(groups)
    return 100 * mean, 100 * lo, 100 * hi, sum(map(len, groups))


def mean_f1(records: Sequence[dict]) -> float:
    """Token F1 of the records' predictions against their gold answers, averaged, in percent."""
    return 100 * sum(f1(r.get("prediction"), r["gold"]) for r in records) / len(records)


def answer_seen(records: Sequence[dict]) -> dict[str, float]:
    """Where agent trajectories lose span answers (yes/no questions left out): ``seen``, the percent whose
    observations contain a gold answer; ``seen_correct``, the percent of those answered correctly."""
    spans = [r for r in records if r.get("steps") and is_span_question(r["gold"])]
    seen = [
        r
        for r in spans
        if answer_in_text(" ".join(s.get("observation") or "" for s in r["steps"]), r["gold"])
    ]
    return {
        "n_span": len(spans),
        "seen": 100 * len(seen) / len(spans) if spans else float("nan"),
        "seen_correct": 100 * sum(float(r["score"]) for r in seen) / len(seen) if seen else float("nan"),
    }


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` (95% with the default ``z``), as fractions in [0, 1].

    Unlike a bootstrap over questions, it has width when every answer was scored the same (0 of 3: [0, 0.56])."""
    if n <= 0:
        raise ValueError("n must be positive")
    p = k / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / d
    return max(0.0, centre - half), min(1.0, centre + half)


def questions_to_separate(p_high: float, p_low: float, z: float = 1.96, n_max: int = 1_000_000) -> int | None:
    """The smallest number of questions per arm at which the Wilson intervals of two accuracies, ``p_high``
    and ``p_low`` (fractions, observed at those rates), no longer overlap; None if not within ``n_max``."""
    if p_high <= p_low:
        return None

    def apart(n: int) -> bool:
        return wilson_interval(round(p_high * n), n, z)[0] > wilson_interval(round(p_low * n), n, z)[1]

    n = 1
    while n <= n_max and not apart(n):  # doubling, then a bisection (apart() is monotone up to rounding)
        n *= 2
    if n > n_max:
        return None
    lo, hi = n // 2, n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if apart(mid) else (mid, hi)
    return hi


# ---------------------------------------------------------------- LLM judge (factual answers)
# The authors' judge prompt, word for word (exps_research/unified_framework/score_answers.py,
# evaluate_factual_answer); they asked gpt-4o-mini for a JSON object {explanation, score} with structured output.
JUDGE_PROMPT = """Compare the following predicted answer with the gold (correct) answer and determine if they match in meaning given the question.
Be reasonable - phrasing differences are okay if the core meaning is the same. You should accept the aliases and the answer conveying the same conclusion.
If the predicted answer is overly verbose and fails to capture the key information found in the gold answer (i.e., low recall), consider it a false answer.

Question: {question}
Predicted answer: {predicted}
Gold answer: {gold}

Output your evaluation as a JSON object with two fields:
- explanation: Brief explanation of your scoring decision
- score: 0 or 1 indicating if answers match
"""
JUDGE_SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "ResponseFormat",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"explanation": {"type": "string"}, "score": {"type": "integer"}},
            "required": ["explanation", "score"],
            "additionalProperties": False,
        },
    },
}


def parse_verdict(text: str) -> tuple[bool, str] | None:
    """(score == 1, explanation) from the judge's reply: a JSON object, or ``"score": 0|1`` found in the text."""
    text = text.strip()
    fenced = re.search(r"\{.*\}", text, re.S)
    for candidate in (text, fenced[0] if fenced else None):
        if candidate is None:
            continue
        try:
            obj = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(obj, dict) and "score" in obj:
            try:
                return int(obj["score"]) == 1, str(obj.get("explanation", ""))
            except (TypeError, ValueError):
                return None
    m = re.search(r'"?score"?\s*[:=]\s*"?([01])\b', text)
    return (m[1] == "1", text) if m else None


class LLMJudge:
    """Judge factual answers with any OpenAI-compatible chat endpoint, with the authors' prompt; verdicts cached.

    ``judge(question, gold, prediction) -> bool``. ``gold``: the question's answer string (a list: its first
    element, the answer, as the authors passed one string). A verdict is kept in ``cache_path`` (JSONL, one line
    per verdict, keyed by model and prompt), so a rerun sends no request; concurrent calls with the same
    question, gold and prediction send one request (threads of one process; appends are whole lines).

    Departures from the authors' scorer: temperature 0 (they used the API default), a None prediction is False
    without a request, and a reply that is not a verdict counts as 0 (theirs raised). ``structured=True`` asks for
    their JSON schema (``response_format``); a server that rejects it (HTTP 400) is asked again without it.
    ``max_pred_chars``: the authors meant to cut predictions at 1,000 characters (a typo left them whole); None
    keeps them whole, as their scorer ran. Never required for a run: used when a profile configures a judge.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        cache_path: str | Path,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        max_retries: int = 4,
        structured: bool = True,
        max_pred_chars: int | None = None,
        temperature: float = 0.0,
    ) -> None:
        import os

        self.base_url, self.model = base_url.rstrip("/"), model
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY", "EMPTY")
        self.timeout_s, self.max_retries = timeout_s, max_retries
        self.structured, self.max_pred_chars, self.temperature = structured, max_pred_chars, temperature
        self.cache_path = Path(cache_path)
        self.cache: dict[str, bool] = {}
        self.requests = 0  # HTTP requests sent by this judge (retries included)
        self._lock = threading.Lock()
        self._inflight: dict[str, threading.Event] = {}
        self._client = None
        if self.cache_path.is_file():
            for line in self.cache_path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a torn last line
                self.cache[rec["key"]] = bool(rec.get("verdict"))

    def prompt(self, question: str, gold: str | Sequence[str], prediction: str) -> str:
        gold = gold if isinstance(gold, str) else (list(gold) or [""])[0]
        pred = str(prediction)
        if self.max_pred_chars is not None:
            pred = pred[: self.max_pred_chars]
        return JUDGE_PROMPT.format(question=question, predicted=pred, gold=gold)

    def key(self, prompt: str) -> str:
        return hashlib.sha256(json.dumps([self.model, prompt]).encode()).hexdigest()

    def __call__(self, question: str, gold: str | Sequence[str], prediction: str | None) -> bool:
        if prediction is None:
            return False
        prompt = self.prompt(question, gold, prediction)
        k = self.key(prompt)
        while True:
            with self._lock:
                if k in self.cache:
                    return self.cache[k]
                waiting = self._inflight.get(k)
                if waiting is None:
                    self._inflight[k] = threading.Event()
                    break
            waiting.wait()  # the same question is being judged on another thread: use its verdict
        try:
            verdict, explanation = self._ask(prompt)
            with self._lock:
                self.cache[k] = verdict
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                with self.cache_path.open("a") as f:
                    f.write(
                        json.dumps(
                            {
                                "key": k,
                                "verdict": verdict,
                                "model": self.model,
                                "question": question,
                                "prediction": str(prediction),
                                "explanation": explanation,
                            }
                        )
                        + "\n"
                    )
            return verdict
        finally:
            with self._lock:
                self._inflight.pop(k).set()

    def _ask(self, prompt: str) -> tuple[bool, str]:
        import time

        import httpx

        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = httpx.Client(
                        timeout=self.timeout_s, headers={"Authorization": f"Bearer {self.api_key}"}
                    )
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            body = {
                "model": self.model,
                "temperature": self.temperature,
                "messages": [{"role": "user", "content": prompt}],
            }
            if self.structured:
                body["response_format"] = JUDGE_SCHEMA
            with self._lock:
                self.requests += 1
            try:
                r = self._client.post(f"{self.base_url}/chat/completions", json=body)
            except httpx.HTTPError as e:
                last = e
            else:
                if r.status_code == 400 and self.structured:  # no structured output here: ask plainly
                    self.structured = False
                    continue
                if r.status_code < 400:
                    text = r.json()["choices"][0]["message"].get("content") or ""
                    return parse_verdict(text) or (False, f"unparsed reply: {text[:500]}")
                last = RuntimeError(f"judge: HTTP {r.status_code}: {r.text[:300]}")
                if r.status_code != 429 and r.status_code < 500:
                    raise last
            time.sleep(min(30.0, 0.5 * 2**attempt))
        raise ConnectionError(f"judge: no verdict after {self.max_retries + 1} attempts: {last!r}")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def judge_records(records: Sequence[dict], judge: LLMJudge, max_workers: int = 8) -> list[float]:
    """The judge's 1.0/0.0 for each factual record (keys ``question``, ``gold``, ``prediction``: trajectory
    records or ``Example``-like dicts with ``answer``), ``max_workers`` requests at a time; cached verdicts cost
    nothing. Records without a prediction score 0.0 without a request."""
    from concurrent.futures import ThreadPoolExecutor

    def one(r: dict) -> float:
        gold = r["gold"] if "gold" in r else r["answer"]
        return float(judge(r["question"], gold, r.get("prediction")))

    if not records:
        return []
    with ThreadPoolExecutor(max(1, min(max_workers, len(records)))) as pool:
        return list(pool.map(one, records))
