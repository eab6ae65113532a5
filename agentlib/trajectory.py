"""Trajectory records: append-only JSONL with fsync (resumable runs), filtering for SFT, summaries.

One JSON object per question (schema in ``agentlib.agent``'s docstring). A run appends each record as
soon as its question is finished and fsyncs, so an interrupted run loses at most the questions in
flight; rerunning with the same ``out_path`` skips the ids already written (0 lost, 0 duplicated).
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

_SEARCH_CALL = re.compile(r"\bsearch\s*\(")


def read_records(path: str | Path) -> list[dict]:
    """All complete records of a JSONL file, gzipped when it ends in ``.gz`` (a torn last line from a crash
    is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with (gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")) as f:
        for line in f:
            if not line.endswith(b"\n"):
                break  # torn write: the record was never completed
            line = line.strip()
            if line:
                records.append(json.loads(line))
    return records


class JsonlWriter:
    """Append records to a JSONL file, one line each, flushed and fsynced before returning.

    Opening repairs a torn last line (an interrupted write) by truncating the file to its last newline.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                with self.path.open("r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
        self._f = self.path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def filter_trajectories(records: Iterable[dict], require_correct: bool = True) -> list[dict]:
    """Training data: correct answer, no code-parsing error, step limit not hit, no repeated step.

    Execution errors that the model recovered from (it still answered correctly) are kept, as in the
    paper. Unlike the paper's code, the step-limit check is real: ``hit_step_limit`` records are dropped,
    and so are ``stopped_on_repeat`` ones (a loop that was cut short instead of running into the limit).
    ``require_correct=False`` keeps well-formed trajectories whatever their answer (an ablation, not the paper).
    """
    return [
        r
        for r in records
        if r.get("prediction") is not None
        and (not require_correct or float(r.get("score", 0.0)) >= 1.0)
        and int(r.get("parse_errors", 0)) == 0
        and not r.get("hit_step_limit", False)
        and not r.get("stopped_on_repeat", False)
    ]


def search_calls(record: dict) -> int:
    """Number of ``search(`` call sites in the code the trajectory executed (a static count)."""
    return sum(len(_SEARCH_CALL.findall(s.get("code") or "")) for s in record.get("steps", []))


def summarize(records: list[dict]) -> dict:
    """Accuracy, parse-error rate (share of trajectories with >= 1), step-limit rate, repeat-stop rate, mean steps,
    mean search calls, execution-error rate (share of steps) and generation throughput."""
    n = len(records)
    if n == 0:
        return {"n": 0}
    steps = [s for r in records for s in r.get("steps", [])]
    completion = sum(int(s.get("completion_tokens", 0)) for s in steps)
    gen_s = sum(float(s.get("gen_s", 0.0)) for s in steps)
    return {
        "n": n,
        "accuracy": sum(float(r.get("score", 0.0)) for r in records) / n,
        "parse_error_rate": sum(int(r.get("parse_errors", 0)) > 0 for r in records) / n,
        "step_limit_rate": sum(bool(r.get("hit_step_limit")) for r in records) / n,
        "repeat_stop_rate": sum(bool(r.get("stopped_on_repeat")) for r in records) / n,
        "mean_steps": len(steps) / n,
        "mean_search_calls": sum(search_calls(r) for r in records) / n,
        "exec_error_rate": (sum(s.get("error") is not None for s in steps) / len(steps)) if steps else 0.0,
        "completion_tokens": completion,
        "tokens_per_s": completion / gen_s if gen_s > 0 else None,
    }
