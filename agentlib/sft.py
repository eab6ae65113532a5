"""Supervised fine-tuning of a student on teacher trajectories: chats, the loss mask, batching, LoRA/QLoRA.

The loss mask is built from *character offsets* of the rendered chat, so it works for any chat template:

1. render the whole conversation with ``tokenizer.apply_chat_template(..., tokenize=False)``;
2. find where each message's content sits in that string by rendering the conversation's prefixes
   (the text before message ``i`` is the rendering of ``messages[:i]``; for an assistant message, with the
   generation prompt) and locating the content right after it;
3. tokenize the rendered string once with ``return_offsets_mapping=True`` and train on the tokens whose
   characters lie in an assistant content span, plus the first token after it (the end-of-turn token).

Checks (a ``MaskError`` otherwise): every example keeps > 0 trained tokens and no trained token touches the
system prompt, the question or any observation.

Truncation (``max_length``) never keeps half an assistant turn: the example is cut right after the last
assistant turn that fits whole (its end-of-turn token included) and marked ``truncated=True``; later turns are
dropped. An example where not even the first assistant turn fits raises ``MaskError`` (``train`` skips and
counts it).
"""

from __future__ import annotations

import bisect
import csv
import dataclasses
import hashlib
import json
import math
import random
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "IGNORE",
    "MaskError",
    "trajectory_to_chat",
    "message_spans",
    "assistant_labels",
    "encode_chat",
    "plan_batches",
    "collate",
    "loss_sum",
    "SFTConfig",
    "TrainResult",
    "resolve_model_path",
    "pick_device",
    "load_for_training",
    "encode_all",
    "make_plan",
    "fit",
    "train",
    "read_losses",
]

IGNORE = -100


class MaskError(ValueError):
    """The loss mask of an example is unusable (no trained token, or a non-assistant token trained)."""


# --------------------------------------------------------------------------------------------- chats


def trajectory_to_chat(record: dict, system_prompt: str | None) -> list[dict]:
    """A trajectory record's ``messages`` as a training chat.

    system (``system_prompt``, e.g. the student's short ``agent.system_prompt(["search"], short=True)``;
    ``None`` keeps the record's own), user question, then assistant turns with observations as user turns.
    Trailing non-assistant messages (nothing to learn after them) are dropped.
    """
    # Assistant turns are stripped: a token that straddles the template/content boundary is never trained.
    messages = [
        {"role": m["role"], "content": m["content"].strip() if m["role"] == "assistant" else m["content"]}
        for m in record["messages"]
    ]
    for m in messages:
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"unexpected role {m['role']!r} in trajectory {record.get('id')}")
    if system_prompt is not None:
        if messages and messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": system_prompt}
        else:
            messages.insert(0, {"role": "system", "content": system_prompt})
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"trajectory {record.get('id')} has no assistant turn")
    return messages


# ----------------------------------------------------------------------------------------- the mask


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def message_spans(messages: list[dict], tokenizer: Any) -> tuple[str, list[tuple[int, int, int]]]:
    """The rendered chat and, per message, ``(content_start, content_end, turn_end)`` character offsets.

    ``turn_end`` is where the next message's rendering begins (the end-of-turn marker lies in
    ``[content_end, turn_end)``). Found by rendering prefixes of the conversation, so no template-specific
    string is assumed; the content itself is searched after the prefix (templates may strip whitespace).
    """
    text = _render(tokenizer, messages)
    spans: list[tuple[int, int, int]] = []
    cursor = 0
    for i, m in enumerate(messages):
        if i > 0:
            before = _render(tokenizer, messages[:i], generation_prompt=m["role"] == "assistant")
            if text.startswith(before):
                cursor = max(cursor, len(before))
        content = m["content"]
        start = text.find(content, cursor) if content else cursor
        if start < 0 and content.strip():
            content = content.strip()
            start = text.find(content, cursor)
        if start < 0:
            raise MaskError(f"message {i} ({m['role']}) not found in the rendered chat")
        end = start + len(content)
        through = _render(tokenizer, messages[: i + 1])
        turn_end = len(through) if text.startswith(through) and len(through) >= end else end
        spans.append((start, end, max(turn_end, end)))
        cursor = end
    return text, spans


def assistant_labels(
    input_ids: Sequence[int],
    offsets: Sequence[tuple[int, int]],
    spans: Sequence[tuple[int, int, int]],
    roles: Sequence[str],
) -> list[int]:
    """Labels from character spans: a token is trained (label = its id) if it is non-empty and starts inside an
    assistant message's content, or if it is the first token starting in ``[content_end, turn_end)`` of an
    assistant message (its end-of-turn marker); every other label is -100."""
    starts = [a for a, _ in offsets]
    labels = [IGNORE] * len(input_ids)
    for role, (start, end, turn_end) in zip(roles, spans, strict=True):
        if role != "assistant":
            continue
        lo, hi = bisect.bisect_left(starts, start), bisect.bisect_left(starts, end)
        for j in range(lo, hi):
            if offsets[j][1] > offsets[j][0]:
                labels[j] = input_ids[j]
        if hi < len(input_ids) and starts[hi] < turn_end:
            labels[hi] = input_ids[hi]
    return labels


def encode_chat(messages: list[dict], tokenizer: Any, max_length: int | None = None) -> dict:
    """Tokenize a chat and mask it: ``{"input_ids", "labels", "truncated", "n_trained"}``.

    ``labels`` is ``-100`` on every token not trained: only assistant content and its end-of-turn token are
    trained. See the module docstring for truncation. Raises ``MaskError`` when the mask is unusable.
    """
    text, spans = message_spans(messages, tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets: list[tuple[int, int]] = [tuple(o) for o in enc["offset_mapping"]]
    roles = [m["role"] for m in messages]
    labels = assistant_labels(ids, offsets, spans, roles)
    starts = [a for a, _ in offsets]
    for role, (start, end, _) in zip(roles, spans, strict=True):
        if role != "assistant" and end > start:
            lo, hi = bisect.bisect_right(starts, start) - 1, bisect.bisect_left(starts, end)
            if any(labels[j] != IGNORE and offsets[j][1] > start for j in range(max(lo, 0), hi)):
                raise MaskError(f"a {role} token would be trained")
    turn_last = []  # index of each assistant turn's last trained token (its end-of-turn marker, usually)
    for role, (start, _, turn_end) in zip(roles, spans, strict=True):
        lo, j = bisect.bisect_left(starts, start), bisect.bisect_left(starts, turn_end) - 1
        while role == "assistant" and j >= lo and labels[j] == IGNORE:
            j -= 1
        if role == "assistant" and j >= lo:
            turn_last.append(j)
    truncated = False
    if max_length is not None and len(ids) > max_length:
        fitting = [j for j in turn_last if j < max_length]
        if not fitting:
            raise MaskError(f"no whole assistant turn fits in max_length={max_length}")
        cut = fitting[-1] + 1
        ids, labels, truncated = ids[:cut], labels[:cut], True
    n_trained = sum(label != IGNORE for label in labels)
    if n_trained == 0:
        raise MaskError("example has no trained token (check the chat template / messages)")
    return {"input_ids": ids, "labels": labels, "truncated": truncated, "n_trained": n_trained}


# -------------------------------------------------------------------------------- batching & collate


def plan_batches(
    lengths: Sequence[int],
    batch_size: int,
    mode: str = "pack",
    micro_batch_size: int = 4,
    pack_length: int = 4096,
    seed: int = 0,
) -> list[list[list[int]]]:
    """Group example indices into optimizer steps of ``batch_size`` examples, each a list of micro-batches.

    ``mode``: ``"pad"`` (naive: random order, ``micro_batch_size`` examples padded to the longest),
    ``"group"`` (length-grouped: examples of similar length share a step, micro-batches padded), or
    ``"pack"`` (each step's examples packed first-fit-decreasing into rows of <= ``pack_length`` tokens).
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if mode == "group":  # sort inside mega-chunks, HF LengthGroupedSampler-style, then shuffle the steps
        mega = batch_size * 16
        order = [
            i
            for k in range(0, len(order), mega)
            for i in sorted(order[k : k + mega], key=lambda i: -lengths[i])
        ]
    steps = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    if mode == "group":
        rng.shuffle(steps)
    plan = []
    for step in steps:
        if mode in ("pad", "group"):
            plan.append([step[k : k + micro_batch_size] for k in range(0, len(step), micro_batch_size)])
        elif mode == "pack":
            rows: list[list[int]] = []
            room: list[int] = []
            for i in sorted(step, key=lambda i: -lengths[i]):
                slot = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
                if slot is None:
                    rows.append([i])
                    room.append(pack_length - lengths[i])
                else:
                    rows[slot].append(i)
                    room[slot] -= lengths[i]
            plan.append(rows)
        else:
            raise ValueError(f"unknown batching mode {mode!r}")
    return plan


def collate(examples: Sequence[dict], pad_id: int, pack: bool = False) -> dict:
    """Tensors for one micro-batch. Padded: ``input_ids, labels, attention_mask`` (right padding).

    Packed: one row, ``position_ids`` restarting at 0 for every example and no attention mask, which
    transformers turns into a block-diagonal causal mask (no attention across examples).
    """
    import torch

    if pack:
        ids = [t for e in examples for t in e["input_ids"]]
        labels = [t for e in examples for t in ([IGNORE] + list(e["labels"][1:]))]
        pos = [p for e in examples for p in range(len(e["input_ids"]))]
        return {
            "input_ids": torch.tensor([ids]),
            "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([pos]),
        }
    width = max(len(e["input_ids"]) for e in examples)
    ids = [list(e["input_ids"]) + [pad_id] * (width - len(e["input_ids"])) for e in examples]
    labels = [list(e["labels"]) + [IGNORE] * (width - len(e["labels"])) for e in examples]
    mask = [[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in examples]
    return {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "attention_mask": torch.tensor(mask),
    }


def loss_sum(model: Any, batch: dict) -> tuple[Any, int]:
    """Summed next-token cross-entropy over the trained tokens and their count.

    The LM head runs only on the positions whose next token is trained (full-vocabulary logits for every
    position of a 10k-token agent trajectory would take gigabytes).
    """
    import torch.nn.functional as F

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = base.get_decoder()(**inputs, use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    logits = base.get_output_embeddings()(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, targets[keep], reduction="sum"), int(keep.sum())


# ----------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class SFTConfig:
    """Everything that defines a fine-tuning run (its hash names the run). Defaults: the paper's.

    A profile holds one (``Profile.sft``); ``agentlib.pipeline.sft_config`` adds what a run takes from its
    kind (CoT or agent): the max length and the student's system prompt.
    """

    lora_r: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    load_in_4bit: bool = False  # 4-bit NF4 QLoRA (bitsandbytes); bf16 LoRA otherwise or when 4-bit fails
    learning_rate: float = 2e-4
    num_epochs: float = 2.0
    batch_size: int = 8  # effective batch (examples per optimizer step), reached by gradient accumulation
    # "group" | "pack" | "pad" (see plan_batches). Length-grouping was fastest on CPU (bench/bench_sft.py):
    # packing removes all padding, but sdpa attends over a whole packed row with a block-diagonal mask.
    batching: str = "group"
    micro_batch_size: int = 1  # examples per forward pass in "pad"/"group" mode
    max_length: int = 10_240
    pack_length: int | None = None  # row length when packing; defaults to max_length
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_steps: int | None = None  # stop early (smoke runs, benchmarks)
    gradient_checkpointing: bool = False
    system_prompt: str | None = None  # replaces the records' system prompt (the student's); None keeps it
    seed: int = 0
    device: str = "auto"  # "auto": cuda when available, else cpu

    def hash(self, *parts: str) -> str:
        """A short hash of the config (device excluded) and any extra strings (model, data)."""
        d = dataclasses.asdict(self)
        d.pop("device")
        blob = json.dumps([d, *parts], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class TrainResult:
    out_dir: Path
    losses: list[float]  # one per optimizer step (mean loss per trained token)
    n_examples: int
    n_dropped: int  # examples whose mask was unusable (e.g. no whole assistant turn within max_length)
    n_truncated: int
    tokens_per_s: float  # real (unpadded) tokens through forward+backward per second
    quantized: bool  # the base was loaded in 4-bit
    skipped: bool  # True when an adapter with the same config hash already existed


def resolve_model_path(name_or_path: str | Path) -> str | Path:
    """A local HF model folder for a path or a registry name like ``"smollm2-135m"`` (a hub id stays one)."""
    from agentlib import registry

    return registry.resolve(name_or_path)


def pick_device(device: str = "auto") -> str:
    import torch

    return device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def load_for_training(model_path: str | Path, config: SFTConfig, device: str) -> tuple[Any, Any]:
    """(peft model, tokenizer): a 4-bit NF4 base (QLoRA) when ``config.load_in_4bit``, else bf16, plus LoRA.

    If 4-bit loading fails (no bitsandbytes backend for this device), warns and falls back to bf16 LoRA;
    ``model.is_loaded_in_4bit`` tells which one ran.
    """
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agentlib.models import _default_dtype

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # bf16 on GPUs and CPUs with native bf16; fp32 elsewhere (bf16 matmuls were 30x slower on an AVX2-only CPU)
    dtype = torch.bfloat16 if str(device).startswith("cuda") else _default_dtype()
    model = None
    if config.load_in_4bit:
        try:
            from transformers import BitsAndBytesConfig

            bnb = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=dtype,
                bnb_4bit_use_double_quant=True,
            )
            model = AutoModelForCausalLM.from_pretrained(
                model_path, dtype=dtype, quantization_config=bnb, device_map={"": device}
            )
            # No forward pass before get_peft_model: with a 4-bit base it breaks backward later.
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=config.gradient_checkpointing
            )
            # It upcasts every non-4-bit weight (embeddings, norms) to fp32, making all activations fp32: twice
            # the memory, and sdpa's math kernel (a seq x seq matrix per head; OOM at 9.5k tokens on an 80 GB
            # H100, docs/gpu.md). Back to bf16 on GPUs, as in bf16 LoRA; the LoRA weights (added later) stay fp32.
            for p in model.parameters():
                if p.dtype == torch.float32 and str(device).startswith("cuda"):
                    p.data = p.data.to(torch.bfloat16)
        except (ImportError, RuntimeError, ValueError) as err:
            warnings.warn(f"4-bit loading failed ({err}); falling back to {dtype} LoRA", stacklevel=2)
            model = None
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device)
        if config.gradient_checkpointing:
            enable = (
                getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            )
            enable()
            model.enable_input_require_grads()
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora), tokenizer


def encode_all(chats: Sequence[list[dict]], tokenizer: Any, max_length: int) -> tuple[list[dict], int]:
    """Encoded examples and the number dropped for an unusable mask."""
    out, dropped = [], 0
    for chat in chats:
        try:
            out.append(encode_chat(chat, tokenizer, max_length))
        except MaskError:
            dropped += 1
    return out, dropped


def make_plan(lengths: Sequence[int], config: SFTConfig) -> list[list[list[int]]]:
    """All optimizer steps of a run: ``num_epochs`` (a fractional last epoch allowed), capped at ``max_steps``."""
    plan: list[list[list[int]]] = []
    for epoch in range(math.ceil(config.num_epochs)):
        steps = plan_batches(
            lengths,
            config.batch_size,
            config.batching,
            config.micro_batch_size,
            config.pack_length or config.max_length,
            seed=config.seed + epoch,
        )
        if epoch + 1 > config.num_epochs:
            steps = steps[: max(1, round(len(steps) * (config.num_epochs - epoch)))]
        plan += steps
    return plan[: config.max_steps] if config.max_steps is not None else plan


def fit(
    model: Any,
    examples: Sequence[dict],
    plan: list[list[list[int]]],
    config: SFTConfig,
    pad_id: int,
    device: str,
    progress: bool = True,
    on_step: Any = None,
) -> list[dict]:
    """The training loop: AdamW, linear warmup/decay, gradient accumulation over each step's micro-batches.

    The loss of a step is the mean over its trained tokens (not over micro-batches). Returns one row per step
    (step, loss, lr, tokens, seconds); ``on_step(rows)`` is called after each step.
    """
    import torch

    from agentlib.viz import progress_bar

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    n = len(plan)
    warmup = max(1, round(config.warmup_ratio * n))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (n - s) / max(1, n - warmup)))
    )
    rows: list[dict] = []
    tokens, t0 = 0, time.perf_counter()
    model.train()
    for step, micro_batches in enumerate(progress_bar(plan, desc="sft", disable=not progress)):
        n_trained = sum(examples[i]["n_trained"] for mb in micro_batches for i in mb)
        total = 0.0
        for mb in micro_batches:
            batch = collate([examples[i] for i in mb], pad_id, pack=config.batching == "pack")
            loss, _ = loss_sum(model, {k: v.to(device) for k, v in batch.items()})
            (loss / n_trained).backward()
            total += loss.item()
            tokens += sum(len(examples[i]["input_ids"]) for i in mb)
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        lr = sched.get_last_lr()[0]  # the rate this step uses (after `sched.step()` it is the next step's)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        rows.append(
            {
                "step": step + 1,
                "loss": total / n_trained,
                "lr": lr,
                "tokens": tokens,
                "seconds": round(time.perf_counter() - t0, 3),
            }
        )
        if on_step is not None:
            on_step(rows)
    return rows


def train(
    config: SFTConfig,
    data: Iterable[dict | list[dict]],
    model_name_or_path: str | Path,
    out_dir: str | Path,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune a LoRA adapter on trajectory records (or ready chats) and save it in ``out_dir``.

    Writes the peft adapter (``adapter_config.json``, ``adapter_model.safetensors``), ``loss.csv`` (one row
    per optimizer step, rewritten after each) and ``sft_run.json`` (config, hash, counts, speed). Returns at
    once when ``sft_run.json`` holds the same hash (same config, model and data) and the adapter exists.
    """
    out = Path(out_dir)
    chats = [
        trajectory_to_chat(d if isinstance(d, dict) else {"messages": d}, config.system_prompt) for d in data
    ]
    run_hash = config.hash(str(model_name_or_path), hashlib.sha256(json.dumps(chats).encode()).hexdigest())
    meta_path = out / "sft_run.json"
    if meta_path.exists() and (out / "adapter_config.json").exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("hash") == run_hash:
            return TrainResult(
                out,
                read_losses(out),
                meta["n_examples"],
                meta["n_dropped"],
                meta["n_truncated"],
                meta["tokens_per_s"],
                meta["quantized"],
                skipped=True,
            )

    import torch

    device = pick_device(config.device)
    torch.manual_seed(config.seed)
    model, tokenizer = load_for_training(resolve_model_path(model_name_or_path), config, device)
    quantized = bool(getattr(model.get_base_model(), "is_loaded_in_4bit", False))
    examples, dropped = encode_all(chats, tokenizer, config.max_length)
    if not examples:
        raise ValueError(f"no usable example out of {len(chats)} (all masks empty or too long)")
    if n_cut := sum(e["truncated"] for e in examples):
        warnings.warn(
            f"{n_cut} of {len(examples)} examples are longer than max_length={config.max_length}: each is "
            "cut after its last whole assistant turn, so its later turns (the final answer among them) "
            "are not trained; raise max_length if they matter",
            stacklevel=2,
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    plan = make_plan([len(e["input_ids"]) for e in examples], config)
    out.mkdir(parents=True, exist_ok=True)
    rows = fit(
        model,
        examples,
        plan,
        config,
        pad_id,
        device,
        progress,
        on_step=lambda r: _write_csv(out / "loss.csv", r),
    )
    model.save_pretrained(out)
    seconds = rows[-1]["seconds"] if rows else 0.0
    meta = {
        "hash": run_hash,
        "model": str(model_name_or_path),
        "config": dataclasses.asdict(config),
        "device": device,
        "quantized": quantized,
        "n_examples": len(examples),
        "n_dropped": dropped,
        "n_truncated": sum(e["truncated"] for e in examples),
        "steps": len(plan),
        "tokens": rows[-1]["tokens"] if rows else 0,
        "seconds": seconds,
        "tokens_per_s": rows[-1]["tokens"] / seconds if seconds else 0.0,
    }
    meta_path.write_text(json.dumps(meta, indent=2, default=str))
    return TrainResult(
        out,
        [r["loss"] for r in rows],
        len(examples),
        dropped,
        meta["n_truncated"],
        meta["tokens_per_s"],
        quantized,
        skipped=False,
    )


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def read_losses(out_dir: str | Path) -> list[float]:
    """The per-step training losses of a run (from ``loss.csv``), for plotting."""
    path = Path(out_dir) / "loss.csv"
    if not path.exists():
        return []
    with path.open() as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]
