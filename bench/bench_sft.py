"""SFT throughput: packing and length-grouping vs naive padding, on agent-shaped trajectories.

Trajectories are built from real data in the cpu profile's shape: HotpotQA questions with 1-5 search
steps whose observations are 3 real mini-corpus passages cut to the profile's ``passage_chars``
(``Doc i (Title: ...)``), and math questions whose observations are short printed values, mixed in the
profile's ratio of factual to math training questions, under the student's short system prompt,
truncated at the cpu profile's agent max length. The same LoRA model (SmolLM2-135M, r=16; bf16 where the CPU
has it, else fp32) trains the same examples in each mode; tokens/s counts real (unpadded) tokens through forward + backward + step.
References: naive padding of every example to max_length (the bar: >= 1.5x), and dynamic padding to the
longest example of a random micro-batch (reported for information).

    flock /tmp/agentlib-heavy.lock .venv/bin/python bench/bench_sft.py [--n 32] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import row, write_rows  # noqa: E402

from agentlib import agent, data, paths  # noqa: E402
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


def passages(rng: random.Random, corpus: list[dict], k: int = 3, chars: int = PROFILES["cpu"].passage_chars) -> str:
    docs = rng.sample(corpus, k)
    return "\n".join(f"Doc {i} (Title: {d['title']}) {d['text'][:chars]}" for i, d in enumerate(docs, 1))


def factual_record(rng: random.Random, question: str, answer: str, corpus: list[dict]) -> dict:
    msgs = [{"role": "system", "content": "teacher prompt"}, {"role": "user", "content": question}]
    n_steps = rng.choice([1, 1, 2, 2, 2, 3, 3, 4, 5])
    for s in range(n_steps - 1):
        topic = rng.choice(corpus)["title"]
        thought = f"Thought: I need to find out more about {topic} to answer: {question[: rng.randint(20, 90)]}"
        code = f'results = search("{topic} {question[:40]}")\nprint(results)'
        if s % 2:
            code = f'for q in ["{topic}", "{question[:30]}"]:\n    print(search(q))'
        msgs += [{"role": "assistant", "content": f"{thought}\n```python\n{code}\n```"},
                 {"role": "user", "content": "Observation:\n" + passages(rng, corpus)}]
    msgs.append({"role": "assistant",
                 "content": f"Thought: The passages say the answer is {answer}.\n```python\nfinal_answer({answer!r})\n```"})
    return {"messages": msgs}


def math_record(rng: random.Random, question: str, answer: str) -> dict:
    msgs = [{"role": "system", "content": "teacher prompt"}, {"role": "user", "content": question}]
    for _ in range(rng.choice([1, 2, 2, 3])):
        last = rng.randint(2, 11)
        lines = "\n".join(f"x{j} = sympy.Rational({rng.randint(1, 99)}, {rng.randint(2, 9)}) * x{j - 1}"
                          for j in range(1, last + 1))
        msgs += [{"role": "assistant",
                  "content": f"Thought: Let me compute the quantities step by step.\n```python\nimport sympy\nx0 = 1\n{lines}\nprint(x{last})\n```"},
                 {"role": "user", "content": f"Observation:\n{rng.randint(1, 10**6)}/{rng.randint(2, 999)}"}]
    msgs.append({"role": "assistant", "content": f"Thought: Done.\n```python\nfinal_answer({answer!r})\n```"})
    return {"messages": msgs}


def build_records(n: int, seed: int = 0) -> list[dict]:
    prof = PROFILES["cpu"]
    n_factual = sum(count for _, _, count in prof.train_factual)
    share = n_factual / (n_factual + sum(count for _, _, count in prof.train_math))
    rng = random.Random(seed)
    with open(paths.corpus_path()) as f:
        corpus = [json.loads(line) for line in f]
    hotpot = data.load_extra("hotpotqa_train100")
    math = data.load_benchmark("math_medium", split="train", limit=200)
    out = []
    for i in range(n):
        if int((i + 1) * share) > int(i * share):  # the profile's factual share, spread evenly
            ex = rng.choice(hotpot)
            out.append(factual_record(rng, ex.question, ex.answer, corpus))
        else:
            ex = rng.choice(math)
            out.append(math_record(rng, ex.question, ex.answer))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=8, help="trajectories (one optimizer step of each mode)")
    ap.add_argument("--micro", type=int, default=4, help="micro-batch size of the padded modes")
    args = ap.parse_args()

    prof = PROFILES["cpu"]
    base = SFTConfig.from_profile(prof, "agent", lora_r=16, lora_alpha=32, num_epochs=1, max_steps=None,
                                  micro_batch_size=args.micro, device="cpu",
                                  gradient_checkpointing=True)  # 4 x 2048 padded tokens need it in 24 GB
    chats = [trajectory_to_chat(r, agent.system_prompt(["search"], short=True)) for r in build_records(args.n)]
    model, tok = load_for_training(resolve_model_path(args.model), base, "cpu")
    examples, dropped = encode_all(chats, tok, base.max_length)
    lengths = [len(e["input_ids"]) for e in examples]
    print(f"{len(examples)} examples ({dropped} dropped, {sum(e['truncated'] for e in examples)} truncated), "
          f"lengths min/median/max {min(lengths)}/{sorted(lengths)[len(lengths) // 2]}/{max(lengths)}, "
          f"{sum(lengths)} tokens", flush=True)

    padded_max = [{**e, "input_ids": e["input_ids"] + [tok.pad_token_id] * (base.max_length - len(e["input_ids"])),
                   "labels": e["labels"] + [-100] * (base.max_length - len(e["labels"]))} for e in examples]

    def run(name: str, mode: str, exs: list[dict]) -> float:
        cfg = SFTConfig(**{**base.__dict__, "batching": mode})
        plan = make_plan(lengths, cfg)
        computed = sum(sum(len(exs[i]["input_ids"]) for i in mb) if mode == "pack"
                       else len(mb) * max(len(exs[i]["input_ids"]) for i in mb) for step in plan for mb in step)
        real = sum(lengths[i] for step in plan for mb in step for i in mb)
        t0 = time.perf_counter()
        fit(model, exs, plan, cfg, tok.pad_token_id, "cpu", progress=False)
        tps = real / (time.perf_counter() - t0)
        print(f"{name}: {tps:.1f} real tok/s, {len(plan)} steps, computed/real tokens {computed / real:.2f}", flush=True)
        return tps

    warm = SFTConfig(**{**base.__dict__, "max_steps": 1})
    fit(model, examples, make_plan(lengths, warm), warm, tok.pad_token_id, "cpu", progress=False)
    naive = run(f"pad to max_length {base.max_length}", "pad", padded_max)
    dynamic = run("dynamic padding", "pad", examples)
    group = run("length-grouped", "group", examples)
    pack = run("packed", "pack", examples)
    ref = f"naive padding to max_length={base.max_length} (micro-batch {args.micro})"
    ref2 = f"dynamic padding, random order (micro-batch {args.micro})"
    write_rows("bench_sft", [
        row("sft tokens/s, length-grouped", group, "tok/s", ref, naive, ">= 1.5x", group / naive >= 1.5),
        row("sft tokens/s, packed", pack, "tok/s", ref, naive, ">= 1.5x", pack / naive >= 1.5),
        row("sft tokens/s, length-grouped vs dynamic padding", group, "tok/s", ref2, dynamic, "info"),
        row("sft tokens/s, packed vs dynamic padding", pack, "tok/s", ref2, dynamic, "info"),
    ])  # fmt: skip


if __name__ == "__main__":
    main()
