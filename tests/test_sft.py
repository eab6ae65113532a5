"""agentlib.sft: the loss mask on real chat templates, batching, packing, QLoRA/LoRA training."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace

import pytest

from agentlib import registry
from agentlib.sft import (
    IGNORE,
    MaskError,
    SFTConfig,
    assistant_labels,
    collate,
    encode_chat,
    load_for_training,
    loss_sum,
    plan_batches,
    read_losses,
    train,
    trajectory_to_chat,
)

CODE1 = 'Thought: I need the birth years.\n```python\nr = search("Ed Wood birth")\nprint(r[:300])\n```'
CODE2 = 'Thought: Scott Derrickson (東京 🙂 café) was born in 1966 & <b>Ed Wood</b> in 1924.\n```python\nfinal_answer("yes")\n```'
OBS = "Observation: Ed Wood (born October 10, 1924) was an American filmmaker. <script>x()</script>"


def record(obs: str = OBS) -> dict:
    return {
        "id": "q1",
        "question": "Were Scott Derrickson and Ed Wood of the same nationality?",
        "messages": [
            {"role": "system", "content": "A long teacher system prompt with few-shot examples ..."},
            {"role": "user", "content": "Were Scott Derrickson and Ed Wood of the same nationality?"},
            {"role": "assistant", "content": CODE1},
            {"role": "user", "content": obs},
            {"role": "assistant", "content": CODE2},
        ],
    }


@pytest.fixture(scope="module", params=["smollm2-135m", "qwen2.5-coder-0.5b"])
def tokenizer(request):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(registry.hf_dir(request.param))


def trained_runs(enc: dict, tokenizer) -> list[str]:
    """Decoded maximal runs of consecutive trained tokens."""
    runs, cur = [], []
    for tok, lab in zip(enc["input_ids"], enc["labels"], strict=True):
        if lab != IGNORE:
            assert lab == tok
            cur.append(tok)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tokenizer.decode(r) for r in runs]


def test_trajectory_to_chat_replaces_system_and_drops_trailing_observation():
    rec = record()
    rec["messages"].append({"role": "user", "content": "Observation: leftover"})
    rec["messages"][2]["content"] = "  \n" + CODE1 + "\n"
    chat = trajectory_to_chat(rec, "short")
    assert chat[2]["content"] == CODE1
    assert chat[0] == {"role": "system", "content": "short"}
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "user", "assistant"]
    assert trajectory_to_chat(rec, None)[0]["content"].startswith("A long teacher")
    with pytest.raises(ValueError):
        trajectory_to_chat({"id": "x", "messages": [{"role": "user", "content": "q"}]}, "s")


def test_trained_tokens_are_exactly_the_assistant_turns(tokenizer):
    chat = trajectory_to_chat(record(), "Short student prompt.")
    enc = encode_chat(chat, tokenizer)
    eot = tokenizer.eos_token
    assert trained_runs(enc, tokenizer) == [CODE1 + eot, CODE2 + eot]
    assert enc["n_trained"] == sum(lab != IGNORE for lab in enc["labels"]) > 0
    assert not enc["truncated"]
    assert tokenizer.decode(enc["input_ids"]) == tokenizer.apply_chat_template(chat, tokenize=False)


def test_no_observation_or_prompt_token_is_trained(tokenizer):
    # The observation repeats the second assistant turn verbatim: only the assistant copy may be trained.
    chat = trajectory_to_chat(record(obs="Observation: " + CODE2), "Short student prompt.")
    enc = encode_chat(chat, tokenizer)
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert len(offsets) == len(enc["labels"])
    for m in chat:
        if m["role"] == "assistant":
            continue
        s = text.index(m["content"])
        e = s + len(m["content"])
        inside = [j for j, (a, b) in enumerate(offsets) if a < e and b > s]
        assert inside, m
        assert all(enc["labels"][j] == IGNORE for j in inside), f"{m['role']} tokens trained"
    assert trained_runs(enc, tokenizer) == [CODE1 + tokenizer.eos_token, CODE2 + tokenizer.eos_token]


def test_truncation_drops_the_partial_turn_and_marks_it(tokenizer):
    chat = trajectory_to_chat(record(), "Short student prompt.")
    full = encode_chat(chat, tokenizer)
    first_end = max(
        j
        for j, lab in enumerate(full["labels"][: len(full["labels"]) - 5])
        if lab != IGNORE and tokenizer.decode([lab]) == tokenizer.eos_token
    )
    max_length = len(full["input_ids"]) - 4  # cuts the second assistant turn in half
    enc = encode_chat(chat, tokenizer, max_length=max_length)
    assert enc["truncated"]
    assert len(enc["input_ids"]) == first_end + 1 <= max_length
    assert enc["input_ids"] == full["input_ids"][: first_end + 1]
    assert trained_runs(enc, tokenizer) == [CODE1 + tokenizer.eos_token]
    with pytest.raises(MaskError):  # not even the first assistant turn fits
        encode_chat(chat, tokenizer, max_length=first_end - 3)


def test_assistant_labels_from_spans():
    # chars: "S:hi|A:yo<e>|" -> tokens with offsets; spans (content_start, content_end, turn_end) per message
    ids = [10, 11, 12, 13, 14, 15, 16]
    offsets = [(0, 2), (2, 4), (4, 6), (6, 8), (8, 9), (9, 12), (12, 13)]
    spans = [(2, 4, 4), (6, 9, 13)]
    assert assistant_labels(ids, offsets, spans, ["user", "assistant"]) == [
        IGNORE,
        IGNORE,
        IGNORE,
        13,
        14,
        15,
        IGNORE,
    ]
    assert assistant_labels(ids, offsets, spans, ["user", "user"]) == [IGNORE] * 7
    # a zero-width token inside the content is not trained; no end-of-turn token when turn_end == content_end
    offsets[3] = (6, 6)
    assert (
        assistant_labels(ids, offsets, [(2, 4, 4), (6, 9, 9)], ["user", "assistant"])
        == [IGNORE] * 4 + [14] + [IGNORE] * 2
    )


def test_chat_without_assistant_turn_is_rejected(tokenizer):
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    with pytest.raises(MaskError):
        encode_chat(chat, tokenizer)


@pytest.mark.parametrize("mode", ["pad", "group", "pack"])
def test_plan_batches_covers_every_example_once(mode):
    lengths = [(i * 37) % 500 + 20 for i in range(53)]
    plan = plan_batches(lengths, batch_size=8, mode=mode, micro_batch_size=3, pack_length=600, seed=1)
    seen = sorted(i for step in plan for mb in step for i in mb)
    assert seen == list(range(53))
    assert all(sum(len(mb) for mb in step) <= 8 for step in plan)
    if mode == "pack":
        assert all(sum(lengths[i] for i in mb) <= 600 for step in plan for mb in step)
    else:
        assert all(len(mb) <= 3 for step in plan for mb in step)


def test_grouping_and_packing_waste_less_than_padding():
    lengths = [(i * 7919) % 1900 + 100 for i in range(400)]

    def padded_tokens(mode):
        plan = plan_batches(lengths, 8, mode, micro_batch_size=4, pack_length=2048)
        if mode == "pack":
            return sum(sum(lengths[i] for i in mb) for s in plan for mb in s)
        return sum(len(mb) * max(lengths[i] for i in mb) for s in plan for mb in s)

    assert padded_tokens("pack") == sum(lengths)
    assert padded_tokens("group") < 0.75 * padded_tokens("pad")


def tiny_model_dir(tmp_path_factory, tokenizer_name="smollm2-135m"):
    """A random 2-layer Llama with every linear size a multiple of 64 (bitsandbytes CPU kernels need it)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny")
    tok = AutoTokenizer.from_pretrained(registry.hf_dir(tokenizer_name))
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        initializer_range=0.3,
    )  # large weights: outputs depend visibly on context
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


def test_packed_loss_equals_separate_losses(tiny):
    """Packing must not let an example attend to its neighbour: same loss as running them one by one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    chats = [trajectory_to_chat(record(), "s"), trajectory_to_chat(record(obs="Observation: none"), "other")]
    exs = [encode_chat(c, tok) for c in chats]
    with torch.no_grad():
        sep = [loss_sum(model, collate([e], tok.pad_token_id)) for e in exs]
        packed, n = loss_sum(model, collate(exs, tok.pad_token_id, pack=True))
        padded, n2 = loss_sum(model, collate(exs, tok.pad_token_id))
    assert n == n2 == sum(k for _, k in sep) == sum(e["n_trained"] for e in exs)
    total = sum(float(loss) for loss, _ in sep)
    assert float(packed) == pytest.approx(total, rel=1e-4)
    assert float(padded) == pytest.approx(total, rel=1e-4)


def test_qlora_steps_on_cpu(tiny, tmp_path):
    import bitsandbytes as bnb

    cfg = SFTConfig(
        lora_r=8,
        lora_alpha=16,
        load_in_4bit=True,
        batch_size=2,
        max_length=512,
        max_steps=2,
        learning_rate=1e-3,
        device="cpu",
    )
    model, _ = load_for_training(tiny, cfg, "cpu")
    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert n4 == 2 * 7  # q k v o gate up down in each of the 2 layers
    assert model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.quant_type == "nf4"
    del model

    records = [record(), record(obs="Observation: nothing found"), record(obs="Observation: 1924"), record()]
    res = train(cfg, records, tiny, tmp_path / "adapter", progress=False)
    assert not res.skipped and res.quantized and res.n_examples == 4 and res.n_dropped == 0
    assert len(res.losses) == 2 and all(math.isfinite(x) and x > 0 for x in res.losses)
    assert read_losses(tmp_path / "adapter") == pytest.approx(res.losses)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    meta = json.loads((tmp_path / "adapter" / "sft_run.json").read_text())
    assert meta["config"]["load_in_4bit"] is True
    again = train(cfg, records, tiny, tmp_path / "adapter", progress=False)
    assert again.skipped and again.losses == pytest.approx(res.losses)
    changed = train(
        SFTConfig(**{**cfg.__dict__, "max_steps": 1}), records, tiny, tmp_path / "adapter", progress=False
    )
    assert not changed.skipped and len(changed.losses) == 1
    # the logged rate is the one the step used: a one-step run trains at the full rate (warmup of 1 step)
    with (tmp_path / "adapter" / "loss.csv").open() as f:
        assert [float(r["lr"]) for r in csv.DictReader(f)] == [pytest.approx(1e-3)]


def test_train_warns_when_examples_lose_their_final_turn(tiny, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    full = len(encode_chat(trajectory_to_chat(record(), None), tok)["input_ids"])
    cfg = SFTConfig(
        lora_r=8,
        lora_alpha=16,
        load_in_4bit=False,
        batch_size=2,
        max_length=full - 4,
        max_steps=1,
        device="cpu",
    )
    with pytest.warns(UserWarning, match=r"2 of 2 examples are longer than max_length"):
        res = train(cfg, [record(), record()], tiny, tmp_path / "cut", progress=False)
    assert res.n_truncated == 2


def test_config_from_profile():
    from agentlib.pipeline import sft_config
    from agentlib.profiles import PROFILES

    p = PROFILES["cpu"]
    cfg = replace(sft_config(p, "cot"), batching="group")
    assert cfg.batch_size == p.sft.batch_size
    assert (cfg.lora_r, cfg.lora_alpha, cfg.max_length) == (
        p.sft.lora_r,
        p.sft.lora_alpha,
        p.sft_max_length_cot,
    )
    assert cfg.batching == "group"
    assert sft_config(p, "agent").max_length == p.sft.max_length
    assert cfg.hash("m", "d") != sft_config(p, "agent").hash("m", "d")
    assert not cfg.gradient_checkpointing and sft_config(PROFILES["paper"], "agent").gradient_checkpointing


# Each profile's SFT settings as notebook 02 trains them, and their config hashes (a hash decides whether a
# trained adapter is reused): pinned so that reorganising the profiles changes neither.
FIELDS = (
    "lora_r",
    "lora_alpha",
    "num_epochs",
    "batch_size",
    "micro_batch_size",
    "max_steps",
    "load_in_4bit",
    "gradient_checkpointing",
)
# name: (FIELDS' values, (agent, cot) max_length, (agent, cot) config hash)
PINNED_SFT = {
    "smoke": ((8, 16, 1, 2, 1, 3, False, False), (768, 512), ("ae15db9222e74b17", "72f086e4f4ee1f2b")),
    "cpu": ((16, 32, 2, 2, 1, None, False, False), (3072, 1024), ("f1018871af7ca211", "63e0c244428e1d6c")),
    "paper": (
        (64, 128, 2.0, 8, 1, None, True, True),
        (10240, 4096),
        ("01b0c35d7fe40315", "adfacdf6e369833c"),
    ),
}


@pytest.mark.parametrize("name", sorted(PINNED_SFT))
def test_profile_sft_settings_are_pinned(name):
    import dataclasses

    from agentlib import pipeline
    from agentlib.profiles import PROFILES

    values, lengths, hashes = PINNED_SFT[name]
    want = dict(zip(FIELDS, values, strict=True))
    for kind, length, digest in zip(("agent", "cot"), lengths, hashes, strict=True):
        cfg = pipeline.sft_config(PROFILES[name], kind)
        assert {k: getattr(cfg, k) for k in want} == want
        assert type(cfg.num_epochs) is type(want["num_epochs"])  # 2 and 2.0 hash differently
        assert cfg.max_length == length
        assert (cfg.learning_rate, cfg.lora_dropout, cfg.seed, cfg.batching) == (2e-4, 0.05, 0, "group")
        assert (cfg.system_prompt is None) == (kind == "cot")
        assert dataclasses.replace(cfg, system_prompt=None).hash("m", "d") == digest


@pytest.mark.slow
def test_smollm2_lora_loss_falls(tmp_path):
    """A real SmolLM2-135M bf16 LoRA run of a few steps on a handful of trajectories: loss goes down."""
    records = [
        record(),
        record(obs="Observation: Ed Wood was born in Poughkeepsie, New York."),
        record(obs="Observation: Scott Derrickson is an American director."),
    ]
    lora = {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0}
    schedule = {"num_epochs": 8, "learning_rate": 2e-3, "warmup_ratio": 0.0}  # 8 steps of 3 packed examples
    cfg = SFTConfig(**lora, **schedule, batch_size=3, max_length=1024, batching="pack", device="cpu")
    res = train(cfg, records, "smollm2-135m", tmp_path / "smol", progress=False)
    assert len(res.losses) == 8
    assert res.losses[-1] < 0.5 * res.losses[0], res.losses
    assert (tmp_path / "smol" / "adapter_config.json").exists()
