"""Agent benchmark: batched stepping vs one question at a time, and SAG N=8 vs N=1 per-step wall.

Same model, questions, prompt and max tokens in both arms; wall time includes retrieval and sandbox
execution. Bars (issue 5): batched stepping over 16 questions >= 5x the throughput of one at a time;
a SAG step with N=8 candidates (T=0.4, top-p 0.8) <= 2.5x the wall of an N=1 step.

Settings come from a run profile (default ``cpu``, the student's: max tokens per step, search top-k, SAG temperature
and top-p; N is 8 as in the bar); ``--max-tokens`` overrides the profile's per-step budget.

    flock /tmp/agentlib-heavy.lock .venv/bin/python bench/bench_agent.py [--model qwen2.5-coder-0.5b] [--profile cpu]

The ratios depend on the CPU and dtype. On 2 cores of an AMD EPYC with AVX-512 BF16, bf16 (2026-12-03):
- With ``HFModel``'s continuous batching and prefix cache (``agentlib.decoding``): batched stepping
  5.5x and 5.1x one at a time in two runs (49.5 against 9.0 and 44.8 against 8.7 tok/s; 55 and 60 s against 275 and
  282 s), within the bar. The batched run is now bound by its longest chain of turns (a question whose both turns
  run to the 192-token budget: 384 decoding steps at ~100 ms), not by padding. The prefix cache took prompt
  encoding from 9% of the one-at-a-time wall to 0.4%. SAG N=8 1.9x and 1.2x an N=1 step (26.9 against 14.0 s,
  22.3 against 18.2 s: with T=0.4 the N=1 arm's lengths vary from run to run).
- Before, with static batching (``generate`` per call, every row decoding until the call's longest row ended, each
  prompt encoded whole and left-padded to the longest): batched stepping 3.6x (31.6 against 8.8 tok/s), short of the
  bar; prompt encoding took 35 of a batched run's ~90 s. SAG N=8 2.26x (25.3 against 11.2 s); 3.0x (39.0 s)
  before ``models.PACKED_SDPA``: N copies of one prompt need no mask, and transformers then sent grouped-query
  decoding to SDPA's ``enable_gqa`` kernel, 1.5x slower at 8 rows (148 against 100 ms).
- Earlier, fp32 on the same CPU: ``--only sag --dtype float32`` 2.1x (49.5 against 23.3 s).

The informational rows say where the time goes: the share of the one-at-a-time wall spent encoding prompts, the
decode kernel's tokens/s at 16 rows against 1, the Amdahl ceiling on batching that follows, and SAG's floor.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import row, write_rows  # noqa: E402

from agentlib.agent import AgentConfig, run_agent  # noqa: E402
from agentlib.data import load_benchmark  # noqa: E402
from agentlib.models import load_model  # noqa: E402
from agentlib.profiles import get_profile  # noqa: E402
from agentlib.retrieval import BM25Retriever  # noqa: E402


def timed_run(model, examples, config, retriever) -> tuple[float, list[dict], int, dict]:
    """Wall seconds, records, completion tokens, and the run's prefill seconds and mean prompt tokens per call."""
    before = copy.copy(model.usage)
    t0 = time.perf_counter()
    recs = run_agent(model, examples, config, retriever=retriever, progress=False)
    wall, u = time.perf_counter() - t0, model.usage
    prompt = round((u.prompt_tokens - before.prompt_tokens) / max(u.calls - before.calls, 1))
    use = {"prefill_s": u.prefill_seconds - before.prefill_seconds, "prompt_tokens_per_call": prompt}
    return wall, recs, u.completion_tokens - before.completion_tokens, use


def decode_costs(model, use: dict, batch: int) -> tuple[float, float]:
    """(1-row, ``batch``-row) decode step seconds at the run's mean prompt length, and a line saying so."""
    ctx = use["prompt_tokens_per_call"]
    t1, tb = decode_step_seconds(model, ctx, 1), decode_step_seconds(model, ctx, batch)
    print(
        f"{use['prefill_s']:.1f} s encoding prompts ({ctx} tokens per call on average); decode step at {ctx} "
        f"tokens: {t1 * 1e3:.0f} ms for 1 row, {tb * 1e3:.0f} ms for {batch} rows"
    )
    return t1, tb


def decode_step_seconds(model, ctx: int, batch: int, steps: int = 12) -> float:
    """Median seconds of one decoding step (one new token for each of ``batch`` rows) after a ``ctx``-token
    prompt, with an attention mask as ``generate`` passes one: the kernel cost, no sampling or stopping."""
    import torch
    from transformers import DynamicCache

    lm = model.model
    ids = torch.randint(1000, 20000, (batch, ctx), device=model.device)
    mask = torch.ones(batch, ctx + steps, dtype=torch.long, device=model.device)
    times = []
    with torch.inference_mode():
        cache = DynamicCache(config=lm.config)
        lm(
            input_ids=ids,
            attention_mask=mask[:, :ctx],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        nxt = ids[:, -1:]
        for i in range(steps):
            t0 = time.perf_counter()
            lm(input_ids=nxt, attention_mask=mask[:, : ctx + i + 1], past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--sag-questions", type=int, default=4)
    ap.add_argument("--profile", default="cpu", help="run profile giving the student's settings")
    ap.add_argument("--max-tokens", type=int, default=None, help="override the profile's student_max_tokens")
    ap.add_argument("--only", choices=("batched", "sag"), default=None, help="run one of the two comparisons")
    ap.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default=None,
        help="model dtype (default: bf16 where the CPU has native bf16, else fp32)",
    )
    args = ap.parse_args()
    prof = get_profile(args.profile)
    max_tokens = args.max_tokens or prof.student_max_tokens

    import torch

    model = load_model(args.model, backend="hf", dtype=getattr(torch, args.dtype) if args.dtype else None)
    retriever = BM25Retriever.default()
    examples = load_benchmark("hotpotqa", "test", limit=args.questions)
    print(
        f"model={args.model} dtype={model.dtype} questions={len(examples)} profile={prof.name} "
        f"max_tokens={max_tokens} top_k={prof.top_k} SAG N=8 T={prof.sag_temperature} "
        f"top_p={prof.sag_top_p} max_batch={model.max_batch} conversations/call"
    )
    # Short (student) prompt, at most 1 step + the final-answer turn: the comparison is about batching.
    base = dict(max_steps=1, max_tokens=max_tokens, short_prompt=True, search_k=prof.top_k)
    run_agent(
        model, examples[:1], AgentConfig(**base, batch_size=1), retriever=retriever, progress=False
    )  # warm-up

    rows = []
    if args.only != "sag":
        rows += batched_vs_one(model, examples, base, retriever)
    if args.only != "batched":
        rows += sag_n8_vs_n1(model, examples[: args.sag_questions], base, prof, retriever)
    write_rows(
        "bench_agent" + (f"_{args.only}" if args.only else "") + (f"_{args.dtype}" if args.dtype else ""),
        rows,
    )


def batched_vs_one(model, examples, base: dict, retriever) -> list[dict]:
    """Bar: batched stepping over the questions >= 5x the tokens/s of one question at a time."""
    rows = []
    wall_b, recs_b, tok_b, _ = timed_run(model, examples, AgentConfig(**base, batch_size=16), retriever)
    wall_1, recs_1, tok_1, use_1 = timed_run(model, examples, AgentConfig(**base, batch_size=1), retriever)
    steps_b, steps_1 = (sum(len(r["steps"]) for r in recs) for recs in (recs_b, recs_1))
    print(
        f"batched: {wall_b:.1f} s, {steps_b} steps, {tok_b} tokens; one at a time: {wall_1:.1f} s, "
        f"{steps_1} steps, {tok_1} tokens"
    )
    tps_b, tps_1 = tok_b / wall_b, tok_1 / wall_1
    rows.append(
        row(
            "batched_stepping_tokens_per_s",
            tps_b,
            "tok/s",
            "one_at_a_time",
            tps_1,
            ">= 5x one at a time",
            tps_b >= 5 * tps_1,
        )
    )
    rows.append(
        row(
            "batched_stepping_steps_per_s",
            steps_b / wall_b,
            "steps/s",
            "one_at_a_time",
            steps_1 / wall_1,
            "(informational)",
            None,
        )
    )
    rows += batching_ceiling(model, wall_1, use_1, batch=16)
    return rows


def batching_ceiling(model, wall_1: float, use_1: dict, batch: int) -> list[dict]:
    """What batching can give at most here (Amdahl): prompt encoding is compute-bound at batch 1 already, so
    only the decode speeds up, by at most the kernel's gain at ``batch`` rows over one row."""
    print(f"one at a time ({wall_1:.1f} s): ", end="")
    t1, tb = decode_costs(model, use_1, batch)
    prefill = use_1["prefill_s"]
    ceiling = wall_1 / (prefill + (wall_1 - prefill) * tb / (batch * t1))
    return [
        row("one_at_a_time_prefill_share", prefill / wall_1, "fraction", bar="(informational)"),
        row(
            f"decode_step_tokens_per_s_b{batch}",
            batch / tb,
            "tok/s",
            "b1",
            1 / t1,
            "(informational: kernel only)",
        ),
        row(
            "batched_stepping_ceiling",
            ceiling,
            "x",
            bar="(informational: the most batching the decode can give while prompt encoding stays as it is)",
        ),
    ]


def sag_n8_vs_n1(model, sag_ex, base: dict, prof, retriever) -> list[dict]:
    """Bar: a SAG step with N=8 candidates (generation and execution) <= 2.5x the wall of an N=1 step."""
    rows = []
    sampling = dict(temperature=prof.sag_temperature, top_p=prof.sag_top_p, batch_size=1)
    wall_s1, recs_s1, _, use_s1 = timed_run(
        model, sag_ex, AgentConfig(**base, **sampling, n_samples=1), retriever
    )
    wall_s8, recs_s8, *_ = timed_run(model, sag_ex, AgentConfig(**base, **sampling, n_samples=8), retriever)
    per_step_1 = wall_s1 / sum(len(r["steps"]) for r in recs_s1)
    per_step_8 = wall_s8 / sum(len(r["steps"]) for r in recs_s8)
    exec_8 = sum(s["exec_s"] for r in recs_s8 for s in r["steps"]) / sum(len(r["steps"]) for r in recs_s8)
    print(
        f"SAG: N=1 {per_step_1:.2f} s/step, N=8 {per_step_8:.2f} s/step (of which candidate execution "
        f"{exec_8:.3f} s)"
    )
    rows.append(
        row(
            "sag_n8_step_wall",
            per_step_8,
            "s/step",
            "n1_step_wall",
            per_step_1,
            "<= 2.5x N=1",
            per_step_8 <= 2.5 * per_step_1,
        )
    )
    med = [
        statistics.median(s["duration_s"] for r in recs for s in r["steps"]) for recs in (recs_s1, recs_s8)
    ]
    rows.append(
        row(
            "sag_n8_step_median_gen_exec",
            med[1],
            "s/step",
            "n1_step_median_gen_exec",
            med[0],
            "(informational: median, robust to load spikes on a shared machine)",
            None,
        )
    )
    # The floor: the N=1 run with its decode steps costing what 8 rows cost; the rest of the gap is the long tail
    # (a step lasts until the longest of its 8 samples ends).
    print(f"SAG N=1 ({wall_s1:.1f} s): ", end="")
    t1, t8 = decode_costs(model, use_s1, 8)
    prefill = use_s1["prefill_s"]
    floor = (prefill + (wall_s1 - prefill) * t8 / t1) / wall_s1
    rows.append(
        row(
            "sag_n8_floor_same_lengths",
            floor,
            "x N=1",
            bar="(informational: N=8 over N=1 if all 8 samples were as long as the one)",
        )
    )
    return rows


if __name__ == "__main__":
    main()
