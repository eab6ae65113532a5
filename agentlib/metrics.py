"""Answer scoring: HotpotQA exact match / F1, math equivalence (math-verify), optional LLM judge.

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
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agentlib.data import Example


# ---------------------------------------------------------------- factual (official HotpotQA)
def normalize_answer(s: str) -> str:
    """Lowercase, drop punctuation, drop articles (a, an, the), collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _f1_one(pred: str, gold: str) -> float:
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
    return max((_f1_one(str(pred), g) for g in _golds(golds)), default=0.0)


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
def _strip_math(s: str) -> str:
    s = str(s).strip().strip("$").strip()
    s = re.sub(r"\\(?:d|t)frac", r"\\frac", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace(" ", "")
    return s.rstrip(".")


def _as_float(s: str) -> float | None:
    try:
        return float(_strip_math(s).replace(",", ""))
    except ValueError:
        return None


class _MathVerifier:
    """One long-lived worker process (``agentlib._verify_worker``); restarted after a timeout."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None

    def _start(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "agentlib._verify_worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )  # fmt: skip
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
    """Is ``pred`` mathematically equal to ``gold``? ``\\boxed{}`` is extracted; LaTeX and numbers compared.

    Never hangs: a comparison past ``timeout_s`` seconds returns False.
    """
    if pred is None or str(pred).strip() == "" or str(gold).strip() == "":
        return False
    pred, gold = str(pred), str(gold)
    if _strip_math(pred) == _strip_math(gold):
        return True
    a, b = _as_float(pred), _as_float(gold)
    if a is not None and b is not None:  # plain numbers: 1e3, 1,000, 13138980.0
        return abs(a - b) <= 1e-9 * max(1.0, abs(b))
    return _VERIFIER(pred, gold, timeout_s)


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


# ---------------------------------------------------------------- optional LLM judge
JUDGE_PROMPT = (
    "You are grading an answer to a question.\nQuestion: {question}\nGold answer: {gold}\n"
    "Predicted answer: {pred}\nIs the predicted answer correct (same meaning as the gold answer)? "
    "Reply with exactly one word: yes or no."
)


class LLMJudge:
    """Judge factual answers with any OpenAI-compatible chat endpoint; verdicts cached on disk.

    Never required for a run: it is used only when a profile or notebook configures one.
    """

    def __init__(self, base_url: str, model: str, cache_path: Path, api_key: str = "EMPTY") -> None:
        self.base_url, self.model, self.api_key = base_url.rstrip("/"), model, api_key
        self.cache_path = Path(cache_path)
        self.cache: dict[str, bool] = {}
        if self.cache_path.is_file():
            for line in self.cache_path.read_text().splitlines():
                rec = json.loads(line)
                self.cache[rec["key"]] = rec["verdict"]

    def key(self, question: str, gold: str, pred: str) -> str:
        return hashlib.sha256(json.dumps([self.model, question, gold, pred]).encode()).hexdigest()

    def __call__(self, question: str, gold: str, pred: str | None) -> bool:
        if pred is None:
            return False
        k = self.key(question, gold, pred)
        if k not in self.cache:
            import httpx

            r = httpx.post(
                f"{self.base_url}/chat/completions",
                headers={"Authorization": f"Bearer {self.api_key}"},
                json={
                    "model": self.model,
                    "temperature": 0.0,
                    "max_tokens": 3,
                    "messages": [{"role": "user", "content": JUDGE_PROMPT.format(question=question, gold=gold, pred=pred)}],
                },
                timeout=60,
            )
            r.raise_for_status()
            text = r.json()["choices"][0]["message"]["content"].strip().lower()
            self.cache[k] = text.startswith("yes")
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            with self.cache_path.open("a") as f:
                f.write(json.dumps({"key": k, "verdict": self.cache[k]}) + "\n")
        return self.cache[k]
