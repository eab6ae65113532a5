"""Batch reproduction: run the numbered notebooks in order with papermill.

``python -m agentlib.reproduce --profile cpu`` (what ``make reproduce`` calls) executes
``notebooks/0*.ipynb`` into ``runs/<profile>/`` (executed copies, never committed) with the
``profile`` parameter, and writes the wall time and peak memory of each notebook to
``runs/<profile>/timing.json`` and ``figures/timing_<profile>.csv``. The notebooks themselves
resume (trajectory JSONL files skip finished ids; trained adapters are kept), so a run that
stops midway picks up where it left off when started again.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

from agentlib.paths import ROOT, figures_dir, runs_dir


def notebooks(pattern: str = "0*.ipynb") -> list[Path]:
    return sorted((ROOT / "notebooks").glob(pattern))


def run_notebook(path: Path, profile: str, kernel: str, out_dir: Path, **params) -> dict:
    """Execute one notebook with papermill; return its timing record (raises on a failing cell)."""
    import papermill as pm

    out = out_dir / path.name
    t0 = time.time()
    pm.execute_notebook(
        str(path), str(out), parameters={"profile": profile, **params}, kernel_name=kernel,
        cwd=str(path.parent), progress_bar=False, log_output=True, request_save_on_cell_execute=True,
    )  # fmt: skip
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"notebook": path.name, "wall_s": round(time.time() - t0, 1), "peak_rss_mb": round(peak_kb / 1024)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agentlib.reproduce")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--kernel", default="agentlib")
    parser.add_argument("--only", nargs="*", default=None, help="notebook name prefixes, e.g. 01 02")
    args = parser.parse_args(argv)
    if os.environ.get("AGENTLIB_DATA_DIR"):  # kernels run in notebooks/: a relative path would break there
        os.environ["AGENTLIB_DATA_DIR"] = str(Path(os.environ["AGENTLIB_DATA_DIR"]).expanduser().resolve())

    out_dir = runs_dir(args.profile)
    records = []
    total0 = time.time()
    for nb in notebooks():
        if args.only and not any(nb.name.startswith(p) for p in args.only):
            continue
        print(f"== {nb.name} (profile {args.profile})", flush=True)
        rec = run_notebook(nb, args.profile, args.kernel, out_dir)
        print(f"== {nb.name}: {rec['wall_s']} s, peak RSS {rec['peak_rss_mb']} MB", flush=True)
        records.append(rec)
    summary = {
        "profile": args.profile,
        "total_wall_s": round(time.time() - total0, 1),
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "notebooks": records,
    }
    (out_dir / "timing.json").write_text(json.dumps(summary, indent=2))
    fig_dir = figures_dir()
    with (fig_dir / f"timing_{args.profile}.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["notebook", "wall_s", "peak_rss_mb"])
        w.writeheader()
        w.writerows(records)
    print(f"done in {summary['total_wall_s']} s; executed notebooks in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
