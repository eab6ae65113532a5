"""Teacher benchmark: teacher trajectories per hour, the published run's path vs the profile's, side by side.

Each arm runs notebook 01's teacher stage (``pipeline.teacher_stage``: the CoT answers, the agent, and the
agent with the first-thought prefix; greedy sample 0 by default) on the same training questions (10 factual
+ 10 math), one arm after another, each on a fresh teacher (Qwen2.5-Coder-1.5B for ``cpu``) and an empty
run folder:

- ``llamacpp`` (the reference, the published run's path): one llama.cpp server with both cores and one slot,
  so one trajectory at a time, each step prefilling only what is new in its conversation, run after run;
- ``llamacpp2`` (the fallback where bf16 is not native): two 1-thread servers, one per core, one slot each,
  the questions dealt over them;
- ``hf``: transformers in bf16 with continuous batching (``HFModel``, ``pipeline.TEACHER_BATCH`` requests
  decoding together, every conversation's previous turn kept in the prefix cache), the chunk's runs
  decoding in one batch, so that no run's last long trajectories leave the batch nearly empty.

The bar (issue 27) is >= 2.5x trajectories per hour for the profile's path over the reference. Wall time
includes retrieval and sandbox execution; tokens come from the models' usage counters. Run it on an idle
machine: a 2-thread llama.cpp server stalls whenever another process takes one of the cores.

    python bench/bench_teacher.py [--factual 10 --math 10] [--samples 1] [--arms llamacpp,llamacpp2,hf]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import row, speed_row, write_rows  # noqa: E402

from agentlib import pipeline  # noqa: E402
from agentlib.profiles import get_profile  # noqa: E402

ARMS = {
    "llamacpp": ("llamacpp", 1),
    "llamacpp2": ("llamacpp", 2),
    "hf": ("hf", 1),
}  # name -> (backend, servers)


def run_arm(p, questions, retriever, name: str) -> dict:
    """One arm: the teacher stage on ``questions`` with fresh teacher model(s) and an empty run folder."""
    backend, servers = ARMS[name]
    p = replace(p, teacher_backend=backend, teacher_servers=servers, teacher_slots=1)
    with pipeline.open_teacher(p) as m, tempfile.TemporaryDirectory() as tmp:
        models = m if isinstance(m, list) else [m]
        t0 = time.perf_counter()
        runs = pipeline.teacher_stage(p, m, retriever, Path(tmp), progress=False, questions=questions)
        wall = time.perf_counter() - t0
        usage = [mod.usage for mod in models]
    recs = [r for records in runs.values() for r in records]
    return {
        "wall_s": wall,
        "trajectories": len(recs),
        "per_hour": 3600 * len(recs) / wall,
        "prompt_tokens": sum(u.prompt_tokens - u.cached_tokens for u in usage),
        "gen_tokens": sum(u.completion_tokens for u in usage),
        **{f"correct {run}": sum(r["score"] for r in records) for run, records in runs.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--factual", type=int, default=10)
    ap.add_argument("--math", type=int, default=10)
    ap.add_argument("--samples", type=int, default=1, help="samples per question and run (1: greedy only)")
    ap.add_argument("--arms", default="llamacpp,llamacpp2,hf")
    args = ap.parse_args()
    p = get_profile(args.profile, teacher_samples=args.samples)
    sets = pipeline.training_sets(p)
    questions = sets["factual"][: args.factual] + sets["math"][: args.math]
    retriever = pipeline.open_retriever(p)
    picked = pipeline.teacher_backend(p)
    if picked == "llamacpp":
        picked += "2" if p.teacher_servers == 2 else ""
    print(f"{len(questions)} questions; the profile's teacher path here: {picked}", flush=True)
    res = {}
    for name in args.arms.split(","):
        res[name] = run_arm(p, questions, retriever, name)
        print(name, {k: round(v, 1) for k, v in res[name].items()}, flush=True)
    ref = res.get("llamacpp")
    rows = []
    for name, r in res.items():
        is_new = name == picked
        reference = ("llamacpp, 1 slot", ref["per_hour"]) if ref else None
        metric = f"{name}: trajectories per hour ({len(questions)} questions, 3 runs)"
        rows.append(speed_row(metric, r["per_hour"], "traj/h", reference, 2.5 if is_new else None))
        rows.append(row(f"{name}: wall time", r["wall_s"], "s"))
        for run in pipeline.TEACHER_RUNS:
            rows.append(row(f"{name}: {run} correct of {len(questions)}", r[f"correct {run}"], "questions"))
        rows.append(
            row(
                f"{name}: tokens generated / prefilled (not from cache)",
                r["gen_tokens"],
                "tokens",
                "prefilled",
                r["prompt_tokens"],
            )
        )
    rows.append(
        row(f"the profile's teacher path: {picked}", 1.0 if pipeline.native_bf16() else 0.0, "native bf16")
    )
    write_rows("bench_teacher", rows)


if __name__ == "__main__":
    main()
