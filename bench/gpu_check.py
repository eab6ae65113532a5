"""GPU check of the `paper` profile's student path: QLoRA through ``agentlib.sft.train``, adapter reload through
``HFModel``, and timings for the four student sizes — on any CUDA machine, with no weights to download.

Each Qwen2.5-{0.5,1.5,3,7}B-Instruct *shape* (layers, widths, heads, vocabulary) is built from its config with
random weights, saved with ``save_pretrained`` and then loaded by the real code paths (4-bit NF4 base through
bitsandbytes, LoRA r=64/alpha=128/dropout 0.05 on all linear layers, lr 2e-4, effective batch 8 = micro-batch 1
x 8 accumulation, max length 10,240: ``get_profile("paper").sft``). Speed does not depend
on the weights' values, so the timings hold for the real checkpoints; the losses do not mean anything beyond
"finite and decreasing". The tokenizer is Qwen2.5's (any folder with tokenizer.json + chat template).

1. check (0.5B shape): 20 optimizer steps on 16 repeated synthetic agent chats (one of ~9.5k tokens): every loss
   finite, the last 5 steps' mean below 0.8x the first 3 steps'; the adapter is saved, reloads with
   ``HFModel(base, adapter=...)`` on cuda, lowers the loss of a training chat against the same model with the
   adapter disabled, and generates.
   Then, when a ``vllm`` executable is found (``AGENTLIB_VLLM`` or PATH; ``--vllm on`` requires one), the same
   adapter is served the way the ``paper`` profile serves students, through ``agentlib.serve.vllm_model``
   (``vllm serve BASE --enable-lora --max-lora-rank 64 --lora-modules adapter-check=PATH``, started and stopped
   here): the server lists the module, every request names it, the LoRA student and the base model generate
   (greedy, batch of 16; SAG-style n=8 at T=0.4), and their greedy outputs differ (the adapter is applied).
2. timing, per size: seconds per optimizer step (8 chats of ~``--seq`` tokens each; median of the steps after
   the first), peak GPU memory, and ``HFModel`` generation tokens/s (bf16, greedy, batch of 16 prompts; and
   SAG-style n=8 samples at T=0.4 for 4 prompts).

    python bench/gpu_check.py [--sizes 0.5b,1.5b,3b,7b] [--seq 2560] [--tokenizer DIR] [--budget-s 540]
                              [--vllm auto|on|off]

Writes ``$OUT/gpu_check.json`` when ``OUT`` is set (the device tool), else ``runs/bench/gpu_check.json``.
"""

from __future__ import annotations

import argparse
import csv
import gc
import gzip
import json
import math
import os
import platform
import random
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QWEN = dict(
    bos_token_id=151643,
    eos_token_id=151645,
    pad_token_id=151643,
    hidden_act="silu",
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    attention_dropout=0.0,
    use_sliding_window=False,
)
# Shapes of the Qwen2.5-*-Instruct checkpoints' config.json (0.5B/1.5B/3B tie the embeddings; 7B does not).
_SHAPE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "tie_word_embeddings",
)
SHAPES: dict[str, dict] = {
    name: dict(zip(_SHAPE_FIELDS, row, strict=True))
    for name, row in {
        "tiny": (128, 2, 4, 2, 256, 151936, True),  # CPU smoke of this script
        "0.5b": (896, 24, 14, 2, 4864, 151936, True),
        "1.5b": (1536, 28, 12, 2, 8960, 151936, True),
        "3b": (2048, 36, 16, 2, 11008, 151936, True),
        "7b": (3584, 28, 28, 4, 18944, 152064, False),
    }.items()
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
WORDS = (
    "the of and in to was is for on as by with he at from his an were are which this also be has or had first "
    "one their its new after who they two her she been other when time during there into school more years "
    "over only year most would world city some where between later three state such used then national made "
    "known under many american university river film album team season war party county born population "
    "church north south river station game series album club league player army president company"
).split()


# ------------------------------------------------------------------------------------------ inputs


def find_tokenizer(arg: str | None) -> Path:
    """A folder with Qwen2.5's tokenizer: ``--tokenizer``, ``.gpu/tok`` (carried, tokenizer.json may be .gz) or
    the registry's qwen2.5-coder-0.5b folder."""
    cands = [Path(arg)] if arg else [ROOT / ".gpu" / "tok"]
    if not arg:
        try:
            from agentlib.registry import hf_dir

            cands.append(Path(hf_dir("qwen2.5-coder-0.5b")))
        except Exception:
            pass
    for c in cands:
        if (c / "tokenizer.json").exists() or (c / "tokenizer.json.gz").exists():
            return c
    raise FileNotFoundError(f"no Qwen tokenizer in {cands}")


def copy_tokenizer(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    if not (src / "tokenizer.json").exists():
        with gzip.open(src / "tokenizer.json.gz", "rb") as f:
            (dst / "tokenizer.json").write_bytes(f.read())


def build_model(size: str, folder: Path, tokenizer_dir: Path, device: str) -> float:
    """Save a random-weight model of Qwen2.5-``size``'s shape (bf16) and the tokenizer in ``folder``; seconds."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

    t0 = time.perf_counter()
    if (folder / "config.json").exists():
        return 0.0
    config = Qwen2Config(**QWEN, **SHAPES[size])
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=151643, eos_token_id=[151645, 151643], pad_token_id=151643
    )
    model.save_pretrained(folder)
    copy_tokenizer(tokenizer_dir, folder)
    del model
    free_memory()
    return time.perf_counter() - t0


def system_text() -> str:
    try:
        from agentlib.agent import system_prompt

        return system_prompt(["search"], short=True)
    except Exception:  # the agent module's extra imports are not needed for this check
        return "You are an expert assistant who solves tasks with Python code that can call `search(query)`."


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def agent_chat(rng: random.Random, steps: int, passage_words: int) -> list[dict]:
    """A CodeAct trajectory's shape: question, then ``steps`` x (thought + search code, 3 passages), answer."""
    q = words(rng, 18).capitalize() + "?"
    msgs = [{"role": "system", "content": system_text()}, {"role": "user", "content": q}]
    for s in range(steps):
        topic = words(rng, 3)
        code = (
            f'results = search("{topic}")\nprint(results)'
            if s % 2 == 0
            else f'for q in ["{topic}", "{words(rng, 2)}"]:\n    print(search(q))'
        )
        msgs += [
            {"role": "assistant", "content": f"Thought: I need {words(rng, 25)}.\n```python\n{code}\n```"},
            {
                "role": "user",
                "content": "Observation:\n"
                + "\n".join(
                    f"Doc {i} (Title: {words(rng, 2).title()}) {words(rng, passage_words)}" for i in (1, 2, 3)
                ),
            },
        ]
    answer = words(rng, 2)
    msgs.append(
        {
            "role": "assistant",
            "content": f"Thought: The passages say {words(rng, 20)}.\n"
            f"```python\nfinal_answer({answer!r})\n```",
        }
    )
    return msgs


def n_tokens(tokenizer, chat: list[dict]) -> int:
    return len(
        tokenizer(tokenizer.apply_chat_template(chat, tokenize=False), add_special_tokens=False).input_ids
    )


def chats_of_length(tokenizer, n: int, target: int, seed: int, steps: int = 5) -> list[dict]:
    """``n`` agent chats of about ``target`` tokens each (passage length fitted on two probes)."""
    rng = random.Random(seed)
    a, b = (
        n_tokens(tokenizer, agent_chat(random.Random(1), steps, 10)),
        n_tokens(tokenizer, agent_chat(random.Random(1), steps, 110)),
    )
    pw = max(5, round(10 + (target - a) * 100 / max(1, b - a)))
    return [agent_chat(rng, steps, pw) for _ in range(n)]


# ------------------------------------------------------------------------------------------ runs


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def paper_config(**overrides):
    from dataclasses import replace

    from agentlib.profiles import get_profile

    return replace(get_profile("paper").sft, **overrides)


def qlora_check(model_dir: Path, work: Path, steps: int = 20) -> dict:
    """The paper profile's QLoRA step on repeated chats, then the adapter through HFModel."""
    import torch
    from transformers import AutoTokenizer

    from agentlib.models import HFModel
    from agentlib.sft import collate, encode_chat, loss_sum, train

    tok = AutoTokenizer.from_pretrained(model_dir)
    chats = chats_of_length(tok, 15, 1500, seed=10, steps=3) + chats_of_length(tok, 1, 9500, seed=11, steps=5)
    config = paper_config(num_epochs=math.ceil(steps * 8 / len(chats)), max_steps=steps)
    out = work / "adapter-check"
    shutil.rmtree(out, ignore_errors=True)
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    t0 = time.perf_counter()
    res = train(config, chats, model_dir, out, progress=False)
    train_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    free_memory()
    losses = res.losses
    finite = all(math.isfinite(x) for x in losses)
    first, last = statistics.mean(losses[:3]), statistics.mean(losses[-5:])
    lengths = [n_tokens(tok, c) for c in chats]
    r = {
        "config": {
            k: getattr(config, k)
            for k in (
                "lora_r",
                "lora_alpha",
                "lora_dropout",
                "target_modules",
                "load_in_4bit",
                "learning_rate",
                "batch_size",
                "micro_batch_size",
                "max_length",
                "batching",
            )
        },
        "quantized_4bit": res.quantized,
        "steps": len(losses),
        "n_examples": res.n_examples,
        "n_dropped": res.n_dropped,
        "n_truncated": res.n_truncated,
        "max_chat_tokens": max(lengths),
        "losses": [round(x, 4) for x in losses],
        "all_finite": finite,
        "loss_first3": round(first, 4),
        "loss_last5": round(last, 4),
        "decreased": finite and last < 0.8 * first,
        "train_s": round(train_s, 1),
        "peak_gpu_gib": round(peak, 2),
        "adapter_files": sorted(p.name for p in out.iterdir()),
    }
    # reload: bf16 base + the saved adapter, on cuda, through the project's HFModel
    m = HFModel(model_dir, adapter=out, device="cuda" if torch.cuda.is_available() else "cpu")
    ex = encode_chat(chats[0], m.tokenizer, config.max_length)
    batch = {k: v.to(m.device) for k, v in collate([ex], m.tokenizer.pad_token_id).items()}
    with torch.no_grad():
        s, n = loss_sum(m.model, batch)
        with m.model.disable_adapter():
            s0, _ = loss_sum(m.model, batch)
    outs = m.chat_batch([c[:2] for c in chats[:4]], max_tokens=32)
    r.update(
        {
            "reload_device": str(next(m.model.parameters()).device),
            "reload_loss_with_adapter": round(s.item() / n, 4),
            "reload_loss_adapter_disabled": round(s0.item() / n, 4),
            "adapter_lowers_loss": s.item() < s0.item(),
            "generated_tokens": m.usage.completion_tokens,
            "generated_sample": outs[0][0][:80],
        }
    )
    r["passed"] = bool(
        r["decreased"] and r["adapter_lowers_loss"] and r["quantized_4bit"] and r["generated_tokens"] > 0
    )
    del m
    free_memory()
    return r


def time_training(model_dir: Path, work: Path, seq: int, steps: int, **overrides) -> dict:
    """Seconds per optimizer step (effective batch 8, micro-batch 1) with the paper profile's QLoRA config."""
    import torch
    from transformers import AutoTokenizer

    from agentlib.sft import train

    tok = AutoTokenizer.from_pretrained(model_dir)
    chats = chats_of_length(tok, 8 * steps, seq, seed=20)
    out = work / f"adapter-time-{model_dir.name}-{seq}"
    shutil.rmtree(out, ignore_errors=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = train(
        paper_config(num_epochs=1, max_steps=steps, **overrides), chats, model_dir, out, progress=False
    )
    total = time.perf_counter() - t0
    meta = json.loads((out / "sft_run.json").read_text())
    with (out / "loss.csv").open() as f:
        sec = [float(x["seconds"]) for x in csv.DictReader(f)]
    deltas = [b - a for a, b in zip(sec, sec[1:], strict=False)]
    step_s = statistics.median(deltas) if deltas else sec[0]
    toks = meta["tokens"] / len(sec)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    free_memory()
    return {
        "quantized_4bit": res.quantized,
        "tokens_per_step": round(toks),
        "first_step_s": round(sec[0], 2),
        "s_per_step": round(step_s, 3),
        "train_tokens_per_s": round(toks / step_s),
        "load_and_setup_s": round(total - sec[-1], 1),
        "peak_gpu_gib": round(peak, 2),
        "losses_finite": all(math.isfinite(x) for x in res.losses),
        "n_truncated": res.n_truncated,
        **overrides,
    }


def time_generation(model_dir: Path, batch: int = 16, max_tokens: int = 256) -> dict:
    """HFModel (bf16) generation tokens/s: greedy over ``batch`` prompts, and n=8 samples at T=0.4 on 4 prompts."""
    import torch
    from transformers import AutoTokenizer

    from agentlib.models import HFModel

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [c[:4] for c in chats_of_length(tok, batch, 1200, seed=30, steps=1)]
    m = HFModel(model_dir, device="cuda" if torch.cuda.is_available() else "cpu", max_batch=batch)
    m.chat_batch(prompts[:2], max_tokens=8)  # warm-up
    m.usage.reset()
    m.chat_batch(prompts, max_tokens=max_tokens)
    greedy = {
        "prompt_tokens_mean": round(m.usage.prompt_tokens / batch),
        "completion_tokens": m.usage.completion_tokens,
        "seconds": round(m.usage.seconds, 2),
        "tokens_per_s": round(m.usage.tokens_per_s, 1),
    }
    m.usage.reset()
    m.chat_batch(prompts[:4], n=8, temperature=0.4, top_p=0.8, max_tokens=max_tokens)
    sag = {
        "completion_tokens": m.usage.completion_tokens,
        "seconds": round(m.usage.seconds, 2),
        "tokens_per_s": round(m.usage.tokens_per_s, 1),
    }
    del m
    free_memory()
    return {"greedy_batch": greedy, "sag_n8_x4": sag, "batch": batch, "max_tokens": max_tokens}


def vllm_executable() -> str | None:
    exe = os.environ.get("AGENTLIB_VLLM")
    if exe:
        return exe if Path(exe).exists() or shutil.which(exe) else None
    return shutil.which("vllm")


def vllm_lora_check(
    model_dir: Path,
    adapter_dir: Path,
    n_prompts: int = 16,
    max_tokens: int = 64,
    ready_timeout_s: float = 600.0,
) -> dict:
    """The student as the ``paper`` profile serves it: ``serve.vllm_model(base, adapter)`` starts vLLM with the
    adapter as a LoRA module named after its folder; requests name it. Compares with the base model's outputs."""
    import urllib.request

    from transformers import AutoTokenizer

    from agentlib.serve import lora_name, vllm_model

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [c[:2] for c in chats_of_length(tok, n_prompts, 600, seed=40, steps=1)]
    name = lora_name(adapter_dir)
    r: dict = {"module": name, "adapter": str(adapter_dir)}
    server_kw = {
        "max_model_len": 4096,
        "gpu_memory_utilization": 0.5,
        "dtype": "bfloat16",
        "extra_args": ["--enforce-eager"],
    }
    t0 = time.perf_counter()
    with vllm_model(
        str(model_dir), adapter_dir, endpoints=[], server_kw=server_kw, ready_timeout_s=ready_timeout_s
    ) as m:
        r["start_s"] = round(time.perf_counter() - t0, 1)
        with urllib.request.urlopen(m.urls[0] + "/models", timeout=30) as resp:
            r["served_models"] = [x["id"] for x in json.loads(resp.read())["data"]]
        r["requests_name"] = m.model
        lora = m.chat_batch(prompts, max_tokens=max_tokens)
        r["lora_greedy"] = {
            "completion_tokens": m.usage.completion_tokens,
            "seconds": round(m.usage.seconds, 2),
            "tokens_per_s": round(m.usage.tokens_per_s, 1),
        }
        m.usage.reset()
        m.chat_batch(prompts[:4], n=8, temperature=0.4, top_p=0.8, max_tokens=max_tokens)
        r["lora_sag_n8_x4"] = {
            "completion_tokens": m.usage.completion_tokens,
            "seconds": round(m.usage.seconds, 2),
            "tokens_per_s": round(m.usage.tokens_per_s, 1),
        }
        base_model = type(m)(endpoints=m.urls, model=str(model_dir))  # the same server, the base model
        try:
            base = base_model.chat_batch(prompts, max_tokens=max_tokens)
        finally:
            base_model.close()
    r["outputs_differ_from_base"] = sum(a != b for a, b in zip(lora, base, strict=True))
    r["lora_sample"] = lora[0][0][:80]
    r["passed"] = bool(
        name in r["served_models"]
        and r["requests_name"] == name
        and r["lora_greedy"]["completion_tokens"] > 0
        and r["outputs_differ_from_base"] > 0
    )
    return r


# ------------------------------------------------------------------------------------------ main


def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            env[name] = __import__(name).__version__
        except Exception as err:  # noqa: BLE001
            env[name] = f"missing ({type(err).__name__})"
    env["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return env


def print_table(result: dict) -> None:
    c = result.get("check", {})
    if c:
        print(
            f"\nQLoRA check ({result.get('check_size')}): passed={c.get('passed')} 4bit={c.get('quantized_4bit')} "
            f"loss {c.get('loss_first3')} -> {c.get('loss_last5')} over {c.get('steps')} steps; "
            f"reload loss adapter/disabled {c.get('reload_loss_with_adapter')}/{c.get('reload_loss_adapter_disabled')}"
            f"; peak {c.get('peak_gpu_gib')} GiB"
        )
    v = result.get("vllm_lora")
    if v:
        print(
            f"vLLM LoRA student: {v.get('skipped') or v.get('error') or ''}"
            if "passed" not in v
            else f"vLLM LoRA student: passed={v['passed']} module {v['module']!r} served={v['module'] in v['served_models']}"
            f" requests name {v['requests_name']!r}; greedy {v['lora_greedy']['tokens_per_s']} tok/s, SAG n8x4 "
            f"{v['lora_sag_n8_x4']['tokens_per_s']} tok/s; {v['outputs_differ_from_base']}/16 outputs differ from base"
            f"; start {v['start_s']} s"
        )
    print(
        f"\n{'size':>5} | {'tok/step':>8} | {'s/step':>7} | {'train tok/s':>11} | {'peak GiB':>8} | "
        f"{'gen tok/s b16':>13} | {'gen tok/s n8x4':>14}"
    )
    for size, r in sorted(result.get("sizes", {}).items(), key=lambda kv: list(SHAPES).index(kv[0])):
        t, g = r.get("train", {}), r.get("generate", {})
        print(
            f"{size:>5} | {t.get('tokens_per_step', '-'):>8} | {t.get('s_per_step', '-'):>7} | "
            f"{t.get('train_tokens_per_s', '-'):>11} | {t.get('peak_gpu_gib', '-'):>8} | "
            f"{g.get('greedy_batch', {}).get('tokens_per_s', '-'):>13} | "
            f"{g.get('sag_n8_x4', {}).get('tokens_per_s', '-'):>14}"
            + (f"  ERROR {r['error']}" if "error" in r else "")
        )
        if "train_long" in r:
            t = r["train_long"]
            print(
                f"{size:>5} | {t['tokens_per_step']:>8} | {t['s_per_step']:>7} | {t['train_tokens_per_s']:>11} | "
                f"{t['peak_gpu_gib']:>8} | long chats, gradient checkpointing={t['gradient_checkpointing']}"
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="0.5b,1.5b,3b,7b")
    ap.add_argument("--check-size", default="0.5b", help="shape for the QLoRA check ('' skips it)")
    ap.add_argument("--check-steps", type=int, default=20)
    ap.add_argument("--seq", type=int, default=2560, help="tokens per chat for the timing")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps timed per size (first is warm-up)")
    ap.add_argument("--gen-tokens", type=int, default=256)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--work", default="/tmp/gpu_check")
    ap.add_argument(
        "--budget-s", type=float, default=540, help="skip the remaining stages after this many seconds"
    )
    ap.add_argument("--no-generate", action="store_true")
    ap.add_argument(
        "--long-sizes", default="", help="sizes also timed at --long-seq tokens per chat (2 steps)"
    )
    ap.add_argument("--long-seq", type=int, default=9800)
    ap.add_argument("--long-gc", default="7b", help="sizes timed at --long-seq with gradient checkpointing")
    ap.add_argument(
        "--vllm",
        choices=("auto", "on", "off"),
        default="auto",
        help="serve the check's adapter with vLLM as a LoRA module (auto: when a vllm executable is found)",
    )
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    t_start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out_path = (
        Path(os.environ["OUT"]) / "gpu_check.json"
        if os.environ.get("OUT")
        else ROOT / "runs" / "bench" / "gpu_check.json"
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    tok_dir = find_tokenizer(args.tokenizer)
    result: dict = {"bench": "gpu_check", "env": environment(), "args": vars(args), "sizes": {}}
    print(json.dumps(result["env"]), flush=True)

    def save() -> None:
        result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        out_path.write_text(json.dumps(result, indent=2, default=str))

    def left() -> float:
        return args.budget_s - (time.perf_counter() - t_start)

    if args.check_size:
        try:
            d = work / f"qwen2.5-{args.check_size}-random"
            build_model(args.check_size, d, tok_dir, device)
            result["check_size"] = args.check_size
            result["check"] = qlora_check(d, work, args.check_steps)
        except Exception as err:  # noqa: BLE001
            result["check"] = {
                "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc()[-3000:],
            }
        print(json.dumps(result["check"], default=str)[:2000], flush=True)
        save()
        adapter = work / "adapter-check"
        if args.vllm == "off":
            pass
        elif not vllm_executable() and args.vllm == "auto":
            result["vllm_lora"] = {"skipped": "no vllm executable (AGENTLIB_VLLM or PATH)"}
        elif not (adapter / "adapter_config.json").exists():
            result["vllm_lora"] = {"skipped": "the QLoRA check saved no adapter"}
        else:
            try:
                result["vllm_lora"] = vllm_lora_check(
                    d, adapter, ready_timeout_s=max(60.0, min(600.0, left() - 60))
                )
            except Exception as err:  # noqa: BLE001
                result["vllm_lora"] = {
                    "error": f"{type(err).__name__}: {err}",
                    "traceback": traceback.format_exc()[-3000:],
                }
            free_memory()
        if "vllm_lora" in result:
            print("vllm_lora", json.dumps(result["vllm_lora"], default=str)[:2000], flush=True)
            save()
    for size in [s for s in args.sizes.split(",") if s]:
        if left() < 30:
            result["sizes"][size] = {"error": "skipped: time budget spent"}
            continue
        r: dict = {}
        result["sizes"][size] = r
        try:
            d = work / f"qwen2.5-{size}-random"
            r["build_s"] = round(build_model(size, d, tok_dir, device), 1)
            r["train"] = time_training(d, work, args.seq, args.steps)
            save()
            if size in args.long_sizes.split(",") and left() > 60:
                gc_on = size in args.long_gc.split(",")
                r["train_long"] = time_training(d, work, args.long_seq, 2, gradient_checkpointing=gc_on)
                save()
            if not args.no_generate and left() > 20:
                r["generate"] = time_generation(d, max_tokens=args.gen_tokens)
            shutil.rmtree(d, ignore_errors=True)  # free the disk for the next size
        except Exception as err:  # noqa: BLE001
            r["error"] = f"{type(err).__name__}: {err}"
            r["traceback"] = traceback.format_exc()[-3000:]
            free_memory()
        print(size, json.dumps(r, default=str)[:1500], flush=True)
        save()
    save()
    print_table(result)
    print(f"\nwrote {out_path} ({result['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
