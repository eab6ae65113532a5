"""agentlib.paths: AGENTLIB_RUNS_DIR, and the upstream-stage check the notebooks start with."""

from __future__ import annotations

import pytest

from agentlib import paths


def test_runs_dir_defaults_to_the_repository(monkeypatch):
    monkeypatch.delenv("AGENTLIB_RUNS_DIR", raising=False)
    assert paths.runs_dir() == paths.ROOT / "runs"


def test_runs_dir_override(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENTLIB_RUNS_DIR", str(tmp_path / "elsewhere"))
    assert paths.runs_dir("smoke", "teacher") == tmp_path / "elsewhere" / "smoke" / "teacher"
    assert (tmp_path / "elsewhere" / "smoke" / "teacher").is_dir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AGENTLIB_RUNS_DIR", "rel")  # a relative path is taken from the working directory
    assert paths.runs_dir("x") == tmp_path / "rel" / "x"


@pytest.mark.parametrize(
    ("stage", "notebook"),
    [("teacher", "01_teacher_trajectories"), ("students", "02_sft_qlora"), ("eval", "03_evaluation")],
)
def test_a_missing_stage_names_the_notebook_to_run_first(tmp_path, monkeypatch, stage, notebook):
    monkeypatch.setenv("AGENTLIB_RUNS_DIR", str(tmp_path))
    with pytest.raises(paths.StageMissing) as err:
        paths.require_stage("smoke", stage)
    msg = str(err.value)
    assert f"run notebooks/{notebook}.ipynb with profile='smoke' first" in msg and "\n" not in msg
    # in a notebook: the one line, no traceback
    assert err.value._render_traceback_() == [f"StageMissing: {msg}"]


def test_a_stage_that_ran_passes(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENTLIB_RUNS_DIR", str(tmp_path))
    teacher = tmp_path / "smoke" / "teacher"
    teacher.mkdir(parents=True)
    for name in ("cot", "agent"):
        (teacher / f"sft_{name}.jsonl").write_text("")
    with pytest.raises(paths.StageMissing, match="missing sft_agent_ftp.jsonl"):
        paths.require_stage("smoke", "teacher")
    (teacher / "sft_agent_ftp.jsonl").write_text("")  # empty is fine: 01 ran and nothing survived
    assert paths.require_stage("smoke", "teacher") == teacher
    students = tmp_path / "smoke" / "students"
    for name, marker in (
        ("cot", "untrained.json"),
        ("agent", "adapter_config.json"),
        ("agent_ftp", "adapter_config.json"),
    ):
        (students / name).mkdir(parents=True)
        (students / name / marker).write_text("{}")
    assert paths.require_stage("smoke", "students") == students
