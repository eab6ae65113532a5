"""How the sandbox chooses and reports its isolation: kernel as root and unprivileged, the one-time
warning and the in-process fallback where namespaces are unavailable, long commit chains."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest

from agentlib import sandbox as sandbox_module
from agentlib.sandbox import Sandbox, SandboxError, isolation_summary, kernel_isolation_problem

KERNEL = not kernel_isolation_problem()


def test_without_kernel_isolation_it_warns_once_and_runs_in_process(monkeypatch):
    monkeypatch.setattr(sandbox_module, "kernel_isolation_problem", lambda preload=(): "no namespaces (test)")
    monkeypatch.setattr(sandbox_module, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="kernel isolation is unavailable .no namespaces .test.."):
        with Sandbox() as sb:
            assert sb.isolation == "process" and sb.run("print(1)").stdout == "1\n"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Sandbox() as sb:  # once per process
            assert sb.isolation == "process"
        with Sandbox(isolation="process") as sb:
            assert sb.isolation == "process"
    with pytest.raises(SandboxError, match="kernel isolation is unavailable here: no namespaces"):
        Sandbox(isolation="kernel")
    with pytest.raises(ValueError):
        Sandbox(isolation="vm")


@pytest.mark.skipif(not KERNEL, reason="no kernel isolation here")
def test_the_summary_names_the_isolation():
    summary = isolation_summary()
    assert summary.startswith("kernel (user, mount, PID, network")
    assert ("cgroups (memory, pids)" in summary) == (sandbox_module._cgroup_limits(1, 1) is not None)


@pytest.mark.skipif(
    not KERNEL or os.geteuid() != 0 or not shutil.which("unshare"),
    reason="needs root to start an unprivileged user (a user namespace) and kernel isolation",
)
def test_kernel_isolation_works_unprivileged():
    """An unprivileged user (uid 1000 without capabilities, in a user namespace as on a laptop)."""
    script = textwrap.dedent("""
        import os, warnings
        warnings.simplefilter("ignore")
        from agentlib.sandbox import Sandbox
        assert os.geteuid() == 1000
        with Sandbox(isolation="kernel") as sb:
            r = sb.run("import random\\nos = random._os\\nprint(os.getuid(), os.getpid(), os.path.exists('/etc/passwd'))")
            assert r.stdout == "0 2 False\\n", r
            rs = sb.run_candidates(["x = 1\\nprint(2)"] * 3)
            assert [c.stdout for c in rs] == ["2\\n"] * 3, rs
            sb.commit(rs[0])
            assert sb.run("print(x)").stdout == "1\\n"
            with open(f"/proc/{sb.pid}/status") as f:
                status = dict(line.split(":", 1) for line in f)
            assert status["Uid"].split()[0] == "1000" and int(status["CapEff"], 16) == 0
        print("ok")
    """)
    out = subprocess.run(
        ["unshare", "--user", "--map-user=1000", "--map-group=1000", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.stdout.strip() == "ok", out.stderr[-3000:]


@pytest.mark.skipif(not KERNEL, reason="no kernel isolation here")
def test_a_long_chain_of_commits_keeps_working():
    """Each commit nests the state one namespace deeper; past the kernel's limit (32) a commit starts
    the sandbox afresh and says so, instead of leaving a broken state."""
    with Sandbox(isolation="kernel", timeout_s=10) as sb:
        sb.run("n = 0")
        restarts = 0
        for _ in range(40):
            rs = sb.run_candidates(["n += 1\nopen(f'f{n}', 'w').close()", "n = -1"])
            if rs[0].error:
                assert rs[0].error.startswith("SandboxError") and "could not be made" in rs[0].error, rs[
                    0
                ].error
                restarts += 1
                sb.commit(rs[0])
                assert sb.run("n = 0").restarted  # the state it had is gone, and the result says so
                continue
            sb.commit(rs[0])
        r = sb.run("import random\nprint(n, len(random._os.listdir('.')))")
        assert r.error is None and restarts <= 2
        assert r.stdout.split()[0] == r.stdout.split()[1]


@pytest.mark.skipif(not KERNEL, reason="no kernel isolation here")
def test_candidates_without_clone3(monkeypatch):
    """Where clone3 is refused (Docker's default seccomp profile), candidates fork and then unshare."""
    monkeypatch.setenv("AGENTLIB_SANDBOX_CLONE3", "0")
    with Sandbox(isolation="kernel", timeout_s=10) as sb:
        sb.run("x = 1\nopen('a', 'w').write('a')")
        for step in range(3):
            rs = sb.run_candidates(
                [
                    "import random\nos = random._os\n"
                    f"x += 1\nopen('b{step}', 'w').write('b')\nprint(os.getpid(), sorted(os.listdir('.')))",
                    "x = -1\nopen('a', 'w').write('changed')",
                ]
            )
            assert rs[0].error is None and rs[0].stdout.startswith("1 ["), rs[0]
            sb.commit(rs[0])
        r = sb.run("print(x, sorted(random._os.listdir('.')), open('a').read())")
        assert r.stdout == "4 ['a', 'b0', 'b1', 'b2'] a\n", r


def test_process_isolation_refuses_the_fork_exec_route():
    with Sandbox(isolation="process") as sb:
        r = sb.run(
            "import typing\nps = typing.sys.modules['_posixsubprocess']\n"
            "ps.fork_exec([b'/bin/true'], [b'/bin/true'], True, (), None, None, -1, -1, -1, -1, -1, -1, "
            "-1, -1, True, True, -1, None, None, None, -1, None, False)"
        )
        assert r.error and r.error.splitlines()[-1].startswith("PermissionError"), r.error
