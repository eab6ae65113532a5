"""peft LoRA -> GGUF LoRA: name mapping, shape checks, and a real llama.cpp server agreeing with transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agentlib.gguf_lora import gguf_tensor_name, lora_to_gguf
from agentlib.models import load_model

MODEL = "smollm2-135m"
PROMPT = [{"role": "user", "content": "Name three colours of the rainbow."}]


def test_tensor_names_follow_llamacpp():
    key = "base_model.model.model.layers.11.self_attn.o_proj.lora_A.weight"
    assert gguf_tensor_name(key) == ("blk.11.attn_output.weight", "a")
    assert gguf_tensor_name("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight") == (
        "blk.0.ffn_down.weight",
        "b",
    )
    with pytest.raises(ValueError, match="cannot map"):
        gguf_tensor_name("base_model.model.lm_head.lora_A.weight")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A LoRA adapter with random, non-zero A and B on every linear layer of the real model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from agentlib.registry import hf_dir

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(hf_dir(MODEL), dtype=torch.float32)
    cfg = LoraConfig(
        r=8,
        lora_alpha=32,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():  # a change big enough to alter greedy text, small enough to keep it fluent
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.02 / p.abs().mean())
    out = tmp_path_factory.mktemp("lora")
    peft_model.save_pretrained(out)
    return out


def test_conversion_writes_every_pair_with_alpha(adapter):
    import gguf

    from agentlib.registry import gguf_path

    path = lora_to_gguf(adapter, gguf_path(MODEL))
    r = gguf.GGUFReader(str(path))
    names = {t.name for t in r.tensors}
    n_layers = sum(t.name.endswith("attn_q.weight") for t in gguf.GGUFReader(str(gguf_path(MODEL))).tensors)
    assert n_layers == 30 and json.loads((adapter / "adapter_config.json").read_text())["r"] == 8
    assert len(names) == 2 * 7 * n_layers
    assert "blk.29.ffn_down.weight.lora_b" in names and "blk.0.attn_q.weight.lora_a" in names
    assert float(r.fields["adapter.lora.alpha"].parts[-1][0]) == 32.0
    assert bytes(r.fields["general.type"].parts[-1]).decode() == "adapter"
    a = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight.lora_a")
    assert a.data.shape == (8, 576) and np.abs(a.data).sum() > 0  # (r, in) as in convert_lora_to_gguf.py
    assert lora_to_gguf(adapter, gguf_path(MODEL)) == path  # up to date: not rebuilt


def test_mismatched_base_fails_before_serving(adapter, tmp_path):
    from agentlib.registry import gguf_path

    try:
        other = gguf_path("qwen2.5-coder-0.5b", fetch=False)
    except FileNotFoundError:
        pytest.skip("the qwen2.5-coder-0.5b GGUF is not fetched (cpu profile models)")
    with pytest.raises(ValueError, match="does not fit"):
        lora_to_gguf(adapter, other, tmp_path / "x.gguf")


def test_llamacpp_with_gguf_lora_matches_transformers_with_peft(adapter):
    kw = dict(temperature=0.0, max_tokens=12)
    with load_model(MODEL, backend="llamacpp", n_parallel=1) as base_server:
        base = base_server.chat(PROMPT, **kw)[0]
    with load_model(MODEL, backend="llamacpp", adapter=adapter, n_parallel=1) as tuned_server:
        served = tuned_server.chat(PROMPT, **kw)[0]
    hf = load_model(MODEL, backend="hf", adapter=adapter).chat(PROMPT, **kw)[0]
    assert served != base  # the adapter is applied
    assert served.split()[:4] == hf.split()[:4]  # and applied the way peft applies it


def test_open_student_merges_the_adapter_into_the_weights_on_hf(adapter):
    """The in-process student path merges the LoRA into the bf16 weights: same greedy text as peft's run-time
    LoRA, and no LoRA layers left to compute."""
    from agentlib import pipeline
    from agentlib.profiles import get_profile

    kw = dict(temperature=0.0, max_tokens=12)
    p = get_profile("smoke", student_backend="auto")
    with pipeline.open_student(p, MODEL, adapter, backend="hf") as merged:
        assert merged.max_batch == pipeline.STUDENT_BATCH
        assert not any("lora" in name for name, _ in merged.model.named_modules())
        text = merged.chat(PROMPT, **kw)[0]
    assert text == load_model(MODEL, backend="hf", adapter=adapter).chat(PROMPT, **kw)[0]
    assert pipeline.student_backend(p) == ("hf" if pipeline.native_bf16() else "llamacpp")
    assert pipeline.student_config(p).batch_size == (
        pipeline.STUDENT_BATCH if pipeline.native_bf16() else pipeline.SLOTS
    )
