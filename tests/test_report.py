"""The README's results block is rendered from a run's CSV files, never typed by hand."""

from __future__ import annotations

import csv

import pytest

import agentlib.report as report


def _write(path, rows):
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


@pytest.fixture
def figs(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "figures_dir", lambda: tmp_path)
    res = [
        {"method": m, "benchmark": b, "score": s, "ci_low": s - 10, "ci_high": s + 10, "n": n}
        for m, base in (("agent_distill", 40.0), ("cot_distill", 20.0))
        for b, s, n in (
            ("hotpotqa", base, 6),
            ("math500", base / 2, 4),
            ("factual_avg", base, 6),
            ("math_avg", base / 2, 4),
            ("overall_avg", 0.75 * base, 10),
        )
    ]
    _write(tmp_path / "results_cpu.csv", res)
    _write(
        tmp_path / "timing_cpu.csv",
        [
            {"notebook": "01.ipynb", "wall_s": 600, "peak_rss_mb": 3000},
            {"notebook": "02.ipynb", "wall_s": 300, "peak_rss_mb": 5000},
        ],
    )
    return tmp_path


def test_table_rows_follow_method_order_with_intervals_and_paper(figs):
    md = report.results_markdown("cpu")
    lines = md.splitlines()
    assert lines[0].startswith("| method | hotpotqa (n=6) | math500 (n=4) | factual_avg (n=6)")
    cot = next(i for i, ln in enumerate(lines) if ln.startswith("| `cot_distill`"))
    agent = next(i for i, ln in enumerate(lines) if ln.startswith("| `agent_distill`"))
    assert cot < agent  # pipeline.METHODS order, not the CSV's
    assert "| 40.0 [30.0, 50.0] |" in lines[agent] and lines[agent].endswith("| 19.24 |")
    assert "Wall time (written by the run; 15.0 min in all;" in md


def test_readme_block_is_replaced_and_missing_files_fail(figs, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:cpu -->\nold\n<!-- /results:cpu -->\nend\n")
    assert report.update_readme("cpu", readme)
    text = readme.read_text()
    assert (
        "old" not in text and "| `agent_distill` |" in text and text.endswith("<!-- /results:cpu -->\nend\n")
    )
    assert not report.update_readme("smoke", readme)  # no block for that profile: left alone
    (figs / "results_cpu.csv").unlink()
    with pytest.raises(FileNotFoundError, match="make reproduce"):
        report.results_markdown("cpu")


def test_timing_sums_every_invocation_of_a_run(figs, tmp_path, monkeypatch):
    from agentlib import reproduce

    monkeypatch.setattr(reproduce, "figures_dir", lambda: tmp_path)
    # an old-format timing.json (one invocation), then a resumed invocation with an interrupted notebook
    (tmp_path / "timing.json").write_text(
        '{"notebooks": [{"notebook": "01.ipynb", "wall_s": 100.0, "peak_rss_mb": 900}]}'
    )
    later = {
        "started": "t",
        "notebooks": [
            {"notebook": "01.ipynb", "wall_s": 5.5, "peak_rss_mb": 700, "status": "ok"},
            {"notebook": "02.ipynb", "wall_s": 30.0, "peak_rss_mb": 2000, "status": "interrupted"},
        ],
    }
    summary = reproduce.write_timing(tmp_path, "cpu", reproduce._history(tmp_path / "timing.json") + [later])
    assert summary["total_wall_s"] == 135.5
    assert summary["notebooks"] == [
        {"notebook": "01.ipynb", "wall_s": 105.5, "peak_rss_mb": 900, "runs": 2},
        {"notebook": "02.ipynb", "wall_s": 30.0, "peak_rss_mb": 2000, "runs": 1},
    ]
    assert len(reproduce._history(tmp_path / "timing.json")) == 2  # the history survives the rewrite
    md = report.results_markdown("cpu")
    assert "| 01.ipynb | 1.8 | 900 | 2 |" in md and "2.3 min in all" in md


def test_zero_width_intervals_are_called_out(figs):
    assert "zero-width" not in report.results_markdown("cpu")
    rows = list(csv.DictReader((figs / "results_cpu.csv").open()))
    rows[0].update(score=0, ci_low=0, ci_high=0, n=3)  # 0 of 3 correct: every resample is 0
    _write(figs / "results_cpu.csv", rows)
    assert "1 of 10 cells have a zero-width interval: within every benchmark" in report.results_markdown(
        "cpu"
    )


def test_peak_memory_is_per_notebook_and_counts_the_whole_process_tree():
    import subprocess
    import sys

    from agentlib.reproduce import PeakTreeRSS

    # a child that holds ~300 MB and a grandchild that holds ~200 MB, both resident at once
    code = (
        "import subprocess, sys, time; x = bytearray(300 * 2**20); "
        "g = subprocess.Popen([sys.executable, '-c', 'import time; y = bytearray(200 * 2**20); time.sleep(3)']); "
        "time.sleep(3); g.wait()"
    )
    with PeakTreeRSS(interval=0.1) as big:
        subprocess.run([sys.executable, "-c", code], check=True)
    assert 500 <= big.peak_mb < 1500
    with PeakTreeRSS(interval=0.1) as small:  # the next notebook does not inherit the earlier peak
        subprocess.run([sys.executable, "-c", "x = bytearray(50 * 2**20)"], check=True)
    assert small.peak_mb < 300


def test_untrained_students_are_called_out(figs):
    rows = [
        {
            "run": run,
            "questions": 9,
            "trajectories": 9,
            "accuracy_greedy": acc,
            "kept": kept,
            "questions_with_kept": kept,
            "yield_pct": 0,
            "parse_error_rate": 0,
            "step_limit_rate": 0,
            "repeat_stop_rate": 0,
            "mean_steps": 1,
            "mean_search_calls": 0,
            "tokens_per_s": 9,
        }
        for run, acc, kept in (("cot", 0.0, 0), ("agent", 11.1, 1), ("agent_ftp", 22.2, 2))
    ]
    _write(figs / "teacher_cpu.csv", rows)
    md = report.results_markdown("cpu")
    assert "**The `cot` student was not trained**" in md and "so `cot_distill` ran the untuned model." in md
    assert "`agent` student was not trained" not in md
    assert "| agent | 9 | 9 | 11.1 | 1 |" in md


def test_wide_table_keeps_the_eval_sets_order_with_the_averages_last():
    from agentlib import pipeline
    from agentlib.data import Example
    from agentlib.profiles import get_profile

    sets = {"math500": [Example("0", "q", "1", domain="math")], "hotpotqa": [Example("a", "q", "x")]}
    recs = [
        {"method": m, "benchmark": b, "score": 1.0, "prediction": "x", "gold": "x"}
        for m in ("agent_distill", "untuned_cot")
        for b in sets
    ]
    wide = report.wide_table(pipeline.results_table(recs, get_profile("smoke"), sets))
    assert list(wide.columns) == ["math500", "hotpotqa", "factual_avg", "math_avg", "overall_avg"]
    assert list(wide.index) == ["untuned_cot", "agent_distill"]
    assert wide.loc["agent_distill", "hotpotqa"] == "100.0 [100.0, 100.0]"
