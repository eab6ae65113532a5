"""Functional tests of agentlib.sandbox against the real worker processes, in both isolation modes
(``kernel``: namespaces; ``process``: the in-process layers only)."""

from __future__ import annotations

import os
import tempfile
import threading
import time

import pytest

from agentlib.sandbox import (
    ExecResult,
    Sandbox,
    SandboxError,
    _zygote,
    kernel_isolation_problem,
    sweep_stale_dirs,
)

KERNEL_PROBLEM = kernel_isolation_problem()
ISOLATIONS = [
    pytest.param("kernel", marks=pytest.mark.skipif(bool(KERNEL_PROBLEM), reason=str(KERNEL_PROBLEM))),
    "process",
]


def inner_pid(pid: int) -> int:
    """`pid` as its own PID namespace numbers it (what the code sees from os.getpid())."""
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("NSpid:")).split()[-1])


@pytest.fixture(params=ISOLATIONS)
def sb(request):
    calls: list[tuple] = []

    def search(query: str, k: int = 3) -> str:
        calls.append((query, k, os.getpid(), threading.get_ident()))
        return f"{k} passages about {query}"

    def broken(x):
        raise ValueError(f"bad input {x}")

    with Sandbox(tools={"search": search, "broken": broken}, timeout_s=2, isolation=request.param) as box:
        box.calls = calls
        yield box


def test_state_persists_and_stdout_is_captured(sb):
    assert sb.run("x = 6 * 7\ndef double(v):\n    return 2 * v").error is None
    r = sb.run("print(double(x))\nprint('done')")
    assert r.stdout == "84\ndone\n"
    assert r.error is None and not r.called_final_answer and r.final_answer is None
    assert r.duration_s > 0 and not r.timed_out and not r.restarted


def test_code_runs_in_another_process(sb):
    r = sb.run("import random\nprint(random._os.getpid())")
    assert int(r.stdout) == inner_pid(sb.pid) and sb.pid != os.getpid()
    assert sb.isolation in ("kernel", "process")


def test_final_answer_ends_the_step(sb):
    r = sb.run("y = 3\nfinal_answer(y * 2)\nprint('not reached')\ny = 100")
    assert r.called_final_answer and r.final_answer == 6 and r.stdout == ""
    assert sb.run("print(y)").stdout == "3\n"


def test_final_answer_swallowed_by_bare_except_still_counts(sb):
    r = sb.run("try:\n    final_answer('Paris')\nexcept BaseException:\n    print('caught')")
    assert r.called_final_answer and r.final_answer == "Paris" and r.stdout == "caught\n"


def test_final_answer_values_become_plain_python(sb):
    r = sb.run("import numpy as np\nfinal_answer({'a': np.int64(3), 'b': np.arange(3), 't': (1.5, None)})")
    assert r.final_answer == {"a": 3, "b": [0, 1, 2], "t": (1.5, None)}
    assert type(r.final_answer["a"]) is int
    r = sb.run("from fractions import Fraction\nimport sympy\nfinal_answer([Fraction(1, 3), sympy.sqrt(8)])")
    assert r.final_answer == ["1/3", "2*sqrt(2)"]


def test_tool_bridge_runs_tools_in_the_parent(sb):
    r = sb.run("res = search('Eiffel Tower', k=2)\nprint(res)\nfinal_answer(len(res))")
    assert r.stdout == "2 passages about Eiffel Tower\n"
    assert r.final_answer == len("2 passages about Eiffel Tower")
    assert sb.calls[0][:3] == ("Eiffel Tower", 2, os.getpid())  # in a helper thread of this process


def test_tool_error_is_raised_inside_the_code(sb):
    r = sb.run("try:\n    broken(5)\nexcept RuntimeError as e:\n    print('got', e)")
    assert r.stdout == "got tool 'broken' failed: ValueError: bad input 5\n"
    r = sb.run("broken(1)")
    assert "RuntimeError: tool 'broken' failed: ValueError: bad input 1" in r.error


def test_allowed_and_denied_imports(sb):
    r = sb.run(
        "import math, re, collections, itertools, functools, datetime, statistics, random, numpy, sympy"
        "\nfrom fractions import Fraction\nprint(math.comb(5, 2), numpy.arange(4).sum(), sympy.factorint(12))"
    )
    assert r.error is None and r.stdout == "10 6 {2: 2, 3: 1}\n"
    for mod in ("os", "sys", "subprocess", "socket", "ctypes", "importlib", "shutil", "pickle"):
        r = sb.run(f"import {mod}")
        assert r.error.splitlines()[-1].startswith(f"ImportError: import of '{mod}' is not allowed"), mod


def test_error_reads_like_python(sb):
    code = "def f(a):\n    return 10 / a\n\ny = f(0)"
    r = sb.run(code)
    assert r.error.splitlines() == [
        "Traceback (most recent call last):",
        '  File "<code>", line 4, in <module>',
        "    y = f(0)",
        '  File "<code>", line 2, in f',
        "    return 10 / a",
        "ZeroDivisionError: division by zero",
    ]
    r = sb.run("print('before')\nundefined_name + 1")
    assert r.stdout == "before\n" and r.error.endswith("NameError: name 'undefined_name' is not defined")
    r = sb.run("x = = 2")
    assert r.error.splitlines()[0] == '  File "<code>", line 1' and r.error.endswith(
        "SyntaxError: invalid syntax"
    )


def test_observation_joins_stdout_and_error(sb):
    r = sb.run("print('hi')\n1/0")
    assert r.observation.startswith("hi\nTraceback") and r.observation.endswith("division by zero")
    assert not r.ok and sb.run("pass").ok


def test_output_is_truncated_with_marker():
    with Sandbox(max_output_chars=100) as box:
        r = box.run("for i in range(1000):\n    print(i)")
    assert r.stdout.startswith("0\n1\n2\n")
    assert r.stdout.split("\n[... output truncated: ")[0] == "".join(f"{i}\n" for i in range(1000))[:100]
    assert "more characters not shown]" in r.stdout


def test_timeout_restarts_with_fresh_state(sb):
    sb.run("kept = 1")
    old_pid = sb.pid
    t0 = time.monotonic()
    r = sb.run("while True:\n    pass")
    assert 1.9 < time.monotonic() - t0 < 4
    assert r.timed_out and r.restarted and r.error.startswith("TimeoutError")
    assert "restarted" in r.error and "gone" in r.error
    assert sb.pid != old_pid and not os.path.exists(f"/proc/{old_pid}")
    assert "NameError" in sb.run("print(kept)").error


def test_last_output_is_the_value_of_the_last_statement(sb):
    assert sb.run("x = 2\nx * 21").last_output == "42"
    assert sb.run("y = [1, 2]").last_output == "[1, 2]"
    assert sb.run("print(1)").last_output is None  # a None value: the observation writes "None"
    assert sb.run("1 / 0").last_output is None
    assert sb.run("final_answer(3)").last_output is None


def test_ordinary_code_that_the_interpreter_imports_for(sb):
    r = sb.run(
        "import datetime, time\n"
        "print(datetime.datetime.strptime('2024-03-05', '%Y-%m-%d').date())\n"
        "print(time.strptime('5 Mar 2024', '%d %b %Y').tm_yday)\n"
        "print('bücher.de'.encode('idna'), b'xn--bcher-kva.de'.decode('idna'))\n"
        "print('ü'.encode('latin-1'), 'x'.encode('utf-16-le'), 'abc'.encode('punycode'))"
    )
    assert r.error is None, r.error
    assert r.stdout.splitlines() == [
        "2024-03-05",
        "65",
        "b'xn--bcher-kva.de' bücher.de",
        "b'\\xfc' b'x\\x00' b'abc-'",
    ]


def test_big_integer_answers_are_strings(sb):
    r = sb.run("import math\nn = math.factorial(2000)\nfinal_answer(n)")
    assert r.called_final_answer and isinstance(r.final_answer, str) and len(r.final_answer) == 5736
    assert r.final_answer.startswith("33162750924506332411") and str(r.final_answer) == r.final_answer
    r = sb.run("final_answer(10**4999)")
    assert r.final_answer == "1" + "0" * 4999
    r = sb.run("final_answer({'n': [10**5000 + 1], 'small': 10**100})")
    assert r.final_answer == {"n": ["1" + "0" * 4999 + "1"], "small": 10**100}
    r = sb.run("final_answer(10**100_000)")
    assert r.final_answer == "<integer of about 100001 digits>"


def test_run_candidates_are_independent_and_commit_does_not_rerun(sb):
    sb.run("log = []\ncounter = 0")
    codes = [
        f"log.append({i})\ncounter += {i}\nsearch('q{i}')\nopen('f{i}.txt', 'w').write('x')\nfinal_answer(counter)"
        for i in range(4)
    ]
    results = sb.run_candidates(codes)
    assert [r.final_answer for r in results] == [0, 1, 2, 3]
    assert [r.candidate for r in results] == [0, 1, 2, 3]
    assert sorted(c[0] for c in sb.calls) == ["q0", "q1", "q2", "q3"]
    check = "import random\nprint(log, counter, sorted(random._os.listdir('.')))"
    assert sb.run(check).stdout == "[] 0 []\n"  # the sandbox's own state is untouched
    results = sb.run_candidates(codes)
    sb.commit(results[2])
    assert sb.run(check).stdout == "[2] 2 ['f2.txt']\n"  # candidate 2's state, executed once
    assert len(sb.calls) == 8  # commit did not call the tool again
    with pytest.raises(ValueError):
        sb.commit(results[1])  # stale: from an older batch


def test_candidates_do_not_leak_processes(sb):
    zygote = _zygote(sb._preload).proc.pid  # counted under the zygote: other tests' processes don't matter
    base = len(_descendants(zygote))  # the worker (and with kernel isolation, the box's pid 1)
    results = sb.run_candidates(["a = 1"] * 6)
    assert len(_descendants(zygote)) >= base + 6  # the template worker + 6 forked candidates
    sb.commit(results[0])
    sb.run("pass")
    deadline = time.monotonic() + 20  # SIGKILLed processes vanish asynchronously; slow under load
    while len(_descendants(zygote)) > base and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_descendants(zygote)) == base  # only the committed worker is left


def test_candidate_timeout_is_isolated(sb):
    sb.run("base = 5")
    results = sb.run_candidates(["while True:\n    pass", "final_answer(base + 1)"])
    assert results[0].timed_out and "discarded" in results[0].error and not results[0].restarted
    assert results[1].final_answer == 6 and results[1].error is None
    sb.commit(results[1])
    assert sb.run("print(base)").stdout == "5\n"
    results = sb.run_candidates(["while True:\n    pass"])
    sb.commit(results[0])  # no state left: the sandbox restarts empty
    assert "NameError" in sb.run("print(base)").error


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_tool_calls_from_candidates_are_served_concurrently(isolation):
    def slow(q):
        time.sleep(0.5)
        return q.upper()

    with Sandbox(tools={"slow": slow}, timeout_s=5, max_parallel=2, isolation=isolation) as box:
        t0 = time.monotonic()
        results = box.run_candidates(["final_answer(slow('a'))", "final_answer(slow('b'))"])
        elapsed = time.monotonic() - t0
    assert [r.final_answer for r in results] == ["A", "B"]
    assert elapsed < 0.9  # one after the other would take > 1 s


def test_environment_is_empty_and_workdir_private(sb, monkeypatch):
    r = sb.run(
        "import random\nenv = dict(random._os.environ)\nprint(sorted(env))\nprint(random._os.getcwd())"
    )
    names, cwd = r.stdout.splitlines()
    assert "OPENAI_API_KEY" not in names and "AGENTLIB_DATA_DIR" not in names
    assert cwd == sb.workdir
    assert cwd == "/tmp/work" if sb.isolation == "kernel" else cwd.startswith(tempfile.gettempdir())


def test_closed_sandbox_refuses_work():
    box = Sandbox()
    box.close()
    box.close()  # idempotent
    with pytest.raises(SandboxError):
        box.run("1")


def test_exec_result_defaults():
    r = ExecResult()
    assert r.ok and r.observation == "" and r.candidate is None


def _descendants(root: int | None = None) -> set[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
    out, todo = set(), [os.getpid() if root is None else root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _temp_dirs() -> set[str]:
    return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("agentlib-sandbox-")}


@pytest.mark.slow
def test_nothing_outlives_close_across_200_sandboxes():
    with Sandbox() as warm:  # the shared zygote is started once and stays
        warm.run_candidates(["x = 1"] * 2)
    procs, fds, dirs = _descendants(), _open_fds(), _temp_dirs()
    for i in range(200):
        box = Sandbox(timeout_s=1)
        box.run("x = 1")
        if i % 20 == 0:
            box.run_candidates(["x = 2", "x = 3"])
        if i % 50 == 0:
            box.run("while True:\n    pass")  # timeout + restart
        box.close()
    assert _descendants() == procs
    assert _open_fds() == fds
    assert _temp_dirs() == dirs


def test_sweep_removes_only_dirs_of_dead_owners(tmp_path):
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid is free now
    dead = tmp_path / f"agentlib-sandbox-{gone.pid}-abc"
    live = tmp_path / f"agentlib-sandbox-{os.getppid()}-def"
    legacy = tmp_path / "agentlib-sandbox-xyz"  # no owner recorded: left alone
    for d in (dead, live, legacy):
        (d / "work1").mkdir(parents=True)
    assert sweep_stale_dirs(tmp_path) == 1
    assert not dead.exists() and live.exists() and legacy.exists()


def test_sandbox_dir_names_its_owner_and_is_removed_on_close():
    with Sandbox(isolation="process") as box:
        base = box._base
        assert os.path.basename(base).startswith(f"agentlib-sandbox-{os.getpid()}-")
        assert os.path.isdir(base)
    assert not os.path.exists(base)
