"""Every notebook runs end to end under papermill on the `smoke` profile (real models, tiny sizes); a notebook
whose upstream stage has not run stops at once, naming the notebook to run first."""

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
    assert names == [
        "01_teacher_trajectories.ipynb",
        "02_sft_qlora.ipynb",
        "03_evaluation.ipynb",
        "04_ablations.ipynb",
    ]
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


@pytest.mark.parametrize(
    ("notebook", "first"),
    [
        ("02_sft_qlora", "01_teacher_trajectories"),
        ("03_evaluation", "02_sft_qlora"),
        ("04_ablations", "03_evaluation"),
    ],
)
def test_a_notebook_before_its_upstream_stops_with_one_line(tmp_path, monkeypatch, notebook, first):
    import nbformat
    import papermill

    monkeypatch.setenv(
        "AGENTLIB_RUNS_DIR", str(tmp_path / "runs")
    )  # empty: nothing has run; the kernel inherits it
    out = tmp_path / f"{notebook}.ipynb"
    with pytest.raises(papermill.PapermillExecutionError) as err:
        papermill.execute_notebook(
            str(ROOT / "notebooks" / f"{notebook}.ipynb"),
            str(out),
            kernel_name="agentlib",
            parameters={"profile": "smoke"},
            cwd=str(ROOT / "notebooks"),
            progress_bar=False,
        )
    assert err.value.ename == "StageMissing"
    assert f"run notebooks/{first}.ipynb with profile='smoke' first" in err.value.evalue
    errors = [
        o
        for c in nbformat.read(out, as_version=4).cells
        for o in c.get("outputs", [])
        if o.output_type == "error"
    ]
    assert len(errors) == 1 and len(errors[0].traceback) == 1  # one line, no traceback
    assert not (tmp_path / "runs" / "smoke" / "students" / "cot").exists()  # nothing trained, nothing written
