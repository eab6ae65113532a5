"""Hostile code against the real sandbox (run as root here): every case must be contained, and the next
``run`` on the same sandbox must work.

Several cases first reach a dangerous module the import guard refuses (os, sys, subprocess, signal,
ctypes, gc, inspect) through attributes of allowed modules (``find`` below), to show that the layers
behind the import guard (audit hook, rlimits, uid, kill from outside) hold on their own.
"""

from __future__ import annotations

import os
import tempfile

import pytest

from agentlib.sandbox import Sandbox

FIND = """
def find(target):
    import random, typing, json, queue, re, collections, copy, sympy, numpy
    seen, todo = set(), [random, typing, json, queue, re, collections, copy, sympy, numpy]
    while todo:
        m = todo.pop(0)
        if id(m) in seen:
            continue
        seen.add(id(m))
        if m.__name__ == target:
            return m
        for a in dir(m):
            try:
                v = getattr(m, a)
            except BaseException:
                continue
            if type(v).__name__ == 'module' and id(v) not in seen:
                todo.append(v)
    raise LookupError(target)
"""

OUTSIDE = os.path.join(tempfile.gettempdir(), "agentlib-sandbox-hostile-marker")


def _hostile_sandbox(timeout_s: float):
    box = Sandbox(tools={"echo": lambda x: x}, timeout_s=timeout_s, memory_mb=512)
    assert box.run(FIND + "\nsentinel = 41").error is None
    return box


@pytest.fixture
def sb():
    """For code that must be stopped by something other than the clock: a generous timeout, because on a
    loaded CI machine zeroing 512 MB page by page took over 1.5 s and ended in a TimeoutError, not the
    MemoryError the case asserts."""
    with _hostile_sandbox(timeout_s=30) as box:
        yield box


@pytest.fixture
def sb_quick():
    """For code that runs forever: a short timeout keeps these cases fast."""
    with _hostile_sandbox(timeout_s=1.5) as box:
        yield box


def _still_works(sb: Sandbox, state_kept: bool) -> None:
    r = sb.run("print(6 * 7)")
    assert r.error is None and r.stdout == "42\n"
    r = sb.run("print(sentinel)")
    if state_kept:
        assert r.stdout == "41\n", r.error
    else:
        assert "NameError" in r.error


def _last(r) -> str:
    return r.error.strip().splitlines()[-1]


# ----------------------------------------------------------------------------- runaway computation


@pytest.mark.parametrize(
    "code",
    [
        "while True:\n    pass",
        "sum(range(10**12))",  # a loop inside one C call
        "x = 10**10**8",  # a huge integer power
        "import time\ntime.sleep(60)",
        "import itertools\nfor _ in itertools.count():\n    pass",
        "s = find('signal')\ns.signal(s.SIGTERM, s.SIG_IGN)\ns.signal(s.SIGALRM, s.SIG_IGN)\nwhile True:\n    pass",
        "try:\n    find('os').setsid()\nexcept OSError:\n    pass\nwhile True:\n    pass",  # tries to leave its group
    ],
)
def test_runaway_code_is_killed_from_outside(sb_quick, code):
    sb = sb_quick
    old = sb.pid
    r = sb.run(code)
    assert r.timed_out and r.restarted and r.error.startswith("TimeoutError") and "restarted" in r.error
    assert not os.path.exists(f"/proc/{old}")
    _still_works(sb, state_kept=False)


# --------------------------------------------------------------------------------------- memory


@pytest.mark.parametrize(
    "code",
    [
        "x = bytearray(8 * 1024**3)",
        "x = [0] * (2 * 10**9)",
        "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 2**20))",
        "import numpy as np\na = np.ones((60000, 60000))",
    ],
)
def test_memory_bombs_hit_the_address_space_limit(sb, code):
    r = sb.run(code)
    assert _last(r).startswith(
        (
            "MemoryError",
            "numpy.core._exceptions._ArrayMemoryError",
            "numpy._core._exceptions._ArrayMemoryError",
        )
    ), r.error
    assert not r.restarted
    _still_works(sb, state_kept=True)


# ---------------------------------------------------------------------------- processes and escape


def test_fork_bomb_is_refused(sb):
    before = _children_of_zygote(sb)
    r = sb.run("os = find('os')\nwhile True:\n    os.fork()")
    assert _last(r) == "PermissionError: 'os.fork' is not allowed in the sandbox"
    assert _children_of_zygote(sb) == before
    _still_works(sb, state_kept=True)


@pytest.mark.parametrize(
    "code, expected",
    [
        ("import os\nos.fork()", "ImportError: import of 'os' is not allowed"),
        ("import subprocess", "ImportError: import of 'subprocess' is not allowed"),
        (
            f"find('subprocess').run(['touch', '{OUTSIDE}'])",
            "PermissionError: 'subprocess.Popen' is not allowed",
        ),
        (f"find('os').system('touch {OUTSIDE}')", "PermissionError: 'os.system' is not allowed"),
        (
            f"find('os').execv('/bin/touch', ['touch', '{OUTSIDE}'])",
            "PermissionError: 'os.exec' is not allowed",
        ),
        (
            f"find('os').posix_spawn('/bin/touch', ['touch', '{OUTSIDE}'], {{}})",
            "PermissionError: 'os.posix_spawn' is not allowed",
        ),
        ("import ctypes", "ImportError: import of 'ctypes' is not allowed"),
        (
            f"c = find('ctypes')\nc.CDLL(None).system(b'touch {OUTSIDE}')",
            "PermissionError: ctypes is disabled",
        ),
        (
            "c = find('ctypes')\nc.create_string_buffer(8)",
            "PermissionError: 'ctypes.create_string_buffer' is not",
        ),
        ("c = find('ctypes')\nc.memmove(id(1), id(2), 8)", "PermissionError: ctypes is disabled"),
        ("c = find('ctypes')\nc.cast(id(1), c.POINTER(c.c_char))", "PermissionError: ctypes is disabled"),
        (
            "c = find('ctypes')\nc.c_char.from_address(id(1))",
            "PermissionError: 'ctypes.cdata' is not allowed",
        ),
        (
            "[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == 'Popen']",
            "PermissionError: access to attribute '__",
        ),
        (
            "getattr(getattr((), '__cla' + 'ss__'), '__subclasses__')()",
            "PermissionError: access to attribute '__class__' is not allowed",
        ),
        ("find('os').kill(find('os').getppid(), 9)", "PermissionError: 'os.kill' is not allowed"),
        ("find('os').killpg(0, 9)", "PermissionError: 'os.killpg' is not allowed"),
        ("find('inspect').currentframe()", "PermissionError: access to stack frames is not allowed"),
        ("find('inspect').stack()", "PermissionError: access to stack frames is not allowed"),
        ("find('sys')._getframe(0)", "PermissionError: access to stack frames is not allowed"),
        (
            "def g():\n    yield 1\ngetattr(g(), 'gi_' + 'frame')",
            "PermissionError: access to attribute 'gi_frame'",
        ),
        ("find('gc').get_objects()", "PermissionError: 'gc.get_objects' is not allowed"),
        ("find('sys').settrace(print)", "PermissionError: 'sys.settrace' is not allowed"),
        ("eval('1 + 1')", "NameError: name 'eval' is not defined"),
        ("exec('x = 1')", "NameError: name 'exec' is not defined"),
        ("__import__('os')", "PermissionError: name '__import__' is not allowed"),
    ],
)
def test_escapes_are_refused(sb, code, expected):
    r = sb.run(code)
    assert _last(r).startswith(expected), r.error
    assert not os.path.exists(OUTSIDE)
    _still_works(sb, state_kept=True)


def test_hook_rules_cannot_be_cleared_through_the_worker_module(sb):
    code = (
        "main = find('sys').modules['__main__']\nmain.AUDIT_RULES.clear()\nmain.TRUSTED.clear()\n"
        f"find('os').system('touch {OUTSIDE}')"
    )
    r = sb.run(code)
    assert _last(r) == "PermissionError: 'os.system' is not allowed in the sandbox"
    assert not os.path.exists(OUTSIDE)
    _still_works(sb, state_kept=True)


def test_runs_as_an_unprivileged_user_when_root(sb):
    r = sb.run("print(find('os').getuid())")
    if sb.isolation == "kernel":  # root of its own user namespace, without any capability
        assert r.stdout == "0\n"
        with open(f"/proc/{sb.pid}/status") as f:
            status = dict(line.split(":", 1) for line in f)
        assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0
        assert status["Uid"].split()[0] == ("65534" if os.geteuid() == 0 else str(os.geteuid()))
    else:
        assert r.stdout == ("65534\n" if os.geteuid() == 0 else f"{os.geteuid()}\n")
    r = sb.run("find('resource').setrlimit(find('resource').RLIMIT_AS, (-1, -1))")
    assert "not allowed" in r.error or "LookupError" in r.error


# ------------------------------------------------------------------------------------- files, network


@pytest.mark.parametrize(
    "code",
    [
        f"open('{OUTSIDE}', 'w').write('x')",
        "open('../../agentlib-sandbox-hostile-marker', 'w').write('x')",
        "open('/etc/passwd').read()",
        "open('/proc/self/environ').read()",
        "open(0).read()",
        "find('os').open('/etc/hostname', 0)",
        "find('os').listdir('/root')",
        "find('os').symlink('/etc/passwd', 'link')",
        "find('os').chdir('/')",
    ],
)
def test_file_access_outside_the_workdir_is_refused(sb, code):
    r = sb.run(code)
    if not (sb.isolation == "kernel" and code.startswith(f"open('{OUTSIDE}'")):  # (the box's own /tmp)
        assert _last(r).startswith("PermissionError"), r.error
    assert not os.path.exists(OUTSIDE)
    _still_works(sb, state_kept=True)


def test_files_inside_the_workdir_work_and_are_size_limited():
    with Sandbox(file_size_mb=1) as box:
        r = box.run("open('a.txt', 'w').write('hello')\nprint(open('a.txt').read())")
        assert r.stdout == "hello\n"
        r = box.run("f = open('big.bin', 'wb')\nf.write(b'x' * (2 * 2**20))\nf.flush()")
        assert "File too large" in r.error
        r = box.run("fs = [open(f'f{i}', 'w') for i in range(200)]")
        assert "Too many open files" in r.error
        assert box.run("print(1)").stdout == "1\n"


@pytest.mark.parametrize(
    "code, expected",
    [
        ("import socket", "ImportError"),
        ("s = find('socket')\ns.create_connection(('127.0.0.1', 22), timeout=0.5)", "PermissionError"),
        ("s = find('socket')\ns.socket(s.AF_INET, s.SOCK_STREAM)", "PermissionError"),
        (
            "s = find('socket')\nu = s.socket(s.AF_UNIX, s.SOCK_STREAM)\nu.connect('/run/x.sock')",
            "PermissionError",
        ),
    ],
)
def test_network_is_refused(sb, code, expected):
    r = sb.run(code)
    last = _last(r)
    assert last.startswith(expected) or last.startswith("LookupError: socket"), r.error
    _still_works(sb, state_kept=True)


# -------------------------------------------------------------------------------- output and channel


def test_fifty_megabytes_of_print_are_truncated(sb):
    r = sb.run("for _ in range(50):\n    print('x' * 2**20)")
    assert r.error is None and len(r.stdout) < 20_000
    assert "output truncated" in r.stdout and str(50 * (2**20 + 1) - 10_000) in r.stdout
    _still_works(sb, state_kept=True)


def test_deep_recursion(sb):
    r = sb.run("def f(n):\n    return f(n + 1)\nf(0)")
    assert _last(r).startswith("RecursionError: maximum recursion depth exceeded")
    assert len(r.error) < 2000
    _still_works(sb, state_kept=True)


@pytest.mark.parametrize("code", ["raise SystemExit(3)", "exit()", "quit()", "raise KeyboardInterrupt"])
def test_exit_attempts_keep_the_worker(sb, code):
    r = sb.run(code)
    assert r.error and not r.restarted
    _still_works(sb, state_kept=True)


@pytest.mark.parametrize(
    "code",
    [
        "find('os')._exit(0)",
        "find('os').abort()",
        "os = find('os')\nfor fd in range(3, 64):\n    try:\n        os.close(fd)\n    except OSError:\n        pass",
        "os = find('os')\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'\\xff' * 64)\n    except OSError:\n        pass\nwhile True:\n    pass",
        "os = find('os')\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'\\x00\\x00\\x00\\xff\\xff\\xff\\xff\\xff')\n    except OSError:\n        pass",
    ],
)
def test_killing_or_corrupting_the_channel_restarts(sb_quick, code):
    sb = sb_quick
    r = sb.run(code)
    assert r.restarted and r.error.startswith(("SandboxError", "TimeoutError")), r.error
    _still_works(sb, state_kept=False)


def test_huge_and_unpicklable_return_values(sb):
    r = sb.run("final_answer('x' * 50_000_000)")
    assert r.called_final_answer and len(r.final_answer) < 200_000 and "truncated" in r.final_answer
    r = sb.run("final_answer(lambda: 1)")
    assert r.final_answer.startswith("<function <lambda>")
    r = sb.run("def g():\n    yield 1\nfinal_answer({'gen': g(), 'mod': find('os')})")
    assert r.final_answer["gen"].startswith("<generator") and r.final_answer["mod"].startswith("<module 'os'")
    r = sb.run("class Evil:\n    def __str__(self):\n        raise RuntimeError('no')\nfinal_answer(Evil())")
    assert r.final_answer == "<unprintable Evil>"
    r = sb.run("final_answer(10**100_000)")
    assert r.final_answer == "<integer of about 100001 digits>"
    r = sb.run("echo(find('os'))")  # an unpicklable tool argument is sent as text
    assert r.error is None
    _still_works(sb, state_kept=True)


def test_hostile_candidates_do_not_affect_the_state(sb_quick):
    sb = sb_quick
    results = sb.run_candidates(
        [
            "sentinel = 0\nfind('os')._exit(1)",
            "while True:\n    pass",
            "x = bytearray(8 * 1024**3)",
            "final_answer(sentinel)",
        ]
    )
    assert results[0].error.startswith("SandboxError") and results[1].timed_out
    assert "MemoryError" in results[2].error and results[3].final_answer == 41
    _still_works(sb, state_kept=True)


def _children_of_zygote(sb: Sandbox) -> int:
    zpid = os.getsid(sb.pid)
    n = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                n += os.getsid(int(name)) == zpid
            except OSError:
                pass
    return n
