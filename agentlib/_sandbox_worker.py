"""Child side of `agentlib.sandbox`: a zygote process that forks warm, locked-down workers.

Started as ``python -I _sandbox_worker.py CTL_FD PRELOAD``; the standard library only (plus the preloaded
packages), so it never imports agentlib. The zygote imports numpy/sympy once, becomes a child subreaper
(so workers orphaned by ``commit`` are still reaped) and forks one worker per request. A worker locks
itself down (rlimits, an unprivileged uid when started as root, an audit hook, an import allow-list, an
AST check, a trimmed builtins) and then runs code sent over its socket, keeping its globals between runs.
For ``run_candidates`` a worker forks copies of itself, each with its own socket and working directory.

Messages are length-prefixed pickles. The parent loads what a worker sends with an unpickler that
refuses every class, so only plain data (see `to_plain`) crosses back.
"""

from __future__ import annotations

import _socket
import _thread
import array
import ast
import builtins
import gc
import io
import os
import pickle
import resource
import signal
import struct
import sys
import time
import traceback

HEADER = struct.Struct("!Q")
MAX_MESSAGE = 64 * 2**20  # bytes; larger messages from a worker count as a protocol violation
USER_FILE = "<code>"
MAX_FDS = 16  # file descriptors per message (candidates forked per request)
NOBODY = 65534

ALLOWED_IMPORTS = frozenset(
    "math cmath re collections itertools functools datetime statistics random numpy sympy mpmath fractions"
    " decimal string json heapq bisect time unicodedata copy operator typing dataclasses queue numbers enum"
    " textwrap calendar array abc pprint difflib".split()
)
DENIED_SUBMODULES = ("numpy.ctypeslib", "numpy.distutils", "numpy.f2py", "numpy.testing", "sympy.utilities.autowrap")
# Modules the audit hook refuses to load for sandboxed code even if the import guard were bypassed.
HARD_DENIED_IMPORTS = frozenset(
    "subprocess _posixsubprocess ctypes _ctypes socket _socket multiprocessing _multiprocessing pty asyncio"
    " ssl http urllib ftplib smtplib telnetlib webbrowser mmap resource signal _signal pickle marshal".split()
)
ALLOWED_DUNDERS = frozenset(
    "__init__ __name__ __doc__ __qualname__ __str__ __repr__ __len__ __iter__ __next__ __eq__ __ne__ __lt__"
    " __le__ __gt__ __ge__ __hash__ __add__ __sub__ __mul__ __truediv__ __floordiv__ __mod__ __pow__"
    " __contains__ __getitem__ __setitem__ __enter__ __exit__ __call__ __bool__ __neg__ __abs__".split()
)
FORBIDDEN_ATTRS = frozenset(
    "f_globals f_locals f_builtins f_back f_code gi_frame gi_code cr_frame cr_code ag_frame ag_code tb_frame"
    " tb_next co_code func_globals mro".split()
)
REMOVED_BUILTINS = (
    "eval exec compile breakpoint input help exit quit copyright credits license globals locals vars"
).split()

# Audit events: DENY always (unless raised directly by trusted worker code), PATH = every path argument
# must lie in the working directory, FRAME = refuse frame access from sandboxed code and introspection
# modules, OPEN = the open() policy and LIST = directory listing (reads also allowed under the Python
# installation, which the import machinery needs for lazy imports inside numpy/sympy).
DENY, PATH, LIST, FRAME, OPEN, IMPORT = "deny", "path", "list", "frame", "open", "import"
AUDIT_RULES: dict[str, str] = {
    e: DENY
    for e in (
        "os.system os.exec os.posix_spawn os.spawn os.fork os.forkpty os.kill os.killpg os.chmod"
        " os.chown os.chflags os.link os.symlink os.setxattr os.removexattr os.putenv os.unsetenv os.startfile"
        " subprocess.Popen pty.spawn ctypes.dlopen ctypes.dlsym ctypes.dlsym/handle ctypes.cdata"
        " ctypes.cdata/buffer ctypes.addressof ctypes.call_function ctypes.string_at ctypes.wstring_at"
        " ctypes.PyObj_FromPtr ctypes.create_string_buffer ctypes.create_unicode_buffer socket.__new__"
        " socket.bind socket.connect socket.getaddrinfo socket.gethostbyname socket.gethostbyaddr"
        " socket.getnameinfo socket.sendmsg socket.sendto socket.sethostname resource.setrlimit"
        " resource.prlimit mmap.__new__ sys._current_frames sys.settrace sys.setprofile gc.get_objects"
        " gc.get_referrers gc.get_referents code.__new__ function.__new__ sys.addaudithook webbrowser.open"
        " urllib.Request http.client.connect ftplib.connect smtplib.connect telnetlib.Telnet.open"
    ).split()
}
AUDIT_RULES.update({e: PATH for e in (
    "os.chdir os.mkdir os.remove os.rmdir os.rename os.truncate os.utime shutil.copyfile shutil.copymode"
    " shutil.copystat shutil.copytree shutil.rmtree shutil.move"
).split()})
AUDIT_RULES.update({e: LIST for e in ("os.listdir", "os.scandir", "glob.glob")})  # import machinery lists dirs
AUDIT_RULES.update({"open": OPEN, "import": IMPORT, "sys._getframe": FRAME, "object.__getattr__": FRAME})
FRAME_EVENT_ATTRS = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame"})
INTROSPECTION_FILES = ("inspect.py", "traceback.py")

TRUSTED: set = set()  # code objects of worker functions whose own audit events are allowed


def trusted(fn):
    """Mark a worker function whose *direct* privileged calls (fork, chdir, ...) the audit hook allows."""
    TRUSTED.add(fn.__code__)
    return fn


# ---------------------------------------------------------------------------------------------- wire


def pack(obj) -> bytes:
    body = pickle.dumps(obj, protocol=5)
    return HEADER.pack(len(body)) + body


def recv_exact(sock, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise EOFError("channel closed")
        got += k
    return bytes(buf)


def recv_msg(sock):
    """Read one message and any file descriptors sent with it (SCM_RIGHTS)."""
    fds = array.array("i")
    data, anc, _flags, _addr = sock.recvmsg(HEADER.size, _socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
    if not data:
        raise EOFError("channel closed")
    for level, kind, payload in anc:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    if len(data) < HEADER.size:
        data += recv_exact(sock, HEADER.size - len(data))
    (n,) = HEADER.unpack(data)
    return pickle.loads(recv_exact(sock, n)), list(fds)


# ------------------------------------------------------------------------------------- plain values


def to_plain(x, max_chars: int = 100_000, _depth: int = 0, _count: list | None = None):
    """Copy `x` into builtin types only (what the parent's restricted unpickler accepts).

    Strings are cut at ``max_chars``; numpy values become Python values; anything else becomes ``str(x)``.
    """
    count = _count if _count is not None else [0]
    count[0] += 1
    try:
        t = type(x)
        if x is None or t in (bool, int, float, complex):
            return x
        if _is_numpy(x):
            return to_plain(x.tolist(), max_chars, _depth + 1, count)
        if isinstance(x, int):  # subclasses (IntEnum, ...) become exact builtins
            return int.__add__(x, 0)
        if isinstance(x, float):
            return float.__add__(x, 0.0)
        if isinstance(x, complex):
            return complex.__add__(x, 0j)
        if isinstance(x, str):
            s = str.__getitem__(x, slice(0, max_chars))
            return s if len(x) <= max_chars else s + f"... [truncated {len(x) - max_chars} characters]"
        if isinstance(x, (bytes, bytearray)):
            b = bytes(x[:max_chars])
            return b
        if _depth < 20 and count[0] < 10_000:
            if isinstance(x, dict):
                return {to_plain(k, max_chars, _depth + 1, count): to_plain(v, max_chars, _depth + 1, count)
                        for k, v in list(x.items())[:10_000]}
            for base in (list, tuple, set, frozenset):
                if isinstance(x, base):
                    return base(to_plain(v, max_chars, _depth + 1, count) for v in list(x)[:10_000])
        s = str(x)
        return str.__getitem__(s, slice(0, max_chars)) if isinstance(s, str) else "<unprintable>"
    except BaseException:  # hostile __str__/__iter__, or a value too big to print
        try:
            return f"<unprintable {type(x).__name__}>"
        except BaseException:
            return "<unprintable>"


def _is_numpy(x) -> bool:
    np = sys.modules.get("numpy")
    return np is not None and isinstance(x, (np.ndarray, np.generic))


# ----------------------------------------------------------------------------------------- guards


class _Forbidden(Exception):
    def __init__(self, msg: str, lineno: int):
        super().__init__(msg)
        self.lineno = lineno


def forbidden_attr(name: str) -> bool:
    if name in FORBIDDEN_ATTRS:
        return True
    return name.startswith("__") and name.endswith("__") and name not in ALLOWED_DUNDERS


def check_code(tree: ast.AST) -> None:
    """Static layer: refuse dunder/introspection attributes, dunder names and relative imports."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and forbidden_attr(node.attr):
            raise _Forbidden(f"access to attribute '{node.attr}' is not allowed in the sandbox", node.lineno)
        if isinstance(node, ast.Name) and node.id.startswith("__") and node.id not in ALLOWED_DUNDERS:
            raise _Forbidden(f"name '{node.id}' is not allowed in the sandbox", node.lineno)
        if isinstance(node, ast.ImportFrom) and node.level:
            raise _Forbidden("relative imports are not allowed in the sandbox", node.lineno)


def make_builtins(allowed: frozenset) -> dict:
    """The sandboxed code's builtins: no eval/exec/..., guarded import and attribute functions."""
    real_import, real_getattr = builtins.__import__, builtins.getattr
    real_hasattr, real_setattr, real_delattr = builtins.hasattr, builtins.setattr, builtins.delattr

    def _check(name):
        if isinstance(name, str) and forbidden_attr(name):
            raise PermissionError(f"access to attribute '{name}' is not allowed in the sandbox")

    def __import__(name, globals=None, locals=None, fromlist=(), level=0):  # noqa: A001
        if level:
            raise ImportError("relative imports are not allowed in the sandbox")
        top = name.partition(".")[0]
        bad = top not in allowed or name.startswith(DENIED_SUBMODULES)
        bad = bad or any(not isinstance(f, str) or f.startswith("_") for f in fromlist or ())
        if bad:
            raise ImportError(
                f"import of '{name}' is not allowed in the sandbox; allowed modules: {', '.join(sorted(allowed))}."
                " The tools (such as search) are already defined as functions here: call them without importing"
            )
        return real_import(name, globals, locals, fromlist, 0)

    def getattr(obj, name, *default):  # noqa: A001
        _check(name)
        return real_getattr(obj, name, *default)

    def hasattr(obj, name):  # noqa: A001
        _check(name)
        return real_hasattr(obj, name)

    def setattr(obj, name, value):  # noqa: A001
        _check(name)
        return real_setattr(obj, name, value)

    def delattr(obj, name):  # noqa: A001
        _check(name)
        return real_delattr(obj, name)

    b = {k: v for k, v in vars(builtins).items() if k not in REMOVED_BUILTINS}
    b.update(__import__=__import__, getattr=getattr, hasattr=hasattr, setattr=setattr, delattr=delattr)
    return b


def install_audit_hook(base: str, read_roots: list[str]) -> None:
    """Second layer: refuse dangerous operations whatever path the sandboxed code used to reach them.

    Files may be written only under `base` (this sandbox's directory) and read there or under
    `read_roots`. Everything the hook relies on is captured here, immutable, at install time: code that
    reaches the worker's module (e.g. through a leaked ``sys``) cannot change the rules afterwards.
    """
    import posix
    import stat

    rules, trusted_codes, busy = dict(AUDIT_RULES), frozenset(TRUSTED), set()
    getframe, get_ident, main_ident, hard = sys._getframe, _thread.get_ident, _thread.get_ident(), HARD_DENIED_IMPORTS
    lstat, readlink, getcwd, is_link = posix.lstat, posix.readlink, posix.getcwd, stat.S_ISLNK
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    base = base.rstrip("/") + "/"
    read_roots = tuple(r.rstrip("/") + "/" for r in read_roots)
    user_file, introspection, frame_attrs, af_unix = USER_FILE, INTROSPECTION_FILES, FRAME_EVENT_ATTRS, _socket.AF_UNIX

    def resolve(path) -> str | None:
        """Absolute path with symlinks resolved, or None for anything but a plain str/bytes path."""
        if type(path) is bytes:
            path = path.decode("utf-8", "surrogateescape")
        if type(path) is not str:
            return None
        if not path.startswith("/"):
            path = getcwd() + "/" + path
        parts, todo, links = [], path.split("/")[::-1], 0
        while todo:
            part = todo.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if parts:
                    parts.pop()
                continue
            parts.append(part)
            try:
                if not is_link(lstat("/" + "/".join(parts)).st_mode):
                    continue
                target = readlink("/" + "/".join(parts))
            except OSError:
                continue
            links += 1
            if links > 40:
                return None
            parts.pop()
            if target.startswith("/"):
                parts = []
            todo.extend(target.split("/")[::-1])
        return "/" + "/".join(parts) + "/"

    def inside(path, roots) -> bool:
        p = resolve(path)
        return p is not None and p.startswith(roots)

    def is_trusted(code) -> bool:
        """Direct call from a worker function, in the main thread, with no sandboxed code on the stack."""
        if code not in trusted_codes or get_ident() != main_ident:
            return False
        f = getframe(2)
        while f is not None:
            if f.f_code.co_filename == user_file:
                return False
            f = f.f_back
        return True

    def hook(event, args):
        rule = rules.get(event)
        if rule is None:
            return
        tid = get_ident()
        if tid in busy:  # the sys._getframe events of our own calls below
            return
        busy.add(tid)
        try:
            code = getframe(1).f_code
            if event != "import" and is_trusted(code):
                return
            if rule == FRAME:
                if event == "object.__getattr__" and args[1] not in frame_attrs:
                    return
                depth = 2  # look through inspect/traceback helpers to the code that asked for a frame
                try:
                    while code.co_filename.endswith(introspection):
                        code, depth = getframe(depth).f_code, depth + 1
                except ValueError:
                    pass
        finally:
            busy.discard(tid)
        if rule == FRAME:
            if code.co_filename == user_file:
                raise PermissionError("access to stack frames is not allowed in the sandbox")
            return
        if event == "socket.__new__" and args[1] in (-1, af_unix):
            return  # wrapping an existing descriptor, or a local socketpair; connect/bind/send are refused
        if rule == DENY:
            raise PermissionError(f"'{event}' is not allowed in the sandbox")
        if rule == IMPORT:
            if type(args[0]) is not str or args[0].partition(".")[0] in hard:
                raise ImportError(f"import of '{args[0]}' is not allowed in the sandbox")
            return
        if rule == OPEN:
            path, mode, flags = args
            if mode is not None and type(mode) is not str:
                raise PermissionError("invalid open() mode in the sandbox")
            writing = any(c in (mode or "") for c in "wax+") or bool((flags or 0) & write_flags)
            if inside(path, base) or (not writing and inside(path, read_roots)):
                return
            raise PermissionError(f"access to '{path}' is not allowed in the sandbox (only the working directory)")
        if rule == LIST:
            path = getcwd() if not args or args[0] is None else args[0]
            if inside(path, (base, *read_roots)):
                return
            raise PermissionError(f"'{event}' of '{path}' is not allowed in the sandbox")
        if rule == PATH:
            paths = [a for a in args if a is not None and not isinstance(a, (int, float, bool, tuple))]
            if args and type(args[0]) is int:
                raise PermissionError(f"'{event}' on a file descriptor is not allowed in the sandbox")
            if not paths or not all(inside(p, base) for p in paths):
                raise PermissionError(f"'{event}' outside the working directory is not allowed in the sandbox")

    sys.addaudithook(hook)


# ------------------------------------------------------------------------------------------ worker


class _FinalAnswer(BaseException):
    pass


class CappedWriter(io.TextIOBase):
    """stdout/stderr replacement keeping the first `limit` characters and counting the rest."""

    def __init__(self, limit: int):
        self.limit = limit
        self.reset()

    def reset(self) -> None:
        self.parts: list[str] = []
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, s) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        if self.size < self.limit:
            self.parts.append(str.__getitem__(s, slice(0, self.limit - self.size)))
        self.size += len(s)
        return len(s)

    def getvalue(self) -> str:
        out = "".join(self.parts)
        if self.size > self.limit:
            out += f"\n[... output truncated: {self.size - self.limit} more characters not shown]"
        return out


class Worker:
    """One sandboxed interpreter state, served over a socket."""

    def __init__(self, sock, cfg: dict):
        self.sock, self.cfg = sock, cfg
        self.workdir = os.getcwd()
        self.out = CappedWriter(cfg["max_output_chars"])
        sys.stdout = sys.stderr = self.out
        self.final, self.called = None, False
        self.globals: dict = {"__name__": "__main__", "__builtins__": make_builtins(frozenset(cfg["allowed"]))}
        for name in cfg["tools"]:
            self.globals[name] = self._make_tool(name)
        self.globals["final_answer"] = self._make_final_answer()

    def send(self, obj) -> None:
        self.sock.sendall(pack(obj))

    def _make_final_answer(self):
        worker = self

        def final_answer(answer=None):
            """End this step and report `answer`."""
            worker.final, worker.called = answer, True
            raise _FinalAnswer()

        return final_answer

    def _make_tool(self, name: str):
        worker = self

        def tool(*args, **kwargs):
            mc = worker.cfg["max_answer_chars"]
            worker.send(("tool", name, to_plain(list(args), mc), to_plain(kwargs, mc)))
            msg, _ = recv_msg(worker.sock)
            if msg[0] != "tool_result":
                raise RuntimeError("sandbox protocol error")
            if not msg[1]:
                raise RuntimeError(f"tool '{name}' failed: {msg[2]}")
            return msg[2]

        tool.__name__ = tool.__qualname__ = name
        return tool

    def loop(self) -> None:
        while True:
            try:
                msg, fds = recv_msg(self.sock)
            except (EOFError, OSError):
                os._exit(0)
            if msg[0] == "run":
                self.send(("result", self.execute(msg[1], msg[2])))
            elif msg[0] == "fork":
                self.fork(fds)
            elif msg[0] == "exit":
                os._exit(0)

    def execute(self, code: str, timeout_s: float) -> dict:
        t0 = time.perf_counter()
        self.final, self.called = None, False
        self.out.reset()
        sys.stdout = sys.stderr = self.out
        error = None
        try:
            tree = ast.parse(code, USER_FILE, "exec")
            check_code(tree)
            exec(compile(tree, USER_FILE, "exec"), self.globals)
        except _FinalAnswer:
            pass
        except BaseException as e:  # noqa: BLE001 - everything the code raises becomes an observation
            error = format_error(e, code)
        _restore_handlers()
        mc = self.cfg["max_answer_chars"]
        answer = to_plain(self.final, mc) if self.called else None
        result = {"stdout": self.out.getvalue(), "error": error, "final_answer": answer,
                  "called_final_answer": self.called, "duration_s": time.perf_counter() - t0}
        if len(pickle.dumps(answer, protocol=5)) > MAX_MESSAGE // 4:
            result["final_answer"] = "<final answer too large to return>"
        return result

    @trusted
    def fork(self, fds: list[int], received: tuple[int, ...] = ()) -> None:
        """Fork one copy of this state per socket, as a binary tree so that forks run in parallel.

        Each copy closes the sockets that are not its own, forks the copies it is responsible for,
        then announces itself on its own socket and serves it (the candidates of ``run_candidates``).
        """
        received = received or tuple(fds)
        while fds:
            mine, rest = fds[0], fds[1:]
            theirs, fds = rest[: len(rest) // 2], rest[len(rest) // 2:]
            pid = os.fork()
            if pid == 0:
                try:
                    for fd in received:
                        if fd != mine and fd not in theirs:
                            try:
                                os.close(fd)
                            except OSError:
                                pass
                    self.fork(theirs, received)
                    self._become_copy(mine)
                    self.send(("ready", os.getpid()))
                    self.loop()
                finally:
                    os._exit(1)
            for fd in (mine, *theirs):
                os.close(fd)

    def _become_copy(self, fd: int) -> None:
        """In a forked candidate: own socket, own copy of the working directory."""
        self.sock.close()
        self.sock = _socket.socket(fileno=fd)
        new = os.path.join(os.path.dirname(self.workdir), f"cand{os.getpid()}")
        copy_tree(self.workdir, new)
        os.chdir(new)
        self.workdir = new


_HANDLERS = {}


def _restore_handlers() -> None:
    """Undo signal handlers and gc callbacks the code may have installed (they could fire later)."""
    for sig, handler in _HANDLERS.items():
        if signal.getsignal(sig) is not handler:
            signal.signal(sig, handler)
    gc.callbacks.clear()


def _refused(*args, **kwargs):
    raise PermissionError("ctypes is disabled in the sandbox")


def _disable_ctypes() -> None:
    """Calls of already-resolved ctypes functions raise no audit event: replace the entry points."""
    ctypes = sys.modules.get("ctypes")
    if ctypes is None:
        return
    for name in ("memmove", "memset", "cast", "string_at", "wstring_at", "CFUNCTYPE", "PYFUNCTYPE", "CDLL",
                 "PyDLL", "cdll", "pydll", "pythonapi", "LibraryLoader", "_CFuncPtr", "_FuncPtr", "_cast",
                 "_string_at", "_wstring_at", "_memmove_addr", "_memset_addr", "_cast_addr",
                 "_string_at_addr", "_wstring_at_addr", "_c_functype_cache"):
        if hasattr(ctypes, name):
            setattr(ctypes, name, _refused)


def copy_tree(src: str, dst: str) -> None:
    """Copy regular files and directories (never symlinks) from src to dst."""
    os.mkdir(dst, 0o700)
    for entry in os.scandir(src):
        s, d = os.path.join(src, entry.name), os.path.join(dst, entry.name)
        if entry.is_dir(follow_symlinks=False):
            copy_tree(s, d)
        elif entry.is_file(follow_symlinks=False):
            with open(s, "rb") as fi, open(d, "wb") as fo:
                while chunk := fi.read(1 << 20):
                    fo.write(chunk)


def format_error(e: BaseException, code: str) -> str:
    """Python-style traceback restricted to the sandboxed code's own frames."""
    lines = code.splitlines()
    if isinstance(e, SyntaxError) and not isinstance(e, _Forbidden) and e.filename == USER_FILE:
        return "".join(traceback.format_exception_only(type(e), e)).rstrip()
    frames = []
    if isinstance(e, _Forbidden):
        frames.append((e.lineno, "<module>"))
        tail = f"PermissionError: {e} (the code was not run)"
    else:
        tb = e.__traceback__
        while tb is not None:
            co = tb.tb_frame.f_code
            if co.co_filename == USER_FILE:
                frames.append((tb.tb_lineno, co.co_name))
            tb = tb.tb_next
        tail = "".join(traceback.format_exception_only(type(e), e)).strip()
    out = ["Traceback (most recent call last):"]
    if len(frames) > 4:
        out.append(f"  [... {len(frames) - 4} earlier frames not shown]")
        frames = frames[-4:]
    for lineno, name in frames:
        out.append(f'  File "{USER_FILE}", line {lineno}, in {name}')
        if 0 < lineno <= len(lines) and lines[lineno - 1].strip():
            out.append("    " + lines[lineno - 1].strip())
    out.append(tail)
    return "\n".join(out)


# -------------------------------------------------------------------------------------- processes


def worker_main(fd: int, cfg: dict, read_roots: list[str]) -> None:
    """Runs in a fresh fork of the zygote: lock down, then serve."""
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    sock = _socket.socket(fileno=fd)
    os.chdir(cfg["workdir"])
    mb = 2**20
    with open("/proc/self/status") as f:
        vm = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:")), 0)
    limits = {
        resource.RLIMIT_AS: vm + cfg["memory_mb"] * mb,
        resource.RLIMIT_FSIZE: cfg["file_size_mb"] * mb,
        resource.RLIMIT_NOFILE: cfg["max_open_files"],
        resource.RLIMIT_CORE: 0,
        resource.RLIMIT_CPU: cfg["cpu_s"],
    }
    if cfg.get("uid") is not None:
        limits[resource.RLIMIT_NPROC] = cfg["max_processes"]
    for which, value in limits.items():
        resource.setrlimit(which, (value, value))
    if cfg.get("uid") is not None:
        os.setgroups([])
        os.setgid(cfg["gid"])
        os.setuid(cfg["uid"])
    _no_new_privs()
    for sig in signal.valid_signals():
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            try:
                _HANDLERS[sig] = signal.getsignal(sig)
            except (OSError, ValueError):
                pass
    _disable_ctypes()
    install_audit_hook(os.path.dirname(cfg["workdir"]), read_roots)
    worker = Worker(sock, cfg)
    worker.send(("ready", os.getpid()))
    worker.loop()


_PRCTL = None


def _no_new_privs() -> None:
    if _PRCTL is not None:
        _PRCTL(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS


def _kill_session() -> None:
    """Kill every other process in the zygote's session (used when the parent went away)."""
    me, sid = os.getpid(), os.getsid(0)
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != me:
            try:
                if os.getsid(int(name)) == sid:
                    os.kill(int(name), signal.SIGKILL)
            except OSError:
                pass


def zygote_main(ctl_fd: int, preload: list[str]) -> None:
    global _PRCTL
    try:  # PR_SET_CHILD_SUBREAPER: orphaned sandbox processes are re-parented here and auto-reaped
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)
        _PRCTL = libc.prctl
    except (ImportError, OSError, AttributeError):
        pass
    for name in sorted(ALLOWED_IMPORTS) + preload:
        try:
            __import__(name)
        except ImportError:
            pass
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    gc.collect()
    gc.freeze()  # keep the preloaded heap out of GC passes: forks then share far more pages
    read_roots = sorted({os.path.realpath(p) for p in [sys.prefix, sys.base_prefix, sys.exec_prefix, *sys.path]
                         if p and os.path.isdir(p)})
    ctl = _socket.socket(fileno=ctl_fd)
    ctl.sendall(pack(("ready", os.getpid())))
    while True:
        try:
            msg, fds = recv_msg(ctl)
        except (EOFError, OSError):
            break
        if msg[0] != "spawn":
            continue
        pid = os.fork()
        if pid == 0:
            try:
                ctl.close()
                worker_main(fds[0], msg[1], read_roots)
            finally:
                os._exit(1)
        try:
            os.setpgid(pid, pid)
        except OSError:
            pass
        os.close(fds[0])
        ctl.sendall(pack(("spawned", pid)))
    _kill_session()
    os._exit(0)


if __name__ == "__main__":
    zygote_main(int(sys.argv[1]), [m for m in sys.argv[2].split(",") if m] if len(sys.argv) > 2 else [])
