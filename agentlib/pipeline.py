"""The stages the notebooks run, one function per stage, all driven by a `Profile`.

01 teacher: ``teacher_stage`` (CoT, first-thought prefixes, agent runs with/without FTP, rejection
sampling, filtering, SFT datasets). 02 SFT: ``sft_stage``. 03 evaluation: ``evaluate_method`` and
``results_table``. 04 ablations reuse the same calls with other settings. Every stage writes its
outputs under ``runs/<profile>/`` and resumes from them.

What the stages use lives with its kind: statistics in ``metrics``, tables in ``report``, publishing and
loading the teacher's set in ``trajectory``, fine-tuning settings in ``Profile.sft`` (an ``sft.SFTConfig``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from agentlib.agent import (
    SAG_VOTES,
    AgentConfig,
    AgentRun,
    CotRun,
    drive,
    ftp_prefix,
    make_prefixes,
    prefixes_from_cot,
    run_agent,
    run_cot,
)
from agentlib.data import Example, load_benchmark, load_extra
from agentlib.metrics import bootstrap_ci, mean_f1, stratified_ci
from agentlib.models import Sampling
from agentlib.profiles import Profile
from agentlib.sft import SFTConfig
from agentlib.trajectory import (
    base_id,
    filter_trajectories,
    load_published,
    publish_teacher,
    read_records,
    seed_from_published,
    summarize,
)

__all__ = [
    "PAPER_05B",
    "SLOTS",
    "SLOT_CTX",
    "METHODS",
    "training_sets",
    "eval_sets",
    "question_domains",
    "closed_book",
    "open_retriever",
    "open_model",
    "native_bf16",
    "resolve_backend",
    "teacher_backend",
    "student_backend",
    "open_teacher",
    "open_student",
    "STUDENT_BATCH",
    "TEACHER_BATCH",
    "teacher_config",
    "student_config",
    "TEACHER_RUNS",
    "teacher_chunks",
    "sharded",
    "teacher_stage",
    "TEACHER_SOURCES",
    "teacher_runs",
    "sft_datasets",
    "teacher_summary",
    "sft_config",
    "UNTRAINED",
    "student_dir",
    "method_label",
    "sft_stage",
    "adapter_dirs",
    "method_plan",
    "evaluate_method",
    "open_judge",
    "judge_factual",
    "results_table",
    "run_summaries",
    "load_records",
    "trajectory_shape",
]

# Table 2 of the paper, Qwen2.5-0.5B-Instruct student, averages over the 8 benchmarks (accuracy, %).
PAPER_05B = {
    "cot_distill": 13.64,
    "cot_distill_rag": 15.90,
    "agent_distill": 19.24,
    "agent_distill_ftp_sag": 21.90,
}

# A local llama.cpp server's slots, and the trajectories the agent advances together: one per slot, so
# each conversation keeps its slot (and its prompt cache) from step to step. More trajectories than
# slots make them take each other's slots and re-prefill whole conversations every step.
SLOTS = 6
SLOT_CTX = 5120  # context tokens per slot: the teacher's 1.9k-token prompt + 5 steps (see `open_model`)

METHODS = (
    "untuned_cot",
    "untuned_agent",
    "cot_distill",
    "cot_distill_rag",
    "agent_distill",
    "agent_distill_ftp",
    "agent_distill_sag",
    "agent_distill_ftp_sag",
)


# ------------------------------------------------------------------ questions
def _load(loader: str, name: str, count: int, answerable_only: bool) -> list[Example]:
    if loader == "extra":
        return load_extra(name, limit=count)
    return load_benchmark(name, loader, limit=count, answerable_only=answerable_only and loader == "test")


def training_sets(p: Profile) -> dict[str, list[Example]]:
    """{"factual": [...], "math": [...]}: the profile's training questions (never in a test set).

    A spec ``(loader, name, count, first)`` takes rows ``first`` .. ``first + count - 1`` (default first row 0).

    Ids are unique across sets: a set's question whose id an earlier set already holds gets the set's name
    as a prefix (the MATH training files both number their rows from ``0``: MATH's ``0`` becomes ``math/0``).
    Trajectory files resume by id, so a clash would silently drop a question.
    """
    out, seen = {}, set()
    for domain, specs in (("factual", p.train_factual), ("math", p.train_math)):
        out[domain] = []
        for loader, name, count, *first in specs:
            start = first[0] if first else 0
            for ex in _load(loader, name, start + count, answerable_only=False)[start:]:
                if ex.id in seen:
                    ex = replace(ex, id=f"{name}/{ex.id}")
                seen.add(ex.id)
                out[domain].append(ex)
    return out


def question_domains(p: Profile) -> dict[str, str]:
    """Training question id -> "factual" or "math" (records carry only the id)."""
    return {ex.id: domain for domain, exs in training_sets(p).items() for ex in exs}


def eval_sets(p: Profile) -> dict[str, list[Example]]:
    """Benchmark label -> questions. Labels: the benchmark name, or the extra's name (``musique_train100``)."""
    return {name: _load(loader, name, count, p.answerable_only) for loader, name, count in p.eval_sets}


def closed_book(benchmark: str, p: Profile) -> bool:
    """True where the retrieval corpus does not hold the evidence (results are closed-book)."""
    if p.retriever != "wiki_mini":
        return False
    answerable = {"musique_train100", "hotpotqa_dev300", "hotpotqa_train100"}
    return benchmark not in answerable and not (benchmark == "hotpotqa" and p.answerable_only)


# ------------------------------------------------------------------ components
def open_retriever(p: Profile, k: int | None = None):
    """The profile's BM25 retriever: the offline mini-corpus, or a Pyserini prebuilt index (online)."""
    from agentlib.retrieval import BM25Retriever

    if p.retriever == "wiki_mini":
        return BM25Retriever.default()
    return BM25Retriever.prebuilt(p.retriever)


@contextmanager
def open_model(name: str, backend: str, adapter: str | Path | None = None, **kw: Any) -> Iterator[Any]:
    """A chat model for the duration of a ``with`` block (a llama.cpp server is stopped afterwards)."""
    from agentlib.models import load_model

    if backend == "vllm":  # AGENTLIB_ENDPOINTS (servers already up), else its own vLLM server for the block
        from agentlib.serve import vllm_model

        with vllm_model(name, adapter, **kw) as model:  # requests name the LoRA module (the adapter's folder)
            try:
                yield model
            finally:
                if text := model.endpoint_summary():
                    print(f"{name} served by:\n{text}")
        return
    if backend == "llamacpp":
        # The slots decode as one batch. Each slot keeps its conversation's KV cache, so the next step only
        # prefills the new observation: the shared context must hold every slot's whole trajectory. When it
        # is full, llama.cpp drops caches and steps re-prefill whole conversations (~8 min a step on 2 cores).
        kw.setdefault("n_parallel", SLOTS)
        kw.setdefault("n_ctx", kw["n_parallel"] * SLOT_CTX)
    if adapter is not None:
        kw["adapter"] = adapter
    model = load_model(name, backend=backend, **kw)
    try:
        yield model
    finally:
        summary = getattr(model, "endpoint_summary", None)
        if summary and (text := summary()):  # servers' share of the work, as the run's summary
            print(f"{name} served by:\n{text}")
        close = getattr(model, "close", None)
        if close:
            close()


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): batched bf16 transformers then beat
    llama.cpp for the teacher (``bench/bench_teacher.py``); elsewhere bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_backend(backend: str) -> str:
    """``"auto"``: ``"hf"`` (batched bf16 transformers) on CPUs with native bf16, else ``"llamacpp"``."""
    if backend != "auto":
        return backend
    return "hf" if native_bf16() else "llamacpp"


def teacher_backend(p: Profile) -> str:
    """The profile's teacher backend (:func:`resolve_backend`)."""
    return resolve_backend(p.teacher_backend)


def student_backend(p: Profile) -> str:
    """The profile's student backend (:func:`resolve_backend`)."""
    return resolve_backend(p.student_backend)


@contextmanager
def open_student(
    p: Profile, name: str, adapter: str | Path | None = None, backend: str | None = None
) -> Iterator[Any]:
    """Student ``name`` (with its LoRA ``adapter``, if any) on the profile's student backend.

    ``hf``: the adapter merged into the bf16 weights (no LoRA matmuls at run time), ``STUDENT_BATCH``
    trajectories decoding together; ``llamacpp``: the GGUF base with the adapter applied at run time.
    """
    backend = backend or student_backend(p)
    kw: dict[str, Any] = {"merge_adapter": True, "max_batch": STUDENT_BATCH} if backend == "hf" else {}
    with open_model(name, backend, adapter=adapter, **kw) as model:
        yield model


# student trajectories decoding together in-process (SAG's N samples share one row's prompt)
STUDENT_BATCH = 32


@contextmanager
def open_teacher(p: Profile, backend: str | None = None) -> Iterator[Any]:
    """The profile's teacher (backend: :func:`teacher_backend`).

    llama.cpp: ``p.teacher_servers`` servers, each with ``p.teacher_slots`` slots and an equal share of the
    cores, as a list of models that :func:`teacher_stage` deals trajectories over (one 1-thread server per
    core does not stall when another process takes a core, as a 2-thread one does). In-process (``hf``): one
    model batching ``TEACHER_BATCH`` trajectories.
    """
    import os
    from contextlib import ExitStack

    backend = backend or teacher_backend(p)
    if backend == "llamacpp":
        threads = max(1, (os.cpu_count() or 1) // p.teacher_servers)
        with ExitStack() as stack:
            # 8k tokens a slot: the 1.9k-token few-shot prompt and five long steps with their observations
            models = [
                stack.enter_context(
                    open_model(
                        p.teacher,
                        backend,
                        n_parallel=p.teacher_slots,
                        threads=threads,
                        n_ctx=p.teacher_slots * 8192,
                    )
                )
                for _ in range(p.teacher_servers)
            ]
            yield models[0] if len(models) == 1 else models
        return
    kw: dict[str, Any] = {}
    if backend == "hf":  # every trajectory's previous turn stays cached: ~29 KB a token for the 1.5B
        kw = {"max_batch": TEACHER_BATCH, "prefix_cache_mb": 4096}
    with open_model(p.teacher, backend, **kw) as model:
        yield model


TEACHER_BATCH = 32  # trajectories decoding together in-process: a full batch keeps the 2 cores busy (bf16)


def _batch(backend: str, n_samples: int = 1, slots: int = SLOTS, in_process: int = 16) -> int:
    """Trajectories advanced together: one per llama.cpp slot (a SAG step takes ``n_samples`` slots);
    ``in_process`` with transformers; 16 elsewhere (vLLM batches any number)."""
    if backend == "llamacpp":
        return max(1, slots // n_samples)
    return in_process if backend == "hf" else 16


def teacher_config(p: Profile, **kw: Any) -> AgentConfig:
    base = dict(
        max_steps=p.max_steps,
        temperature=p.teacher_temperature,
        top_p=p.teacher_top_p,
        max_tokens=p.teacher_max_tokens,
        search_k=p.top_k,
        search_chars=p.passage_chars,
        batch_size=_batch(teacher_backend(p), slots=p.teacher_slots, in_process=TEACHER_BATCH),
        method="teacher",
        short_prompt=p.teacher_short_prompt,
        stop_on_repeat=p.stop_on_repeat,
        last_output=p.last_output,
    )
    return AgentConfig.teacher(**{**base, **kw})


def student_config(p: Profile, sag: bool = False, **kw: Any) -> AgentConfig:
    if p.sag_vote not in SAG_VOTES:
        raise ValueError(f"unknown sag_vote {p.sag_vote!r}; choose from {SAG_VOTES}")
    n_samples = kw.get("n_samples", p.sag_n) if sag else 1
    base = dict(
        max_steps=p.max_steps,
        max_tokens=p.student_max_tokens,
        search_k=p.top_k,
        search_chars=p.passage_chars,
        batch_size=_batch(student_backend(p), n_samples, in_process=STUDENT_BATCH),
        stop_on_repeat=p.stop_on_repeat,
        sag_vote=p.sag_vote,
        last_output=p.last_output,
    )
    if sag:
        base.update(n_samples=p.sag_n, temperature=p.sag_temperature, top_p=p.sag_top_p)
        return AgentConfig.sag(**{**base, **kw})
    return AgentConfig.student(**{**base, **kw})


# ------------------------------------------------------------------ 01: teacher
def _copies(examples: Sequence[Example], tag: str) -> list[Example]:
    """Copies with ids ``<id>#<tag>``, so several samples of one question live in one JSONL file."""
    return [replace(ex, id=f"{ex.id}#{tag}") for ex in examples]


TEACHER_RUNS = ("cot", "agent", "agent_ftp")


def teacher_chunks(p: Profile) -> list[list[Example]]:
    """The training questions in chunks of ``p.teacher_chunk``, factual and math interleaved in proportion, so
    every chunk (a checkpoint of the teacher run, and an increment of the published set) has both domains."""
    sets = training_sets(p)
    fact, math = sets["factual"], sets["math"]
    n = max(1, -(-(len(fact) + len(math)) // max(1, p.teacher_chunk)))
    cut = lambda xs, i: xs[len(xs) * i // n : len(xs) * (i + 1) // n]  # noqa: E731
    return [cut(fact, i) + cut(math, i) for i in range(n)]


def sharded(fn: Any, models: Sequence[Any], items: Sequence[Any]) -> list[Any]:
    """``fn(model, shard)`` for each model, the items dealt round-robin over ``models`` (one thread each, e.g.
    one llama.cpp server per core); the results in the models' order."""
    if len(models) == 1 or len(items) <= 1:
        return [fn(models[0], list(items))]
    from concurrent.futures import ThreadPoolExecutor

    shards = [list(items[i :: len(models)]) for i in range(len(models))]
    with ThreadPoolExecutor(len(models)) as pool:
        return list(pool.map(fn, models, shards))


def teacher_stage(
    p: Profile,
    model: Any,
    retriever: Any,
    out_dir: Path,
    progress: bool = True,
    runs: Sequence[str] = TEACHER_RUNS,
    on_chunk: Any = None,
    questions: Sequence[Example] | None = None,
) -> dict[str, list]:
    """Run the teacher on the training questions (``questions``: these instead, as one chunk); return all
    trajectory records by run name.

    - ``cot``: chain-of-thought answers (CoT-distillation data);
    - ``agent``: CodeAct agent without FTP;
    - ``agent_ftp``: the same, the first step starting with the first-thought prefix built from the ``cot``
      run's own answer as the authors do (:func:`agentlib.agent.ftp_prefix`; ``p.ftp_source="plan"``: the
      plan-prompted variant, an ablation).

    Sample 0 of every run is greedy (the paper). With ``p.teacher_samples > 1`` a question that no sample of
    a run has solved yet gets another sample at the profile's temperature, up to ``teacher_samples`` (rejection
    sampling, a documented departure). Questions go in chunks (:func:`teacher_chunks`): each chunk gets all of
    its samples of all runs, then ``on_chunk(done, total, records_so_far)`` (notebook 01 publishes there).
    In-process and on vLLM a chunk's runs decode together (:class:`_TeacherChunk`); on llama.cpp in turn.
    Every record is appended to ``out_dir/<run>.jsonl`` as it finishes, so an interrupted stage resumes.
    ``model``: one model, or a list of models the trajectories are dealt over (one server per core).
    """
    unknown = set(runs) - set(TEACHER_RUNS)
    if unknown:
        raise ValueError(f"unknown teacher runs {sorted(unknown)}; choose from {TEACHER_RUNS}")
    if "agent_ftp" in runs and p.ftp_source == "cot" and "cot" not in runs:
        raise ValueError("the agent_ftp run takes its prefixes from the cot run: add 'cot' to runs")
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    out_dir.mkdir(parents=True, exist_ok=True)
    chunks = [list(questions)] if questions is not None else teacher_chunks(p)
    out: dict[str, list] = {name: [] for name in TEACHER_RUNS if name in runs}

    def done(i: int, records: dict[str, list]) -> None:
        for name, recs in _in_order(chunks[i], records).items():
            out[name] += recs
        if on_chunk is not None:
            on_chunk(i + 1, len(chunks), out)

    if teacher_backend(p) != "llamacpp" and len(models) == 1:
        make = lambda chunk: _TeacherChunk(p, models[0], retriever, out_dir, chunk, runs, progress, True)  # noqa: E731
        drive(models[0], [_Chunks([make(c) for c in chunks], teacher_config(p).batch_size, done)])
        return out
    for i, chunk in enumerate(chunks):
        done(i, _teacher_chunk(p, models, retriever, out_dir, chunk, runs, progress))
    return out


TEACHER_SOURCES = ("published", "generate")


def teacher_runs(
    p: Profile,
    source: str | None = None,
    out_dir: Path | None = None,
    progress: bool = True,
    publish: bool = True,
) -> dict[str, list]:
    """Notebook 01's teacher data: ``source="published"`` loads and checks ``data/``'s set
    (:func:`load_published`); ``"generate"`` runs the teacher (:func:`teacher_stage`, resumable) and, with
    ``publish``, rewrites the published set after every chunk. ``None``: the profile's ``teacher_source``."""
    from agentlib.paths import runs_dir

    source = source or p.teacher_source
    if source not in TEACHER_SOURCES:
        raise ValueError(f"unknown teacher_source {source!r}; choose from {TEACHER_SOURCES}")
    if source == "published":
        runs = load_published(p)
        seed_from_published(p, out_dir or runs_dir(p.name, "teacher"))  # later notebooks read the run files
    else:
        backend = teacher_backend(p)
        out_dir = out_dir or runs_dir(p.name, "teacher")
        if publish and (added := seed_from_published(p, out_dir)):
            print(f"resuming from the published set: {added} trajectories copied to {out_dir}")

        def on_chunk(done: int, total: int, out: dict[str, list]) -> None:
            if publish:
                path = publish_teacher(p, out, backend=backend)
                print(
                    f"chunk {done}/{total}: published {path.name} ({path.stat().st_size / 1024:.0f} KiB)",
                    flush=True,
                )

        with open_teacher(p, backend) as model:
            runs = teacher_stage(p, model, open_retriever(p), out_dir, progress=progress, on_chunk=on_chunk)
            usage = getattr(model, "usage", None)
        if usage is not None and usage.seconds:
            print(
                f"teacher ({backend}): {usage.completion_tokens:,} tokens generated, {usage.prompt_tokens:,} "
                f"prompt tokens, {usage.seconds / 60:.1f} min generating, {usage.tokens_per_s:.1f} tokens/s"
            )
    domain = question_domains(p)
    for records in runs.values():  # the summary reports per domain; published records carry it already
        for r in records:
            r.setdefault("domain", domain.get(base_id(r["id"]), ""))
    coverage = {name: len({base_id(r["id"]) for r in records}) for name, records in runs.items()}
    wanted = sum(len(v) for v in training_sets(p).values())
    print(
        f"teacher data ({source}): "
        + ", ".join(
            f"{n} {k} trajectories over {coverage[k]} of {wanted} questions"
            for k, n in ((k, len(v)) for k, v in runs.items())
        )
    )
    return runs


class _TeacherChunk:
    """The teacher's runs on one chunk of questions, as one job (``agent.drive``) over a job per (run, sample).

    Work moves per question: a run's sample ``j+1`` takes a question as soon as sample ``j`` has failed on
    it (no sample of that run has solved it), and ``agent_ftp`` takes a question as soon as its greedy CoT
    answer, the source of its prefix, is in. ``concurrent``: every job takes its questions as they come, so
    the runs' requests share the model's batch up to the chunk's end (no run waits for another run's slowest
    answer); else one job at a time, in the order (sample, run), each once all its questions are known -- a
    llama.cpp slot keeps one conversation's cache, so interleaved trajectories would re-prefill every step.
    """

    def __init__(
        self,
        p: Profile,
        model: Any,
        retriever: Any,
        out_dir: Path,
        chunk: list[Example],
        runs: Sequence[str],
        progress: bool,
        concurrent: bool,
    ):
        self.p, self.model, self.retriever, self.out_dir = p, model, retriever, out_dir
        self.chunk, self.concurrent = chunk, concurrent
        self.by_id = {ex.id: ex for ex in chunk}
        self.out: dict[str, list] = {name: [] for name in TEACHER_RUNS if name in runs}
        samples = max(1, p.teacher_samples)
        self.todo = [(name, j) for j in range(samples) for name in self.out]  # jobs not made yet, in turn
        self.inbox: dict[tuple[str, int], list[Example]] = {key: [] for key in self.todo}
        for name in self.out:
            if not self._fed_by_cot(name):
                self.inbox[(name, 0)] = list(chunk)
        self.active: dict[tuple[str, int], Any] = {}
        self.prefixes: dict[str, str] = {}  # question id -> first-thought prefix
        self.bars = {name: _GrowBar(name, progress) for name in self.out}

    def _fed_by_cot(self, name: str) -> bool:
        return name == "agent_ftp" and self.p.ftp_source == "cot"

    def _make(self, key: tuple[str, int], questions: list[Example], open_: bool) -> Any:
        """The job for run ``name``'s sample ``j`` on ``questions`` (``open_``: more may come)."""
        (name, j), p = key, self.p
        temperature = 0.0 if j == 0 else p.teacher_temperature
        if name == "cot":
            early = j == 0 and "agent_ftp" in self.out and self._fed_by_cot("agent_ftp")
            job: Any = CotRun(
                [],
                Sampling(temperature=temperature, top_p=p.teacher_top_p, max_tokens=p.cot_tokens),
                batch_size=teacher_config(p).batch_size,
                out_path=self.out_dir / "cot.jsonl",
                progress=False,
                watch=self._first_paragraph if early else None,
            )
        else:
            if name == "agent_ftp" and not self._fed_by_cot(name) and not self.prefixes:
                self.prefixes = _plan_prefixes(p, self.model, self.chunk, self.out_dir)
            job = AgentRun(
                self.model,
                [],
                teacher_config(p, method=f"teacher_{name}", temperature=temperature),
                out_path=self.out_dir / f"{name}.jsonl",
                retriever=self.retriever,
                progress=False,
            )
        self._add(job, key, questions)
        job.open = open_
        return job

    def _add(self, job: Any, key: tuple[str, int], questions: list[Example]) -> None:
        if key[0] == "agent_ftp":
            job.prefixes.update(
                {f"{ex.id}#s{key[1]}": self.prefixes[ex.id] for ex in questions if ex.id in self.prefixes}
            )
        job.add(_copies(questions, f"s{key[1]}"))
        self.bars[key[0]].grow(len(questions))

    def _send(self, key: tuple[str, int], qid: str) -> None:
        """Question ``qid`` for job ``key``: to the job if it runs, else to its inbox."""
        if key not in self.inbox:  # past the last sample
            return
        if key in self.active:
            self._add(self.active[key], key, [self.by_id[qid]])
        else:
            self.inbox[key].append(self.by_id[qid])

    def _first_paragraph(self, ex: Example, text: str) -> bool:
        """A greedy CoT answer decoding in-process has its first paragraph: the question's FTP trajectory
        starts now, not once the answer (up to ``cot_tokens``) is done. The prefix is the one the finished
        answer gives (:func:`agentlib.agent.ftp_prefix` keeps only what precedes the first blank line)."""
        if "\n\n" not in text.lstrip():
            return False
        qid = base_id(str(ex.id))
        self.prefixes[qid] = ftp_prefix(text)
        self._send(("agent_ftp", 0), qid)
        return True

    def _settle(self, key: tuple[str, int], rec: dict) -> None:
        """A record is in: pass its question on to the jobs that wait for it."""
        (name, j), qid = key, base_id(rec["id"])
        self.bars[name].update(1)
        if name == "cot" and j == 0 and self._fed_by_cot("agent_ftp"):
            for prefix in prefixes_from_cot([rec]).values():
                self.prefixes.setdefault(qid, prefix)  # a prefix taken early stays: its trajectory runs
            self._send(("agent_ftp", 0), qid)
        if not filter_trajectories([rec]):
            self._send((name, j + 1), qid)

    def _feeders_done(self, key: tuple[str, int]) -> bool:
        name, j = key
        upstream = [(name, j - 1)] if j > 0 else [("cot", 0)] if self._fed_by_cot(name) else []
        return all(k not in self.active and k not in self.todo for k in upstream)

    def refill(self, submit: Any) -> None:
        moved = True
        while moved:
            moved = False
            for key, job in list(self.active.items()):
                for rec in job.settled():
                    self._settle(key, rec)
                if job.open and self._feeders_done(key):
                    job.open = False
                if job.finished:
                    del self.active[key]
                    self.out[key[0]] += job.records()
                    job.close()
                    moved = True
            while self.todo and (self.concurrent or not self.active):
                key = self.todo[0]
                if not self.concurrent and not self._feeders_done(key):
                    break
                self.todo.pop(0)
                questions, self.inbox[key] = self.inbox[key], []
                if not self.concurrent and not questions:
                    continue
                self.active[key] = self._make(key, questions, open_=self.concurrent)
                moved = True
        for key, job in self.active.items():
            job.refill(partial(_submit_as, submit, key))

    @property
    def finished(self) -> bool:
        return not self.active and not self.todo

    def load(self) -> int:
        """Questions queued or in flight in this chunk's jobs."""
        return sum(
            len(job.queue) + (job.in_flight if isinstance(job, CotRun) else len(job.active))
            for job in self.active.values()
        )

    def take(self, key: tuple, texts: list[str], info: dict, submit: Any) -> None:
        run, inner = key
        self.active[run].take(inner, texts, info, partial(_submit_as, submit, run))

    def close(self) -> None:
        for job in self.active.values():
            job.close()
        for bar in self.bars.values():
            bar.close()


class _GrowBar:
    """A progress bar whose total grows as work is found (a chunk's retries and prefixed runs)."""

    def __init__(self, name: str, enabled: bool):
        self.name, self.enabled, self.bar = name, enabled, None

    def grow(self, n: int) -> None:
        if not self.enabled or n <= 0:
            return
        if self.bar is None:
            from agentlib.viz import progress_bar

            self.bar = progress_bar(total=0, desc=self.name)
        self.bar.total += n
        self.bar.refresh()

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _submit_as(submit: Any, name: str, key: Any, *args: Any) -> None:
    submit((name, key), *args)


def _teacher_chunk(
    p: Profile,
    models: list,
    retriever: Any,
    out_dir: Path,
    chunk: list[Example],
    runs: Sequence[str],
    progress: bool,
) -> dict[str, list]:
    """All runs and samples of one chunk: each model (server) takes its share of the questions; records come
    back per run in (sample, question) order."""
    concurrent = teacher_backend(p) != "llamacpp"

    def one(model: Any, questions: list[Example]) -> dict[str, list]:
        job = _TeacherChunk(p, model, retriever, out_dir, questions, runs, progress, concurrent)
        drive(model, [job])
        return job.out

    parts = sharded(one, models, chunk)
    return {name: [r for part in parts for r in part[name]] for name in parts[0]}


def _in_order(chunk: list[Example], runs: dict[str, list]) -> dict[str, list]:
    """A chunk's records per run in (sample, question) order, however they were made."""
    where = {ex.id: i for i, ex in enumerate(chunk)}
    order = lambda r: (int(r["id"].rsplit("#s", 1)[1]), where[base_id(r["id"])])  # noqa: E731
    return {name: sorted(records, key=order) for name, records in runs.items()}


class _Chunks:
    """A stage's chunks as one job on one model (in-process or vLLM): the next chunk starts as soon as the
    running ones have fewer questions queued or in flight than the batch holds. A question's chain -- its CoT
    answer, then its FTP trajectory, then that one's retry -- is long, so a chunk ends in a few long
    trajectories; they decode beside the next chunk's work instead of in a nearly empty batch. Chunks are
    done, and ``done(i, records)`` called, in order."""

    def __init__(self, chunks: list[_TeacherChunk], room: int, done: Any):
        self.waiting, self.room, self.done = list(enumerate(chunks)), room, done
        self.running: dict[int, _TeacherChunk] = {}

    def refill(self, submit: Any) -> None:
        for i, chunk in self.running.items():
            chunk.refill(partial(_submit_as, submit, i))
        self._retire()
        while self.waiting and sum(c.load() for c in self.running.values()) < self.room:
            i, chunk = self.waiting.pop(0)
            self.running[i] = chunk
            chunk.refill(partial(_submit_as, submit, i))
            self._retire()  # a chunk all on disk is done at once

    def _retire(self) -> None:
        while self.running and self.running[min(self.running)].finished:
            i = min(self.running)
            chunk = self.running.pop(i)
            chunk.close()
            self.done(i, chunk.out)

    def take(self, key: tuple, texts: list[str], info: dict, submit: Any) -> None:
        i, inner = key
        self.running[i].take(inner, texts, info, partial(_submit_as, submit, i))

    def close(self) -> None:
        for chunk in self.running.values():
            chunk.close()


def _plan_prefixes(p: Profile, model: Any, chunk: list[Example], out_dir: Path) -> dict[str, str]:
    """Question id -> first-step prefix from the plan prompt (``ftp_source="plan"``, an ablation; the
    authors' prefixes, from the greedy CoT answers, are taken per question by :class:`_TeacherChunk`)."""
    if p.ftp_source != "plan":
        raise ValueError(f"unknown ftp_source {p.ftp_source!r}; choose 'cot' or 'plan'")
    path = out_dir / "prefixes_plan.json"
    cached = json.loads(path.read_text()) if path.exists() else {}
    missing = [ex for ex in chunk if ex.id not in cached]
    if missing:  # only the first paragraph is kept, so a short generation suffices
        cached |= make_prefixes(model, missing, max_tokens=min(p.teacher_max_tokens, 160))
        path.write_text(json.dumps(cached, indent=1))
    return cached


def sft_datasets(
    runs: dict[str, list], out_dir: Path, unfiltered_if_empty: bool = False, require_correct: bool = True
) -> dict[str, list]:
    """Filter the teacher's runs into training sets and write ``sft_<name>.jsonl``.

    ``unfiltered_if_empty`` (the smoke profile): a run with no surviving trajectory trains on all of its
    trajectories, so the pipeline's code path is exercised even when a tiny teacher solves nothing.
    ``require_correct``: see ``filter_trajectories``.
    """
    data = {name: filter_trajectories(records, require_correct) for name, records in runs.items()}
    for name, records in data.items():
        if not records and unfiltered_if_empty:
            print(
                f"{name}: no trajectory survived filtering; training on all {len(runs[name])} (smoke profile)"
            )
            data[name] = list(runs[name])
    for name, records in data.items():
        with (out_dir / f"sft_{name}.jsonl").open("w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    return data


def teacher_summary(runs: dict[str, list], kept: dict[str, list]) -> list[dict]:
    """One row per teacher run and domain: the greedy run's accuracy (sample 0, the paper's single run), the
    yield of questions with a kept trajectory from sample 0 alone and from any sample (rejection sampling), the
    greedy answers with no answer in them (cut off by the token budget, or unparsable), the greedy CoT answers
    cut off by their token budget (``cut_pct``, over the records that say: ``None`` if none does), and the shape."""
    rows = []
    for name, records in runs.items():
        for domain in sorted({r.get("domain", "") for r in records}):
            recs = [r for r in records if r.get("domain", "") == domain]
            keep = [r for r in kept[name] if r.get("domain", "") == domain]
            greedy = [r for r in recs if r["id"].endswith("#s0")] or recs
            n = max(1, len({base_id(r["id"]) for r in recs}))
            solved = {base_id(r["id"]) for r in keep}
            solved0 = {base_id(r["id"]) for r in keep if r["id"].endswith("#s0")}
            s = summarize(greedy)
            rows.append(
                {
                    "run": name,
                    "domain": domain or "all",
                    "questions": len({base_id(r["id"]) for r in recs}),
                    "trajectories": len(recs),
                    "accuracy_greedy": 100 * s.get("accuracy", 0.0),
                    "kept": len(keep),
                    "yield_greedy_pct": 100 * len(solved0) / n,
                    "yield_pct": 100 * len(solved) / n,
                    "no_answer_pct": 100
                    * sum(r.get("prediction") is None for r in greedy)
                    / max(1, len(greedy)),
                    "cut_pct": _cut_pct(greedy),
                    "parse_error_rate": 100 * s.get("parse_error_rate", 0.0),
                    "step_limit_rate": 100 * s.get("step_limit_rate", 0.0),
                    "repeat_stop_rate": 100 * s.get("repeat_stop_rate", 0.0),
                    "mean_steps": s.get("mean_steps", 0.0),
                    "mean_search_calls": s.get("mean_search_calls", 0.0),
                    "tokens_per_s": s.get("tokens_per_s"),
                }
            )
    return rows


def _cut_pct(records: list[dict]) -> float | None:
    """Percent of ``records`` (CoT answers) that used their whole token budget, of those that record it."""
    known = [r["cut"] for r in records if r.get("cut") is not None]
    return 100 * sum(known) / len(known) if known else None


# ------------------------------------------------------------------ 02: SFT
def sft_config(p: Profile, kind: str) -> SFTConfig:
    """The profile's ``sft`` config for ``kind`` in {"cot", "agent"}: CoT chats keep their own system prompt
    and have ``p.sft_max_length_cot`` tokens; agent chats get the student's short prompt."""
    if kind == "cot":
        return replace(p.sft, max_length=p.sft_max_length_cot, system_prompt=None)
    if kind != "agent":
        raise ValueError(f"unknown SFT kind {kind!r}; choose 'cot' or 'agent'")
    return replace(p.sft, system_prompt=_student_system_prompt())


def _student_system_prompt() -> str:
    from agentlib.agent import system_prompt

    return system_prompt(["search"], short=True)


UNTRAINED = "untrained.json"  # in a student's folder: no trajectory survived filtering, no adapter


def student_dir(p: Profile, student: str | None, base: Path) -> Path:
    """Where one student size's adapters live: ``base`` itself for a profile with one student (``cpu``), else
    ``base/<size>`` (``paper``: ``students/Qwen2.5-0.5B-Instruct/agent``). The adapter folders keep the names
    ``cot``, ``agent`` and ``agent_ftp``, which vLLM serves them under."""
    student = student or p.student
    if p.student_models == [student]:
        return base
    return base / student.rsplit("/", 1)[-1]


def method_label(p: Profile, method: str, student: str) -> str:
    """A method's name in the tables: as is for a profile with one student, else ``method@size``
    (``agent_distill@Qwen2.5-7B-Instruct``), one row per Table 2 row."""
    return method if p.student_models == [student] else f"{method}@{student.rsplit('/', 1)[-1]}"


def sft_stage(
    p: Profile, datasets: dict[str, list], out_dir: Path, progress: bool = True, student: str | None = None
) -> dict[str, Any]:
    """Train the three students (CoT-, agent-, agent+FTP-distilled) of size ``student`` (default: the profile's
    ``student``); adapters under ``out_dir/<name>`` (use :func:`student_dir` for one folder per size).

    A student whose dataset is empty (the teacher solved none of its questions) is not trained: its folder
    gets an ``untrained.json`` marker, :func:`adapter_dirs` maps it to ``None``, and evaluation runs the
    untuned model under that student's method names. The stage never fails for lack of data, so a run
    whose small teacher was unlucky still ends with a table that says so.
    """
    from agentlib.sft import TrainResult, train

    results = {}
    for name in ("cot", "agent", "agent_ftp"):
        records = datasets[name]
        folder = out_dir / name
        marker = folder / UNTRAINED
        if not records:
            print(
                f"WARNING: no {name} training trajectory survived filtering; the {name} student stays untuned "
                "(its methods are evaluated with the base model)"
            )
            shutil.rmtree(folder, ignore_errors=True)  # an adapter of an earlier run must not be evaluated
            folder.mkdir(parents=True)
            marker.write_text(json.dumps({"reason": "no trajectory survived filtering", "examples": 0}))
            results[name] = TrainResult(folder, [], 0, 0, 0, 0.0, False, skipped=False)
            continue
        marker.unlink(missing_ok=True)
        kind = "cot" if name == "cot" else "agent"
        results[name] = train(sft_config(p, kind), records, student or p.student, folder, progress=progress)
    return results


def adapter_dirs(out_dir: Path) -> dict[str, Path | None]:
    """Each student's adapter folder, or ``None`` for a student that was not trained (see :func:`sft_stage`)."""
    return {
        name: None if (out_dir / name / UNTRAINED).exists() else out_dir / name
        for name in ("cot", "agent", "agent_ftp")
    }


# ------------------------------------------------------------------ 03: evaluation
def method_plan(method: str) -> dict[str, Any]:
    """Which adapter, prompting and options a method key means."""
    plans = {
        "untuned_cot": dict(adapter=None, kind="cot", rag=False),
        "untuned_agent": dict(adapter=None, kind="agent", sag=False, ftp=False),
        "cot_distill": dict(adapter="cot", kind="cot", rag=False),
        "cot_distill_rag": dict(adapter="cot", kind="cot", rag=True),
        "agent_distill": dict(adapter="agent", kind="agent", sag=False),
        "agent_distill_ftp": dict(adapter="agent_ftp", kind="agent", sag=False),
        "agent_distill_sag": dict(adapter="agent", kind="agent", sag=True),
        "agent_distill_ftp_sag": dict(adapter="agent_ftp", kind="agent", sag=True),
    }
    if method not in plans:
        raise KeyError(f"unknown method {method!r}; choose from {list(plans)}")
    return plans[method]


def evaluate_method(
    p: Profile,
    method: str,
    model: Any,
    retriever: Any,
    sets: dict[str, list[Example]],
    out_dir: Path,
    progress: bool = True,
    **config_overrides: Any,
) -> list[dict]:
    """Run one method on every benchmark; records are tagged with ``benchmark`` and ``method``.

    Agent methods run all benchmarks in one batch (``<method>__all.jsonl``, ids ``<benchmark>/<id>``), so
    small per-benchmark subsets still fill the server's slots; CoT methods write one file per benchmark.
    """
    plan = method_plan(method)
    records = []
    if plan["kind"] != "cot":
        examples = [
            replace(ex, id=f"{bench}/{ex.id}", source=bench) for bench, exs in sets.items() for ex in exs
        ]
        # a model that was not fine-tuned gets the full few-shot prompt, as the authors give it
        # (use_short_system_message=fine_tuned); a distilled student the short prompt it was trained on
        untuned = {"short_prompt": False} if plan["adapter"] is None else {}
        cfg = student_config(p, sag=plan["sag"], method=method, **{**untuned, **config_overrides})
        recs = run_agent(
            model,
            examples,
            cfg,
            out_path=out_dir / f"{method}__all.jsonl",
            retriever=retriever,
            progress=progress,
        )
        return judge_factual(p, [{**r, "method": method} for r in recs], sets)
    for bench, examples in sets.items():
        examples = [replace(ex, source=bench) for ex in examples]  # records carry the benchmark label
        path = out_dir / f"{method}__{bench}.jsonl"
        recs = run_cot(
            model,
            examples,
            max_tokens=p.cot_tokens,
            out_path=path,
            progress=progress,
            rag_retriever=retriever if plan["rag"] else None,
            k=p.top_k,
            passage_chars=p.passage_chars,
        )
        records += [{**r, "benchmark": bench, "method": method} for r in recs]
    return judge_factual(p, records, sets)


def open_judge(p: Profile) -> Any:
    """The profile's LLM judge (``metrics.LLMJudge``, verdicts cached under ``runs/<profile>/judge/``), or None.

    ``AGENTLIB_JUDGE_URL`` / ``AGENTLIB_JUDGE_MODEL`` point it at another OpenAI-compatible server (a local one,
    e.g. the teacher's); ``OPENAI_API_KEY`` is its key."""
    import os

    from agentlib.metrics import LLMJudge
    from agentlib.paths import runs_dir

    if p.judge is None:
        return None
    url = os.environ.get("AGENTLIB_JUDGE_URL") or p.judge[0]
    model = os.environ.get("AGENTLIB_JUDGE_MODEL") or p.judge[1]
    return LLMJudge(url, model, cache_path=runs_dir(p.name, "judge") / "verdicts.jsonl")


def judge_factual(
    p: Profile, records: list[dict], sets: dict[str, list[Example]], judge: Any = None
) -> list[dict]:
    """Records of factual benchmarks gain ``judge`` (1.0/0.0, the paper's metric) when the profile configures a
    judge; exact match stays in ``score``. Cached verdicts cost no request."""
    from agentlib.metrics import judge_records

    judge = judge or open_judge(p)
    if judge is None:
        return records
    factual = {b for b, exs in sets.items() if exs and exs[0].domain == "factual"}
    todo = [r for r in records if r.get("benchmark") in factual]
    for r, verdict in zip(todo, judge_records(todo, judge), strict=True):
        r["judge"] = verdict
    return records


def results_table(records: Sequence[dict], p: Profile, sets: dict[str, list[Example]]) -> Any:
    """Long table: method, benchmark, score, ci_low, ci_high, n (+ f1 for factual, closed_book), in percent.

    Adds ``factual_avg``, ``math_avg`` and ``overall_avg`` rows: the mean over the benchmarks' per-question
    scores pooled with equal weight per benchmark (the interval bootstraps questions within benchmarks).
    """
    import pandas as pd

    domain = {b: (exs[0].domain if exs else "factual") for b, exs in sets.items()}
    by = {}
    for r in records:
        by.setdefault((r["method"], r["benchmark"]), []).append(r)

    def rank(names: Sequence[str], name: str) -> tuple[int, str]:  # listed names first, in their order
        return (names.index(name) if name in names else len(names), name)

    benches = list(sets)
    rows = []
    for (method, bench), recs in sorted(
        by.items(), key=lambda kv: (rank(METHODS, kv[0][0]), rank(benches, kv[0][1]))
    ):
        scores = [float(r["score"]) for r in recs]
        mean, lo, hi = bootstrap_ci(scores)
        row = {
            "method": method,
            "benchmark": bench,
            "score": 100 * mean,
            "ci_low": 100 * lo,
            "ci_high": 100 * hi,
            "n": len(scores),
            "domain": domain.get(bench, ""),
            "closed_book": closed_book(bench, p),
        }
        if domain.get(bench) == "factual":
            row["f1"] = mean_f1(recs)
            if all("judge" in r for r in recs):  # the paper's metric, where a judge was configured
                row["judge"] = 100 * sum(r["judge"] for r in recs) / len(recs)
        rows.append(row)
    for method in sorted({m for m, _ in by}, key=lambda m: rank(METHODS, m)):  # the paper's row order
        for avg, keep in (
            ("factual_avg", {"factual"}),
            ("math_avg", {"math"}),
            ("overall_avg", {"factual", "math"}),
        ):
            groups = [
                [float(r["score"]) for r in by[(method, b)]]
                for b in sets
                if (method, b) in by and domain[b] in keep
            ]
            if not groups:
                continue
            mean, lo, hi = stratified_ci(groups)
            rows.append(
                {
                    "method": method,
                    "benchmark": avg,
                    "score": 100 * mean,
                    "ci_low": 100 * lo,
                    "ci_high": 100 * hi,
                    "n": sum(map(len, groups)),
                    "domain": "",
                    "closed_book": False,
                }
            )
    return pd.DataFrame(rows)


def run_summaries(records: Sequence[dict]) -> Any:
    """Per method: parse-error rate, step-limit rate, mean steps and search calls (agent methods)."""
    import pandas as pd

    by: dict[str, list] = {}
    for r in records:
        by.setdefault(r["method"], []).append(r)
    rows = [{"method": m, **summarize(recs)} for m, recs in by.items()]
    return pd.DataFrame(rows)


def load_records(out_dir: Path, pattern: str = "*.jsonl") -> list[dict]:
    return [r for path in sorted(out_dir.glob(pattern)) for r in read_records(path)]


def trajectory_shape(record: dict, run: str) -> dict:
    """Steps, search calls and lines of code of one trajectory (for the FTP ablation)."""
    from agentlib.trajectory import search_calls

    steps = record.get("steps", [])
    lines = sum(len([ln for ln in (s.get("code") or "").splitlines() if ln.strip()]) for s in steps)
    return {
        "run": run,
        "id": record["id"],
        "steps": len(steps),
        "search_calls": search_calls(record),
        "code_lines": lines,
        "correct": float(record.get("score", 0.0)),
    }
