"""Isolated Python sandbox for the CodeAct agent: tool bridge, killable timeouts, forkable state.

    with Sandbox(tools={"search": search}, timeout_s=10, memory_mb=1024) as sb:
        r = sb.run("x = 6 * 7\\nprint(x)")        # ExecResult(stdout='42\\n', ...)
        rs = sb.run_candidates(["final_answer(x)", "x += 1"])   # independent forked copies of the state
        sb.commit(rs[1])                          # adopt candidate 1's state, without running it again

Code never runs in this process. A shared zygote process (one per interpreter, started on first use,
numpy and sympy preloaded) forks one worker per sandbox; the worker keeps its globals between runs.
Tool calls made by the code are sent back here and run in this process.

Two layers. The kernel's (``isolation="kernel"``, the default on Linux): each sandbox is a box of its own
namespaces -- user, mount, PID, network, IPC, UTS -- built by `agentlib._sandbox_worker` with
``unshare``/``mount``/``pivot_root`` (why not bubblewrap: see there). Inside, the file system is a
read-only view of the interpreter and libraries plus a size-capped tmpfs at /tmp (the work dir); there is
no network interface but a down loopback; the worker is pid 2 under a tiny pid 1 that this process
controls, runs as root of its user namespace without any capability, and cannot see or signal anything
outside the box. As root, per-sandbox cgroups cap memory and processes over every process of the box.
Between runs every process of the box is stopped (SIGSTOP from the box's pid 1); a timeout kills the
box's pid 1, and with it, by the kernel, every process of the box. Candidates of ``run_candidates`` are
forks that get namespaces of their own (a copy-on-write /tmp, their own PID namespace).

The in-process layer (``isolation="process"``, and in front of the kernel's in both modes): an import
allow-list, restricted builtins, an AST check and an audit hook; rlimits; an unprivileged uid when run
as root. Where kernel isolation is unavailable the sandbox warns once and runs with this layer alone.

Everything a worker sends is treated as hostile: messages are size-capped and loaded without classes,
their types are checked, the output and answer caps are applied again here, processes are identified by
the kernel's credentials (SCM_CREDENTIALS), and any violation replaces the worker (the state is lost;
the result says so) instead of raising.
"""

from __future__ import annotations

import atexit
import functools
import io
import os
import pickle
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentlib._sandbox_worker import (
    ALLOWED_IMPORTS,
    BOX_WORKDIR,
    HEADER,
    MAX_FDS,
    MAX_MESSAGE,
    NOBODY,
    pack,
    to_plain,
)

__all__ = ["ALLOWED_IMPORTS", "ExecResult", "Sandbox", "SandboxError"]

WORKER_SCRIPT = str(Path(__file__).with_name("_sandbox_worker.py"))
DEFAULT_PRELOAD = ("numpy", "numpy.random", "numpy.linalg", "numpy.fft", "numpy.polynomial", "sympy")
WORKER_ENV = {
    "PATH": "/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/nonexistent",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONHASHSEED": "0",
}
RESET_NOTE = (
    "The sandbox was restarted: all variables, functions and imports from earlier steps are gone, "
    "so define what you need again."
)


class SandboxError(RuntimeError):
    """The sandbox itself failed (could not start, or used after close)."""


class _Timeout(Exception):
    pass


class _Died(Exception):
    pass


@dataclass
class ExecResult:
    """Outcome of one code step. ``error`` is a Python-style traceback text, None on success."""

    stdout: str = ""
    error: str | None = None
    final_answer: Any = None
    called_final_answer: bool = False
    last_output: str | None = None  # str() of the last statement's value (smolagents' "Last output")
    duration_s: float = 0.0
    timed_out: bool = False
    restarted: bool = False  # the worker was replaced by a fresh one: earlier state is gone
    candidate: int | None = None  # index in run_candidates, for commit()
    _batch: int | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def observation(self) -> str:
        """stdout followed by the error text, as an agent would show it."""
        parts = [self.stdout.rstrip("\n")] if self.stdout.strip() else []
        if self.error:
            parts.append(self.error)
        return "\n".join(parts)


class _SafeUnpickler(pickle.Unpickler):
    """Loads only builtin data from a (possibly compromised) worker: no classes, no callables."""

    def find_class(self, module: str, name: str):
        if (module, name) in {("builtins", "complex"), ("builtins", "set"), ("builtins", "frozenset")}:
            return {"complex": complex, "set": set, "frozenset": frozenset}[name]
        raise pickle.UnpicklingError(f"refused {module}.{name} from the sandbox")


_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class _Proc:
    """A sandboxed process seen from here: its socket and a pidfd (safe against pid reuse).

    Its pid is what the kernel reported with its first message (SCM_CREDENTIALS, translated into this
    process's PID namespace), never a number the process wrote itself.
    """

    def __init__(self, sock: socket.socket, pid: int, workdir: str, max_message: int = MAX_MESSAGE):
        self.sock, self.pid, self.workdir, self.max_message = sock, pid, workdir, max_message
        try:
            self.pidfd: int | None = os.pidfd_open(pid) if pid > 0 else None
        except OSError:
            self.pidfd = None

    @staticmethod
    def listen(sock: socket.socket) -> socket.socket:
        """Ask the kernel to attach the sender's credentials (set before the other side can send)."""
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        return sock

    @classmethod
    def greeted(cls, sock: socket.socket, workdir: str, deadline: float, max_message: int) -> _Proc:
        """Wait for a process's ("ready",) and take its pid from the kernel's credentials."""
        probe = cls(sock, -1, workdir, max_message)
        pid = probe._read_header_pid(deadline)
        msg = probe._body(deadline)
        if not (isinstance(msg, tuple) and msg and msg[0] == "ready"):
            probe.sock.close()
            raise _Died("bad greeting")
        if pid <= 1:  # 0: not visible from here; 1: this namespace's init
            probe.sock.close()
            raise _Died("the greeting came without usable credentials")
        return cls(sock, pid, workdir, max_message)

    def _read_header_pid(self, deadline: float) -> int:
        self.sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            data, anc, _, _ = self.sock.recvmsg(HEADER.size, socket.CMSG_SPACE(_UCRED.size))
        except TimeoutError:
            raise _Timeout from None
        except OSError as e:
            raise _Died(f"channel read failed: {e}") from None
        if not data:
            raise _Died("the process exited")
        pid = 0
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(payload) >= _UCRED.size:
                pid = _UCRED.unpack(payload[: _UCRED.size])[0]
        self._pending = (
            data + self._read(HEADER.size - len(data), deadline) if len(data) < HEADER.size else data
        )
        return pid

    def send(self, obj: Any, timeout: float = 10.0, fds: Sequence[int] = ()) -> None:
        data = pack(obj)
        try:
            self.sock.settimeout(timeout)
            if fds:
                sent = socket.send_fds(self.sock, [data], list(fds))
                self.sock.sendall(data[sent:])
            else:
                self.sock.sendall(data)
        except OSError as e:
            raise _Died(f"channel write failed: {e}") from None

    def recv(self, deadline: float) -> Any:
        self._pending = self._read(HEADER.size, deadline)
        return self._body(deadline)

    def _body(self, deadline: float) -> Any:
        (n,) = HEADER.unpack(self._pending)
        if n > self.max_message:
            raise _Died(f"oversized message ({n} bytes)")
        try:
            return _SafeUnpickler(io.BytesIO(self._read(n, deadline))).load()
        except (_Timeout, _Died):
            raise
        except Exception as e:  # noqa: BLE001 - garbage on the channel
            raise _Died(f"corrupt message ({type(e).__name__})") from None

    def _read(self, n: int, deadline: float) -> bytes:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Timeout
            self.sock.settimeout(remaining)
            try:
                k = self.sock.recv_into(view[got:])
            except TimeoutError:
                raise _Timeout from None
            except OSError as e:
                raise _Died(f"channel read failed: {e}") from None
            if k == 0:
                raise _Died("the process exited")
            got += k
        return bytes(buf)

    def alive(self) -> bool:
        if self.pidfd is None:
            return self.pid > 0 and os.path.exists(f"/proc/{self.pid}")
        return not select.select([self.pidfd], [], [], 0)[0]

    def kill(self) -> None:
        """Send SIGKILL (pid-reuse safe) and release the socket; see `gone`/`wait_gone`."""
        if self.pidfd is not None:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except OSError:
                pass
        self.sock.close()

    def gone(self) -> bool:
        """True once the process has exited (and, for a box's pid 1, every process of its box with it)."""
        if self.pidfd is None:
            return self.pid <= 0 or not os.path.exists(f"/proc/{self.pid}")
        if self.alive():
            return False
        os.close(self.pidfd)
        self.pidfd = None
        return True

    def wait_gone(self, timeout: float = 5.0) -> bool:
        end = time.monotonic() + timeout
        if self.pidfd is not None:
            select.select([self.pidfd], [], [], timeout)
        while not self.gone():
            if time.monotonic() > end:
                return False
            time.sleep(0.0002)
        return True


class _Box:
    """A kernel box seen from here: its pid 1 (a pidfd: killing it kills every process of the box) and
    the one-byte control channel to it: S = stop every process of the box, C = continue them.

    Between runs the box is stopped by SIGSTOP, sent by its pid 1 to every other process of the box
    (and of the namespaces nested in it). Not the cgroup v1 freezer: a frozen process that is killed
    stays until it is thawed, where a stopped one dies at once.
    """

    def __init__(self, init_pid: int, ctl: socket.socket):
        self.init = _Proc(ctl, init_pid, "/")
        self.ctl = ctl
        self.stopped = False

    def stop(self) -> None:
        self._say(b"S")
        self.stopped = True

    def cont(self) -> None:
        self._say(b"C")
        try:
            self.ctl.settimeout(10)
            ok = self.ctl.recv(1) == b"c"
        except OSError:
            ok = False
        if not ok:
            raise _Died("the sandbox's init did not answer")
        self.stopped = False

    def _say(self, cmd: bytes) -> None:
        try:
            self.ctl.settimeout(10)
            self.ctl.send(cmd)
        except OSError as e:
            raise _Died(f"the sandbox's init is gone ({e})") from None


def _is_namespace_init(pid: int) -> bool:
    """Whether `pid` is pid 1 of its own PID namespace (a candidate or a committed one)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            ns = next((line.split()[1:] for line in f if line.startswith("NSpid:")), [])
    except OSError:
        return False
    return len(ns) > 1 and ns[-1] == "1"


class _Zygote:
    """The per-interpreter process that forks warm workers and kernel boxes (a child subreaper)."""

    def __init__(self, preload: tuple[str, ...]):
        ours, theirs = socket.socketpair()
        self.owner = os.getpid()
        self.lock = threading.Lock()
        self.proc = subprocess.Popen(
            [sys.executable, "-I", WORKER_SCRIPT, str(theirs.fileno()), ",".join(preload)],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=None if os.environ.get("AGENTLIB_SANDBOX_DEBUG") else subprocess.DEVNULL,
            env=WORKER_ENV,
            cwd="/",
            start_new_session=True,
            close_fds=True,
        )
        theirs.close()
        self.chan = _Proc(ours, self.proc.pid, "/")
        try:
            msg = self.chan.recv(time.monotonic() + 120)
        except (_Timeout, _Died) as e:
            self.close()
            raise SandboxError(f"sandbox zygote failed to start: {e}") from None
        assert msg[0] == "ready"
        self.kernel_problem: str | None = msg[1]

    def spawn(self, cfg: dict, fds: Sequence[int]) -> Any:
        with self.lock:
            self.chan.send(("spawn", cfg), fds=list(fds))
            return self.chan.recv(time.monotonic() + 30)

    def alive(self) -> bool:
        return self.proc.poll() is None and self.owner == os.getpid()

    def close(self) -> None:
        self.chan.sock.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_ZYGOTES: dict[tuple[str, ...], _Zygote] = {}
_ZYGOTE_LOCK = threading.Lock()


def _zygote(preload: tuple[str, ...]) -> _Zygote:
    with _ZYGOTE_LOCK:
        z = _ZYGOTES.get(preload)
        if z is None or not z.alive():
            if z is not None and z.owner == os.getpid():
                z.close()
            z = _ZYGOTES[preload] = _Zygote(preload)
        return z


_DIR_PREFIX = "agentlib-sandbox-"  # + "<pid of the owning process>-" + random: see `sweep_stale_dirs`
CGROUP_V1 = "/sys/fs/cgroup"
_CG_DIR = "agentlib"  # /sys/fs/cgroup/{memory,pids}/agentlib/agentlib-sandbox-<owner pid>-<n>


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        pass
    return True


def sweep_stale_dirs(tmp: str | os.PathLike | None = None) -> int:
    """Remove sandbox directories (and, as root, cgroups) whose owning process is gone (killed before
    `Sandbox.close` ran: a SIGKILLed kernel, a stopped run). Returns how many directories were removed.
    Runs once per process by itself."""
    removed = 0
    for path in Path(tmp or tempfile.gettempdir()).glob(f"{_DIR_PREFIX}*-*"):
        pid = path.name[len(_DIR_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed += not path.exists()
    if tmp is None:
        for ctrl in ("memory", "pids"):
            for path in Path(CGROUP_V1, ctrl, _CG_DIR).glob(f"{_DIR_PREFIX}*-*"):
                pid = path.name[len(_DIR_PREFIX) :].split("-", 1)[0]
                if pid.isdigit() and not _alive(int(pid)):
                    _rmdir(str(path))
    return removed


def _rmdir(path: str) -> bool:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


_sweep_once = functools.cache(sweep_stale_dirs)


@atexit.register
def _close_zygotes() -> None:
    for z in _ZYGOTES.values():
        if z.owner == os.getpid():
            z.close()
    _ZYGOTES.clear()


_WARNED: set[str] = set()
_CG_COUNTER = iter(range(1, 1 << 62))


def _warn_once(key: str, text: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(text, RuntimeWarning, stacklevel=3)


def kernel_isolation_problem(preload: Sequence[str] = ()) -> str | None:
    """Why kernel isolation cannot be used on this machine (None when it can); starts the zygote."""
    if not sys.platform.startswith("linux"):
        return f"{sys.platform} has no Linux namespaces"
    return _zygote(tuple(preload) or DEFAULT_PRELOAD).kernel_problem


def isolation_summary() -> str:
    """One line on what isolates a default Sandbox here (for benchmark and run descriptions)."""
    problem = kernel_isolation_problem()
    if problem:
        return f"process (in-process layers only; kernel isolation unavailable: {problem})"
    cg = "per-sandbox cgroups (memory, pids)" if _cgroup_limits(1, 1) else "no cgroups (rlimits)"
    return f"kernel (user, mount, PID, network, IPC, UTS namespaces; {cg})"


def _cgroup_limits(memory_bytes: int, max_processes: int) -> dict[str, dict[str, int]] | None:
    """Per-sandbox cgroup v1 memory and pids limits where this process may create cgroups (root)."""
    mem, pids = os.path.join(CGROUP_V1, "memory"), os.path.join(CGROUP_V1, "pids")
    if not (
        os.path.isfile(os.path.join(mem, "memory.limit_in_bytes"))
        and os.path.isdir(pids)
        and os.access(mem, os.W_OK)
        and os.access(pids, os.W_OK)
    ):
        return None
    name = f"{_DIR_PREFIX}{os.getpid()}-{next(_CG_COUNTER)}"
    mem_limits = {"memory.limit_in_bytes": memory_bytes}
    if os.path.exists(os.path.join(mem, "memory.memsw.limit_in_bytes")):
        mem_limits["memory.memsw.limit_in_bytes"] = memory_bytes
    return {
        os.path.join(mem, _CG_DIR, name): mem_limits,
        os.path.join(pids, _CG_DIR, name): {"pids.max": max_processes},
    }


class Sandbox:
    """A persistent, isolated Python interpreter state for one agent trajectory.

    Args:
        tools: functions the code may call by name; they run in *this* process (in a helper thread, so
            that a slow tool cannot hold a run past its timeout).
        timeout_s: wall-clock limit of one ``run`` (and of each candidate), tool time included.
        memory_mb: address space each process of the code may allocate on top of the warm interpreter;
            with kernel isolation as root, also (plus `disk_mb` and 256 MB) the cgroup limit of the box.
        max_output_chars: stdout budget per step; the rest is dropped with a visible marker.
        max_answer_chars: the longest string a final answer, tool argument or last output may hold.
        max_parallel: candidates run at once by ``run_candidates`` (default: the number of cores).
        disk_mb, max_files: size and file count of the box's /tmp (the work dir), kernel isolation only.
        max_processes: processes (and threads) of the box; per worker process in process isolation.
        cpu_s: CPU-time limit of a worker process over its life (a backstop to the wall-clock timeout).
        preload: modules imported once in the zygote (fast warm imports in the code).
        isolation: "kernel" (namespaces; SandboxError where unavailable), "process" (the in-process layer
            only) or "auto" (kernel where available, else process with a one-time warning).
    """

    def __init__(
        self,
        tools: dict[str, Callable[..., Any]] | None = None,
        timeout_s: float = 10.0,
        memory_mb: int = 1024,
        max_output_chars: int = 10_000,
        max_answer_chars: int = 100_000,
        max_parallel: int | None = None,
        file_size_mb: int = 64,
        max_open_files: int = 64,
        cpu_s: int = 600,
        allowed_imports: Sequence[str] = tuple(sorted(ALLOWED_IMPORTS)),
        preload: Sequence[str] = DEFAULT_PRELOAD,
        disk_mb: int = 256,
        max_files: int = 10_000,
        max_processes: int = 128,
        isolation: str = "auto",
    ):
        self.tools = dict(tools or {})
        bad = [n for n in self.tools if not n.isidentifier() or n == "final_answer"]
        if bad:
            raise ValueError(f"invalid tool names: {bad}")
        if isolation not in ("auto", "kernel", "process"):
            raise ValueError(f"isolation must be 'auto', 'kernel' or 'process', not {isolation!r}")
        self.timeout_s = float(timeout_s)
        self.max_parallel = max(1, max_parallel or os.cpu_count() or 1)
        self._preload = tuple(preload)
        self._root = os.geteuid() == 0
        _sweep_once()
        if isolation != "process":
            problem = kernel_isolation_problem(self._preload)
            if problem and isolation == "kernel":
                raise SandboxError(f"kernel isolation is unavailable here: {problem}")
            if problem:
                _warn_once(
                    "kernel",
                    f"agentlib.sandbox: kernel isolation is unavailable ({problem}); "
                    "model-written code runs with the in-process layers only "
                    "(import allow-list, audit hook, rlimits). Sandbox(isolation='process') "
                    "silences this warning.",
                )
                isolation = "process"
            else:
                isolation = "kernel"
        self.isolation = isolation
        self._max_output = int(max_output_chars)
        self._max_answer = int(max_answer_chars)
        self._max_message = 8 * (self._max_output + 3 * self._max_answer) + 2**20
        self._cfg = {
            "memory_mb": int(memory_mb),
            "max_output_chars": int(max_output_chars),
            "max_answer_chars": int(max_answer_chars),
            "file_size_mb": int(file_size_mb),
            "max_open_files": int(max_open_files),
            "max_processes": int(max_processes),
            "cpu_s": int(cpu_s),
            "allowed": sorted(allowed_imports),
            "tools": sorted(self.tools),
            "uid": NOBODY if self._root else None,
            "gid": NOBODY if self._root else None,
            "disk_mb": int(disk_mb),
            "max_files": int(max_files),
            "copy_mb": min(64, int(disk_mb)),
            "isolation": isolation,
            "cores": min(self.max_parallel, os.cpu_count() or 1),
            "clone3": os.environ.get("AGENTLIB_SANDBOX_CLONE3", "1") != "0",  # 0: the fork+unshare path
        }
        self._cgroups = None
        if isolation == "kernel":
            self._cgroups = _cgroup_limits((int(memory_mb) + int(disk_mb) + 256) * 2**20, int(max_processes))
            if self._cgroups is None:
                _warn_once(
                    "cgroups",
                    "agentlib.sandbox: no cgroups to create here (not root, or no cgroup v1 "
                    "memory/pids hierarchy): memory and process limits hold per process "
                    "(rlimits) and per user namespace, not over the whole sandbox.",
                )
            self._cfg["cgroups"] = self._cgroups
        self._closed = False
        self._lost_state = False
        self._generation = 0
        self._batch = 0
        self._box: _Box | None = None
        self._candidates: list[_Proc | None] = []
        self._dying: list[_Proc] = []  # killed, not yet confirmed gone (checked lazily, waited for in close)
        self._dying_lock = threading.Lock()
        self._lock = threading.Lock()
        self._base = "" if isolation == "kernel" else tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-")
        try:
            if self._root and self._base:
                os.chown(self._base, NOBODY, NOBODY)
            self._worker = self._spawn()
        except BaseException:
            if self._base:
                shutil.rmtree(self._base, ignore_errors=True)
            self._remove_cgroups()
            raise

    # ------------------------------------------------------------------------------------- public

    @property
    def pid(self) -> int:
        """Process id (in this process's PID namespace) of the current worker; changes after a restart or
        a commit."""
        return self._worker.pid

    @property
    def workdir(self) -> str:
        """The current worker's working directory, as the code sees it (inside the box with kernel
        isolation; removed on close)."""
        return self._worker.workdir

    def run(self, code: str) -> ExecResult:
        """Run `code` in the persistent state; never raises for anything the code does."""
        with self._lock:
            self._check_open()
            self._drop_candidates()
            t0 = time.monotonic()
            try:
                self._cont()
                self._worker.send(("run", code, self.timeout_s))
                result = self._result(self._serve(self._worker, t0 + self.timeout_s), t0)
                self._lost_state = False
                self._stop()
                return result
            except _Timeout:
                self._restart()
                return ExecResult(
                    error=self._timeout_text() + " " + RESET_NOTE,
                    timed_out=True,
                    restarted=True,
                    duration_s=time.monotonic() - t0,
                )
            except Exception as e:  # noqa: BLE001 - _Died, or anything a hostile worker's bytes caused here
                self._restart()
                return ExecResult(
                    error=self._crash_text(e) + " " + RESET_NOTE,
                    restarted=True,
                    duration_s=time.monotonic() - t0,
                )

    def run_candidates(self, codes: Sequence[str]) -> list[ExecResult]:
        """Run each code in its own fork of the current state (``max_parallel`` at a time).

        The sandbox's own state is unchanged until ``commit``; uncommitted copies are discarded by the
        next ``run``/``run_candidates``/``commit``/``close``. Each candidate has the full ``timeout_s``.
        """
        with self._lock:
            self._check_open()
            self._drop_candidates()
            self._batch += 1
            n = len(codes)
            self._candidates = [None] * n
            results: list[ExecResult | None] = [None] * n
            socks: list[socket.socket | None] = [None] * n
            try:
                self._cont()
            except _Died:
                pass  # the copies' sockets then report EOF
            for start in range(0, n, MAX_FDS):  # the worker forks while we wait for the copies below
                pairs = [socket.socketpair() for _ in range(start, min(n, start + MAX_FDS))]
                socks[start : start + len(pairs)] = [_Proc.listen(ours) for ours, _ in pairs]
                try:
                    self._worker.send(("fork",), fds=[theirs.fileno() for _, theirs in pairs])
                except _Died:
                    pass
                finally:
                    for _, theirs in pairs:
                        theirs.close()

            def one(i: int) -> None:
                t0 = time.monotonic()
                deadline, proc = t0 + self.timeout_s, None
                try:
                    proc = _Proc.greeted(
                        socks[i], self._worker.workdir if self._box else "", deadline, self._max_message
                    )
                    self._check_candidate(proc)
                    self._candidates[i] = proc
                    proc.send(("run", codes[i], self.timeout_s))
                    d = self._serve(proc, deadline)
                    r = self._result(d, t0)
                    if d.get("broken") is True:  # no copy of the state: nothing to commit
                        self._candidates[i] = None
                        self._discard(proc)
                except Exception as e:  # noqa: BLE001 - _Timeout, _Died, or a protocol violation
                    timed_out = isinstance(e, _Timeout)
                    text = self._timeout_text() if timed_out else self._crash_text(e)
                    r = ExecResult(
                        error=text + " This candidate was discarded.",
                        timed_out=timed_out,
                        duration_s=time.monotonic() - t0,
                    )
                    self._candidates[i] = None
                    if proc is not None:
                        self._discard(proc)
                    else:
                        socks[i].close()
                r.candidate, r._batch = i, self._batch
                results[i] = r

            with ThreadPoolExecutor(max_workers=max(1, min(n, self.max_parallel))) as pool:
                list(pool.map(one, range(n)))
            self._lost_state = False
            try:
                alive = self._worker.alive()
                if alive:
                    self._stop()
            except Exception:  # noqa: BLE001 - the box's init is gone
                alive = False
            if not alive:  # the template itself died: start fresh (committing any result restarts again)
                self._restart()
                self._candidates = [None] * n
                for r in results:
                    if r is not None:
                        r.restarted = True
            return [r for r in results if r is not None]

    def commit(self, result: ExecResult) -> None:
        """Make the state that produced `result` (from the last ``run_candidates``) the sandbox's state.

        A candidate that timed out or crashed has no state left: committing it restarts the sandbox
        with a fresh, empty state.
        """
        with self._lock:
            self._check_open()
            i = result.candidate
            if i is None or result._batch != self._batch or i >= len(self._candidates):
                raise ValueError("commit() needs a result of the latest run_candidates() call")
            proc = self._candidates[i]
            self._candidates[i] = None
            self._drop_candidates()
            if proc is None or not proc.alive():
                if proc is not None:
                    self._discard(proc)
                self._restart()
                self._lost_state = True  # said by the next result (restarted=True)
                return
            old, self._worker = self._worker, proc
            if self._box is not None and _is_namespace_init(old.pid):
                self._retire(old)
            else:
                self._discard(old)
            self._batch += 1

    def close(self) -> None:
        """Kill every process of this sandbox and remove its directory. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._drop_candidates()
            self._kill_all()
            self._discard(self._worker)
            self._reap(wait=True)
            if self._base:
                shutil.rmtree(self._base, ignore_errors=True)
            self._remove_cgroups()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ------------------------------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self._closed:
            raise SandboxError("the sandbox is closed")

    def _spawn(self) -> _Proc:
        for attempt in range(2):
            try:
                return self._spawn_once()
            except (_Died, _Timeout, OSError) as e:  # the zygote died, or the box failed: once more
                if attempt:
                    raise SandboxError(f"the sandbox could not start a worker: {e}") from None
                with _ZYGOTE_LOCK:
                    z = _ZYGOTES.pop(self._preload, None)
                if z is not None and z.owner == os.getpid():
                    z.close()
        raise AssertionError  # unreachable

    def _spawn_once(self) -> _Proc:
        self._generation += 1
        zygote = _zygote(self._preload)
        deadline = time.monotonic() + 30
        if self.isolation == "kernel":
            data, data_theirs = socket.socketpair()
            ctl, ctl_theirs = socket.socketpair()
            _Proc.listen(data)
            try:
                msg = zygote.spawn(
                    dict(self._cfg, workdir=BOX_WORKDIR), [data_theirs.fileno(), ctl_theirs.fileno()]
                )
            finally:
                data_theirs.close()
                ctl_theirs.close()
            if msg[0] != "spawned":
                data.close()
                ctl.close()
                raise _Died(f"the sandbox's namespaces could not be made: {msg[1]}")
            self._box = _Box(msg[1], ctl)
            try:
                proc = _Proc.greeted(data, BOX_WORKDIR, deadline, self._max_message)
                self._box.stop()
            except BaseException:
                self._box.init.kill()
                self._box.init.wait_gone()
                raise
            return proc
        workdir = os.path.join(self._base, f"work{self._generation}")
        os.mkdir(workdir, 0o700)
        if self._root:
            os.chown(workdir, NOBODY, NOBODY)
        data, theirs = socket.socketpair()
        _Proc.listen(data)
        try:
            msg = zygote.spawn(dict(self._cfg, workdir=workdir), [theirs.fileno()])
        finally:
            theirs.close()
        proc = _Proc.greeted(data, workdir, deadline, self._max_message)
        if proc.pid != msg[1]:
            proc.kill()
            raise _Died("the worker's credentials do not match the process the zygote forked")
        self._pgid, self._sid = proc.pid, os.getsid(proc.pid)
        return proc

    def _check_candidate(self, proc: _Proc) -> None:
        """A candidate's kernel-reported pid must be one of this sandbox's processes."""
        if self._box is None:
            try:
                ok = os.getsid(proc.pid) == self._sid
            except OSError:
                ok = False
            if ok:
                proc.workdir = os.path.join(self._base, f"cand{proc.pid}")
        else:  # nested in the box's PID namespace (the kernel only lets it name processes of its own)
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    ns = next((line.split()[1:] for line in f if line.startswith("NSpid:")), [])
                ok = len(ns) >= 3
            except OSError:
                ok = False
        if not ok:
            proc.sock.close()
            raise _Died("a forked copy is not a process of this sandbox")

    def _cont(self) -> None:
        if self._box is not None and self._box.stopped:
            self._box.cont()

    def _stop(self) -> None:
        if self._box is not None:
            self._box.stop()

    def _serve(self, proc: _Proc, deadline: float) -> dict:
        """Answer tool calls from `proc` until it sends its result (a hostile process's bytes: checked)."""
        while True:
            msg = proc.recv(deadline)
            if type(msg) is not tuple or not msg or type(msg[0]) is not str:
                raise _Died("protocol violation (not a message)")
            if msg[0] == "result" and len(msg) == 2 and type(msg[1]) is dict:
                return msg[1]
            if not (
                msg[0] == "tool"
                and len(msg) == 4
                and type(msg[1]) is str
                and msg[1] in self.tools
                and type(msg[2]) is list
                and type(msg[3]) is dict
                and all(type(k) is str and k.isidentifier() for k in msg[3])
            ):
                raise _Died("protocol violation (malformed tool call)")
            _, name, args, kwargs = msg
            mc = self._max_answer
            args = to_plain(args, mc)
            kwargs = {k: to_plain(v, mc) for k, v in list(kwargs.items())[:64]}
            reply = self._call_tool(name, args, kwargs, deadline)
            proc.send(reply, timeout=max(0.1, deadline - time.monotonic()))

    def _call_tool(self, name: str, args: list, kwargs: dict, deadline: float) -> tuple:
        """Run a tool in a helper thread; past the deadline the run times out (the thread is abandoned and
        its result dropped), so a slow tool cannot hold the sandbox beyond its timeout."""
        out: list = []
        done = threading.Event()
        mc = self._max_answer

        def call() -> None:
            try:
                out.append(("tool_result", True, to_plain(self.tools[name](*args, **kwargs), mc)))
            except Exception as e:  # noqa: BLE001 - a failing tool is an observation for the code
                out.append(("tool_result", False, to_plain(f"{type(e).__name__}: {e}", mc)))
            finally:
                done.set()

        threading.Thread(target=call, name=f"sandbox-tool-{name}", daemon=True).start()
        if not done.wait(max(0.0, deadline - time.monotonic())):
            raise _Timeout
        return out[0]

    def _result(self, d: dict, t0: float) -> ExecResult:
        """The worker's result dict, checked and capped again here."""
        stdout, error, last = d.get("stdout"), d.get("error"), d.get("last_output")
        if (
            type(stdout) is not str
            or not (error is None or type(error) is str)
            or not (last is None or type(last) is str)
            or type(d.get("called_final_answer")) is not bool
        ):
            raise _Died("protocol violation (malformed result)")
        limit = self._max_output
        if len(stdout) > limit + 200:
            stdout = (
                stdout[:limit] + f"\n[... output truncated: {len(stdout) - limit} more characters not shown]"
            )
        if error is not None and len(error) > 20_000:
            error = error[:20_000] + "\n[... error text truncated]"
        if last is not None and len(last) > self._max_answer:
            last = last[: self._max_answer] + "..."
        called = d["called_final_answer"]
        answer = to_plain(d.get("final_answer"), self._max_answer) if called else None
        return ExecResult(
            stdout=stdout,
            error=error,
            final_answer=answer,
            called_final_answer=called,
            last_output=last,
            duration_s=time.monotonic() - t0,
            restarted=self._lost_state,
        )

    def _timeout_text(self) -> str:
        return f"TimeoutError: the code did not finish within {self.timeout_s:g} s and was stopped."

    @staticmethod
    def _crash_text(e: Exception) -> str:
        why = str(e) if isinstance(e, _Died) else f"protocol violation: {type(e).__name__}"
        return f"SandboxError: the sandbox process stopped unexpectedly ({why})."

    def _retire(self, proc: _Proc) -> None:
        """An old template that is pid 1 of the namespace holding the new one: it execs an idle process
        (killing it would kill the new state); the box's end takes it."""
        try:
            proc.send(("retire",), timeout=1.0)
        except _Died:
            pass
        proc.sock.close()
        if proc.pidfd is not None:
            os.close(proc.pidfd)
            proc.pidfd = None

    def _drop_candidates(self) -> None:
        for proc in self._candidates:
            if proc is not None:
                self._discard(proc)
        self._candidates = []
        self._reap()

    def _discard(self, proc: _Proc) -> None:
        """Kill without waiting; its directory is removed once it is gone."""
        proc.kill()
        with self._dying_lock:
            self._dying.append(proc)

    def _reap(self, wait: bool = False) -> None:
        with self._dying_lock:
            dying, self._dying = self._dying, []
        still = []
        for proc in dying:
            if proc.wait_gone() if wait else proc.gone():
                if self._base and proc.workdir.startswith(self._base + os.sep):
                    shutil.rmtree(proc.workdir, ignore_errors=True)
            else:
                still.append(proc)
        with self._dying_lock:
            self._dying.extend(still)

    def _kill_all(self) -> None:
        """Kill every process of the sandbox: the box's pid 1 (the kernel then kills the whole box), or
        in process isolation the worker's process group."""
        if self._box is not None:
            box, self._box = self._box, None
            box.init.kill()
            with self._dying_lock:
                self._dying.append(box.init)
        elif self._worker.alive():
            try:
                os.killpg(self._pgid, signal.SIGKILL)
            except OSError:
                pass

    def _remove_cgroups(self) -> None:
        for path in self._cgroups or ():
            for _ in range(50):
                if _rmdir(path):
                    break
                time.sleep(0.01)

    def _restart(self) -> None:
        self._drop_candidates()
        self._kill_all()
        self._discard(self._worker)
        self._reap(wait=True)  # the old worker is really gone before the next step starts
        self._worker = self._spawn()
