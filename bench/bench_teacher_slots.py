"""Teacher benchmark: one llama.cpp slot (trajectories one at a time) vs several slots in lockstep.

The cpu profile's teacher (Qwen2.5-Coder-1.5B on a local llama.cpp server) runs the CodeAct agent, greedy,
on the first training questions (4 factual + 2 math by default) in three arms, each on a fresh server:

- ``seq``: 1 slot, one trajectory at a time: each step only prefills what is new in its conversation;
- ``lockstep1``: 1 slot, 6 trajectories in lockstep: the slot switches conversation at every request;
- ``parallel``: 6 slots, 6 trajectories in lockstep (the setting before `Profile.teacher_slots`).

Wall time includes retrieval and sandbox execution; prefilled tokens (prompt tokens less those the server
took from its prompt cache) and generated tokens come from the model's usage counters. The reference is
``parallel``; the decision bar: ``seq`` is faster per generated token.
About 45 min on 2 cores (``--arms seq,parallel`` for ~25).

    flock /tmp/agentlib-heavy.lock .venv/bin/python bench/bench_teacher_slots.py [--factual 4 --math 2]
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

ARMS = {"seq": (1, 1), "lockstep1": (1, 6), "parallel": (6, 6)}  # name -> (slots, trajectories together)


def run_arm(p, questions, retriever, slots: int, together: int) -> dict:
    cfg = replace(pipeline.teacher_config(p, method="teacher_agent"), temperature=0.0, batch_size=together)
    with pipeline.open_model(p.teacher, "llamacpp", n_parallel=slots, n_ctx=max(slots, together) * pipeline.SLOT_CTX) as m:
        t0 = time.perf_counter()
        recs = run_agent(m, questions, cfg, retriever=retriever, progress=False)
        wall = time.perf_counter() - t0
        u = m.usage
    return {"wall_s": wall, "prompt_tokens": u.prompt_tokens - u.cached_tokens, "gen_tokens": u.completion_tokens,
            "correct": sum(r["score"] for r in recs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--factual", type=int, default=4)
    ap.add_argument("--math", type=int, default=2)
    ap.add_argument("--arms", default="seq,lockstep1,parallel")
    args = ap.parse_args()
    p = get_profile(args.profile)
    sets = pipeline.training_sets(p)
    questions = sets["factual"][: args.factual] + sets["math"][: args.math]
    retriever = pipeline.open_retriever(p)
    res = {}
    for name in args.arms.split(","):
        res[name] = run_arm(p, questions, retriever, *ARMS[name])
        print(name, res[name], flush=True)
    ref = res.get("parallel")
    rows = []
    for name, r in res.items():
        rows.append(row(f"{name}: wall, {len(questions)} trajectories", r["wall_s"], "s", "parallel" if ref else "",
                        ref["wall_s"] if ref else None))  # fmt: skip
        rows.append(row(f"{name}: tokens prefilled", r["prompt_tokens"], "tokens"))
        per = r["wall_s"] / max(1, r["gen_tokens"])
        ref_per = ref["wall_s"] / max(1, ref["gen_tokens"]) if ref else None
        ok = per < ref_per if ref and name == "seq" else None
        rows.append(row(f"{name}: wall per generated token", per, "s", "parallel" if ref else "", ref_per,
                        "seq faster than parallel" if name == "seq" else "", ok))  # fmt: skip
    write_rows("bench_teacher_slots", rows)


if __name__ == "__main__":
    main()
