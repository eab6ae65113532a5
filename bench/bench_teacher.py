"""Teacher benchmark: trajectories per hour of the cpu teacher, today's path vs the automatic backend.

The cpu profile's teacher (Qwen2.5-Coder-1.5B) runs the CodeAct agent, greedy, on the same training
questions (10 factual + 10 math by default) in each arm, one after another on a fresh model:

- ``llamacpp`` (the reference, the published run's path): one llama.cpp server, one slot, trajectories one
  at a time, so each step prefills only what is new in its conversation;
- ``hf``: transformers in bf16 with continuous batching (``HFModel``, 16 trajectories decoding together,
  the few-shot prompt's KV shared through the prefix cache).

``pipeline.teacher_backend`` picks ``hf`` where the CPU has native bf16 and ``llamacpp`` elsewhere; the bar
(issue 27) is >= 2.5x trajectories per hour for the picked backend over the reference. Wall time includes
retrieval and sandbox execution; tokens come from the models' usage counters.

    python bench/bench_teacher.py [--factual 10 --math 10] [--arms llamacpp,hf]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import row, write_rows  # noqa: E402

from agentlib import pipeline  # noqa: E402
from agentlib.agent import run_agent  # noqa: E402
from agentlib.profiles import get_profile  # noqa: E402


def run_arm(p, questions, retriever, backend: str) -> dict:
    """One arm: the plain agent run, greedy, on a fresh teacher of ``backend``."""
    with pipeline.open_teacher(p, backend=backend) as m:
        batch = 1 if backend == "llamacpp" else pipeline.TEACHER_BATCH
        cfg = replace(pipeline.teacher_config(p, method="teacher_agent"), temperature=0.0, batch_size=batch)
        t0 = time.perf_counter()
        recs = run_agent(m, questions, cfg, retriever=retriever, progress=False)
        wall = time.perf_counter() - t0
        u = m.usage
        return {"wall_s": wall, "trajectories": len(recs), "per_hour": 3600 * len(recs) / wall,
                "prompt_tokens": u.prompt_tokens - getattr(u, "cached_tokens", 0), "gen_tokens": u.completion_tokens,
                "correct": sum(r["score"] for r in recs), "steps": sum(len(r["steps"]) for r in recs)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--factual", type=int, default=10)
    ap.add_argument("--math", type=int, default=10)
    ap.add_argument("--arms", default="llamacpp,hf")
    args = ap.parse_args()
    p = get_profile(args.profile)
    sets = pipeline.training_sets(p)
    questions = sets["factual"][: args.factual] + sets["math"][: args.math]
    retriever = pipeline.open_retriever(p)
    picked = pipeline.teacher_backend(p)
    print(f"{len(questions)} questions; the profile's automatic backend here: {picked}", flush=True)
    res = {}
    for name in args.arms.split(","):
        res[name] = run_arm(p, questions, retriever, name)
        print(name, {k: round(v, 1) for k, v in res[name].items()}, flush=True)
    ref = res.get("llamacpp")
    rows = []
    for name, r in res.items():
        is_new = name == picked and name != "llamacpp"
        rows.append(row(f"{name}: trajectories per hour ({len(questions)} questions)", r["per_hour"], "traj/h",
                        "llamacpp, 1 slot" if ref else "", ref["per_hour"] if ref else None,
                        ">= 2.5x" if is_new else "", (r["per_hour"] >= 2.5 * ref["per_hour"]) if is_new and ref else None))  # fmt: skip
        rows.append(row(f"{name}: correct of {r['trajectories']}", r["correct"], "trajectories"))
        rows.append(row(f"{name}: tokens generated / prefilled (not from cache)", r["gen_tokens"], "tokens",
                        "prefilled", r["prompt_tokens"]))  # fmt: skip
    rows.append(row(f"automatic backend on this machine: {picked}", 1.0 if pipeline.native_bf16() else 0.0,
                    "native bf16"))  # fmt: skip
    write_rows("bench_teacher", rows)


if __name__ == "__main__":
    main()
