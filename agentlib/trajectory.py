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
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agentlib.profiles import Profile

__all__ = [
    "base_id",
    "read_records",
    "JsonlWriter",
    "filter_trajectories",
    "search_calls",
    "summarize",
    "published_path",
    "teacher_settings",
    "publish_teacher",
    "PublishedMismatch",
    "load_published",
    "read_published",
    "seed_from_published",
]

_SEARCH_CALL = re.compile(r"\bsearch\s*\(")


def base_id(record_id: str) -> str:
    return record_id.split("#", 1)[0]


def read_records(path: str | Path) -> list[dict]:
    """All complete records of a JSONL file, gzipped when it ends in ``.gz`` (a torn last line from a crash
    is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as f:
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


# ------------------------------------------------------------------ publishing the teacher's trajectories
def published_path(p: Profile) -> Path:
    """``data/teacher_trajectories_<set>.jsonl.gz``: the profile's own set, or the one it shares (``teacher_set``)."""
    from agentlib.paths import ROOT

    return ROOT / "data" / f"teacher_trajectories_{p.teacher_set or p.name}.jsonl.gz"


def _manifest_path(path: Path) -> Path:
    return path.with_name(path.name.replace(".jsonl.gz", ".manifest.json"))


def teacher_settings(p: Profile) -> dict[str, Any]:
    """What makes two teacher runs comparable: model and its sha256, prompts, sampling, budgets, questions.

    A published set is reused only where these match the profile (:func:`load_published`)."""
    import hashlib
    import importlib.resources

    from agentlib import registry

    spec = registry.MODELS.get(p.teacher)
    prompts = {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        for path in importlib.resources.files("agentlib.prompts").iterdir()
        if path.name.endswith(".yaml")
    }
    return {
        "teacher": p.teacher,
        "teacher_gguf_sha256": getattr(spec, "sha256", None),
        "prompts_sha256": prompts,
        "teacher_samples": p.teacher_samples,
        "temperature": p.teacher_temperature,
        "top_p": p.teacher_top_p,
        "teacher_max_tokens": p.teacher_max_tokens,
        "cot_max_tokens": p.cot_tokens,
        "max_steps": p.max_steps,
        "top_k": p.top_k,
        "passage_chars": p.passage_chars,
        "retriever": p.retriever,
        "stop_on_repeat": p.stop_on_repeat,
        "short_prompt": p.teacher_short_prompt,
        "ftp_source": p.ftp_source,
        "last_output": p.last_output,
        "train_factual": [list(x) for x in p.train_factual],
        "train_math": [list(x) for x in p.train_math],
    }


def publish_teacher(
    p: Profile, runs: dict[str, list], dest: Path | None = None, backend: str | None = None
) -> Path:
    """Write ``data/teacher_trajectories_<profile>.jsonl.gz`` (+ ``.manifest.json``) from a teacher run.

    Each record gains ``run``, ``domain`` and ``backend`` (a record of the set it replaces keeps its own). The
    manifest holds :func:`teacher_settings`, the backend of this run and the records per backend, the
    questions covered per run and domain, the date, the code version and the file's sha256, so notebook 01
    (``teacher_source="published"``) and the lab start from it instead of regenerating.
    """
    import datetime
    import subprocess

    from agentlib.paths import ROOT, file_sha256
    from agentlib.pipeline import question_domains

    dest = dest or published_path(p)
    dest.parent.mkdir(parents=True, exist_ok=True)
    domain = question_domains(p)
    backend = backend or p.teacher_backend
    made_by = _backends_before(dest)  # a record published before keeps the backend that made it
    stamped = {
        name: [{**r, "backend": r.get("backend") or made_by.get((name, r["id"]), backend)} for r in records]
        for name, records in runs.items()
    }
    lines = [
        json.dumps(
            {**r, "run": name, "domain": r.get("domain") or domain.get(base_id(r["id"]), "")},
            ensure_ascii=False,
        )
        for name, records in stamped.items()
        for r in records
    ]
    with gzip.GzipFile(dest, "wb", mtime=0) as f:  # mtime=0: the same trajectories give the same bytes
        f.write(("\n".join(lines) + "\n").encode())
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    covered: dict[str, dict[str, int]] = {}
    for name, records in runs.items():
        qs = {base_id(r["id"]) for r in records}
        covered[name] = {d: sum(domain.get(q) == d for q in qs) for d in ("factual", "math")}
    manifest = {
        "profile": p.name,
        **teacher_settings(p),
        "backend": backend,
        "backends": dict(
            Counter(r["backend"] for records in stamped.values() for r in records).most_common()
        ),
        "counts": {name: len(records) for name, records in runs.items()},
        "questions": covered,
        "date": datetime.date.today().isoformat(),
        "code_version": commit,
        "file_sha256": file_sha256(dest),
    }
    _manifest_path(dest).write_text(json.dumps(manifest, indent=2) + "\n")
    return dest


def _backends_before(path: Path) -> dict[tuple[str, str], str]:
    """(run, id) -> the backend that made each record of the set already at ``path`` (its manifest's, for
    records from before records carried one)."""
    if not path.exists() or not _manifest_path(path).exists():
        return {}
    default = json.loads(_manifest_path(path).read_text()).get("backend", "")
    return {(r["run"], r["id"]): r.get("backend") or default for r in read_records(path)}


class PublishedMismatch(ValueError):
    """A published teacher set does not match its manifest, or the manifest does not match the profile."""


def load_published(p: Profile, path: Path | None = None, check_settings: bool = True) -> dict[str, list]:
    """The published teacher set of profile ``p`` as records by run name, checked before use.

    Raises :class:`PublishedMismatch` when the file's sha256 differs from its manifest's, or (with
    ``check_settings``) when a setting of :func:`teacher_settings` differs from the profile's, naming each.
    """
    from agentlib.paths import file_sha256

    path = path or published_path(p)
    mpath = _manifest_path(path)
    if not path.exists() or not mpath.exists():
        raise FileNotFoundError(
            f"no published teacher set at {path} (+ manifest): run notebook 01 with teacher_source='generate'"
        )
    manifest = json.loads(mpath.read_text())
    digest = file_sha256(path)
    if digest != manifest.get("file_sha256"):
        raise PublishedMismatch(
            f"{path.name}: sha256 {digest[:12]} is not the manifest's {str(manifest.get('file_sha256'))[:12]}"
        )
    if check_settings:
        want = teacher_settings(p)
        bad = {k: (manifest.get(k), v) for k, v in want.items() if manifest.get(k) != v}
        if bad:
            lines = "; ".join(f"{k}: published {a!r}, profile {b!r}" for k, (a, b) in bad.items())
            raise PublishedMismatch(
                f"{path.name} was made with other settings than profile {p.name!r}: {lines}"
            )
    return read_published(path)


def read_published(path: Path) -> dict[str, list]:
    """A file written by ``publish_teacher``, back as records by run name (in the file's order)."""
    runs: dict[str, list] = {}
    for r in read_records(path):
        runs.setdefault(r["run"], []).append(r)
    return runs


def seed_from_published(p: Profile, out_dir: Path) -> int:
    """Resume a generation from the published set: its records whose ids the run files of ``out_dir`` lack are
    appended to them (a fresh checkout has the published increments but not ``runs/``). Only a set made with
    the profile's settings is used; returns the number of records added."""
    try:
        published = load_published(p)
    except (FileNotFoundError, PublishedMismatch):
        return 0
    added = 0
    for name, records in published.items():
        path = out_dir / f"{name}.jsonl"
        have = {r["id"] for r in read_records(path)} if path.exists() else set()
        with JsonlWriter(path) as w:
            for r in records:
                if r["id"] not in have:
                    w.write({k: v for k, v in r.items() if k not in ("run", "domain")})
                    added += 1
    return added
