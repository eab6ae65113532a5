"""Where things live: the repository, external data, caches, runs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = [
    "ROOT",
    "data_dir",
    "cache_dir",
    "corpus_path",
    "runs_dir",
    "STAGES",
    "StageMissing",
    "require_stage",
    "figures_dir",
    "file_sha256",
]

ROOT = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """The external data folder (benchmarks/, corpus/, extra/), never committed.

    Resolution order: ``AGENTLIB_DATA_DIR`` → ``data/cache`` inside the repository (filled by
    ``make data``). Raises ``FileNotFoundError`` with the fix when neither exists.
    """
    env = os.environ.get("AGENTLIB_DATA_DIR")
    if env:
        path = Path(env).expanduser().resolve()
        if not path.is_dir():
            raise FileNotFoundError(f"AGENTLIB_DATA_DIR={env} is not a directory")
        return path
    path = ROOT / "data" / "cache"
    if (path / "benchmarks").is_dir():
        return path
    raise FileNotFoundError(
        "no data found: set AGENTLIB_DATA_DIR to a data folder (benchmarks/, corpus/, extra/) "
        "or run `make data` to fill data/cache"
    )


def cache_dir(*parts: str) -> Path:
    """A writable cache folder (models, indexes), ``AGENTLIB_CACHE`` or ``~/.cache/agentlib``."""
    base = Path(os.environ.get("AGENTLIB_CACHE", Path.home() / ".cache" / "agentlib")).expanduser()
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def corpus_path() -> Path:
    """The offline Wikipedia mini-corpus (JSONL: id, title, text, source)."""
    return data_dir() / "corpus" / "wiki_mini.jsonl"


def runs_dir(*parts: str, create: bool = True) -> Path:
    """``runs/`` (executed notebooks, trajectories, adapters): git-ignored; created unless ``create=False``.

    ``AGENTLIB_RUNS_DIR`` puts it elsewhere (a bigger disk, a test's temp folder); give an absolute path,
    since notebooks run with ``notebooks/`` as their working directory.
    """
    env = os.environ.get("AGENTLIB_RUNS_DIR")
    base = Path(env).expanduser().resolve() if env else ROOT / "runs"
    path = base.joinpath(*parts)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


# What each stage leaves in ``runs/<profile>/<stage>/`` ("a|b": either), and the notebook that makes it.
_STUDENTS = ("cot", "agent", "agent_ftp")
_AGENT_METHODS = ("agent_distill", "agent_distill_ftp", "agent_distill_sag", "agent_distill_ftp_sag")
STAGES = {
    "teacher": ("01_teacher_trajectories", tuple(f"sft_{s}.jsonl" for s in _STUDENTS)),
    "students": ("02_sft_qlora", tuple(f"{s}/adapter_config.json|{s}/untrained.json" for s in _STUDENTS)),
    "eval": ("03_evaluation", tuple(f"{m}__all.jsonl" for m in _AGENT_METHODS)),
}


class StageMissing(RuntimeError):
    """An upstream notebook has not run; in a notebook it shows as its one-line message, without a traceback."""

    def _render_traceback_(self) -> list[str]:  # IPython's hook for a custom traceback
        return [f"{type(self).__name__}: {self}"]


def require_stage(profile: str, stage: str) -> Path:
    """``runs/<profile>/<stage>`` when the stage's outputs are there, else raise :class:`StageMissing` naming
    the notebook to run first (``stage``: ``teacher``, ``students`` or ``eval``)::

        require_stage("smoke", "teacher")  # in 02: StageMissing: ... run 01_teacher_trajectories first
    """
    notebook, outputs = STAGES[stage]
    folder = runs_dir(profile, stage)
    missing = [name for name in outputs if not any((folder / alt).exists() for alt in name.split("|"))]
    if missing:
        raise StageMissing(
            f"no {stage} outputs for profile {profile!r} in {folder} (missing {', '.join(missing)}): "
            f"run notebooks/{notebook}.ipynb with profile={profile!r} first"
        )
    return folder


def figures_dir() -> Path:
    """``figures/`` (committed plots and result tables; smoke-profile outputs are git-ignored)."""
    path = ROOT / "figures"
    path.mkdir(parents=True, exist_ok=True)
    return path


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
