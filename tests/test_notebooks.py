"""Every notebook runs end to end under papermill on the `smoke` profile (real models, tiny sizes)."""

import json
import shutil

import pytest

from agentlib import reproduce
from agentlib.paths import ROOT, runs_dir

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


@pytest.fixture(scope="module")
def smoke_run():
    shutil.rmtree(runs_dir("smoke"), ignore_errors=True)  # a fresh run, not a resumed one
    assert reproduce.main(["--profile", "smoke", "--kernel", "agentlib"]) == 0
    return runs_dir("smoke")


def test_all_notebooks_ran_without_errors(smoke_run):
    names = [nb.name for nb in reproduce.notebooks()]
    assert names == ["01_teacher_trajectories.ipynb", "02_sft_qlora.ipynb", "03_evaluation.ipynb", "04_ablations.ipynb"]
    for name in names:
        nb = json.loads((smoke_run / name).read_text())
        errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{name}: {errors[:1]}"
    timing = json.loads((smoke_run / "timing.json").read_text())
    assert [r["notebook"] for r in timing["notebooks"]] == names


def test_smoke_run_wrote_the_result_table(smoke_run):
    import pandas as pd

    table = pd.read_csv(ROOT / "figures" / "results_smoke.csv")
    assert list(table.columns) == ["method", "benchmark", "score", "ci_low", "ci_high", "n"]
    from agentlib.pipeline import METHODS

    assert set(table.method) == set(METHODS)
    assert {"factual_avg", "math_avg", "overall_avg"} <= set(table.benchmark)
    assert ((table.ci_low <= table.score) & (table.score <= table.ci_high)).all()
    for fig in ("accuracy_smoke.png", "sft_loss_smoke.png", "sag_sweep_smoke.png", "teacher_ftp_smoke.png"):
        assert (ROOT / "figures" / fig).stat().st_size > 1000


def test_rerun_resumes_without_redoing_work(smoke_run):
    before = (smoke_run / "teacher" / "agent.jsonl").read_text()
    assert reproduce.main(["--profile", "smoke", "--kernel", "agentlib", "--only", "01"]) == 0
    assert (smoke_run / "teacher" / "agent.jsonl").read_text() == before  # nothing appended, nothing lost
