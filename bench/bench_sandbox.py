"""Sandbox overhead: warm ``run`` of a trivial snippet and ``run_candidates`` of 8 trivial candidates.

References measured in the same run: a fresh ``python -c "print(1)"`` process (what a sandbox without a
persistent worker pays per step) and smolagents' in-process, unisolated ``LocalPythonExecutor``.

    flock /tmp/agentlib-heavy.lock .venv/bin/python bench/bench_sandbox.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import median_seconds, row, write_rows  # noqa: E402

from agentlib.sandbox import Sandbox  # noqa: E402

SNIPPET = "x = 1 + 1\nprint(x)"


def main() -> None:
    with Sandbox(timeout_s=10) as sb:
        assert sb.run(SNIPPET).stdout == "2\n"
        run_s = median_seconds(lambda: sb.run(SNIPPET), repeat=500, warmup=20)

        def candidates() -> None:
            results = sb.run_candidates([SNIPPET] * 8)
            assert all(r.stdout == "2\n" for r in results)

        cand_s = median_seconds(candidates, repeat=30, warmup=3)

        def step() -> None:  # one SAG step: 8 candidates, then adopt one
            sb.commit(sb.run_candidates([SNIPPET] * 8)[0])

        commit_s = median_seconds(step, repeat=30, warmup=3)

    fresh_s = median_seconds(
        lambda: subprocess.run([sys.executable, "-c", "print(1)"], check=True, capture_output=True),
        repeat=30, warmup=2,
    )
    rows = [
        row("run p50 (trivial snippet, warm)", run_s * 1e3, "ms", "fresh python -c", fresh_s * 1e3,
            "<= 1 ms and >= 8x faster than python -c", run_s <= 1e-3 and fresh_s / run_s >= 8),
    ]
    try:
        from smolagents.local_python_executor import LocalPythonExecutor

        ex = LocalPythonExecutor(additional_authorized_imports=[])
        ex.send_tools({})
        assert ex(SNIPPET).logs == "2\n"
        smol_s = median_seconds(lambda: ex(SNIPPET), repeat=500, warmup=20)
        rows.append(row("run p50 vs smolagents LocalPythonExecutor", run_s * 1e3, "ms", "smolagents in-process",
                        smol_s * 1e3, "within 5x of smolagents", run_s <= 5 * smol_s))
    except ImportError:
        print("smolagents not installed: skipping that reference")
    rows.append(row("run_candidates p50 (8 trivial candidates)", cand_s * 1e3, "ms", bar="<= 50 ms",
                    passed=cand_s <= 0.050))
    rows.append(row("run_candidates(8) + commit p50", commit_s * 1e3, "ms", bar="(info)"))
    write_rows("sandbox", rows)


if __name__ == "__main__":
    main()
