"""Sandbox overhead: warm ``run`` of a trivial snippet and ``run_candidates`` of 8 trivial candidates.

Measured for the sandbox as it runs here (kernel isolation where available), for its in-process-only
mode, and -- side by side, in the same run -- for the sandbox as it was before kernel isolation (its two
files taken from git at `BEFORE`, run in a subprocess). Further references: a fresh ``python -c
"print(1)"`` process (what a sandbox without a persistent worker pays per step) and smolagents'
in-process, unisolated ``LocalPythonExecutor``.

    flock /tmp/agentlib-heavy.lock .venv/bin/python bench/bench_sandbox.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import ROOT, median_seconds, row, write_rows  # noqa: E402

from agentlib.sandbox import Sandbox  # noqa: E402

SNIPPET = "x = 1 + 1\nprint(x)"
BEFORE = "95c93183e17fed2de86cc0674c53d1858d1dc358"  # the last commit before kernel isolation
MEASURE = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from _common import median_seconds
from agentlib.sandbox import Sandbox
kw = json.loads(sys.argv[2])
snippet = "x = 1 + 1\\nprint(x)"
with Sandbox(timeout_s=10, **kw) as sb:
    assert sb.run(snippet).stdout == "2\\n"
    run_s = median_seconds(lambda: sb.run(snippet), repeat=500, warmup=20)
    cand_s = median_seconds(lambda: sb.run_candidates([snippet] * 8), repeat=30, warmup=3)
    commit_s = median_seconds(lambda: sb.commit(sb.run_candidates([snippet] * 8)[0]), repeat=30, warmup=3)
    print(json.dumps({"run": run_s, "cand": cand_s, "commit": commit_s, "isolation": getattr(sb, "isolation", "")}))
"""


def measure(package_dir: str, **kw) -> dict:
    """The three timings of the sandbox importable from `package_dir`, in a fresh interpreter."""
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, package_dir, json.dumps(kw)],
        cwd=ROOT / "bench",
        capture_output=True,
        text=True,
    )
    if out.returncode:
        raise RuntimeError(f"measuring the sandbox in {package_dir} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_before() -> dict | None:
    """The pre-isolation sandbox, from git; None outside a git checkout that holds `BEFORE`."""
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp, "agentlib")
        pkg.mkdir()
        (pkg / "__init__.py").write_text("")
        for name in ("sandbox.py", "_sandbox_worker.py"):
            got = subprocess.run(["git", "show", f"{BEFORE}:agentlib/{name}"], cwd=ROOT, capture_output=True)
            if got.returncode:
                return None
            (pkg / name).write_bytes(got.stdout)
        return measure(tmp)


def main() -> None:
    now = measure(str(ROOT))
    process = measure(str(ROOT), isolation="process")
    before = measure_before()
    with Sandbox(timeout_s=10) as sb:
        assert sb.run(SNIPPET).stdout == "2\n"
    fresh_s = median_seconds(
        lambda: subprocess.run([sys.executable, "-c", "print(1)"], check=True, capture_output=True),
        repeat=30,
        warmup=2,
    )
    iso = now["isolation"]
    ref = "sandbox before kernel isolation" if before else ""
    old = before or {"run": None, "cand": None, "commit": None}
    ms = lambda v: None if v is None else v * 1e3  # noqa: E731
    rows = [
        row(
            f"run p50 (trivial snippet, warm; {iso} isolation)",
            now["run"] * 1e3,
            "ms",
            ref,
            ms(old["run"]),
            "<= 1 ms",
            now["run"] <= 1e-3,
        ),
        row(
            f"run p50 ({iso} isolation) vs a fresh python -c",
            now["run"] * 1e3,
            "ms",
            "fresh python -c",
            fresh_s * 1e3,
            ">= 8x faster than python -c",
            fresh_s / now["run"] >= 8,
        ),
        row(
            f"run_candidates p50 (8 trivial candidates; {iso} isolation)",
            now["cand"] * 1e3,
            "ms",
            ref,
            ms(old["cand"]),
            "<= 50 ms",
            now["cand"] <= 0.050,
        ),
        row(
            f"run_candidates(8) + commit p50 ({iso} isolation)",
            now["commit"] * 1e3,
            "ms",
            ref,
            ms(old["commit"]),
            "(info)",
        ),
        row("run p50 (process isolation only)", process["run"] * 1e3, "ms", ref, ms(old["run"]), "(info)"),
        row(
            "run_candidates p50 (8; process isolation only)",
            process["cand"] * 1e3,
            "ms",
            ref,
            ms(old["cand"]),
            "(info)",
        ),
    ]
    try:
        from smolagents.local_python_executor import LocalPythonExecutor

        ex = LocalPythonExecutor(additional_authorized_imports=[])
        ex.send_tools({})
        assert ex(SNIPPET).logs == "2\n"
        smol_s = median_seconds(lambda: ex(SNIPPET), repeat=500, warmup=20)
        rows.insert(
            2,
            row(
                f"run p50 ({iso} isolation) vs smolagents LocalPythonExecutor",
                now["run"] * 1e3,
                "ms",
                "smolagents in-process",
                smol_s * 1e3,
                "within 5x of smolagents",
                now["run"] <= 5 * smol_s,
            ),
        )
    except ImportError:
        print("smolagents not installed: skipping that reference")
    write_rows("sandbox", rows)


if __name__ == "__main__":
    main()
