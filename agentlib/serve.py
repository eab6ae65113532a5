"""Start and stop OpenAI-compatible servers: llama.cpp on CPU (xllamacpp) and vLLM on GPU.

``vllm_model(base_model, adapter)`` is a student on vLLM: its LoRA adapter served as a module named after the
adapter's folder, every request naming it; on ``AGENTLIB_ENDPOINTS`` if set, else on servers it starts and stops.

Each server is a child process in its own process group, on a free loopback port, declared ready when its
``/health`` endpoint answers 200 (never by reading its log), and stopped by its own process group id:

    with start_llamacpp("smollm2-135m", n_parallel=4) as srv:
        OpenAIModel(endpoints=[srv.base_url]).chat([{"role": "user", "content": "Hi"}])

``python -m agentlib.serve llamacpp --model FILE.gguf --port P`` is the child process for llama.cpp: the
``xllamacpp`` wheel embeds llama.cpp's own C++ HTTP server (OpenAI-compatible, continuous batching).
"""

from __future__ import annotations

import argparse
import atexit
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentlib.paths import runs_dir

if TYPE_CHECKING:
    from agentlib.models import OpenAIModel

__all__ = [
    "free_port",
    "ServerProcess",
    "llamacpp_command",
    "start_llamacpp",
    "run_llamacpp",
    "vllm_command",
    "start_vllm",
    "lora_name",
    "open_vllm",
    "vllm_model",
]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server child process in its own process group; ``stop()`` ends that group only."""

    def __init__(
        self,
        cmd: Sequence[str],
        port: int,
        host: str = "127.0.0.1",
        name: str = "server",
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
    ):
        self.cmd, self.port, self.host, self.name = list(cmd), port, host, name
        self.log_path = log_path or runs_dir("servers") / f"{name}-{port}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.pid = self.proc.pid  # == its process group id (start_new_session)
        self._stopped = False
        atexit.register(self.stop)  # a normal interpreter exit does not leave servers behind

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def healthy(self, timeout_s: float = 2.0) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.port}/health", timeout=timeout_s) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float = 300.0, poll_s: float = 0.25) -> ServerProcess:
        """Poll ``/health`` until it answers 200; raise (and stop) if the process exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} before ready; log: "
                    f"{self.log_path}\n{self.log_tail()}"
                )
            if self.healthy():
                return self
            time.sleep(poll_s)
        self.stop()
        raise TimeoutError(
            f"{self.name} not ready after {timeout_s:.0f}s; log: {self.log_path}\n{self.log_tail()}"
        )

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the server's own process group, SIGKILL it after ``timeout_s``; reap the child. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        try:  # leftovers of the group (its id cannot be reused while any member lives): ours, nobody else's
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()
        atexit.unregister(self.stop)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------- llama.cpp


DEFAULT_SLOTS = 4  # llama.cpp server slots unless a caller says otherwise


def llamacpp_command(
    model: str | os.PathLike,
    port: int,
    host: str = "127.0.0.1",
    n_ctx: int = 8192,
    n_parallel: int = DEFAULT_SLOTS,
    threads: int | None = None,
    seed: int | None = None,
    lora: str | os.PathLike | None = None,
) -> list[str]:
    """The child command that serves ``model`` (a GGUF file, plus a GGUF LoRA ``lora``) with llama.cpp."""
    cmd = [
        sys.executable,
        "-m",
        "agentlib.serve",
        "llamacpp",
        "--model",
        str(model),
        "--host",
        host,
        "--port",
        str(port),
        "--n-ctx",
        str(n_ctx),
        "--n-parallel",
        str(n_parallel),
    ]
    if threads:
        cmd += ["--threads", str(threads)]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    if lora is not None:
        cmd += ["--lora", str(lora)]
    return cmd


def start_llamacpp(
    model: str | os.PathLike,
    port: int | None = None,
    host: str = "127.0.0.1",
    ready_timeout_s: float = 300.0,
    **options: Any,
) -> ServerProcess:
    """A ready llama.cpp server for a GGUF file or a registry name (``qwen2.5-coder-1.5b``).

    ``options`` as :func:`llamacpp_command`: ``n_ctx`` (shared by the ``n_parallel`` slots, each gets
    ``n_ctx / n_parallel`` tokens), ``n_parallel``, ``threads``, ``seed``, and ``lora``, a GGUF LoRA file (see
    `agentlib.gguf_lora`) applied at scale 1 to every request.
    """
    from agentlib.registry import gguf_file

    path = gguf_file(model)
    port = port or free_port(host)
    cmd = llamacpp_command(path, port, host, **options)
    server = ServerProcess(cmd, port, host, name=f"llamacpp-{path.stem}")
    server.n_parallel = options.get("n_parallel", DEFAULT_SLOTS)
    return server.wait_ready(ready_timeout_s)


def run_llamacpp(
    model: str,
    host: str,
    port: int,
    n_ctx: int,
    n_parallel: int,
    threads: int | None,
    seed: int | None,
    lora: str | None = None,
) -> None:
    """Serve in this process until SIGTERM/SIGINT (the body of the child process)."""
    import threading

    import xllamacpp as xlc

    p = xlc.CommonParams()
    p.model.path = model
    p.hostnames = [host]
    p.port = port
    p.n_ctx = n_ctx
    p.n_parallel = n_parallel
    p.kv_unified = True  # slots share the context: long and short requests mix
    n = threads or os.cpu_count() or 1
    p.cpuparams.n_threads = n
    p.cpuparams_batch.n_threads = n
    if seed is not None:
        p.sampling.seed = seed
    if lora:
        p.lora_adapters = [xlc.CommonAdapterLoraInfo(lora, 1.0)]
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = xlc.Server(p)
    print(f"agentlib.serve: llama.cpp listening on {server.listening_address}", flush=True)
    stop.wait()
    del server


# --------------------------------------------------------------------------------------------- vLLM


def vllm_command(
    model: str,
    port: int,
    host: str = "127.0.0.1",
    tensor_parallel_size: int = 1,
    lora_modules: Mapping[str, str] | None = None,
    max_lora_rank: int = 64,
    gpu_memory_utilization: float = 0.9,
    seed: int = 0,
    max_model_len: int | None = None,
    served_model_name: str | None = None,
    dtype: str = "auto",
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The ``vllm serve`` command line; LoRA adapters are served as ``name=path`` modules.

    vLLM pins its own torch/transformers (vllm 0.33.0: torch 2.14.0, transformers < 5.21), so it lives in its
    own environment (``requirements-vllm.txt``); ``AGENTLIB_VLLM`` names its ``vllm`` executable.
    """
    cmd = [
        os.environ.get("AGENTLIB_VLLM", "vllm"),
        "serve",
        model,
        "--host",
        host,
        "--port",
        str(port),
        "--tensor-parallel-size",
        str(tensor_parallel_size),
        "--gpu-memory-utilization",
        str(gpu_memory_utilization),
        "--seed",
        str(seed),
        "--dtype",
        dtype,
    ]
    if served_model_name:
        cmd += ["--served-model-name", served_model_name]
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    if lora_modules:
        cmd += [
            "--enable-lora",
            "--max-lora-rank",
            str(max_lora_rank),
            "--max-loras",
            str(len(lora_modules)),
            "--lora-modules",
            *(f"{name}={path}" for name, path in lora_modules.items()),
        ]
    return cmd + list(extra_args)


def start_vllm(
    model: str,
    port: int | None = None,
    host: str = "127.0.0.1",
    cuda_devices: str | None = None,
    ready_timeout_s: float = 900.0,
    **kwargs: object,
) -> ServerProcess:
    """A ready ``vllm serve`` (GPU); ``cuda_devices`` (``"0,1"``) sets CUDA_VISIBLE_DEVICES for it alone."""
    return _launch_vllm(model, port, host, cuda_devices, **kwargs).wait_ready(ready_timeout_s)


def _launch_vllm(
    model: str,
    port: int | None = None,
    host: str = "127.0.0.1",
    cuda_devices: str | None = None,
    **kwargs: object,
) -> ServerProcess:
    port = port or free_port(host)
    cmd = vllm_command(model, port, host, **kwargs)  # type: ignore[arg-type]
    env = {"CUDA_VISIBLE_DEVICES": cuda_devices} if cuda_devices is not None else None
    return ServerProcess(cmd, port, host, name=f"vllm-{Path(model).name}", env=env)


def lora_name(adapter: str | os.PathLike) -> str:
    """The name a LoRA adapter is served and requested under: its folder's name (``runs/.../agent`` -> ``agent``)."""
    name = Path(adapter).expanduser().resolve().name
    if not name:
        raise ValueError(f"no folder name in adapter path {adapter!r}")
    return name


def _served_models(url: str, timeout_s: float = 10.0) -> list[str] | None:
    """The model ids a server lists at ``/v1/models`` (vLLM lists LoRA modules too), or None if it does not say."""
    import json

    try:
        with urllib.request.urlopen(url.rstrip("/") + "/models", timeout=timeout_s) as r:
            data = json.loads(r.read())
        return [m["id"] for m in data.get("data", [])]
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError):
        return None


def _load_lora(url: str, name: str, path: str, timeout_s: float = 120.0) -> bool:
    """Ask a running vLLM to load an adapter (needs ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` on the server)."""
    import json

    req = urllib.request.Request(
        url.rstrip("/") + "/load_lora_adapter",
        method="POST",
        data=json.dumps({"lora_name": name, "lora_path": path}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _ensure_lora(urls: Sequence[str], name: str, path: str) -> None:
    """Every server that lists its models must list ``name`` (loading it at runtime where allowed)."""
    from agentlib.models import _normalize_url

    missing = []
    for url in map(_normalize_url, urls):
        served = _served_models(url)
        if served is None or name in served:
            continue  # unreachable now (the pool routes around it) or already served
        if not (_load_lora(url, name, path) and name in (_served_models(url) or [])):
            missing.append(f"{url} (serves {served})")
    if missing:
        raise RuntimeError(
            f"LoRA module {name!r} is not served by {', '.join(missing)}: start vLLM with "
            f"--enable-lora --max-lora-rank 64 --lora-modules {name}={path}, or with "
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True so it can be loaded at run time"
        )


def open_vllm(
    base_model: str,
    adapter: str | os.PathLike | None = None,
    *,
    endpoints: Sequence[str] | None = None,
    devices: Sequence[str | None] | None = None,
    max_lora_rank: int = 64,
    server_kw: Mapping[str, object] | None = None,
    ready_timeout_s: float = 900.0,
    **model_kw: Any,
) -> OpenAIModel:
    """``vllm_model`` without the ``with``: the model's ``close()`` stops any server this started."""
    from agentlib.models import OpenAIModel, endpoints_from_env

    name, path = base_model, None
    if adapter is not None:
        path = str(Path(adapter).expanduser().resolve())
        if not Path(path).is_dir():
            raise FileNotFoundError(f"no adapter folder {path}")
        name = lora_name(path)
    urls = endpoints_from_env() if endpoints is None else list(endpoints)
    if urls:
        if path is not None:
            _ensure_lora(urls, name, path)
        return OpenAIModel(endpoints=urls, model=name, **model_kw)
    kw = dict(server_kw or {})
    if path is not None:
        kw.update(lora_modules={name: path}, max_lora_rank=max_lora_rank)
    servers: list[ServerProcess] = []
    try:
        for dev in list(devices or [None]):  # start them all, then wait: they load at the same time
            servers.append(_launch_vllm(base_model, cuda_devices=dev, **kw))
        for srv in servers:
            srv.wait_ready(ready_timeout_s)
        model = OpenAIModel(endpoints=[srv.base_url for srv in servers], model=name, **model_kw)
    except BaseException:
        for srv in servers:
            srv.stop()
        raise
    model._on_close.extend(srv.stop for srv in servers)
    return model


@contextmanager
def vllm_model(base_model: str, adapter: str | os.PathLike | None = None, **kw: Any) -> Iterator[OpenAIModel]:
    """An ``OpenAIModel`` over vLLM for ``base_model``, or for its LoRA ``adapter`` (a peft folder), for a block.

    Requests name the model ``lora_name(adapter)`` (the adapter folder's name) when an adapter is given, else
    ``base_model``. Servers: ``endpoints``, else (None) ``AGENTLIB_ENDPOINTS`` (already up; started with
    ``--enable-lora --max-lora-rank 64 --lora-modules NAME=PATH``: a server that lists its models without NAME is
    asked to load it, and an error says how to start it if it cannot); with neither (or ``endpoints=[]``), one
    server per entry of ``devices`` (CUDA_VISIBLE_DEVICES each, default one server on what is visible) is started
    with ``start_vllm(base_model, lora_modules={NAME: PATH}, max_lora_rank=64, **server_kw)`` and stopped afterwards.
    ``model_kw`` go to ``OpenAIModel`` (``max_concurrency``, ``seed``, ``timeout_s``, ...).

        with vllm_model("Qwen/Qwen2.5-0.5B-Instruct", "runs/paper/students/agent") as m:
            m.chat([{"role": "user", "content": "Hi"}])  # POST .../chat/completions {"model": "agent", ...}

    Keywords as :func:`open_vllm`: ``endpoints``, ``devices``, ``max_lora_rank``, ``server_kw``,
    ``ready_timeout_s``, and the rest for ``OpenAIModel``.
    """
    model = open_vllm(base_model, adapter, **kw)
    try:
        yield model
    finally:
        model.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m agentlib.serve")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("llamacpp", help="serve a GGUF with llama.cpp (OpenAI-compatible HTTP)")
    a.add_argument("--model", required=True, help="a .gguf file or a registry name")
    a.add_argument("--host", default="127.0.0.1")
    a.add_argument("--port", type=int, default=0, help="0: a free port")
    a.add_argument("--n-ctx", type=int, default=8192)
    a.add_argument("--n-parallel", type=int, default=4)
    a.add_argument("--threads", type=int, default=None)
    a.add_argument("--seed", type=int, default=None)
    a.add_argument("--lora", default=None, help="a GGUF LoRA adapter applied to every request")
    args = ap.parse_args(argv)
    from agentlib.registry import gguf_file

    model = str(gguf_file(args.model))
    run_llamacpp(
        model,
        args.host,
        args.port or free_port(args.host),
        args.n_ctx,
        args.n_parallel,
        args.threads,
        args.seed,
        args.lora,
    )


if __name__ == "__main__":
    main()
