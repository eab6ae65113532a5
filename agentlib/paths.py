"""Where things live: the repository, external data, caches, runs."""

from __future__ import annotations

import os
from pathlib import Path

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
        "no data found: set AGENTLIB_DATA_DIR to a data folder (e.g. ../shared/data) "
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


def runs_dir(*parts: str) -> Path:
    """``runs/`` (executed notebooks, trajectories, adapters): git-ignored."""
    path = ROOT.joinpath("runs", *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def figures_dir() -> Path:
    """``figures/`` (committed plots and result tables; smoke-profile outputs are git-ignored)."""
    path = ROOT / "figures"
    path.mkdir(parents=True, exist_ok=True)
    return path
