"""The README's results section, rendered from what a run wrote to ``figures/`` (never typed by hand).

``python -m agentlib.report cpu`` replaces the block between ``<!-- results:cpu -->`` and
``<!-- /results:cpu -->`` in README.md with tables built from ``figures/results_cpu.csv``,
``run_summary_cpu.csv``, ``teacher_cpu.csv`` and ``timing_cpu.csv``.
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path
from typing import Any

from agentlib.metrics import wilson_interval
from agentlib.paths import ROOT, figures_dir
from agentlib.pipeline import METHODS, PAPER_05B, method_plan

__all__ = [
    "AVERAGES",
    "md_table",
    "wide_table",
    "results_markdown",
    "update_readme",
]

AVERAGES = ("factual_avg", "math_avg", "overall_avg")


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `make reproduce PROFILE=...` first")
    with path.open() as f:
        return list(csv.DictReader(f))


def _pct(interval: tuple[float, float]) -> str:
    return f"[{100 * interval[0]:.0f}, {100 * interval[1]:.0f}]"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table: one header row, then one row per list of cell texts."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def wide_table(df: Any) -> Any:
    """Method × benchmark view with "score [low, high]" cells (the paper's Table 2 layout): rows in the paper's
    method order, columns in the order of ``df`` (the eval sets' order) with the averages last."""
    cells = df.assign(
        cell=[
            f"{s:.1f} [{lo:.1f}, {hi:.1f}]" for s, lo, hi in zip(df.score, df.ci_low, df.ci_high, strict=True)
        ]
    )
    wide = cells.pivot(index="method", columns="benchmark", values="cell")
    benches = list(dict.fromkeys(df.benchmark))
    columns = [b for b in benches if b not in AVERAGES] + [b for b in AVERAGES if b in benches]
    order = [m for m in METHODS if m in wide.index]
    return wide.loc[order, columns]


def results_markdown(profile: str = "cpu") -> str:
    """Markdown tables: accuracy by method and benchmark (with 95% intervals and n), student behaviour,
    teacher statistics, timing."""
    fig = figures_dir()
    res = _rows(fig / f"results_{profile}.csv")
    cell = {(r["method"], r["benchmark"]): r for r in res}
    benches = list(dict.fromkeys(r["benchmark"] for r in res if r["benchmark"] not in AVERAGES)) + list(
        AVERAGES
    )
    n = {b: next(r["n"] for r in res if r["benchmark"] == b) for b in benches}
    methods = [m for m in METHODS if any(k[0] == m for k in cell)]

    def fmt(m: str, b: str) -> str:
        r = cell.get((m, b))
        return (
            ""
            if r is None
            else f"{float(r['score']):.1f} [{float(r['ci_low']):.1f}, {float(r['ci_high']):.1f}]"
        )

    table = md_table(
        ["method"] + [f"{b} (n={n[b]})" for b in benches] + ["paper 0.5B (avg)"],
        [
            [f"`{m}`"] + [fmt(m, b) for b in benches] + [f"{PAPER_05B[m]:.2f}" if m in PAPER_05B else ""]
            for m in methods
        ],
    )
    out = [table]
    flat = [r for r in res if float(r["ci_low"]) == float(r["ci_high"])]
    if flat:
        out += [
            "",
            f"{len(flat)} of {len(res)} cells have a zero-width interval: within every benchmark such a cell "
            "covers, all of its answers were scored the same (or there was one), so resampling questions cannot "
            f"show the uncertainty. Such an interval says nothing; for scale, a 95% Wilson interval is "
            f"{_pct(wilson_interval(0, 3))} for 0 of 3 correct and {_pct(wilson_interval(1, 1))} for 1 of 1.",
        ]
    teacher = fig / f"teacher_{profile}.csv"
    untrained = [r["run"] for r in _rows(teacher) if int(r["kept"]) == 0] if teacher.exists() else []
    for run in untrained:
        same = [f"`{m}`" for m in methods if method_plan(m).get("adapter") == run]
        out += [
            "",
            f"**The `{run}` student was not trained**: none of the teacher's `{run}` trajectories survived "
            f"the filter, so {' and '.join(same)} ran the untuned model.",
        ]
    summary = fig / f"run_summary_{profile}.csv"
    if summary.exists():
        rows = [r for r in _rows(summary) if r["method"] in methods and float(r.get("mean_steps") or 0) > 0]
        out += [
            "",
            "Student behaviour (agent methods, all benchmarks pooled; rates in %):",
            "",
            md_table(
                [
                    "method",
                    "parse-error rate",
                    "step-limit rate",
                    "repeat-stop rate",
                    "mean steps",
                    "mean search calls",
                    "decode tokens/s",
                ],
                [
                    [
                        f"`{r['method']}`",
                        f"{100 * float(r['parse_error_rate']):.0f}",
                        f"{100 * float(r['step_limit_rate']):.0f}",
                        f"{100 * float(r.get('repeat_stop_rate') or 0):.0f}",
                        f"{float(r['mean_steps']):.2f}",
                        f"{float(r['mean_search_calls']):.2f}",
                        f"{float(r['tokens_per_s']):.1f}" if r.get("tokens_per_s") else "",
                    ]
                    for r in sorted(rows, key=lambda r: methods.index(r["method"]))
                ],
            ),
        ]
    if teacher.exists():
        out += [
            "",
            "Teacher (training questions; accuracy of the greedy sample, yield = questions with ≥ 1 kept "
            "trajectory over all samples):",
            "",
            md_table(
                [
                    "run",
                    "questions",
                    "trajectories",
                    "greedy accuracy %",
                    "kept",
                    "yield %",
                    "parse-error %",
                    "step-limit %",
                    "repeat-stop %",
                    "mean steps",
                    "mean search calls",
                    "decode tokens/s",
                ],
                [
                    [
                        r["run"],
                        r["questions"],
                        r["trajectories"],
                        f"{float(r['accuracy_greedy']):.1f}",
                        r["kept"],
                        f"{float(r['yield_pct']):.1f}",
                        f"{float(r['parse_error_rate']):.0f}",
                        f"{float(r.get('step_limit_rate') or 0):.0f}",
                        f"{float(r.get('repeat_stop_rate') or 0):.0f}",
                        f"{float(r['mean_steps']):.2f}",
                        f"{float(r['mean_search_calls']):.2f}",
                        f"{float(r['tokens_per_s']):.1f}" if r.get("tokens_per_s") else "",
                    ]
                    for r in _rows(teacher)
                ],
            ),
        ]
    timing = fig / f"timing_{profile}.csv"
    if timing.exists():
        rows = _rows(timing)
        total = sum(float(r["wall_s"]) for r in rows)
        out += [
            "",
            f"Wall time (written by the run; {total / 60:.1f} min in all; a notebook's time sums all of its "
            "executions, resumed or interrupted ones included):",
            "",
            md_table(
                ["notebook", "wall (min)", "peak RSS (MB)", "executions"],
                [
                    [r["notebook"], f"{float(r['wall_s']) / 60:.1f}", r["peak_rss_mb"], r.get("runs") or "1"]
                    for r in rows
                ],
            ),
        ]
    return "\n".join(out)


def update_readme(profile: str = "cpu", readme: Path | None = None) -> bool:
    """Replace the README's results block for ``profile``; False when the README has no such block."""
    readme = readme or ROOT / "README.md"
    text = readme.read_text()
    start, end = f"<!-- results:{profile} -->", f"<!-- /results:{profile} -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        return False
    block = f"{start}\n{results_markdown(profile)}\n{end}"
    readme.write_text(pattern.sub(lambda _: block, text))
    return True


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    if update_readme(name):
        print(f"README.md: results block for {name} updated")
    else:
        print(f"README.md has no <!-- results:{name} --> block: nothing to update")
