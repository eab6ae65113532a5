"""Child side of `agentlib.sandbox`: a zygote process that forks warm, locked-down workers.

Started as ``python -I _sandbox_worker.py CTL_FD PRELOAD``; the standard library only (plus the preloaded
packages), so it never imports agentlib. The zygote imports numpy/sympy once, becomes a child subreaper,
checks once whether kernel isolation works here (`probe_kernel`), and then, per request, either

* builds a kernel box (`spawn_box`): new user, mount, PID, network, IPC and UTS namespaces, the
  sandbox's cgroups, a read-only root of the interpreter and libraries with a size-capped tmpfs at /tmp
  (`build_root`), a pid 1 (`box_init`) that stops and continues the box on the parent's command, and
  the worker as pid 2, without capabilities; or
* forks a plain worker (process isolation).

Either way the worker locks itself down (rlimits, an audit hook, an import allow-list, an AST check, a
trimmed builtins; as root in process isolation, an unprivileged uid) and runs code sent over its
socket, keeping its globals between runs. For ``run_candidates`` it makes copies of itself, each with
its own socket and file state (in a box: its own namespaces too, see `Worker._clone_copies`).

Messages are length-prefixed pickles. The parent loads what a worker sends with an unpickler that
refuses every class, checks and bounds it again (`to_plain`), and learns a process's pid from the kernel.
"""

from __future__ import annotations

import _socket
import _thread
import array
import ast
import builtins
import errno
import fcntl
import gc
import io
import os
import pickle
import resource
import signal
import stat
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
# Imported by the interpreter itself on behalf of allowed code (``datetime.strptime``, ``str.encode('idna')``):
# preloaded in the zygote and let through the import guard.
INTERNAL_IMPORTS = frozenset({"_strptime", "encodings.idna", "encodings.punycode", "stringprep"})
# Codecs the zygote imports once (``str.encode`` imports them lazily; a worker that runs as nobody may not
# be able to read the standard library, e.g. under /root, in process isolation).
PRELOAD_CODECS = tuple(
    "encodings." + c
    for c in (
        "ascii latin_1 utf_8_sig utf_16 utf_16_le utf_16_be utf_32 utf_32_le utf_32_be utf_7 cp1252 cp1251 cp437"
        " cp850 iso8859_2 iso8859_15 koi8_r mac_roman charmap unicode_escape raw_unicode_escape punycode idna"
        " base64_codec hex_codec rot_13 quopri_codec uu_codec zlib_codec bz2_codec shift_jis euc_jp gbk gb2312"
        " gb18030 big5 euc_kr"
    ).split()
)
DENIED_SUBMODULES = (
    "numpy.ctypeslib",
    "numpy.distutils",
    "numpy.f2py",
    "numpy.testing",
    "sympy.utilities.autowrap",
)
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
AUDIT_RULES.update(
    {
        e: PATH
        for e in (
            "os.chdir os.mkdir os.remove os.rmdir os.rename os.truncate os.utime shutil.copyfile shutil.copymode"
            " shutil.copystat shutil.copytree shutil.rmtree shutil.move"
        ).split()
    }
)
AUDIT_RULES.update(
    {e: LIST for e in ("os.listdir", "os.scandir", "glob.glob")}
)  # import machinery lists dirs
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


BIG_INT_BITS = 13_000  # about 3,900 digits: below Python's 4,300-digit limit on str(int)
MAX_INT_DIGITS = 20_000  # larger integers are described, not converted (conversion is quadratic)
MAX_NODES = 10_000  # values (containers and scalars) per bounded structure


def int_text(n: int) -> str:
    """Decimal text of `n` without Python's limit on ``str(int)`` (divide and conquer, for <= 20,000 digits)."""
    if n < 0:
        return "-" + int_text(-n)
    if n.bit_length() <= BIG_INT_BITS:
        return int.__repr__(n)
    k = n.bit_length() * 3 // 20  # about half of its decimal digits
    hi, lo = divmod(n, 10**k)
    return int_text(hi) + int_text(lo).zfill(k)


def to_plain(x, max_chars: int = 100_000, _depth: int = 0, _budget: list | None = None):
    """Copy `x` into bounded builtin data (what the parent's restricted unpickler accepts; the parent
    applies it again to whatever a worker sends).

    Strings are cut at ``max_chars`` and all strings together share a budget of 4 x ``max_chars``;
    structures hold at most `MAX_NODES` values (shared references count each time, so a DAG cannot
    expand); integers beyond ~3,900 digits become their decimal text (``str(int)`` raises beyond 4,300),
    beyond 20,000 digits a description; numpy values become Python values; anything else ``str(x)``.
    ``str()`` of the result never raises and is at most a few times ``max_chars`` long.
    """
    budget = _budget if _budget is not None else [MAX_NODES, 4 * max_chars]
    budget[0] -= 1
    try:
        t = type(x)
        if x is None or t in (bool, float, complex):
            return x
        if t is int or (isinstance(x, int) and t is not bool):
            n = int.__add__(x, 0)  # subclasses (IntEnum, ...) become exact builtins
            if n.bit_length() <= BIG_INT_BITS:
                return n
            digits = int(n.bit_length() * 0.30103) + 1
            if digits > min(MAX_INT_DIGITS, max(budget[1], 0)):
                return f"<integer of about {digits} digits>"
            return _cut(int_text(n), max_chars, budget)
        if _is_numpy(x):
            return to_plain(x.tolist(), max_chars, _depth + 1, budget)
        if isinstance(x, float):
            return float.__add__(x, 0.0)
        if isinstance(x, complex):
            return complex.__add__(x, 0j)
        if isinstance(x, str):
            return _cut(str.__str__(x), max_chars, budget)
        if isinstance(x, (bytes, bytearray)):
            n = max(0, min(max_chars, budget[1]))
            budget[1] -= n
            return bytes(x[:n])
        if _depth < 20 and budget[0] > 0:
            if isinstance(x, dict):
                out = {}
                for k, v in list(dict.items(x))[:MAX_NODES]:
                    if budget[0] <= 0:
                        break
                    k = to_plain(k, max_chars, _depth + 1, budget)
                    try:
                        out[k] = to_plain(v, max_chars, _depth + 1, budget)
                    except TypeError:  # an unhashable key after all
                        out[str(k)] = None
                return out
            for base in (list, tuple, set, frozenset):
                if isinstance(x, base):
                    items = []
                    for v in list(base.__iter__(x))[:MAX_NODES]:
                        if budget[0] <= 0:
                            items.append("...")
                            break
                        items.append(to_plain(v, max_chars, _depth + 1, budget))
                    return base(items)
        if t in (list, tuple, set, frozenset, dict):
            return "..."
        s = str(x)
        return _cut(s, max_chars, budget) if isinstance(s, str) else "<unprintable>"
    except BaseException:  # hostile __str__/__iter__, or a value too big to print
        try:
            return f"<unprintable {type(x).__name__}>"
        except BaseException:
            return "<unprintable>"


def _cut(s: str, max_chars: int, budget: list) -> str:
    n = max(0, min(max_chars, budget[1]))
    budget[1] -= min(len(s), n)
    if len(s) <= n:
        return str.__str__(s)
    return str.__getitem__(s, slice(0, n)) + f"... [truncated {len(s) - n} characters]"


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
        bad = (top not in allowed and name not in INTERNAL_IMPORTS) or name.startswith(DENIED_SUBMODULES)
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
    getframe, get_ident, main_ident, hard = (
        sys._getframe,
        _thread.get_ident,
        _thread.get_ident(),
        HARD_DENIED_IMPORTS,
    )
    lstat, readlink, getcwd, is_link = posix.lstat, posix.readlink, posix.getcwd, stat.S_ISLNK
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    base = base.rstrip("/") + "/"
    read_roots = tuple(r.rstrip("/") + "/" for r in read_roots)
    user_file, introspection, frame_attrs, af_unix = (
        USER_FILE,
        INTROSPECTION_FILES,
        FRAME_EVENT_ATTRS,
        _socket.AF_UNIX,
    )

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
            raise PermissionError(
                f"access to '{path}' is not allowed in the sandbox (only the working directory)"
            )
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
                raise PermissionError(
                    f"'{event}' outside the working directory is not allowed in the sandbox"
                )

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


LAST = "_last_output_"  # where the value of a final expression statement is kept for one run


def _short_str(value, max_chars: int) -> str:
    """``str(value)`` cut at ``max_chars``; never raises (huge integers, a failing ``__str__``)."""
    try:
        text = str(value)
    except Exception as e:  # noqa: BLE001 - e.g. ValueError for an int over 4,300 digits
        text = f"<{type(value).__name__} that cannot be printed: {type(e).__name__}>"
    return text if len(text) <= max_chars else text[:max_chars] + "..."


class Worker:
    """One sandboxed interpreter state, served over a socket."""

    def __init__(self, sock, cfg: dict, box: bool = False):
        self.sock, self.cfg, self.box = sock, cfg, box
        self.broken: str | None = None  # why this copy cannot run code (set up failed)
        self.workdir = os.getcwd()
        self.out = CappedWriter(cfg["max_output_chars"])
        sys.stdout = sys.stderr = self.out
        self.final, self.called = None, False
        self.globals: dict = {
            "__name__": "__main__",
            "__builtins__": make_builtins(frozenset(cfg["allowed"])),
        }
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
            _reap_children()
            if msg[0] == "run":
                self.send(
                    (
                        "result",
                        dict(self.execute(msg[1], msg[2]), broken=True)
                        if self.broken
                        else self.execute(msg[1], msg[2]),
                    )
                )
                if self.broken:  # a candidate without its copy: gone, so that a commit of it restarts
                    os._exit(0)
            elif msg[0] == "fork":
                self.fork(fds)
            elif msg[0] == "retire":
                self.retire()
            elif msg[0] == "exit":
                os._exit(0)

    def execute(self, code: str, timeout_s: float) -> dict:
        t0 = time.perf_counter()
        self.final, self.called = None, False
        self.out.reset()
        sys.stdout = sys.stderr = self.out
        error, value = None, None
        try:
            if self.broken:
                raise _Broken(self.broken)
            tree = ast.parse(code, USER_FILE, "exec")
            check_code(tree)
            last = tree.body[-1] if tree.body else None
            if isinstance(last, ast.Expr):  # smolagents' "last output": the value of a final expression
                tree.body[-1] = ast.Assign(targets=[ast.Name(LAST, ast.Store())], value=last.value)
                ast.fix_missing_locations(ast.copy_location(tree.body[-1], last))
            self.globals.pop(LAST, None)
            exec(compile(tree, USER_FILE, "exec"), self.globals)
            if isinstance(last, ast.Expr):
                value = self.globals.pop(LAST, None)
            elif isinstance(last, (ast.Assign, ast.AnnAssign, ast.AugAssign)):  # ... or of a final assignment
                target = last.targets[0] if isinstance(last, ast.Assign) else last.target
                value = self.globals.get(target.id) if isinstance(target, ast.Name) else None
        except _FinalAnswer:
            pass
        except _Broken as e:
            error = f"SandboxError: {e}"
        except BaseException as e:  # noqa: BLE001 - everything the code raises becomes an observation
            error = format_error(e, code)
        _restore_handlers()
        mc = self.cfg["max_answer_chars"]
        answer = to_plain(self.final, mc) if self.called else None
        result = {
            "stdout": self.out.getvalue(),
            "error": error,
            "final_answer": answer,
            "called_final_answer": self.called,
            "duration_s": time.perf_counter() - t0,
            "last_output": None if error or self.called or value is None else _short_str(value, mc),
        }
        if len(pickle.dumps(answer, protocol=5)) > MAX_MESSAGE // 4:
            result["final_answer"] = "<final answer too large to return>"
        return result

    @trusted
    def retire(self) -> None:
        """A replaced template that is pid 1 of a PID namespace holding the committed candidate (its
        descendant) must not exit: the kernel would kill the namespace, the new state with it. It becomes
        an idle init instead -- ``sleep`` exec'd in place, which drops this interpreter and its threads."""
        self.sock.close()
        for path in ("/usr/bin/sleep", "/bin/sleep"):
            try:
                os.execv(path, ["sleep", "infinity"])
            except OSError:
                pass
        while True:  # no sleep binary: idle in Python
            time.sleep(3600)

    @trusted
    def fork(self, fds: list[int], received: tuple[int, ...] = ()) -> None:
        """Fork one copy of this state per socket, as a binary tree so that forks run in parallel.

        Each copy closes the sockets that are not its own, forks the copies it is responsible for,
        then becomes a candidate (`_become_copy`), greets on its own socket and serves it.
        """
        if self.box and not received and KERNEL.clone_ok and self.cfg.get("clone3", True):
            fds = self._clone_copies(fds)  # the rest (if cloning failed) as below
        received = received or tuple(fds)
        while fds:
            mine, rest = fds[0], fds[1:]
            theirs, fds = rest[: len(rest) // 2], rest[len(rest) // 2 :]
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
                    self.send(("ready",))
                    self.loop()
                finally:
                    os._exit(1)
            for fd in (mine, *theirs):
                os.close(fd)

    @trusted
    def _clone_copies(self, fds: list[int]) -> list[int]:
        """Kernel box: clone(2) each candidate straight into new user, mount and PID namespaces (one
        copy of the page tables per candidate, as a fork; a fork followed by unshare would need a
        second fork to enter the PID namespace). Returns the sockets left if cloning stopped working
        (say, past the kernel's 32 nested namespaces): those take the fork path.

        The copies are made in parallel: a plain forked helper (a process of the box, not of any
        candidate's namespaces, so the candidates it clones are siblings of ours) takes half of them."""
        if len(fds) >= 4 and self.cfg.get("cores", 1) > 1:
            half = len(fds) // 2
            pid = os.fork()
            if pid == 0:
                try:
                    for fd in fds[:half]:
                        os.close(fd)
                    self._clone_copies(fds[half:])  # (what it cannot clone, its candidates report)
                finally:
                    os._exit(0)
            for fd in fds[half:]:
                os.close(fd)
            fds = fds[:half]
        k = KERNEL
        old = os.open("/tmp", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            empty = _only_empty_workdir(old)
            k.prctl(PR_SET_DUMPABLE, 1)  # the copy writes its own /proc/self/uid_map
            k.raise_setfcap()
            for i, mine in enumerate(fds):
                try:
                    pid = k.clone(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID)
                except OSError as e:
                    if e.errno in (errno.ENOSYS, errno.EPERM):  # (Docker's seccomp profile refuses clone3)
                        k.clone_ok = False
                    return fds[i:]
                if pid == 0:
                    try:
                        for fd in fds[i + 1 :]:  # (the earlier ones are closed already)
                            os.close(fd)
                        self._become_clone(mine, old, empty)
                        self.send(("ready",))
                        self.loop()
                    finally:
                        os._exit(1)
                os.close(mine)
            return []
        finally:
            os.close(old)
            k.prctl(PR_SET_DUMPABLE, 0)
            k.drop_privileges()

    @trusted
    def _become_clone(self, fd: int, old: int, empty: bool) -> None:
        """In a cloned candidate (pid 1 of its namespaces): its own socket, /tmp, /proc; no privileges."""
        self.sock.close()
        self.sock = _socket.socket(fileno=fd)
        fds = _open_fds({0, 1, 2, fd, old})
        try:
            _write("/proc/self/setgroups", "deny")
            _write("/proc/self/uid_map", "0 0 1")
            _write("/proc/self/gid_map", "0 0 1")
            self._private_tmp(old, empty)
            _reopen_fds(fds, "/tmp", "/tmp")
            os.chdir(self.workdir)
            KERNEL.mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except BaseException as e:  # noqa: BLE001 - this candidate reports it on every run
            self.broken = f"the candidate's copy of the sandbox could not be made ({type(e).__name__}: {e})"
            _reopen_fds(fds, None, None)
        finally:
            os.close(old)
            KERNEL.drop_privileges()
            KERNEL.prctl(PR_SET_DUMPABLE, 0)

    @trusted
    def _private_tmp(self, old: int, empty: bool) -> None:
        """A tmpfs of this candidate's own over /tmp, holding its copy of the sandbox's /tmp (`old`, a
        descriptor shared with the sandbox: its directory offset is too, so it is reopened here).

        Copy-on-write where the kernel allows: an overlay whose lower layer is the sandbox's /tmp as this
        mount namespace holds it (overlayfs takes no layer from another namespace), the upper layer on
        the new tmpfs, mounted first at /tmp/work (in this namespace only). Otherwise a bounded copy."""
        k = KERNEL
        opts = f"size={self.cfg['disk_mb']}m,nr_inodes={self.cfg['max_files']},mode=1777"
        flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
        if empty:  # nothing to copy (the usual case): a fresh tmpfs is the copy
            k.mount("tmpfs", "/tmp", "tmpfs", flags, opts)
            os.mkdir(BOX_WORKDIR, 0o700)
            return
        own = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=old)
        try:
            try:
                k.mount("tmpfs", BOX_WORKDIR, "tmpfs", flags, opts)
                try:
                    os.mkdir(BOX_WORKDIR + "/.upper", 0o755)
                    os.mkdir(BOX_WORKDIR + "/.work", 0o700)
                    k.mount(
                        "overlay",
                        "/tmp",
                        "overlay",
                        flags,
                        f"lowerdir=/tmp,upperdir={BOX_WORKDIR}/.upper,workdir={BOX_WORKDIR}/.work",
                    )
                except OSError:
                    k.umount(BOX_WORKDIR, MNT_DETACH)
                    raise
            except OSError:  # overlays stack two deep at most (a candidate of a committed candidate...)
                k.mount("tmpfs", "/tmp", "tmpfs", flags, opts)
                copy_tree(own, "/tmp", self.cfg["copy_mb"] * 2**20)
        finally:
            os.close(own)

    @trusted
    def _become_copy(self, fd: int) -> None:
        """In a forked candidate: its own socket and its own copy of the file state.

        In a kernel box the candidate gets namespaces of its own (user, mount, PID): a copy-on-write
        overlay of /tmp (or a bounded copy where overlays do not stack), its own /proc, and pid 1 of a
        PID namespace, so it can neither see nor signal the sandbox's worker or the other candidates.
        Either way, descriptors that could share state with the sandbox (files, pipes, sockets opened
        by earlier code) are reopened on the copy or pointed at /dev/null.
        """
        self.sock.close()
        self.sock = _socket.socket(fileno=fd)
        keep = {0, 1, 2, fd}
        fds = _open_fds(keep)
        try:
            if self.box:
                self._become_box_copy(fds)
            else:
                new = os.path.join(os.path.dirname(self.workdir), f"cand{os.getpid()}")
                copy_tree(self.workdir, new, self.cfg["copy_mb"] * 2**20)
                _reopen_fds(fds, self.workdir, new)
                os.chdir(new)
                self.workdir = new
        except BaseException as e:  # noqa: BLE001 - this candidate reports it on every run
            self.broken = f"the candidate's copy of the sandbox could not be made ({type(e).__name__}: {e})"
            _reopen_fds(fds, None, None)

    @trusted
    def _become_box_copy(self, fds: dict) -> None:
        k = KERNEL
        old = os.open("/tmp", os.O_RDONLY | os.O_DIRECTORY)
        try:
            k.prctl(PR_SET_DUMPABLE, 1)  # its own /proc/self/uid_map must be writable by itself
            k.raise_setfcap()
            empty = _only_empty_workdir(old)
            enter_user_namespace(CLONE_NEWNS | CLONE_NEWPID, 0, 0, 0, 0)  # (the box's mounts are private)
            self._private_tmp(old, empty)
            _reopen_fds(fds, "/tmp", "/tmp")
        finally:
            os.close(old)
        os.chdir(self.workdir)
        if os.fork() != 0:  # the copy continues as pid 1 of its own PID namespace
            os._exit(0)
        k.mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        k.drop_privileges()
        k.prctl(PR_SET_DUMPABLE, 0)


@trusted
def _only_empty_workdir(tmp: int) -> bool:
    """Whether the /tmp behind descriptor `tmp` holds nothing but an empty work dir."""
    names = os.listdir(tmp)
    if names != [os.path.basename(BOX_WORKDIR)]:
        return False
    fd = os.open(names[0], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=tmp)
    try:
        return not os.listdir(fd)
    finally:
        os.close(fd)


class _Broken(Exception):
    pass


@trusted
def _reap_children() -> None:
    """Collect exited children (the intermediates of forked candidates, or processes the code started)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


@trusted
def _open_fds(keep: set) -> dict:
    """The open descriptors beyond `keep`: {fd: (path, flags, offset)} for regular files, else None."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd in keep:
            continue
        try:
            st = os.fstat(fd)
        except OSError:
            continue  # the listing's own descriptor
        info = None
        if stat.S_ISREG(st.st_mode):
            try:
                info = (
                    os.readlink(f"/proc/self/fd/{fd}"),
                    fcntl.fcntl(fd, fcntl.F_GETFL),
                    os.lseek(fd, 0, os.SEEK_CUR),
                )
            except OSError:
                pass
        out[fd] = info
    return out


@trusted
def _reopen_fds(fds: dict, old: str | None, new: str | None) -> None:
    """Point every descriptor in `fds` at this copy: files under `old` are reopened under `new` (same flags
    and offset), everything else (pipes, sockets, files elsewhere) at /dev/null."""
    for fd, info in fds.items():
        target = -1
        if info is not None and old is not None and info[0].startswith(old.rstrip("/") + "/"):
            path = new.rstrip("/") + info[0][len(old.rstrip("/")) :]
            flags = info[1] & ~(os.O_CREAT | os.O_TRUNC | os.O_EXCL)
            try:
                target = os.open(path, flags & (os.O_ACCMODE | os.O_APPEND))
                os.lseek(target, info[2], os.SEEK_SET)
            except OSError:
                target = -1
        if target < 0:
            target = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(target, fd)
        finally:
            os.close(target)


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
    for name in (
        "memmove",
        "memset",
        "cast",
        "string_at",
        "wstring_at",
        "CFUNCTYPE",
        "PYFUNCTYPE",
        "CDLL",
        "PyDLL",
        "cdll",
        "pydll",
        "pythonapi",
        "LibraryLoader",
        "_CFuncPtr",
        "_FuncPtr",
        "_cast",
        "_string_at",
        "_wstring_at",
        "_memmove_addr",
        "_memset_addr",
        "_cast_addr",
        "_string_at_addr",
        "_wstring_at_addr",
        "_c_functype_cache",
    ):
        if hasattr(ctypes, name):
            setattr(ctypes, name, _refused)


def _disable_fork_exec() -> None:
    """In process isolation: ``_posixsubprocess.fork_exec`` starts processes without the audit events of
    subprocess/os, so it is replaced. In a kernel box it is left as it is: what a process started there
    can reach is the kernel's business, and the tests use it to attack that layer."""
    mod = sys.modules.get("_posixsubprocess")
    if mod is not None:
        mod.fork_exec = _refused


@trusted
def copy_tree(src, dst: str, max_bytes: int, _used: list | None = None) -> None:
    """Copy regular files and directories (never symlinks) from `src` (a path or a directory descriptor)
    into `dst`, at most `max_bytes` in all (OSError beyond: a candidate never gets a partial copy)."""
    used = _used if _used is not None else [0]
    os.makedirs(dst, 0o700, exist_ok=True)
    for entry in os.scandir(src):
        if entry.name in (".upper", ".work") and isinstance(src, int):
            continue
        d = os.path.join(dst, entry.name)
        if entry.is_dir(follow_symlinks=False):
            sub = (
                os.open(
                    entry.name,
                    os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                    dir_fd=src if isinstance(src, int) else None,
                )
                if isinstance(src, int)
                else entry.path
            )
            try:
                copy_tree(sub, d, max_bytes, used)
            finally:
                if isinstance(sub, int):
                    os.close(sub)
        elif entry.is_file(follow_symlinks=False):
            used[0] += entry.stat(follow_symlinks=False).st_size
            if used[0] > max_bytes:
                raise OSError(27, f"the work dir holds more than {max_bytes // 2**20} MB to copy")
            fi = os.open(
                entry.name if isinstance(src, int) else entry.path,
                os.O_RDONLY | os.O_NOFOLLOW,
                dir_fd=src if isinstance(src, int) else None,
            )
            try:
                fo = os.open(d, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    while chunk := os.read(fi, 1 << 20):
                        os.write(fo, chunk)
                finally:
                    os.close(fo)
            finally:
                os.close(fi)


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


# ------------------------------------------------------------------------ kernel isolation (Linux)
#
# Why these interfaces and not bubblewrap: the zygote forks warm workers (numpy and sympy already
# imported) in about a millisecond, and each sandbox -- and each candidate of ``run_candidates``, a fork
# of a live interpreter -- must get namespaces of its own *after* that fork. A wrapper that execs a new
# process (bwrap, nsjail) cannot put an already-running interpreter into namespaces; it would cost a
# fresh interpreter (>100 ms) per sandbox and per candidate. ``unshare(2)``, ``mount(2)`` and
# ``pivot_root(2)`` are stable kernel ABI, reached through libc with ctypes (Python 3.11 has no
# os.unshare), need no package on the machine, and work as root and, through a user namespace,
# unprivileged. What each call does is what ``unshare --user --map-root-user --mount --pid --net``
# followed by a bind-mounted read-only root does.

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = (
    1024,
    2048,
    4096,
    16384,
    1 << 18,
    1 << 21,
)
MNT_DETACH = 2
PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER = 4, 24, 38, 36
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217, "i686": 217}
CAP_SETFCAP_BIT = 1 << 31
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_CLONE3 = (
    428,
    429,
    435,
)  # the same on every architecture (added after the unification)
BOX_WORKDIR = "/tmp/work"  # the code's working directory inside a kernel box (on the box's own tmpfs)
DEV_NODES = ("null", "zero", "random", "urandom")


class Kernel:
    """The few libc entry points the sandbox needs, resolved in the zygote (before any code runs)."""

    def __init__(self):
        import ctypes
        import platform

        self.ctypes = ctypes
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.pivot_nr = SYS_PIVOT_ROOT.get(platform.machine())
        for name in ("unshare", "mount", "umount2", "prctl", "syscall", "capset"):
            getattr(self.libc, name)  # AttributeError: no such libc function (not Linux/glibc)
        self.libc.mount.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_char_p,
        ]
        self.api = ctypes.pythonapi
        for name in ("PyOS_BeforeFork", "PyOS_AfterFork_Parent", "PyOS_AfterFork_Child"):
            getattr(self.api, name).restype = None
        self.pysyscall = ctypes.PyDLL(None, use_errno=True).syscall
        self.pysyscall.restype = ctypes.c_long
        self.clone_ok = True

    def _check(self, rc: int, what: str) -> int:
        if rc < 0:
            e = self.ctypes.get_errno()
            raise OSError(e, f"{what}: {os.strerror(e)}")
        return rc

    @trusted
    def unshare(self, flags: int) -> None:
        self._check(self.libc.unshare(flags), "unshare")

    @trusted
    def mount(self, src, target: str, fstype, flags: int, data=None) -> None:
        enc = lambda v: None if v is None else v.encode()  # noqa: E731
        self._check(self.libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")

    @trusted
    def umount(self, target: str, flags: int = 0) -> None:
        self._check(self.libc.umount2(target.encode(), flags), f"umount {target}")

    @trusted
    def prctl(self, option: int, arg: int = 0) -> int:
        return self._check(self.libc.prctl(option, arg, 0, 0, 0), f"prctl {option}")

    @trusted
    def clone(self, flags: int) -> int:
        """clone3(2) with `flags` (fork semantics otherwise), bracketed like os.fork by CPython's own
        PyOS_BeforeFork/AfterFork hooks; called through PyDLL, so the GIL stays held across it."""
        args = (self.ctypes.c_uint64 * 11)(flags, 0, 0, 0, signal.SIGCHLD, 0, 0, 0, 0, 0, 0)
        self.api.PyOS_BeforeFork()
        pid = self.pysyscall(SYS_CLONE3, args, self.ctypes.sizeof(args))
        err = self.ctypes.get_errno()
        if pid == 0:
            self.api.PyOS_AfterFork_Child()
            return 0
        self.api.PyOS_AfterFork_Parent()
        if pid < 0:
            raise OSError(err, f"clone3: {os.strerror(err)}")
        return pid

    def open_tree(self, path: str) -> int | None:
        """A detached copy of the mounts at `path` (open_tree(2), Linux >= 5.2), or None if unsupported."""
        fd = self.libc.syscall(SYS_OPEN_TREE, -100, path.encode(), 1 | 0x8000 | os.O_CLOEXEC)
        return fd if fd >= 0 else None  # OPEN_TREE_CLONE | AT_RECURSIVE

    def move_mount(self, tree: int, target: str) -> None:
        self._check(
            self.libc.syscall(SYS_MOVE_MOUNT, tree, b"", -100, target.encode(), 4), f"move_mount {target}"
        )

    @trusted
    def pivot_root(self, new: str, old: str) -> None:
        if self.pivot_nr is None:
            raise OSError(38, "pivot_root: unknown syscall number on this architecture")
        self._check(self.libc.syscall(self.pivot_nr, new.encode(), old.encode()), "pivot_root")

    @trusted
    def drop_privileges(self) -> None:
        """No capabilities, now or after an exec, and no way to gain them (PR_SET_NO_NEW_PRIVS).

        One exception, held in the permitted set only: CAP_SETFCAP of the box's own user namespace. A
        candidate needs it (effective) when it creates its nested user namespace, or the kernel refuses
        to map the box's root into it (Linux >= 5.12). It only concerns file capabilities, which never
        take effect here: no_new_privs, an empty bounding set and a noexec /tmp.
        """
        for cap in range(64):
            if self.libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0:
                break  # EINVAL: past the last capability
        self._capset(0, CAP_SETFCAP_BIT)
        self.prctl(PR_SET_NO_NEW_PRIVS, 1)

    @trusted
    def raise_setfcap(self) -> None:
        self._capset(CAP_SETFCAP_BIT, CAP_SETFCAP_BIT)

    @trusted
    @trusted
    def _capset(self, effective: int, permitted: int) -> None:
        header = (self.ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
        data = (self.ctypes.c_uint32 * 6)(effective, permitted, 0, 0, 0, 0)  # caps 0-31, then 32-63
        self._check(self.libc.capset(header, data), "capset")


KERNEL: Kernel | None = None


@trusted
def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def enter_user_namespace(flags: int, uid: int, gid: int, outer_uid: int, outer_gid: int) -> None:
    """unshare(CLONE_NEWUSER | flags) and map `uid`/`gid` inside to `outer_*` outside (one id each)."""
    KERNEL.unshare(CLONE_NEWUSER | flags)
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {outer_uid} 1")
    _write("/proc/self/gid_map", f"{gid} {outer_gid} 1")


def _mount_flags(path: str) -> int:
    """The mount flags of `path` that a bind mount in a user namespace must keep (they are locked)."""
    f = os.statvfs(path).f_flag
    out = 0
    for st, ms in (
        (1, MS_RDONLY),
        (2, MS_NOSUID),
        (4, MS_NODEV),
        (8, MS_NOEXEC),
        (1024, MS_NOATIME),
        (2048, MS_NODIRATIME),
        (4096, MS_RELATIME),
    ):
        if f & st:
            out |= ms
    return out


def build_root(spec: dict) -> None:
    """In a fresh mount namespace (as the box's pid 1): a tmpfs root holding read-only binds of the
    interpreter and libraries, /dev/{null,zero,random,urandom}, /proc of the box's PID namespace and a
    size-capped tmpfs at /tmp (the work dir and the only writable place); then pivot_root into it, so
    nothing else of the host's file system is reachable. Binds are detached copies made (open_tree)
    before the user namespace was entered: its root may be mapped to an unprivileged user that cannot
    walk the host's paths (an interpreter under /root)."""
    k = KERNEL
    k.mount(None, "/", None, MS_REC | MS_PRIVATE)
    new = "/tmp" if os.path.isdir("/tmp") else "/mnt"
    k.mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,nr_inodes=4096,mode=755")
    for link, target in spec["links"]:
        os.symlink(target, new + link)
    for path, tree, flags in spec["ro"]:
        os.makedirs(new + path, 0o755, exist_ok=True)
        if tree is None:
            k.mount(path, new + path, None, MS_BIND | MS_REC)
        else:
            k.move_mount(tree, new + path)
            os.close(tree)
        k.mount(None, new + path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
    os.mkdir(new + "/dev", 0o755)
    for name in DEV_NODES:
        if os.path.exists("/dev/" + name):
            os.close(os.open(new + "/dev/" + name, os.O_CREAT | os.O_WRONLY, 0o666))
            k.mount("/dev/" + name, new + "/dev/" + name, None, MS_BIND)
    os.mkdir(new + "/proc", 0o555)
    k.mount("proc", new + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.mkdir(new + "/tmp", 0o777)
    k.mount("tmpfs", new + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, spec["tmpfs"])
    os.mkdir(new + BOX_WORKDIR, 0o700)
    os.chdir(new)
    k.pivot_root(".", ".")  # the old root ends up stacked under the new one: detach it
    k.umount(".", MNT_DETACH)
    os.chdir("/")
    k.mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def box_spec(cfg: dict, ro: list[str]) -> dict:
    """What `build_root` mounts; run before entering the namespaces (paths are opened here)."""
    links = [
        (p, os.readlink(p))
        for p in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
        if os.path.islink(p)
    ]
    dirs = [
        p for p in ("/usr", "/bin", "/sbin", "/lib", "/lib64") if os.path.isdir(p) and not os.path.islink(p)
    ]
    roots: list[str] = []
    for p in sorted(set(dirs + ro)):
        if p == "/" or p.split("/")[1] in ("tmp", "proc", "dev", "sys", "mnt"):
            continue  # places of the box's own, or not a library directory
        if not any(p == r or p.startswith(r.rstrip("/") + "/") for r in roots):
            roots.append(p)
    binds = [(p, KERNEL.open_tree(p), _mount_flags(p)) for p in roots]
    tmpfs = f"size={cfg['disk_mb']}m,nr_inodes={cfg['max_files']},mode=1777"
    return {"links": links, "ro": binds, "roots": roots, "tmpfs": tmpfs}


def join_cgroups(cg: dict) -> None:
    """Create this sandbox's cgroups (memory, pids), set their limits and move this process in."""
    for path, limits in cg.items():
        os.makedirs(path, exist_ok=True)
        for name, value in limits.items():
            _write(os.path.join(path, name), str(value))
        _write(os.path.join(path, "cgroup.procs"), str(os.getpid()))


def box_init(ctl, data_fd: int, cfg: dict, spec: dict, vm: int) -> None:
    """pid 1 of a sandbox's PID namespace: builds the file system, forks the worker, then obeys the
    parent's one-byte commands: S = stop every other process of the box (SIGSTOP through kill(-1), which
    from a namespace's init reaches exactly the processes of that namespace and those nested in it),
    C = continue them (acknowledged, so that a late S can never stop what comes after a C). When the parent goes away (EOF) it exits, and the kernel kills the whole box."""
    build_root(spec)
    KERNEL.prctl(PR_SET_DUMPABLE, 0)  # no /proc/<pid>/{root,mem,fd} access to box processes by others
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)  # no handler: signals from inside the box cannot touch pid 1
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # orphans of the box are reaped by the kernel
    pid = os.fork()
    if pid == 0:
        try:
            ctl.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if cfg.get("probe"):
                _probe_in_box(_socket.socket(fileno=data_fd))
                os._exit(0)
            worker_main(data_fd, dict(cfg, workdir=BOX_WORKDIR), spec["roots"], vm, box=True)
        finally:
            os._exit(1)
    os.close(data_fd)
    fd = ctl.fileno()
    while True:
        try:
            cmd = os.read(fd, 1)
        except InterruptedError:
            continue
        except OSError:
            cmd = b""
        if cmd == b"S":
            _kill_all(signal.SIGSTOP)
        elif cmd == b"C":
            _kill_all(signal.SIGCONT)
            os.write(fd, b"c")  # acknowledged: every earlier S has been carried out too
        elif not cmd:
            os._exit(0)


def _kill_all(sig: int) -> None:
    try:
        os.kill(-1, sig)
    except OSError:
        pass  # ESRCH: nothing else in the box


def spawn_box(fds: list[int], cfg: dict, ro: list[str], vm: int) -> int:
    """In the zygote: fork the sandbox's namespaces; returns the host pid of its pid 1 (or raises).

    The intermediate child joins the cgroups, opens what will be bound, enters new user, mount, PID,
    network, IPC and UTS namespaces, and forks the box's pid 1. Its user namespace maps root inside to
    nobody outside when we are root (else to our own uid): the zygote writes that map, since a process
    inside the new namespace may only map its own uid.
    """
    r, w = os.pipe()  # intermediate -> zygote: "unshared", then the pid of the box's init
    r2, w2 = os.pipe()  # zygote -> intermediate: "mapped"
    uid, gid = os.getuid(), os.getgid()
    outer = (cfg["uid"], cfg["gid"]) if uid == 0 and cfg.get("uid") is not None else (uid, gid)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.close(w2)
            _close_fds_except({w, r2, *fds})
            if cfg.get("cgroups"):
                join_cgroups(cfg["cgroups"])
            spec = box_spec(cfg, ro)
            if uid == 0:
                os.setgroups([])  # (an unprivileged user keeps its groups: it cannot drop them)
            KERNEL.unshare(
                CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
            )
            os.write(w, b"U")
            if os.read(r2, 1) != b"M":
                raise OSError("the zygote could not map the sandbox's user namespace")
            os.close(r2)
            os.setgid(0)  # become the mapped root of the new namespace (until now: an unmapped id)
            os.setuid(0)
            ctl = _socket.socket(fileno=fds[1])
            init = os.fork()
            if init == 0:
                try:
                    os.close(w)
                    box_init(ctl, fds[0], cfg, spec, vm)
                finally:
                    os._exit(1)
            os.write(w, struct.pack("!q", init))
            code = 0
        except BaseException as e:  # noqa: BLE001 - reported to the parent as the reason
            try:
                os.write(w, struct.pack("!q", -1) + f"{type(e).__name__}: {e}".encode()[:500])
            except OSError:
                pass
        finally:
            os._exit(code)
    os.close(w)
    os.close(r2)
    try:
        data = os.read(r, 1)
        if data == b"U":
            try:
                _write(f"/proc/{pid}/setgroups", "deny")
                _write(f"/proc/{pid}/uid_map", f"0 {outer[0]} 1")
                _write(f"/proc/{pid}/gid_map", f"0 {outer[1]} 1")
                os.write(w2, b"M")
            except OSError as e:
                os.write(w2, b"X")
                raise OSError(f"user namespace map: {e}") from None
            data = b""
        while chunk := os.read(r, 600):
            data += chunk
    finally:
        os.close(r)
        os.close(w2)
    (init,) = struct.unpack("!q", data[:8]) if len(data) >= 8 else (-1,)
    if init <= 0:
        raise OSError(data[8:].decode(errors="replace") or "the sandbox's namespaces could not be created")
    return init


# -------------------------------------------------------------------------------------- processes


def worker_main(fd: int, cfg: dict, read_roots: list[str], vm: int, box: bool = False) -> None:
    """Runs in a fresh fork of the zygote (or as pid 2 of a kernel box): lock down, then serve."""
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    sock = _socket.socket(fileno=fd)
    os.chdir(cfg["workdir"])
    mb = 2**20
    limits = {
        resource.RLIMIT_AS: vm + cfg["memory_mb"] * mb,
        resource.RLIMIT_FSIZE: cfg["file_size_mb"] * mb,
        resource.RLIMIT_NOFILE: cfg["max_open_files"],
        resource.RLIMIT_CORE: 0,
        resource.RLIMIT_CPU: cfg["cpu_s"],
    }
    if box or cfg.get("uid") is not None:
        limits[resource.RLIMIT_NPROC] = cfg["max_processes"]
    for which, value in limits.items():
        resource.setrlimit(which, (value, value))
    if box:
        KERNEL.drop_privileges()  # uid 0 of the box's user namespace, without any capability
    elif cfg.get("uid") is not None:
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
    if not box:
        _disable_fork_exec()
    install_audit_hook(os.path.dirname(cfg["workdir"]), read_roots)
    worker = Worker(sock, cfg, box)
    worker.send(("ready",))  # the parent learns our pid from the kernel (SCM_CREDENTIALS), not from us
    worker.loop()


def _no_new_privs() -> None:
    if KERNEL is not None:
        KERNEL.prctl(PR_SET_NO_NEW_PRIVS, 1)


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


def _close_fds_except(keep) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:")), 0)


def probe_kernel(ro: list[str], vm: int) -> str | None:
    """Try a whole box once (namespaces, mounts, pivot_root, a dropped-privilege worker, a nested
    candidate namespace). None if it works, else the reason."""
    if KERNEL is None:
        return "no Linux libc interfaces (unshare, mount) here"
    hidden = [r for r in ro if r.split("/")[1:2] and r.split("/")[1] in ("tmp", "proc", "dev", "sys", "mnt")]
    if hidden:  # a box mounts its own /tmp (and /proc, /dev): libraries there would vanish inside it
        return f"the interpreter's libraries are under {hidden[0]}, which a kernel box replaces with its own"
    a, b = _socket.socketpair()
    c, d = _socket.socketpair()
    cfg = {"disk_mb": 1, "max_files": 64, "uid": NOBODY, "gid": NOBODY, "probe": True}
    try:
        init = spawn_box([b.fileno(), d.fileno()], cfg, ro, vm)
    except OSError as e:
        return str(e)
    finally:
        b.close()
        d.close()
    a.settimeout(20)
    try:
        reply = a.recv(200)
    except OSError as e:
        reply = f"no answer ({e})".encode()
    a.close()
    c.close()
    try:
        os.kill(init, signal.SIGKILL)
    except OSError:
        pass
    return None if reply == b"ok" else (reply.decode(errors="replace") or "the probe box exited")


@trusted
def _probe_in_box(sock) -> None:
    """Inside the probe box: what a worker and a candidate will need."""
    try:
        assert not os.path.exists("/etc/passwd") and os.path.isdir(BOX_WORKDIR)
        KERNEL.drop_privileges()
        pid = os.fork()
        if pid == 0:
            try:
                KERNEL.prctl(PR_SET_DUMPABLE, 1)
                KERNEL.raise_setfcap()
                enter_user_namespace(CLONE_NEWNS | CLONE_NEWPID, 0, 0, 0, 0)
                KERNEL.mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=1m")
                sock.sendall(b"ok")
                os._exit(0)
            except BaseException as e:  # noqa: BLE001
                sock.sendall(
                    f"a candidate could not get its own namespaces: {type(e).__name__}: {e}".encode()[:200]
                )
            finally:
                os._exit(1)
        os.waitpid(pid, 0)
    except BaseException as e:  # noqa: BLE001
        sock.sendall(f"{type(e).__name__}: {e}".encode()[:200])


def zygote_main(ctl_fd: int, preload: list[str]) -> None:
    global KERNEL
    try:
        KERNEL = Kernel()
        KERNEL.prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphaned sandbox processes are re-parented here
    except (ImportError, OSError, AttributeError):
        KERNEL = None
    for name in sorted(ALLOWED_IMPORTS) + sorted(INTERNAL_IMPORTS) + list(PRELOAD_CODECS) + preload:
        try:
            __import__(name)
        except ImportError:
            pass
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    gc.collect()
    gc.freeze()  # keep the preloaded heap out of GC passes: forks then share far more pages
    read_roots = python_roots()
    vm = _vm_size()
    kernel_problem = probe_kernel(read_roots, vm)
    ctl = _socket.socket(fileno=ctl_fd)
    ctl.sendall(pack(("ready", kernel_problem)))
    while True:
        try:
            msg, fds = recv_msg(ctl)
        except (EOFError, OSError):
            break
        if msg[0] != "spawn":
            continue
        cfg = msg[1]
        if cfg.get("isolation") == "kernel":
            try:
                init = spawn_box(fds, cfg, read_roots, vm)
                reply = ("spawned", init)
            except OSError as e:
                reply = ("failed", str(e))
            for fd in fds:
                os.close(fd)
            ctl.sendall(pack(reply))
            continue
        pid = os.fork()
        if pid == 0:
            try:
                ctl.close()
                worker_main(fds[0], cfg, read_roots, vm)
            finally:
                os._exit(1)
        try:
            os.setpgid(pid, pid)
        except OSError:
            pass
        for fd in fds:
            os.close(fd)
        ctl.sendall(pack(("spawned", pid)))
    _kill_session()
    os._exit(0)


def python_roots() -> list[str]:
    """Directories of the interpreter's modules (the standard library, lib-dynload, site-packages)."""
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    for m in list(sys.modules.values()):
        f = getattr(m, "__file__", None)
        if isinstance(f, str) and "site-packages" in f:
            paths.append(f.split("site-packages")[0] + "site-packages")
    return sorted({os.path.realpath(p) for p in paths if os.path.isdir(p)})


if __name__ == "__main__":
    zygote_main(int(sys.argv[1]), [m for m in sys.argv[2].split(",") if m] if len(sys.argv) > 2 else [])
