"""SFT throughput: packing and length-grouping vs naive padding, on the cpu profile's own trajectories.

The data are the published cpu teacher's agent trajectories (``data/teacher_trajectories_cpu.jsonl.gz``, the
agent runs with and without FTP, correct or not), under the student's short system prompt, cut at the cpu
profile's agent max length. The same LoRA model (SmolLM2-135M, r=16; bf16 where the CPU has it, else fp32)
trains the same examples in each mode, with the paper's effective batch of 8; tokens/s counts real (unpadded)
tokens through forward + backward + step. References: naive padding of every example to max_length (the bar:
>= 1.5x), and dynamic padding to the longest example of a random micro-batch (reported for information).

    flock /tmp/agentlib-heavy.lock .venv/bin/python bench/bench_sft.py [--n 8] [--batch 8] [--micro 4] [--repeat 3]

The reference pads every trajectory to max_length (3072), which is slow on 2 cores: --n/--batch shorten the run.
Each mode runs --repeat times, the modes interleaved round by round; the rows are medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import row, write_rows  # noqa: E402

from agentlib import agent, lab  # noqa: E402
from agentlib.profiles import PROFILES  # noqa: E402
from agentlib.sft import (  # noqa: E402
    SFTConfig,
    encode_all,
    fit,
    load_for_training,
    make_plan,
    resolve_model_path,
    trajectory_to_chat,
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=8, help="trajectories: the file's first n")
    ap.add_argument(
        "--batch", type=int, default=8, help="examples per optimizer step (the paper's effective batch)"
    )
    ap.add_argument("--micro", type=int, default=4, help="micro-batch size of the padded modes")
    ap.add_argument("--repeat", type=int, default=3, help="rounds over the four modes (interleaved); medians")
    args = ap.parse_args()

    prof = PROFILES["cpu"]
    base = replace(
        prof.sft,
        lora_r=16,
        lora_alpha=32,
        num_epochs=1,
        max_steps=None,
        batch_size=args.batch,
        micro_batch_size=args.micro,
        device="cpu",
        gradient_checkpointing=True,
    )  # 4 x 3072 padded tokens need it in 24 GB
    records = lab.published_trajectories("published", "cpu")[: args.n]
    chats = [trajectory_to_chat(r, agent.system_prompt(["search"], short=True)) for r in records]
    model, tok = load_for_training(resolve_model_path(args.model), base, "cpu")
    examples, dropped = encode_all(chats, tok, base.max_length)
    lengths = [len(e["input_ids"]) for e in examples]
    print(
        f"{len(examples)} examples ({dropped} dropped, {sum(e['truncated'] for e in examples)} truncated), "
        f"lengths min/median/max {min(lengths)}/{sorted(lengths)[len(lengths) // 2]}/{max(lengths)}, "
        f"{sum(lengths)} tokens",
        flush=True,
    )

    padded_max = [
        {
            **e,
            "input_ids": e["input_ids"] + [tok.pad_token_id] * (base.max_length - len(e["input_ids"])),
            "labels": e["labels"] + [-100] * (base.max_length - len(e["labels"])),
        }
        for e in examples
    ]

    def run(name: str, mode: str, exs: list[dict]) -> float:
        cfg = SFTConfig(**{**base.__dict__, "batching": mode})
        plan = make_plan(lengths, cfg)
        computed = sum(
            sum(len(exs[i]["input_ids"]) for i in mb)
            if mode == "pack"
            else len(mb) * max(len(exs[i]["input_ids"]) for i in mb)
            for step in plan
            for mb in step
        )
        real = sum(lengths[i] for step in plan for mb in step for i in mb)
        t0 = time.perf_counter()
        fit(model, exs, plan, cfg, tok.pad_token_id, "cpu", progress=False)
        tps = real / (time.perf_counter() - t0)
        print(
            f"{name}: {tps:.1f} real tok/s, {len(plan)} steps, computed/real tokens {computed / real:.2f}",
            flush=True,
        )
        return tps

    warm = SFTConfig(**{**base.__dict__, "max_steps": 1})
    fit(model, examples, make_plan(lengths, warm), warm, tok.pad_token_id, "cpu", progress=False)
    arms = {
        "naive": (f"pad to max_length {base.max_length}", "pad", padded_max),
        "dynamic": ("dynamic padding", "pad", examples),
        "group": ("length-grouped", "group", examples),
        "pack": ("packed", "pack", examples),
    }
    rounds: dict[str, list[float]] = {k: [] for k in arms}
    for r in range(args.repeat):  # interleaved, so a machine that slows down mid-run slows every mode alike
        print(f"round {r + 1}/{args.repeat}", flush=True)
        for key, arm in arms.items():
            rounds[key].append(run(*arm))
    medians = {k: statistics.median(v) for k, v in rounds.items()}
    naive, dynamic, group, pack = medians.values()
    print(
        "medians (real tok/s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in medians.items())
        + f"; ratios vs naive: group {group / naive:.2f}x, pack {pack / naive:.2f}x",
        flush=True,
    )
    med = f", median of {args.repeat}" if args.repeat > 1 else ""
    ref = f"naive padding to max_length={base.max_length} (micro-batch {args.micro}{med})"
    ref2 = f"dynamic padding, random order (micro-batch {args.micro}{med})"
    write_rows(
        "bench_sft",
        [
            row("sft tokens/s, length-grouped", group, "tok/s", ref, naive, ">= 1.5x", group / naive >= 1.5),
            row("sft tokens/s, packed", pack, "tok/s", ref, naive, ">= 1.5x", pack / naive >= 1.5),
            row("sft tokens/s, length-grouped vs dynamic padding", group, "tok/s", ref2, dynamic, "info"),
            row("sft tokens/s, packed vs dynamic padding", pack, "tok/s", ref2, dynamic, "info"),
        ],
    )


if __name__ == "__main__":
    main()
