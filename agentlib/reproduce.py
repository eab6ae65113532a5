"""Batch reproduction: run the numbered notebooks in order with papermill.

``python -m agentlib.reproduce --profile cpu`` (what ``make reproduce`` calls) executes
``notebooks/0*.ipynb`` into ``runs/<profile>/`` (executed copies, never committed) with the
``profile`` parameter, and writes the wall time and peak memory of each notebook (the peak of the
summed RSS of the processes it started -- kernel, model servers, sandboxes -- sampled every 0.5 s) to
``runs/<profile>/timing.json`` and ``figures/timing_<profile>.csv``. The notebooks themselves
resume (trajectory JSONL files skip finished ids; trained adapters are kept), so a run that
stops midway picks up where it left off when started again. Timing accumulates over the
invocations of one run: a notebook's wall time is the sum of all its executions, including
ones that failed or were interrupted (recorded with their status).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

from agentlib.paths import ROOT, figures_dir, runs_dir

__all__ = [
    "notebooks",
    "PeakTreeRSS",
    "run_notebook",
    "totals",
    "write_timing",
]


def notebooks(pattern: str = "0*.ipynb") -> list[Path]:
    return sorted((ROOT / "notebooks").glob(pattern))


class PeakTreeRSS:
    """Samples the summed resident memory of this process's descendants every ``interval`` seconds.

    ``getrusage(RUSAGE_CHILDREN)`` cannot tell notebooks apart: it is the largest child of the whole
    process so far, so a training notebook's peak showed up again in every notebook after it.
    """

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        import psutil

        total = 0
        for p in psutil.Process().children(recursive=True):
            try:
                total += p.memory_info().rss
            except psutil.Error:  # exited between listing and reading
                pass
        self.peak_bytes = max(self.peak_bytes, total)
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> PeakTreeRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    @property
    def peak_mb(self) -> int:
        return round(self.peak_bytes / 2**20)


def run_notebook(
    path: Path, profile: str, kernel: str, out_dir: Path, log: list[dict] | None = None, **params
) -> dict:
    """Execute one notebook with papermill; return its timing record. The record is also appended to ``log``
    when given, even when a cell fails or the run is interrupted (``status`` says which; the error propagates)."""
    import papermill as pm

    out = out_dir / path.name
    t0 = time.time()
    status = "interrupted"
    memory = PeakTreeRSS()
    try:
        with memory:
            pm.execute_notebook(
                str(path),
                str(out),
                parameters={"profile": profile, **params},
                kernel_name=kernel,
                cwd=str(path.parent),
                progress_bar=False,
                log_output=True,
                request_save_on_cell_execute=True,
            )
        status = "ok"
    except Exception:
        status = "failed"
        raise
    finally:
        record = {
            "notebook": path.name,
            "wall_s": round(time.time() - t0, 1),
            "peak_rss_mb": memory.peak_mb,
            "status": status,
        }
        if log is not None:
            log.append(record)
    return record


def totals(invocations: list[dict]) -> list[dict]:
    """Per notebook, over every invocation of a run: summed wall time, peak memory, executions."""
    out: dict[str, dict] = {}
    for inv in invocations:
        for r in inv["notebooks"]:
            t = out.setdefault(
                r["notebook"], {"notebook": r["notebook"], "wall_s": 0.0, "peak_rss_mb": 0, "runs": 0}
            )
            t["wall_s"] = round(t["wall_s"] + r["wall_s"], 1)
            t["peak_rss_mb"] = max(t["peak_rss_mb"], r["peak_rss_mb"])
            t["runs"] += 1
    return sorted(out.values(), key=lambda t: t["notebook"])


def _history(path: Path) -> list[dict]:
    """Earlier invocations of this run (a timing.json without them is one invocation)."""
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    return old.get("invocations") or [{"started": None, "notebooks": old.get("notebooks", [])}]


def write_timing(out_dir: Path, profile: str, invocations: list[dict]) -> dict:
    """``runs/<profile>/timing.json`` (every invocation + totals) and ``figures/timing_<profile>.csv`` (totals)."""
    rows = totals(invocations)
    summary = {
        "profile": profile,
        "total_wall_s": round(sum(r["wall_s"] for r in rows), 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "notebooks": rows,
        "invocations": invocations,
    }
    (out_dir / "timing.json").write_text(json.dumps(summary, indent=2))
    with (figures_dir() / f"timing_{profile}.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["notebook", "wall_s", "peak_rss_mb", "runs"])
        w.writeheader()
        w.writerows(rows)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agentlib.reproduce")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--kernel", default="agentlib")
    parser.add_argument("--only", nargs="*", default=None, help="notebook name prefixes, e.g. 01 02")
    parser.add_argument(
        "--teacher-source",
        choices=("published", "generate"),
        default=None,
        help="notebook 01: load data/'s teacher set or run the teacher (default: the profile's)",
    )
    args = parser.parse_args(argv)
    for var in (
        "AGENTLIB_DATA_DIR",
        "AGENTLIB_RUNS_DIR",
    ):  # kernels run in notebooks/: a relative path breaks
        if os.environ.get(var):
            os.environ[var] = str(Path(os.environ[var]).expanduser().resolve())

    out_dir = runs_dir(args.profile)
    invocations = _history(out_dir / "timing.json")
    current = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "notebooks": []}
    invocations.append(current)
    try:
        for nb in notebooks():
            if args.only and not any(nb.name.startswith(p) for p in args.only):
                continue
            print(f"== {nb.name} (profile {args.profile})", flush=True)
            params = (
                {"teacher_source": args.teacher_source}
                if args.teacher_source and nb.name.startswith("01")
                else {}
            )
            rec = run_notebook(nb, args.profile, args.kernel, out_dir, log=current["notebooks"], **params)
            print(f"== {nb.name}: {rec['wall_s']} s, peak RSS {rec['peak_rss_mb']} MB", flush=True)
    finally:  # a failed or interrupted notebook still counts towards the run's time
        summary = write_timing(out_dir, args.profile, invocations)
    print(
        f"done: {summary['total_wall_s']} s over {len(invocations)} invocation(s); executed notebooks in {out_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
