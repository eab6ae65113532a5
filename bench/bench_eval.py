"""Student-evaluation benchmark: questions per minute of ``agent_distill``, llama.cpp with run-time LoRA vs the
profile's student path.

The cpu profile's agent-distilled student (Qwen2.5-Coder-0.5B + its LoRA adapter) runs the CodeAct agent, greedy,
on the same 40 mixed evaluation questions (HotpotQA, MuSiQue, MATH-500, GSM-Hard: 10 each) in each arm, one after
another:

- ``llamacpp`` (the reference, today's path): the GGUF base on one llama.cpp server, the adapter applied at run
  time as a GGUF LoRA, ``pipeline.SLOTS`` slots;
- ``hf``: transformers in bf16, the adapter merged into the weights, continuous batching of
  ``pipeline.STUDENT_BATCH`` trajectories (``pipeline.open_student``), the profile's path where bf16 is native.

The bar (issue 28) is >= 3x questions per minute for the profile's path over the reference. The adapter is the cpu
run's (``runs/cpu/students/agent``) or ``--adapter``; without one, a short LoRA run on the published teacher set's
agent trajectories makes one (speed does not depend on how well it was trained). Run it on an idle machine.

    python bench/bench_eval.py [--per-set 10] [--arms llamacpp,hf] [--adapter DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import row, speed_row, write_rows  # noqa: E402

from agentlib import pipeline, trajectory  # noqa: E402
from agentlib.paths import runs_dir  # noqa: E402
from agentlib.profiles import get_profile  # noqa: E402

SETS = (("test", "hotpotqa"), ("extra", "musique_train100"), ("test", "math500"), ("test", "gsm_hard"))


def bench_adapter(p, given: str | None) -> Path:
    """The agent student's adapter: ``given``, the cpu run's, or a short LoRA run on the published set."""
    if given:
        return Path(given)
    trained = pipeline.adapter_dirs(pipeline.student_dir(p, None, runs_dir(p.name, "students")))["agent"]
    if trained is not None and (trained / "adapter_config.json").exists():
        return trained
    from agentlib.sft import train

    out = runs_dir("bench", "eval_adapter")
    if not (out / "adapter_config.json").exists():
        kept = pipeline.sft_datasets(trajectory.load_published(p), out)["agent"]
        cfg = replace(pipeline.sft_config(p, "agent"), num_epochs=1)
        print(f"training a bench adapter on {len(kept)} agent trajectories", flush=True)
        train(cfg, kept, p.student, out, progress=True)
    return out


def run_arm(p, sets, retriever, adapter: Path, backend: str) -> dict:
    """``agent_distill`` on every question, on a freshly opened student."""
    out = runs_dir("bench", f"eval_{backend}")
    for f in out.glob("*.jsonl"):
        f.unlink()  # every arm starts from nothing
    p = replace(p, student_backend=backend)
    with pipeline.open_student(p, p.student, adapter) as model:
        t0 = time.perf_counter()
        recs = pipeline.evaluate_method(p, "agent_distill", model, retriever, sets, out, progress=False)
        wall = time.perf_counter() - t0
        usage = model.usage
    return {
        "wall_s": wall,
        "questions": len(recs),
        "per_min": 60 * len(recs) / wall,
        "steps": sum(len(r["steps"]) for r in recs),
        "gen_tokens": usage.completion_tokens,
        "correct": sum(r["score"] for r in recs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", default=None, help="an agent student's adapter folder")
    ap.add_argument("--per-set", type=int, default=10, help="questions from each of the four sets")
    ap.add_argument("--arms", default="llamacpp,hf")
    ap.add_argument("--profile", default="cpu")
    args = ap.parse_args()
    p = get_profile(args.profile)
    p = replace(p, eval_sets=tuple((split, name, args.per_set) for split, name in SETS))
    sets = pipeline.eval_sets(p)
    retriever = pipeline.open_retriever(p)
    adapter = bench_adapter(p, args.adapter)
    picked = pipeline.student_backend(p)
    n = sum(map(len, sets.values()))
    print(f"{n} questions; adapter {adapter}; the profile's student path here: {picked}", flush=True)
    res = {}
    for name in args.arms.split(","):
        res[name] = run_arm(p, sets, retriever, adapter, name)
        print(name, {k: round(v, 2) for k, v in res[name].items()}, flush=True)
    ref = res.get("llamacpp")
    rows = []
    for name, r in res.items():
        is_new = name == picked and name != "llamacpp"
        reference = ("llamacpp, run-time LoRA", ref["per_min"]) if ref else None
        metric = f"{name}: agent_distill questions per minute ({n} questions)"
        rows.append(speed_row(metric, r["per_min"], "q/min", reference, 3 if is_new else None))
        rows.append(row(f"{name}: correct of {r['questions']}", r["correct"], "questions"))
        rows.append(row(f"{name}: tokens generated", r["gen_tokens"], "tokens"))
        rows.append(row(f"{name}: agent steps", r["steps"], "steps"))
    rows.append(
        row(f"the profile's student path: {picked}", 1.0 if pipeline.native_bf16() else 0.0, "native bf16")
    )
    write_rows("bench_eval", rows)


if __name__ == "__main__":
    main()
