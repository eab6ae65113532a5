"""Distillation trial: students trained on the 60-question teacher trial, scored on 40 factual questions.

The published `cpu` run fits the whole pipeline in 90 minutes, so its students see three CoT answers or one
agent trajectory each and its table has 4 factual questions. This trial asks the question the paper rests on,
agent-distilled vs CoT-distilled on factual questions, with more data on both ends:
- training: the kept (correct) trajectories of `bench/teacher_trial.py` (30 HotpotQA dev + 30 MATH training
  questions, the cpu teacher), read from ``runs/cpu/teacher_trial/`` or else from the published
  ``data/teacher_trial_cpu.jsonl.gz``; the CoT student on the kept CoT answers, the agent student on the kept
  agent trajectories without FTP; the cpu profile's LoRA settings with CoT answers of <= 384 tokens and one
  epoch, as the published trial was measured (``--epochs N`` writes to ``runs/cpu/distill_trial_eN/`` and
  ``figures/distill_trial_cpu_eN.csv``); ``--more-teachers NAME`` adds the trajectories of the tagged
  teacher trial ``teacher_trial.py --tag NAME`` (output tagged ``_NAME``); ``--keep wellformed`` trains both
  students on every well-formed trajectory, correct or not (an ablation; output tagged ``_wellformed``);
- evaluation: the first 30 answerable HotpotQA test questions and the first 10 MuSiQue train-100 questions,
  exact match, with ``untuned_agent``, ``cot_distill`` and ``agent_distill`` run as notebook 03 runs them
  (``--methods`` may add ``agent_distill_sag``: the agent student with the profile's SAG, N=2);
- output: ``figures/distill_trial_cpu.csv`` (the result table's columns) and ``.png``, ``..._behaviour.csv`` (each method's
  parse-error, step-limit and repeat-stop rates, steps, searches, token F1 in percent; for agent methods
  ``seen``, the percent of span questions whose search results held a gold answer, and ``seen_correct``, the
  percent of those answered right), and, on stdout, both
  tables and the paired differences (agent - CoT, agent - untuned; with SAG, SAG - CoT and SAG - agent) with
  their stratified bootstrap intervals.

Resumable (students and trajectories under ``runs/cpu/distill_trial/``).

    flock /tmp/agentlib-heavy.lock .venv/bin/python bench/distill_trial.py [--hotpotqa 30 --musique 10 --epochs 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from agentlib import pipeline
from agentlib.paths import ROOT, figures_dir, runs_dir
from agentlib.profiles import get_profile
from agentlib.trajectory import read_records

RUNS = pipeline.TEACHER_RUNS


def teacher_runs(tag: str = "") -> dict[str, list]:
    """A teacher trial's trajectories by run: its published file (written when the trial completes), else
    its local run. ``tag``: "" for the published trial, ``_<name>`` for ``teacher_trial.py --tag <name>``."""
    published = ROOT / "data" / f"teacher_trial_cpu{tag}.jsonl.gz"
    if published.exists():
        by_run = pipeline.read_published(published)
        return {name: by_run[name] for name in RUNS if name in by_run}
    local = runs_dir("cpu", f"teacher_trial{tag}")
    runs = {name: read_records(local / f"{name}.jsonl") for name in RUNS if (local / f"{name}.jsonl").exists()}
    if not runs:
        raise FileNotFoundError(f"no teacher trial {tag or '(published)'}: neither {published} nor {local}")
    return runs


def pooled_teacher_runs(tags: list[str]) -> dict[str, list]:
    """The published trial's runs with those of the tagged trials appended, run by run."""
    pooled: dict[str, list] = {}
    for tag in ["", *tags]:
        for name, records in teacher_runs(tag).items():
            pooled.setdefault(name, []).extend(records)
    return pooled


def paired_difference(records: list[dict], a: str, b: str, benches: list[str]) -> tuple[float, float, float, int]:
    """Mean of per-benchmark mean score differences a - b over the questions both answered, in points, with
    the stratified bootstrap interval (questions resampled within benchmarks, pairs kept together)."""
    score = {(r["method"], r["benchmark"], r["id"].split("/", 1)[-1]): float(r["score"]) for r in records}
    groups = []
    for bench in benches:
        ids = sorted({k[2] for k in score if k[:2] == (a, bench)} & {k[2] for k in score if k[:2] == (b, bench)})
        if ids:
            groups.append([score[(a, bench, i)] - score[(b, bench, i)] for i in ids])
    mean, lo, hi = pipeline.stratified_ci(groups)
    return 100 * mean, 100 * lo, 100 * hi, sum(map(len, groups))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hotpotqa", type=int, default=30, help="answerable HotpotQA test questions (first ones)")
    ap.add_argument("--musique", type=int, default=10, help="MuSiQue train-100 questions (first ones)")
    ap.add_argument("--methods", default="cot_distill,agent_distill,untuned_agent")
    ap.add_argument("--epochs", type=float, default=1.0, help="SFT epochs (the published trial: 1)")
    ap.add_argument("--more-teachers", default="", help="tags of more teacher trials (teacher_trial.py --tag) "
                    "whose trajectories join the published trial's, e.g. train100")  # fmt: skip
    ap.add_argument("--keep", choices=("correct", "wellformed"), default="correct",
                    help="training filter for both students: the paper's (correct answers) or, as an ablation, "
                    "every well-formed trajectory whatever its answer (output tagged _wellformed)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=None, help="work folder (default runs/cpu/distill_trial<tag>)")
    args = ap.parse_args(argv)
    p = get_profile("cpu", eval_sets=(("test", "hotpotqa", args.hotpotqa), ("extra", "musique_train100", args.musique)),
                    cot_max_tokens=384)  # fmt: skip
    p = replace(p, lora=replace(p.lora, epochs=args.epochs))
    more = [f"_{t}" for t in args.more_teachers.split(",") if t]
    tag = ("" if args.epochs == 1 else f"_e{args.epochs:g}") + "".join(more)
    tag += "" if args.keep == "correct" else f"_{args.keep}"
    out_dir = args.out or runs_dir("cpu", f"distill_trial{tag}")
    t0 = time.perf_counter()

    runs = pooled_teacher_runs(more)
    out_dir.mkdir(parents=True, exist_ok=True)
    kept = pipeline.sft_datasets(runs, out_dir, require_correct=args.keep == "correct")
    print("kept trajectories:", {name: len(recs) for name, recs in kept.items()})
    from agentlib.sft import train

    students = {}
    for name in ("cot", "agent"):  # the run's name is the SFT kind
        res = train(pipeline.sft_config(p, name), kept[name], p.student, out_dir / "students" / name)
        students[name] = res.out_dir
        print(f"{name} student: {res.n_examples} examples, {len(res.losses)} steps, losses "
              f"{[round(x, 3) for x in res.losses]}, {res.tokens_per_s:.1f} tokens/s{' (resumed)' if res.skipped else ''}")
    t_sft = time.perf_counter() - t0

    sets = pipeline.eval_sets(p)
    retriever = pipeline.open_retriever(p)
    records = []
    for method in args.methods.split(","):
        plan = pipeline.method_plan(method)
        adapter = students[plan["adapter"]] if plan["adapter"] else None
        with pipeline.open_model(p.student, p.student_backend, adapter=adapter) as student:
            records += pipeline.evaluate_method(p, method, student, retriever, sets, out_dir / "eval")
    wall = time.perf_counter() - t0

    table = pipeline.results_table(records, p, sets)
    path = figures_dir() / f"distill_trial_cpu{tag}.csv"
    table[["method", "benchmark", "score", "ci_low", "ci_high", "n"]].to_csv(path, index=False)
    from agentlib.viz import plot_accuracy_bars

    factual = table[table["benchmark"] != "overall_avg"]  # factual questions only: the same as factual_avg
    top = min(100, 10 * (int(factual["ci_high"].max()) // 10 + 1))  # the scores are small: zoom in
    name = f" ({tag[1:].replace('_', ', ')})" if tag else ""
    plot_accuracy_bars(factual, path.with_suffix(".png"), title=f"distillation trial{name}: exact match, 95% CI", xmax=top)
    print(pipeline.wide_table(table).to_string())
    pairs = (("agent_distill", "cot_distill"), ("agent_distill", "untuned_agent"),
             ("agent_distill_sag", "cot_distill"), ("agent_distill_sag", "agent_distill"))  # fmt: skip
    for a, b in pairs:
        if {a, b} <= {r["method"] for r in records}:
            print()
            groups = {"factual": list(sets)} | ({bench: [bench] for bench in sets} if len(sets) > 1 else {})
            for label, benches in groups.items():
                d, lo, hi, n = paired_difference(records, a, b, benches)
                print(f"{label}, {a} - {b}: {d:+.1f} points [{lo:+.1f}, {hi:+.1f}] over {n} paired questions")
    behaviour = pipeline.run_summaries(records)
    by_method = {m: [r for r in records if r["method"] == m] for m in behaviour["method"]}
    behaviour["f1"] = [pipeline.mean_f1(recs) for recs in by_method.values()]
    seen = [pipeline.answer_seen(recs) for recs in by_method.values()]  # lost in the search or in the reading?
    for key in ("seen", "seen_correct"):
        behaviour[key] = [s[key] for s in seen]
    behaviour = behaviour.round(3)
    behaviour.to_csv(path.with_name(path.stem + "_behaviour.csv"), index=False)
    print()
    print(behaviour.to_string(index=False))
    print(f"\n{path} (+ _behaviour.csv); wall {wall:.0f} s this call (SFT {t_sft:.0f} s; resumed work is not redone); work in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
