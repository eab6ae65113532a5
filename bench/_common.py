"""Shared helpers for benchmark scripts: median timing and one JSON result per script.

Every benchmark compares a measured value with a reference measured *in the same run* and
writes rows to ``runs/bench/<script>.json``; ``bench/collect.py`` turns them into one table.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = Path(os.environ.get("AGENTLIB_BENCH_DIR", ROOT / "runs" / "bench"))


def median_seconds(fn: Callable[[], object], repeat: int = 50, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeat`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def row(
    metric: str,
    value: float,
    unit: str,
    reference: str = "",
    reference_value: float | None = None,
    bar: str = "",
    passed: bool | None = None,
) -> dict:
    """One result row. ``ratio`` is value / reference_value when a reference was measured."""
    ratio = None
    if reference_value:
        ratio = value / reference_value
    return {
        "metric": metric,
        "value": value,
        "unit": unit,
        "reference": reference,
        "reference_value": reference_value,
        "ratio": ratio,
        "bar": bar,
        "passed": passed,
    }


def speed_row(
    metric: str, value: float, unit: str, ref: tuple[str, float] | None, times: float | None
) -> dict:
    """A speed compared with the reference arm ``ref`` (label, value); ``times``: the bar's factor, for the arm
    that the bar is about (None for the others)."""
    label, ref_value = ref if ref else ("", None)
    passed = value >= times * ref_value if times and ref_value else None
    return row(metric, value, unit, label, ref_value, f">= {times:g}x" if times else "", passed)


def write_rows(name: str, rows: list[dict]) -> Path:
    """Write a benchmark's rows (with the machine description) and print them."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{name}.json"
    payload = {"bench": name, "machine": machine(), "rows": rows}
    path.write_text(json.dumps(payload, indent=2))
    for r in rows:
        ref = f" | ref {r['reference']}={r['reference_value']:.4g}" if r["reference_value"] else ""
        ratio = f" | ratio {r['ratio']:.2f}" if r["ratio"] else ""
        ok = "" if r["passed"] is None else (" | PASS" if r["passed"] else " | FAIL")
        print(f"{name}: {r['metric']} = {r['value']:.4g} {r['unit']}{ref}{ratio} | bar: {r['bar']}{ok}")
    return path


def machine() -> str:
    """A one-line description of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"
