"""`make bench`: run every bench/bench_*.py one after another, then print one table of all rows.

Each script measures its value and a reference in the same run and writes runs/bench/<name>.json.
The table goes to runs/bench/BENCH.md (and stdout) with the machine's description.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from _common import OUT_DIR, ROOT, machine


def main() -> int:
    scripts = sorted((ROOT / "bench").glob("bench_*.py"))
    only = set(sys.argv[1:])
    failed = []
    for script in scripts:
        if only and script.stem not in only:
            continue
        print(f"== {script.name}", flush=True)
        t0 = time.time()
        rc = subprocess.call([sys.executable, str(script)], cwd=ROOT)
        print(f"== {script.name}: exit {rc} in {time.time() - t0:.0f} s", flush=True)
        if rc:
            failed.append(script.name)
    lines = [
        f"# Benchmarks\n\nMachine: {machine()}; sandbox isolation: {__import__('agentlib.sandbox', fromlist=['x']).isolation_summary()}\n",
        "| bench | metric | value | unit | reference | ref value | ratio | bar | pass |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(OUT_DIR.glob("*.json")):
        payload = json.loads(path.read_text())
        for r in payload["rows"]:
            fmt = lambda v: "" if v is None else f"{v:.4g}"  # noqa: E731
            ok = {True: "yes", False: "NO", None: ""}[r["passed"]]
            lines.append(
                f"| {payload['bench']} | {r['metric']} | {fmt(r['value'])} | {r['unit']} | "
                f"{r['reference']} | {fmt(r['reference_value'])} | {fmt(r['ratio'])} | {r['bar']} | {ok} |"
            )
    table = "\n".join(lines) + "\n"
    (OUT_DIR / "BENCH.md").write_text(table)
    print(table)
    if failed:
        print(f"failed scripts: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
