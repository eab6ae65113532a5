"""Teacher benchmark: trajectories per hour of the cpu teacher, the published run's path vs today's.

The cpu profile's teacher (Qwen2.5-Coder-1.5B) runs the CodeAct agent, greedy, on the same training
questions (10 factual + 10 math by default) in each arm, one after another on fresh models:

- ``llamacpp`` (the reference, the published run's path): one llama.cpp server with both cores, one slot,
  trajectories one at a time, so each step prefills only what is new in its conversation;
- ``llamacpp2`` (the profile's path): two 1-thread servers, one per core, each with one slot, the trajectories
  dealt over them (``pipeline.open_teacher`` with ``teacher_servers=2``);
- ``hf``: transformers in bf16 with continuous batching (``HFModel``, 16 trajectories decoding together,
  every conversation's previous turn kept in the prefix cache).

The bar (issue 27) is >= 2.5x trajectories per hour for the profile's path over the reference. Wall time
includes retrieval and sandbox execution; tokens come from the models' usage counters. Run it on an idle
machine: a 2-thread llama.cpp server stalls whenever another process takes one of the cores.

    python bench/bench_teacher.py [--factual 10 --math 10] [--arms llamacpp,llamacpp2,hf]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import row, speed_row, write_rows  # noqa: E402

from agentlib import pipeline  # noqa: E402
from agentlib.agent import run_agent  # noqa: E402
from agentlib.profiles import get_profile  # noqa: E402

ARMS = {
    "llamacpp": ("llamacpp", 1),
    "llamacpp2": ("llamacpp", 2),
    "hf": ("hf", 1),
}  # name -> (backend, servers)


def run_arm(p, questions, retriever, name: str) -> dict:
    """One arm: the plain agent run, greedy, on fresh teacher model(s)."""
    backend, servers = ARMS[name]
    p = replace(p, teacher_servers=servers)
    with pipeline.open_teacher(p, backend=backend) as m:
        models = m if isinstance(m, list) else [m]
        batch = 1 if backend == "llamacpp" else pipeline.TEACHER_BATCH
        cfg = replace(pipeline.teacher_config(p, method="teacher_agent"), temperature=0.0, batch_size=batch)
        t0 = time.perf_counter()
        recs = pipeline.sharded(
            lambda mod, exs: run_agent(mod, exs, cfg, retriever=retriever, progress=False), models, questions
        )
        wall = time.perf_counter() - t0
        usage = [mod.usage for mod in models]
        return {
            "wall_s": wall,
            "trajectories": len(recs),
            "per_hour": 3600 * len(recs) / wall,
            "prompt_tokens": sum(u.prompt_tokens - u.cached_tokens for u in usage),
            "gen_tokens": sum(u.completion_tokens for u in usage),
            "correct": sum(r["score"] for r in recs),
            "steps": sum(len(r["steps"]) for r in recs),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--factual", type=int, default=10)
    ap.add_argument("--math", type=int, default=10)
    ap.add_argument("--arms", default="llamacpp,llamacpp2,hf")
    args = ap.parse_args()
    p = get_profile(args.profile)
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
        metric = f"{name}: trajectories per hour ({len(questions)} questions)"
        rows.append(speed_row(metric, r["per_hour"], "traj/h", reference, 2.5 if is_new else None))
        rows.append(row(f"{name}: correct of {r['trajectories']}", r["correct"], "trajectories"))
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
