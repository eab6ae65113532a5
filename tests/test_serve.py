"""Server launchers: command construction (vLLM, llama.cpp), readiness by /health, stop by process group."""

from __future__ import annotations

import os
import socket
import sys
import time
import urllib.request

import pytest

from agentlib.models import load_model
from agentlib.serve import ServerProcess, free_port, llamacpp_command, start_llamacpp, vllm_command


def _gone(pid: int) -> bool:
    """No such process, or only a zombie left for its (re)parent to reap."""
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def _refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_free_port_is_bindable():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
    assert 1024 <= port <= 65535


def test_vllm_command_with_lora_and_tp():
    cmd = vllm_command(
        "Qwen/Qwen2.5-32B-Instruct",
        8001,
        tensor_parallel_size=4,
        gpu_memory_utilization=0.85,
        seed=7,
        lora_modules={"student": "/runs/a1", "ftp": "/runs/a2"},
        max_model_len=8192,
    )
    assert cmd[:3] == ["vllm", "serve", "Qwen/Qwen2.5-32B-Instruct"]

    def opt(flag):
        return cmd[cmd.index(flag) + 1]

    assert opt("--port") == "8001" and opt("--host") == "127.0.0.1"
    assert opt("--tensor-parallel-size") == "4"
    assert opt("--gpu-memory-utilization") == "0.85"
    assert opt("--seed") == "7" and opt("--max-model-len") == "8192"
    assert "--enable-lora" in cmd and opt("--max-lora-rank") == "64" and opt("--max-loras") == "2"
    i = cmd.index("--lora-modules")
    assert cmd[i + 1 : i + 3] == ["student=/runs/a1", "ftp=/runs/a2"]


def test_vllm_command_without_lora_has_no_lora_flags():
    cmd = vllm_command("Qwen/Qwen2.5-0.5B-Instruct", 9000)
    assert not any("lora" in c for c in cmd)
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "1"


def test_llamacpp_command():
    cmd = llamacpp_command("/m/x.gguf", 8123, n_parallel=3, threads=2, seed=1)
    assert cmd[:3] == [sys.executable, "-m", "agentlib.serve"]
    assert cmd[cmd.index("--model") + 1] == "/m/x.gguf" and cmd[cmd.index("--port") + 1] == "8123"
    assert cmd[cmd.index("--n-parallel") + 1] == "3" and cmd[cmd.index("--threads") + 1] == "2"


CHILD = r"""
import http.server, subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])  # a grandchild in the same group
time.sleep(float(sys.argv[2]))  # not ready at once
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_server_process_ready_by_health_and_stop_by_group(tmp_path):
    port = free_port()
    srv = ServerProcess(
        [sys.executable, "-c", CHILD, str(port), "0.5"], port, name="dummy", log_path=tmp_path / "dummy.log"
    )
    assert not srv.healthy()
    srv.wait_ready(timeout_s=20)
    assert srv.healthy() and os.getpgid(srv.pid) == srv.pid != os.getpgid(0)
    kids = [
        int(p) for p in os.listdir("/proc") if p.isdigit() and _pgid(int(p)) == srv.pid and int(p) != srv.pid
    ]
    assert kids, "the dummy should have a grandchild"
    srv.stop()
    time.sleep(0.2)
    assert _gone(srv.pid) and all(_gone(k) for k in kids) and _refused(port)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_server_process_that_dies_reports_its_log(tmp_path):
    srv = ServerProcess(
        [sys.executable, "-c", "print('bad flag'); raise SystemExit(3)"],
        free_port(),
        name="dies",
        log_path=tmp_path / "dies.log",
    )
    with pytest.raises(RuntimeError, match="bad flag"):
        srv.wait_ready(timeout_s=20)
    srv.stop()


@pytest.mark.slow
def test_real_llamacpp_start_health_stop():
    srv = start_llamacpp("smollm2-135m", n_parallel=1, n_ctx=1024, threads=1)
    with urllib.request.urlopen(srv.base_url + "/models", timeout=10) as r:
        assert r.status == 200 and b"SmolLM2" in r.read()
    assert srv.healthy()
    srv.stop()
    time.sleep(0.2)
    assert _gone(srv.pid) and _refused(srv.port) and not srv.healthy()


@pytest.mark.slow
def test_load_model_llamacpp_backend_owns_its_server():
    m = load_model("smollm2-135m", backend="llamacpp", n_parallel=2, n_ctx=2048, threads=1)
    url = m.urls[0]
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    out = m.chat([{"role": "user", "content": "Say hello."}], n=2, temperature=0.7, max_tokens=8)
    assert len(out) == 2 and all(isinstance(x, str) for x in out)
    m.close()
    time.sleep(0.2)
    assert _refused(port)
