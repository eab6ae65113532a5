"""Teacher trial: the cpu profile's teacher with and without first-thought prefix on 30 + 30 questions.

Runs the teacher stage of notebook 01 exactly as the cpu profile does (Qwen2.5-Coder-1.5B on a local
llama.cpp server, its few-shot prompt, greedy, 256 tokens per step, 5 steps; the published trial ran before
the profile's longer CoT budget and gave CoT 256 tokens too: ``--cot-max-tokens 256``) on more training questions:
the first 30 HotpotQA dev rows (rows 0-99 have their evidence in the mini-corpus; none is in a test set)
and 30 MATH training questions (15 from ``math_medium``, 15 from ``math``). Reports, per run (CoT, agent,
agent + FTP) and domain: accuracy (exact match on HotpotQA, equivalence on MATH), token F1 on HotpotQA (the
teacher often answers in a sentence, which exact match scores 0), parse-error rate, step-limit rate, mean
steps, mean search calls and tokens/s, to ``figures/teacher_trial_cpu.csv`` and stdout; the trajectories are published (with a manifest)
in ``data/teacher_trial_cpu.jsonl.gz``.

Resumable: trajectories go to ``runs/cpu/teacher_trial/`` as they finish; a second call picks up where the
first stopped. 106 min on 2 AVX2 cores (measured 2026-12-02, the teacher decoding at ~12 tokens/s).

Other settings make a separate, tagged trial: ``--factual-set``, ``--factual``, ``--factual-start``, ``--math``
and ``--runs`` choose the questions and the teacher runs, and ``--tag NAME`` names its folder, CSV and published
file (``..._<NAME>``). The second and third trials, more trajectories for ``bench/distill_trial.py
--more-teachers`` (the second agent-only; the third, agent and CoT, on the HotpotQA dev rows 30-99 that the
first trial left):

    flock /tmp/agentlib-heavy.lock .venv/bin/python bench/teacher_trial.py [--factual 30 --math 30]
    flock /tmp/agentlib-heavy.lock .venv/bin/python bench/teacher_trial.py --tag train100 \
        --factual-set hotpotqa_train100 --factual 70 --math 0 --runs agent
    flock /tmp/agentlib-heavy.lock .venv/bin/python bench/teacher_trial.py --tag dev30 \
        --factual-start 30 --factual 70 --math 0 --runs cot,agent --cot-max-tokens 384
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

from agentlib import pipeline
from agentlib.metrics import questions_to_separate, wilson_interval
from agentlib.paths import ROOT, figures_dir, runs_dir
from agentlib.pipeline import base_id
from agentlib.profiles import get_profile
from agentlib.report import md_table
from agentlib.trajectory import read_records, summarize

COLUMNS = ["run", "domain", "n", "accuracy", "f1", "parse_error_rate", "step_limit_rate", "repeat_stop_rate",
           "mean_steps", "mean_search_calls", "tokens_per_s"]  # fmt: skip


def trial_rows(runs: dict[str, list], domains: dict[str, str]) -> list[dict]:
    """One row per (run, domain) and per run over all questions; rates in percent."""
    rows = []
    for name, records in runs.items():
        for domain in ("factual", "math", "all"):
            subset = [r for r in records if domain == "all" or domains[base_id(r["id"])] == domain]
            s = summarize(subset)
            pct = lambda k, s=s: round(100 * s.get(k, 0.0), 1)  # noqa: E731
            rows.append({
                "run": name, "domain": domain, "n": s["n"], "accuracy": pct("accuracy"),
                "f1": round(pipeline.mean_f1(subset), 1)
                if domain == "factual" and subset else None,
                "parse_error_rate": pct("parse_error_rate"), "step_limit_rate": pct("step_limit_rate"),
                "repeat_stop_rate": pct("repeat_stop_rate"), "mean_steps": round(s.get("mean_steps", 0.0), 2),
                "mean_search_calls": round(s.get("mean_search_calls", 0.0), 2),
                "tokens_per_s": None if s.get("tokens_per_s") is None else round(s["tokens_per_s"], 1),
            })  # fmt: skip
    return rows


def separation(runs: dict[str, list], domains: dict[str, str], a: str = "agent", b: str = "cot") -> str | None:
    """The teacher's own factual margin, ``a`` against ``b``, with 95% Wilson intervals, and the questions per arm
    at which intervals that far apart stop overlapping: a bound on what a student trial can show."""
    if not {a, b} <= runs.keys():
        return None
    k, n = {}, {}
    for name in (a, b):
        greedy = [r for r in runs[name] if "#" not in r["id"] or r["id"].endswith("#s0")]  # CoT ids have no "#s<j>"
        recs = [r for r in greedy if domains[base_id(r["id"])] == "factual"]
        k[name], n[name] = sum(float(r["score"]) for r in recs), len(recs)
    if not n[a] or not n[b]:
        return None
    iv = {name: wilson_interval(round(k[name]), n[name]) for name in (a, b)}
    need = questions_to_separate(k[a] / n[a], k[b] / n[b])
    parts = [f"factual, teacher {name}: {k[name]:.0f} of {n[name]} [{100 * iv[name][0]:.1f}, {100 * iv[name][1]:.1f}]"
             for name in (a, b)]  # fmt: skip
    verdict = ("never (the first is not higher)" if need is None else f"{need} questions per arm")
    return "; ".join(parts) + f". Wilson intervals this far apart stop overlapping at {verdict}."


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--factual", type=int, default=30, help="HotpotQA questions (from --factual-start)")
    ap.add_argument("--factual-set", default="hotpotqa_dev300", choices=("hotpotqa_dev300", "hotpotqa_train100"),
                    help="where the HotpotQA questions come from (both have their evidence in the mini-corpus)")  # fmt: skip
    ap.add_argument("--factual-start", type=int, default=0, help="first HotpotQA row (skip rows another trial ran)")
    ap.add_argument("--math", type=int, default=30, help="MATH training questions, half from each file")
    ap.add_argument("--runs", default=",".join(pipeline.TEACHER_RUNS), help="teacher runs to make")
    ap.add_argument("--tag", default="", help="name of a trial with other settings: runs/cpu/teacher_trial_<tag>/, "
                    "figures/teacher_trial_cpu_<tag>.csv, data/teacher_trial_cpu_<tag>.jsonl.gz")  # fmt: skip
    ap.add_argument(
        "--out", type=Path, default=None, help="trajectory folder (default runs/cpu/teacher_trial)"
    )
    ap.add_argument("--cot-max-tokens", type=int, default=None,
                    help="the CoT answers' token budget (default: the cpu profile's; the published trial: 256)")  # fmt: skip
    ap.add_argument("--report", action="store_true",
                    help="only tabulate the trajectories already in --out (else the published file)")  # fmt: skip
    args = ap.parse_args(argv)
    names = tuple(args.runs.split(","))
    changed = [f"--{o.replace('_', '-')}" for o in ("factual", "factual_set", "factual_start", "math", "runs")
               if getattr(args, o) != ap.get_default(o)]  # fmt: skip
    if changed and not args.tag:
        ap.error(f"--tag is required with settings other than the published trial's ({', '.join(changed)})")
    tag = f"_{args.tag}" if args.tag else ""
    half = args.math // 2
    p = get_profile("cpu", train_factual=(("extra", args.factual_set, args.factual, args.factual_start),),
                    train_math=(("train", "math_medium", args.math - half), ("train", "math", half)),
                    cot_max_tokens=args.cot_max_tokens)  # fmt: skip
    out_dir = args.out or runs_dir("cpu", f"teacher_trial{tag}")
    sets = pipeline.training_sets(p)
    domains = {ex.id: domain for domain, exs in sets.items() for ex in exs}
    t0 = time.perf_counter()
    published = ROOT / "data" / f"teacher_trial_cpu{tag}.jsonl.gz"
    if args.report:  # the published file and its manifest (commit, date) stay those of the run that made them
        if all((out_dir / f"{name}.jsonl").exists() for name in names):
            runs = {name: read_records(out_dir / f"{name}.jsonl") for name in names}
        else:  # no local run: tabulate the published trajectories
            by_run = pipeline.read_published(published)
            runs = {name: by_run.get(name, []) for name in names}
    else:
        retriever = pipeline.open_retriever(p)
        with pipeline.open_teacher(p) as teacher:
            runs = pipeline.teacher_stage(p, teacher, retriever, out_dir, runs=names)
        pipeline.publish_teacher(p, runs, dest=published)
    wall = time.perf_counter() - t0
    rows = [r for r in trial_rows(runs, domains) if r["n"]]
    path = figures_dir() / f"teacher_trial_cpu{tag}.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    print(md_table(COLUMNS, [["" if r[c] is None else str(r[c]) for c in COLUMNS] for r in rows]))
    note = separation(runs, domains)
    if note:
        print("\n" + note)
    print(
        f"\n{path}, {published}; wall {wall:.0f} s this call (resumed trajectories are not re-run); trajectories in {out_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
