"""Attacks on the sandbox's kernel layer: code that has already got around the in-process layers.

Every case starts from what model-written code can reach without any forbidden import: ``typing.sys``
hands over ``sys``, and with it ``_posixsubprocess`` (a shell, without the audit events of
``subprocess``), ``_socket`` and ``pickle``; ``random._os`` is ``os``. From there the code tries to read
and write the host's files, listen on the network, leave processes behind, exhaust shared limits, keep
computing between runs, lie to the parent, and reach the sandbox's state from uncommitted candidates.
The in-process layers stop none of these (each case got out of the sandbox before kernel isolation);
the namespaces, cgroups, the box's stop between runs and the parent's checks must.
"""

from __future__ import annotations

import inspect
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid

import pytest

from agentlib import sandbox as sandbox_module
from agentlib.sandbox import Sandbox

_problem = getattr(sandbox_module, "kernel_isolation_problem", lambda: None)()
pytestmark = pytest.mark.skipif(bool(_problem), reason=f"no kernel isolation here: {_problem}")

PRELUDE = textwrap.dedent("""
    import typing, random
    sys, os = typing.sys, random._os
    def shell(cmd, wait=True):
        ps = sys.modules['_posixsubprocess']
        r, w = os.pipe()
        er, ew = os.pipe()
        pid = ps.fork_exec([b'/bin/sh', b'-c', cmd.encode()], [b'/bin/sh'], True, (w,), None, None,
                           -1, -1, -1, w, -1, w, er, ew, True, True, -1, None, None, None, -1, None, False)
        for fd in (w, ew, er):
            os.close(fd)
        if not wait:
            os.close(r)
            return pid
        out = b''
        while chunk := os.read(r, 65536):
            out += chunk
        os.close(r)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        return out.decode(errors='replace')
""")


def box(**kw) -> Sandbox:
    """A kernel-isolated sandbox with the attack helpers defined (isolation= where the API has it)."""
    if "isolation" in inspect.signature(Sandbox).parameters:
        kw.setdefault("isolation", "kernel")
    sb = Sandbox(**kw)
    r = sb.run(PRELUDE)
    assert r.error is None, r.error
    return sb


def _processes_with(marker: str) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        out.append(int(name))
            except OSError:
                pass
    return out


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime of the whole process (all threads)


# ------------------------------------------------------------------------------------------- files


def test_a_shell_sees_none_of_the_hosts_files():
    here = os.path.dirname(os.path.abspath(__file__))
    with box() as sb:
        r = sb.run(f"print(shell('cat /etc/passwd; ls {here}; ls /root /home /work /etc 2>&1; echo done'))")
        assert r.error is None, r.error
        assert "root:x:0:0" not in r.stdout and "test_sandbox_kernel.py" not in r.stdout
        assert r.stdout.rstrip().endswith("done")


def test_nothing_is_written_outside_the_box():
    marker = os.path.join(tempfile.gettempdir(), f"agentlib-escape-{uuid.uuid4().hex}")
    with box() as sb:
        sb.run(f"shell('echo x > {marker}; mkdir -p {marker}.d; ln -s /etc {marker}.l')")
        sb.run(f"os.mkfifo('{marker}.fifo')")  # no audit event: got out before kernel isolation
        sb.run(f"import numpy\nnumpy.arange(3).tofile('{marker}.npy')")
        r = sb.run("shell('touch /usr/x /bin/x 2>&1; echo $?')")
    try:
        assert not [p for p in os.listdir(tempfile.gettempdir()) if p.startswith(os.path.basename(marker))]
    finally:
        subprocess.run(["rm", "-rf", marker, marker + ".d", marker + ".l", marker + ".fifo", marker + ".npy"])
    assert r.error is None


def test_the_interpreter_and_libraries_are_read_only():
    with box() as sb:
        target = os.path.dirname(os.__file__)
        r = sb.run(f"print(shell('touch {target}/agentlib-x 2>&1; echo rc=$?'))")
        assert "rc=0" not in r.stdout and not os.path.exists(f"{target}/agentlib-x")


# ----------------------------------------------------------------------------------------- network


def test_a_listening_socket_is_unreachable_from_outside():
    with box() as sb:
        r = sb.run("s = sys.modules['_socket'].socket(-1)\ns.listen()\nprint(s.getsockname()[1])")
        if r.error is None:  # it may listen -- inside its own network namespace
            port = int(r.stdout)
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
        r = sb.run("print(shell('cat /proc/net/dev'))")
        assert [line.split(":")[0].strip() for line in r.stdout.strip().splitlines()[2:]] == ["lo"]


# --------------------------------------------------------------------------------------- processes


def test_no_process_outlives_close():
    marker = f"4{uuid.uuid4().int % 10**8}"  # a sleep of this many seconds names the process
    with box() as sb:
        sb.run(f"shell('setsid sleep {marker} & nohup sleep {marker} >/dev/null 2>&1 &', wait=False)")
        sb.run_candidates([f"shell('setsid sleep {marker} &')"] * 2)
        deadline = time.monotonic() + 5
        while len(_processes_with(marker)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _processes_with(marker)
    deadline = time.monotonic() + 10
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_with(marker) == []


def test_no_process_outlives_the_parent():
    marker = f"5{uuid.uuid4().int % 10**8}"
    script = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        from test_sandbox_kernel import box
        sb = box()
        sb.run("shell('setsid sleep {marker} &')")
        time.sleep(0.5)
        os._exit(0)  # no close(), no atexit
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    deadline = time.monotonic() + 10
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_with(marker) == []


def test_kill_everything_reaches_only_the_box():
    with box(timeout_s=5) as victim, box(timeout_s=5) as sb:
        victim.run("kept = 1")
        r = sb.run("shell('kill -9 -1')")  # every process the box's user may signal
        assert sb.run("print(7)").stdout == "7\n"  # a fresh worker if its own died
        assert victim.run("print(kept)").stdout == "1\n" and os.getpid() > 0
        sb.run(PRELUDE)  # (its worker was among the killed: the state is gone)
        r = sb.run("print(os.getppid(), shell('kill -9 1 2>&1; echo $?').split()[-1])")
        assert r.stdout == "1 0\n"  # its parent is the box's pid 1, which ignores the signal...
        assert sb.run("print(8)").stdout == "8\n"  # ...so the box is still there


def test_a_process_bomb_does_not_starve_other_sandboxes():
    with box(timeout_s=20, max_processes=64) as sb:
        sb.run(
            "shell('for i in $(seq 200); do sleep 60 & done; wait', wait=False)\nimport time\ntime.sleep(1)"
        )
        with box(timeout_s=20) as other:
            results = other.run_candidates([f"final_answer({i})" for i in range(8)])
            assert [r.final_answer for r in results] == list(range(8))
        with open(f"/proc/{sb.pid}/cgroup") as f:
            assert "pids" in f.read()


@pytest.mark.skipif(
    getattr(sandbox_module, "_cgroup_limits", lambda *a: {})(1, 1) is None,
    reason="per-sandbox memory cgroups need root and a cgroup v1 hierarchy",
)
def test_memory_is_capped_over_all_processes_of_the_box():
    hold = textwrap.dedent("""
        child = (sys.executable + " -c 'import time; b = bytearray(150 * 2**20); b[::4096] = b\\"x\\" * len(b[::4096]);"
                 " open(\\"/tmp/ok\\" + str(time.time()), \\"w\\"); time.sleep(30)'")
        shell(" & ".join([child] * 5) + " & sleep 4")
        print(len([n for n in os.listdir('/tmp') if n.startswith('ok')]))
    """)
    with box(timeout_s=30, memory_mb=128, disk_mb=64) as sb:  # the box: 128 + 64 + 256 MB
        r = sb.run(hold)
        assert r.error is None, r.error
        assert int(r.stdout) <= 2  # five children of 150 MB each: the kernel kept the rest out


# ----------------------------------------------------------------------------------------- runtime


def test_nothing_runs_between_runs():
    with box() as sb:
        r = sb.run(
            "import queue\nthreading = queue.threading\n"
            "def spin():\n    while True:\n        pass\n"
            "threading.Thread(target=spin, daemon=True).start()"
        )
        assert r.error is None, r.error
        before = _cpu_ticks(sb.pid)
        time.sleep(0.6)
        assert _cpu_ticks(sb.pid) - before <= 2  # ticks of 10 ms: stopped, not spinning


def _forge(message: str, then: str = "import time\ntime.sleep(0.5)") -> str:
    """Code that writes `message` (Python source of a value) on the worker's channel, then runs `then`."""
    send = textwrap.dedent(f"""
        struct = sys.modules['struct']
        pickle = sys.modules['pickle']
        body = pickle.dumps({message})
        for fd in range(3, 64):
            try:
                if os.fstat(fd).st_mode & 0o170000 == 0o140000:
                    os.write(fd, struct.pack('!Q', len(body)) + body)
            except OSError:
                pass
    """)
    return send + then + "\n"


def test_an_early_result_does_not_let_the_code_go_on():
    result = "{'stdout': 'early\\n', 'error': None, 'final_answer': None, 'called_final_answer': False, 'duration_s': 0.0, 'last_output': None}"
    forge = _forge(f"('result', {result})", then="while True:\n    pass")
    with box(timeout_s=3) as sb:
        r = sb.run(forge)
        assert r.stdout == "early\n" and not r.timed_out
        before = _cpu_ticks(sb.pid)
        time.sleep(0.6)
        assert _cpu_ticks(sb.pid) - before <= 2


def test_a_slow_tool_call_cannot_hold_the_timeout():
    def slow(x):
        time.sleep(4)
        return x

    with box(tools={"slow": slow}, timeout_s=1) as sb:
        t0 = time.monotonic()
        r = sb.run("slow(1)")
        assert r.timed_out and time.monotonic() - t0 < 2.5
        assert sb.run("print(1)").stdout == "1\n"


# ------------------------------------------------------------------------- hostile bytes to the parent


@pytest.mark.parametrize(
    "message",
    [
        "('tool', ['unhashable'], [], {})",  # made Sandbox.run raise; later runs got the previous output
        "('tool', 'echo', 'not a list', {})",
        "('tool', 'echo', [], {1: 2})",
        "('result', {'stdout': 5})",
        "('result', {'stdout': '', 'error': None, 'called_final_answer': 'yes'})",
        "('ready',)",
        "'not a tuple'",
        "('result', {'stdout': 'x' * 40_000_000, 'error': None, 'final_answer': None, "
        "'called_final_answer': False, 'duration_s': 0.0, 'last_output': None})",
    ],
)
def test_protocol_violations_restart_the_worker_with_a_clear_error(message):
    with box(tools={"echo": lambda x: x}, timeout_s=5) as sb:
        sb.run("kept = 1")
        r = sb.run(_forge(message))
        assert len(r.stdout) <= 10_200 and (r.error is None or len(r.error) < 25_000)
        if r.restarted:
            assert r.error.startswith("SandboxError") and "restarted" in r.error
        r = sb.run("print('fresh')")
        assert r.stdout == "fresh\n" and r.error is None


def test_a_result_whose_str_never_ends_is_bounded():
    dag = (
        "('result', {'stdout': '', 'error': None, 'called_final_answer': True, 'duration_s': 0.0, "
        "'last_output': None, 'final_answer': (lambda: [x := ['a' * 1000, 10**5000]] + "
        "[x := [x, x] for _ in range(60)])()[-1]})"
    )
    with box(timeout_s=5) as sb:
        r = sb.run(_forge(dag))
        t0 = time.monotonic()
        text = str(r.final_answer)
        assert time.monotonic() - t0 < 1 and len(text) < 2_000_000


def test_a_forged_greeting_cannot_make_the_parent_kill_another_process():
    with box(timeout_s=5) as victim, box(timeout_s=5) as sb:
        victim.run("kept = 1")
        target = victim.pid
        r = sb.run(
            textwrap.dedent(f"""
            main = sys.modules['__main__']
            real_send = main.Worker.send
            def send(self, obj):
                if obj[0] == 'ready':
                    obj = ('ready', {target})
                real_send(self, obj)
            main.Worker.send = send
        """)
        )
        assert r.error is None, r.error
        sb.run_candidates(["x = 1"] * 3)
        sb.run("pass")  # the candidates are discarded (killed) here
        r = victim.run("print(kept)")
        assert r.stdout == "1\n" and not r.restarted


# -------------------------------------------------------------------------------------- candidates


def test_an_open_file_is_not_shared_with_candidates():
    with box() as sb:
        sb.run("f = open('shared.txt', 'w')")
        results = sb.run_candidates(["f.write('from a candidate')\nf.flush()"] * 3)
        assert all(r.error is None for r in results), [r.error for r in results]
        r = sb.run("f.flush()\nprint(repr(open('shared.txt').read()))")
        assert r.stdout == "''\n"


def test_candidates_cannot_talk_over_an_inherited_socketpair():
    send = "import time\nfor _ in range(20):\n    a.send(b'hello')\n    time.sleep(0.05)"
    receive = "b.settimeout(1.5)\ntry:\n    print(b.recv(100))\nexcept OSError as e:\n    print('no', type(e).__name__)"
    with box(timeout_s=5) as sb:
        sb.run("a, b = sys.modules['_socket'].socketpair()")
        heard = sb.run_candidates([send, receive])[1].stdout
    assert "hello" not in heard


def test_uncommitted_candidates_change_nothing():
    with box(timeout_s=5) as sb:
        sb.run("open('keep.txt', 'w').write('mine')\nstate = 1")
        results = sb.run_candidates(
            [
                "open('keep.txt', 'w').write('theirs')\nopen('new.txt', 'w').write('x')\nstate = 2",
                "shell('rm -rf /tmp/work/*; kill -9 -1')",
                "import time\nshell('sleep 30 &', wait=False)\nos.kill(os.getppid(), 9)",
            ]
        )
        assert results[0].error is None
        r = sb.run("print(open('keep.txt').read(), sorted(os.listdir('.')), state)")
        assert r.stdout == "mine ['keep.txt'] 1\n" and not r.restarted


def test_a_big_work_dir_is_not_copied_per_candidate():
    with box(timeout_s=20, disk_mb=256, file_size_mb=256) as sb:
        assert sb.run("with open('big.bin', 'wb') as f:\n    f.write(b'x' * (200 * 2**20))").error is None
        t0 = time.monotonic()
        results = sb.run_candidates(["print(os.stat('big.bin').st_size, open('big.bin', 'rb').read(3))"] * 8)
        assert [r.stdout for r in results] == [f"{200 * 2**20} b'xxx'\n"] * 8
        assert time.monotonic() - t0 < 10


# -------------------------------------------------------------------------------------------- disk


def test_disk_and_file_count_are_capped():
    with box(timeout_s=30, disk_mb=64, max_files=2_000) as sb:
        r = sb.run(
            "n = 0\ntry:\n    for i in range(12):\n        with open(f'f{i}', 'wb') as f:\n"
            "            f.write(b'x' * (60 * 2**20))\n        n += 1\nexcept OSError as e:\n"
            "    print(n, e.errno)"
        )
        assert r.stdout.split()[1] == "28", r  # ENOSPC
        assert int(r.stdout.split()[0]) <= 1
        r = sb.run(
            "for i in range(12):\n    os.remove(f'f{i}') if os.path.exists(f'f{i}') else None\n"
            "n = 0\ntry:\n    for i in range(30_000):\n        open(f'g{i}', 'w').close()\n        n += 1\n"
            "except OSError as e:\n    print(n, e.errno)"
        )
        assert r.stdout.split()[1] == "28" and int(r.stdout.split()[0]) < 2_000, r
        assert sb.run("print(1)").stdout == "1\n"


def test_a_gigabyte_cannot_be_written():
    with box(timeout_s=60) as sb:  # the default: 256 MB of disk
        r = sb.run("shell('head -c 1073741824 /dev/zero > /tmp/work/big')\nprint(os.stat('big').st_size)")
        assert r.error is None, r.error
        assert int(r.stdout) <= 256 * 2**20
