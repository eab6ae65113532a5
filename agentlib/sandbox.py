"""Process-isolated Python sandbox for the CodeAct agent: tool bridge, killable timeouts, forkable state.

    with Sandbox(tools={"search": search}, timeout_s=10, memory_mb=1024) as sb:
        r = sb.run("x = 6 * 7\\nprint(x)")        # ExecResult(stdout='42\\n', ...)
        rs = sb.run_candidates(["final_answer(x)", "x += 1"])   # independent forked copies of the state
        sb.commit(rs[1])                          # adopt candidate 1's state, without running it again

Code never runs in this process. A shared zygote process (one per interpreter, started on first use,
numpy and sympy preloaded) forks one worker per sandbox; the worker keeps its globals between runs.
Tool calls made by the code are sent back here and run in this process. Limits (see
``agentlib/_sandbox_worker.py``): a wall-clock timeout enforced from here (the worker's process group is
killed and a fresh worker forked), an address-space limit, file-size / open-file / CPU-time rlimits, a
private temporary working directory, an empty environment, an unprivileged uid when run as root, and an
audit hook + import allow-list + AST check that block processes, sockets, ctypes, frames and files
outside the working directory. ``run_candidates`` forks the worker once per candidate (copy-on-write).
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
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentlib._sandbox_worker import ALLOWED_IMPORTS, HEADER, MAX_FDS, MAX_MESSAGE, NOBODY, pack, to_plain

__all__ = ["ALLOWED_IMPORTS", "ExecResult", "Sandbox", "SandboxError"]

WORKER_SCRIPT = str(Path(__file__).with_name("_sandbox_worker.py"))
DEFAULT_PRELOAD = ("numpy", "numpy.random", "numpy.linalg", "numpy.fft", "numpy.polynomial", "sympy")
WORKER_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/nonexistent", "OPENBLAS_NUM_THREADS": "1",
              "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
RESET_NOTE = ("The sandbox was restarted: all variables, functions and imports from earlier steps are gone, "
              "so define what you need again.")


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


class _Proc:
    """A sandboxed process seen from here: its socket and a pidfd (safe against pid reuse)."""

    def __init__(self, sock: socket.socket, pid: int, workdir: str):
        self.sock, self.pid, self.workdir = sock, pid, workdir
        try:
            self.pidfd: int | None = os.pidfd_open(pid)
        except OSError:
            self.pidfd = None

    @classmethod
    def announced(cls, sock: socket.socket, base: str, sid: int, deadline: float) -> _Proc:
        """A forked candidate: read its ("ready", pid) and check the pid is in the sandbox's session."""
        probe = cls.__new__(cls)
        probe.sock, probe.pid, probe.pidfd, probe.workdir = sock, -1, None, ""
        msg = probe.recv(deadline)
        if not (isinstance(msg, tuple) and len(msg) == 2 and msg[0] == "ready" and type(msg[1]) is int):
            raise _Died("bad greeting from a forked copy")
        try:
            ok = msg[1] > 1 and os.getsid(msg[1]) == sid
        except OSError:
            ok = False
        if not ok:
            raise _Died("a forked copy reported a foreign pid")
        return cls(sock, msg[1], os.path.join(base, f"cand{msg[1]}"))

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
        (n,) = HEADER.unpack(self._read(HEADER.size, deadline))
        if n > MAX_MESSAGE:
            raise _Died(f"oversized message ({n} bytes)")
        try:
            return _SafeUnpickler(io.BytesIO(self._read(n, deadline))).load()
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
            return os.path.exists(f"/proc/{self.pid}")
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
        """True once the process has exited and been reaped (by the zygote, a child subreaper)."""
        if self.alive() or os.path.exists(f"/proc/{self.pid}"):
            return False
        if self.pidfd is not None:
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


class _Zygote:
    """The per-interpreter process that forks warm workers (and reaps them as a child subreaper)."""

    def __init__(self, preload: tuple[str, ...]):
        ours, theirs = socket.socketpair()
        self.owner = os.getpid()
        self.lock = threading.Lock()
        self.proc = subprocess.Popen(
            [sys.executable, "-I", WORKER_SCRIPT, str(theirs.fileno()), ",".join(preload)],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=None if os.environ.get("AGENTLIB_SANDBOX_DEBUG") else subprocess.DEVNULL,
            env=WORKER_ENV, cwd="/", start_new_session=True, close_fds=True,
        )
        theirs.close()
        self.chan = _Proc(ours, self.proc.pid, "/")
        try:
            msg = self.chan.recv(time.monotonic() + 120)
        except (_Timeout, _Died) as e:
            self.close()
            raise SandboxError(f"sandbox zygote failed to start: {e}") from None
        assert msg[0] == "ready"

    def spawn(self, cfg: dict) -> _Proc:
        ours, theirs = socket.socketpair()
        try:
            with self.lock:
                self.chan.send(("spawn", cfg), fds=[theirs.fileno()])
                msg = self.chan.recv(time.monotonic() + 30)
        finally:
            theirs.close()
        proc = _Proc(ours, msg[1], cfg["workdir"])
        hello = proc.recv(time.monotonic() + 30)
        if hello[0] != "ready":
            proc.kill()
            proc.wait_gone()
            raise _Died("worker did not start")
        return proc

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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        pass
    return True


def sweep_stale_dirs(tmp: str | os.PathLike | None = None) -> int:
    """Remove sandbox directories whose owning process is gone (killed before `Sandbox.close` ran: a
    SIGKILLed kernel, a stopped run). Returns how many were removed. Runs once per process by itself."""
    removed = 0
    for path in Path(tmp or tempfile.gettempdir()).glob(f"{_DIR_PREFIX}*-*"):
        pid = path.name[len(_DIR_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed += not path.exists()
    return removed


_sweep_once = functools.cache(sweep_stale_dirs)


@atexit.register
def _close_zygotes() -> None:
    for z in _ZYGOTES.values():
        if z.owner == os.getpid():
            z.close()
    _ZYGOTES.clear()


class Sandbox:
    """A persistent, isolated Python interpreter state for one agent trajectory.

    Args:
        tools: functions the code may call by name; they run in *this* process.
        timeout_s: wall-clock limit of one ``run`` (and of each candidate), tool time included.
        memory_mb: address space the code may allocate on top of the warm interpreter.
        max_output_chars: stdout budget per step; the rest is dropped with a visible marker.
        max_parallel: candidates run at once by ``run_candidates`` (default: the number of cores).
        cpu_s: CPU-time limit of a worker process over its life (a backstop to the wall-clock timeout).
        preload: modules imported once in the zygote (fast warm imports in the code).
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
    ):
        self.tools = dict(tools or {})
        bad = [n for n in self.tools if not n.isidentifier() or n == "final_answer"]
        if bad:
            raise ValueError(f"invalid tool names: {bad}")
        self.timeout_s = float(timeout_s)
        self.max_parallel = max(1, max_parallel or os.cpu_count() or 1)
        self._preload = tuple(preload)
        self._root = os.geteuid() == 0
        _sweep_once()
        self._base = tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-")
        self._cfg = {
            "memory_mb": int(memory_mb), "max_output_chars": int(max_output_chars),
            "max_answer_chars": int(max_answer_chars), "file_size_mb": int(file_size_mb),
            "max_open_files": int(max_open_files), "max_processes": 256, "cpu_s": int(cpu_s),
            "allowed": sorted(allowed_imports), "tools": sorted(self.tools),
            "uid": NOBODY if self._root else None, "gid": NOBODY if self._root else None,
        }
        self._closed = False
        self._generation = 0
        self._batch = 0
        self._candidates: list[_Proc | None] = []
        self._dying: list[_Proc] = []  # killed, not yet confirmed gone (checked lazily, waited for in close)
        self._dying_lock = threading.Lock()
        self._lock = threading.Lock()
        try:
            if self._root:
                os.chown(self._base, NOBODY, NOBODY)
            self._worker = self._spawn()
        except BaseException:
            shutil.rmtree(self._base, ignore_errors=True)
            raise

    # ------------------------------------------------------------------------------------- public

    @property
    def pid(self) -> int:
        """Process id of the current worker (changes after a restart or a commit)."""
        return self._worker.pid

    @property
    def workdir(self) -> str:
        """The current worker's working directory (removed on close)."""
        return self._worker.workdir

    def run(self, code: str) -> ExecResult:
        """Run `code` in the persistent state; never raises for anything the code does."""
        with self._lock:
            self._check_open()
            self._drop_candidates()
            t0 = time.monotonic()
            try:
                self._worker.send(("run", code, self.timeout_s))
                return self._result(self._serve(self._worker, t0 + self.timeout_s), t0)
            except _Timeout:
                self._restart()
                return ExecResult(error=self._timeout_text() + " " + RESET_NOTE, timed_out=True, restarted=True,
                                  duration_s=time.monotonic() - t0)
            except _Died as e:
                self._restart()
                return ExecResult(error=self._crash_text(e) + " " + RESET_NOTE, restarted=True,
                                  duration_s=time.monotonic() - t0)

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
            for start in range(0, n, MAX_FDS):  # the worker forks while we wait for the copies below
                pairs = [socket.socketpair() for _ in range(start, min(n, start + MAX_FDS))]
                socks[start: start + len(pairs)] = [ours for ours, _ in pairs]
                try:
                    self._worker.send(("fork",), fds=[theirs.fileno() for _, theirs in pairs])
                except _Died:
                    pass  # the copies' sockets then report EOF
                finally:
                    for _, theirs in pairs:
                        theirs.close()

            def one(i: int) -> None:
                t0 = time.monotonic()
                deadline, proc = t0 + self.timeout_s, None
                try:
                    proc = self._candidates[i] = _Proc.announced(socks[i], self._base, self._sid, deadline)
                    proc.send(("run", codes[i], self.timeout_s))
                    r = self._result(self._serve(proc, deadline), t0)
                except (_Timeout, _Died) as e:
                    timed_out = isinstance(e, _Timeout)
                    text = self._timeout_text() if timed_out else self._crash_text(e)
                    r = ExecResult(error=text + " This candidate was discarded.", timed_out=timed_out,
                                   duration_s=time.monotonic() - t0)
                    self._candidates[i] = None
                    if proc is not None:
                        self._discard(proc)
                    else:
                        socks[i].close()
                r.candidate, r._batch = i, self._batch
                results[i] = r

            with ThreadPoolExecutor(max_workers=max(1, min(n, self.max_parallel))) as pool:
                list(pool.map(one, range(n)))
            if not self._worker.alive():  # the template itself died: start fresh
                self._restart()
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
                return
            old, self._worker = self._worker, proc
            self._discard(old)
            self._batch += 1

    def close(self) -> None:
        """Kill every process of this sandbox and remove its directory. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._drop_candidates()
            self._kill_group()
            self._discard(self._worker)
            self._reap(wait=True)
            shutil.rmtree(self._base, ignore_errors=True)

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
        self._generation += 1
        workdir = os.path.join(self._base, f"work{self._generation}")
        os.mkdir(workdir, 0o700)
        if self._root:
            os.chown(workdir, NOBODY, NOBODY)
        cfg = dict(self._cfg, workdir=workdir)
        try:
            proc = _zygote(self._preload).spawn(cfg)
        except (_Died, _Timeout, OSError):  # the zygote died: start a new one once
            with _ZYGOTE_LOCK:
                _ZYGOTES.pop(self._preload, None)
            proc = _zygote(self._preload).spawn(cfg)
        self._pgid, self._sid = proc.pid, os.getsid(proc.pid)
        return proc

    def _serve(self, proc: _Proc, deadline: float) -> dict:
        """Answer tool calls from `proc` until it sends its result."""
        while True:
            msg = proc.recv(deadline)
            if not isinstance(msg, tuple) or not msg or not isinstance(msg[0], str):
                raise _Died("protocol violation")
            if msg[0] == "result" and len(msg) == 2 and isinstance(msg[1], dict):
                return msg[1]
            if msg[0] != "tool" or len(msg) != 4 or msg[1] not in self.tools:
                raise _Died("protocol violation")
            _, name, args, kwargs = msg
            if not isinstance(args, list) or not isinstance(kwargs, dict) or not all(
                    isinstance(k, str) for k in kwargs):
                raise _Died("protocol violation")
            try:
                reply = ("tool_result", True, to_plain(self.tools[name](*args, **kwargs)))
            except Exception as e:  # noqa: BLE001 - a failing tool is an observation for the code
                reply = ("tool_result", False, f"{type(e).__name__}: {e}")
            proc.send(reply, timeout=max(0.1, deadline - time.monotonic()))

    def _result(self, d: dict, t0: float) -> ExecResult:
        try:
            stdout, error = d["stdout"], d["error"]
            if not isinstance(stdout, str) or not (error is None or isinstance(error, str)):
                raise TypeError
            return ExecResult(stdout=stdout, error=error, final_answer=d["final_answer"],
                              called_final_answer=bool(d["called_final_answer"]),
                              duration_s=time.monotonic() - t0)
        except (KeyError, TypeError):
            raise _Died("malformed result") from None

    def _timeout_text(self) -> str:
        return f"TimeoutError: the code did not finish within {self.timeout_s:g} s and was stopped."

    @staticmethod
    def _crash_text(e: Exception) -> str:
        return f"SandboxError: the sandbox process stopped unexpectedly ({e})."

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
                if proc.workdir.startswith(self._base + os.sep):
                    shutil.rmtree(proc.workdir, ignore_errors=True)
            else:
                still.append(proc)
        with self._dying_lock:
            self._dying.extend(still)

    def _kill_group(self) -> None:
        """SIGKILL the worker's whole process group (it and anything it started)."""
        if self._worker.alive():
            try:
                os.killpg(self._pgid, signal.SIGKILL)
            except OSError:
                pass

    def _restart(self) -> None:
        self._drop_candidates()
        self._kill_group()
        self._discard(self._worker)
        self._reap(wait=True)  # the old worker is really gone before the next step starts
        self._worker = self._spawn()
