"""A peft LoRA adapter as a GGUF LoRA file, so llama.cpp serves a fine-tuned student over its base GGUF.

The student is trained in transformers on the base GGUF's dequantized weights; llama.cpp then applies the
same low-rank update at run time (``W x + alpha/r · B A x``) on top of the unchanged quantized base. The file
layout follows llama.cpp's ``convert_lora_to_gguf.py``: ``general.type = adapter``, ``adapter.type = lora``,
``adapter.lora.alpha``, and for each adapted base tensor ``<name>.lora_a`` (r × in) and ``<name>.lora_b``
(out × r).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

__all__ = [
    "gguf_tensor_name",
    "lora_to_gguf",
]

# peft module path (Qwen2/Llama layout) -> llama.cpp tensor name
_MODULES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_KEY = re.compile(r"layers\.(\d+)\.(\w+\.\w+)\.lora_([AB])\.weight$")


def gguf_tensor_name(peft_key: str) -> tuple[str, str]:
    """``(base tensor name, "a"|"b")`` for a peft LoRA weight key; ``ValueError`` for unsupported modules."""
    m = _KEY.search(peft_key)
    if not m or m.group(2) not in _MODULES:
        raise ValueError(
            f"cannot map LoRA weight {peft_key!r} to a llama.cpp tensor "
            f"(supported: {sorted(_MODULES)} in model.layers.N)"
        )
    return f"blk.{m.group(1)}.{_MODULES[m.group(2)]}.weight", m.group(3).lower()


def lora_to_gguf(adapter_dir: str | Path, base_gguf: str | Path, out: str | Path | None = None) -> Path:
    """Write ``adapter_dir``'s peft LoRA as a GGUF LoRA for ``base_gguf``; returns its path.

    The output (default ``adapter_dir/adapter.gguf``) is rebuilt only when older than the adapter.
    Checks every tensor's shape against the base model, so a mismatched base fails here, not in the server.
    """
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    adapter_dir = Path(adapter_dir)
    out = Path(out) if out else adapter_dir / "adapter.gguf"
    weights = adapter_dir / "adapter_model.safetensors"
    if out.exists() and out.stat().st_mtime >= weights.stat().st_mtime:
        return out
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if cfg.get("use_dora") or cfg.get("use_rslora"):
        raise ValueError("DoRA / rsLoRA adapters are not supported by this converter")
    base = gguf.GGUFReader(str(base_gguf))
    arch = bytes(base.fields["general.architecture"].parts[-1]).decode()
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in base.tensors}  # GGUF order: (in, out)
    tensors = {}
    for key, value in load_file(str(weights)).items():
        name, ab = gguf_tensor_name(key)
        if name not in shapes:
            raise ValueError(f"{key}: the base model {base_gguf} has no tensor {name}")
        n_in, n_out = shapes[name][:2]
        rank, width = value.shape if ab == "a" else value.shape[::-1]  # a: (r, in); b: (out, r)
        if width != (n_in if ab == "a" else n_out):
            raise ValueError(f"{key}: shape {value.shape} does not fit {name} (in {n_in}, out {n_out})")
        if rank != cfg["r"] and not cfg.get("rank_pattern"):
            raise ValueError(f"{key}: rank {rank} != r={cfg['r']}")
        tensors[f"{name}.lora_{ab}"] = np.ascontiguousarray(value.astype(np.float32))
    tmp = out.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(cfg["lora_alpha"]))
    for name in sorted(tensors):
        w.add_tensor(name, tensors[name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(out)
    return out
