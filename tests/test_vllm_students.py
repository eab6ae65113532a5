"""LoRA students on vLLM: the adapter is served as a module named after its folder and every request names it,
on servers already up (AGENTLIB_ENDPOINTS) and on servers ``serve.vllm_model`` starts itself (a fake ``vllm``
executable that serves an OpenAI-compatible API and records its argv)."""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
from pathlib import Path

import pytest
from fakes import JsonHandler

from agentlib.models import OpenAIModel, load_model
from agentlib.serve import lora_name, open_vllm, vllm_model

BASE = "Qwen/Qwen2.5-0.5B-Instruct"
HI = [{"role": "user", "content": "Hi"}]


def _adapter(tmp_path: Path, name: str = "agent") -> Path:
    d = tmp_path / "students" / "qwen2.5-0.5b" / name
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(
        json.dumps({"r": 64, "lora_alpha": 128, "base_model_name_or_path": BASE})
    )
    return d


class _Vllm(JsonHandler):
    """An OpenAI-compatible server like ``vllm serve --lora-modules``: lists and answers its models only."""

    served: list = []
    requests: list = []
    loads: list = []
    allow_runtime_lora = False

    def do_GET(self):
        if self.path == "/health":
            return self._send(200, {})
        self._send(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in self.served]})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/v1/load_lora_adapter":
            type(self).loads.append(req)
            if not self.allow_runtime_lora:
                return self._send(404, {"detail": "Not Found"})
            self.served.append(req["lora_name"])
            return self._send(200, {})
        type(self).requests.append(req)
        if req["model"] not in self.served:
            return self._send(404, {"error": f"The model `{req['model']}` does not exist."})
        choice = {"index": 0, "message": {"role": "assistant", "content": f"from {req['model']}"}}
        self._send(200, {"choices": [choice], "usage": {"prompt_tokens": 5, "completion_tokens": 2}})


@pytest.fixture
def vllm_servers(fake_servers):
    def make(served: list[str], **attrs):
        return fake_servers.start(_Vllm, served=list(served), requests=[], loads=[], **attrs)

    return make


def test_lora_name_is_the_adapter_folder_name(tmp_path):
    assert lora_name(tmp_path / "runs" / "agent_ftp") == "agent_ftp"
    assert lora_name(str(tmp_path / "runs" / "cot") + "/") == "cot"


def test_requests_name_the_lora_module_on_running_servers(vllm_servers, tmp_path, monkeypatch):
    adapter = _adapter(tmp_path, "agent_ftp")
    a, url_a = vllm_servers([BASE, "agent_ftp", "cot"])
    b, url_b = vllm_servers([BASE, "agent_ftp"])
    monkeypatch.setenv("AGENTLIB_ENDPOINTS", f"{url_a},{url_b}")
    with vllm_model(BASE, adapter, max_concurrency=4) as m:
        assert isinstance(m, OpenAIModel) and m.model == "agent_ftp"
        outs = m.chat_batch([HI] * 6, max_tokens=4)
    assert outs == [["from agent_ftp"]] * 6
    reqs = a.requests + b.requests
    assert len(reqs) == 6 and {r["model"] for r in reqs} == {"agent_ftp"} and a.requests and b.requests
    # no adapter: the base model
    with vllm_model(BASE) as m:
        assert m.chat(HI, max_tokens=4) == [f"from {BASE}"]
    assert [r["model"] for r in a.requests + b.requests if r not in reqs] == [BASE]
    # load_model's "vllm" backend and "openai" with an adapter name the module too (pipeline.open_model)
    for backend in ("vllm", "openai"):
        m = load_model(BASE, backend=backend, adapter=adapter)
        assert m.model == "agent_ftp" and m.chat(HI, max_tokens=4) == ["from agent_ftp"]
        m.close()


def test_a_server_without_the_module_loads_it_at_run_time_or_says_how_to_serve_it(
    vllm_servers, tmp_path, monkeypatch
):
    adapter = _adapter(tmp_path, "agent")
    runtime, url = vllm_servers([BASE], allow_runtime_lora=True)
    monkeypatch.setenv("AGENTLIB_ENDPOINTS", url)
    with vllm_model(BASE, adapter) as m:
        assert m.chat(HI, max_tokens=4) == ["from agent"]
    assert runtime.loads == [{"lora_name": "agent", "lora_path": str(adapter.resolve())}]
    _, fixed_url = vllm_servers([BASE])
    with pytest.raises(RuntimeError, match=r"--lora-modules agent=.*students/qwen2.5-0.5b/agent"):
        with vllm_model(BASE, adapter, endpoints=[fixed_url]):
            pass
    with pytest.raises(FileNotFoundError):
        with vllm_model(BASE, tmp_path / "no-such-adapter", endpoints=[url]):
            pass


FAKE_VLLM = r'''#!{python}
"""A fake `vllm serve MODEL --host H --port P ...`: records its argv, serves /health and an OpenAI API."""
import json, os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

argv = sys.argv[1:]
log = os.environ["FAKE_VLLM_LOG"]
with open(log, "a") as f:
    f.write(json.dumps({{"argv": argv, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}}) + "\n")
assert argv[0] == "serve"
opt = lambda flag: argv[argv.index(flag) + 1]
served = [argv[1]]
if "--lora-modules" in argv:
    i = argv.index("--lora-modules") + 1
    while i < len(argv) and not argv[i].startswith("--"):
        served.append(argv[i].split("=", 1)[0]); i += 1

class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def send(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        if self.path == "/health": return self.send(200, {{}})
        self.send(200, {{"data": [{{"id": m}} for m in served]}})
    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with open(log, "a") as f:
            f.write(json.dumps({{"request": req}}) + "\n")
        if req["model"] not in served: return self.send(404, {{"error": "no such model"}})
        self.send(200, {{"choices": [{{"index": 0, "message": {{"content": "from " + req["model"]}}}}],
                        "usage": {{"prompt_tokens": 5, "completion_tokens": 2}}}})

ThreadingHTTPServer((opt("--host"), int(opt("--port"))), H).serve_forever()
'''


def _refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    exe = tmp_path / "bin" / "vllm"
    exe.parent.mkdir()
    exe.write_text(FAKE_VLLM.format(python=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "fake_vllm.jsonl"
    monkeypatch.setenv("AGENTLIB_VLLM", str(exe))
    monkeypatch.setenv("FAKE_VLLM_LOG", str(log))
    monkeypatch.setenv("AGENTLIB_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("AGENTLIB_ENDPOINTS", raising=False)

    def entries(kind: str) -> list:
        return [e[kind] for e in map(json.loads, log.read_text().splitlines()) if kind in e]

    return entries


def test_without_endpoints_it_starts_vllm_with_the_lora_module_and_stops_it(fake_vllm, tmp_path):
    adapter = _adapter(tmp_path, "agent")
    with vllm_model(BASE, adapter, server_kw={"max_model_len": 8192}, ready_timeout_s=60) as m:
        port = int(m.urls[0].rsplit(":", 1)[1].split("/")[0])
        assert m.chat(HI, max_tokens=4) == ["from agent"]
    (argv,) = fake_vllm("argv")
    assert argv[:2] == ["serve", BASE]
    i = argv.index("--lora-modules")
    assert argv[i + 1] == f"agent={adapter.resolve()}"
    assert "--enable-lora" in argv and argv[argv.index("--max-lora-rank") + 1] == "64"
    assert argv[argv.index("--max-model-len") + 1] == "8192"
    assert [r["model"] for r in fake_vllm("request")] == ["agent"]
    assert _refused(port)  # stopped with the block


def test_without_endpoints_one_server_per_device_and_load_model_owns_them(fake_vllm, tmp_path):
    adapter = _adapter(tmp_path, "cot")
    m = load_model(BASE, backend="vllm", adapter=adapter, devices=["0", "1"], ready_timeout_s=60)
    ports = [int(u.rsplit(":", 1)[1].split("/")[0]) for u in m.urls]
    assert len(set(ports)) == 2
    assert m.chat_batch([HI] * 4, max_tokens=4) == [["from cot"]] * 4
    m.close()
    assert all(_refused(p) for p in ports)
    assert sorted(
        e["cuda"]
        for e in map(json.loads, (tmp_path / "fake_vllm.jsonl").read_text().splitlines())
        if "argv" in e
    ) == ["0", "1"]
    # the base model alone: no LoRA flags
    with open_vllm(BASE, ready_timeout_s=60) as m:
        assert m.chat(HI, max_tokens=4) == [f"from {BASE}"]
    assert not any("lora" in a for a in fake_vllm("argv")[-1])


def test_a_server_that_fails_to_start_is_stopped_and_reported(tmp_path, monkeypatch):
    exe = tmp_path / "vllm"
    exe.write_text(f"#!{sys.executable}\nimport sys\nprint('CUDA out of memory')\nsys.exit(1)\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("AGENTLIB_VLLM", str(exe))
    monkeypatch.setenv("AGENTLIB_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("AGENTLIB_ENDPOINTS", raising=False)
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        with vllm_model(BASE, _adapter(tmp_path), ready_timeout_s=30):
            pass
    assert os.environ.get("AGENTLIB_ENDPOINTS") is None


def test_gpu_check_vllm_stage_runs_the_served_lora_path(fake_vllm, tmp_path, monkeypatch):
    """bench/gpu_check.py's vLLM stage against the fake ``vllm``: it serves the adapter as a module, names it in
    every request and compares with the base model (on a GPU machine with vLLM the same code runs for real)."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("gpu_check", root / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    monkeypatch.setenv("AGENTLIB_ENDPOINTS", "http://127.0.0.1:9")  # ignored: the check starts its own server
    try:
        tok = gpu_check.find_tokenizer(None)
    except FileNotFoundError:
        pytest.skip("no Qwen tokenizer here")
    model_dir = tmp_path / "qwen2.5-tiny-random"
    gpu_check.copy_tokenizer(tok, model_dir)
    adapter = model_dir.parent / "adapter-check"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert gpu_check.vllm_executable() is not None
    r = gpu_check.vllm_lora_check(model_dir, adapter, n_prompts=4, max_tokens=8, ready_timeout_s=60)
    assert r["passed"] and r["module"] == "adapter-check" and r["requests_name"] == "adapter-check"
    assert r["served_models"] == [str(model_dir), "adapter-check"] and r["outputs_differ_from_base"] == 4
    (argv,) = fake_vllm("argv")
    assert argv[argv.index("--lora-modules") + 1] == f"adapter-check={adapter.resolve()}"
    assert argv[argv.index("--max-lora-rank") + 1] == "64" and "--enforce-eager" in argv
    models = [r["model"] for r in fake_vllm("request")]
    # greedy 4; SAG 4 prompts x 8 samples (the fake returns one choice a request)
    assert models.count("adapter-check") == 4 + 32 and models.count(str(model_dir)) == 4
