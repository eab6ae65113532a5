"""agentlib.quiet: the known-harmless library warnings are dropped by message; every other one still shows."""

from __future__ import annotations

import logging
import warnings

import agentlib  # noqa: F401 - importing agentlib installs the filters
from agentlib import quiet


def test_known_log_lines_are_dropped_others_kept(caplog):
    quiet.filter_known_warnings()  # idempotent
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert sum(isinstance(f, quiet._DropMessages) for f in log.filters) == 1
    with caplog.at_level(logging.WARNING):
        log.warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "no 'kernels'"
        )
        log.warning("Something else went wrong")
    assert [r.getMessage() for r in caplog.records] == ["Something else went wrong"]


def test_known_warnings_are_dropped_others_kept():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet.filter_known_warnings()
        warnings.warn(
            "`is_gradient_checkpointing` is deprecated and will be removed in v6.",
            FutureWarning,
            stacklevel=1,
        )
        warnings.warn("`something_else` is deprecated", FutureWarning, stacklevel=1)
        warnings.warn(
            "`is_gradient_checkpointing` is deprecated (another category)", UserWarning, stacklevel=1
        )
    assert [str(w.message) for w in seen] == [
        "`something_else` is deprecated",
        "`is_gradient_checkpointing` is deprecated (another category)",
    ]


def test_library_bars_off_only_in_a_headless_kernel(monkeypatch):
    import os
    import sys
    import types

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.delenv("AGENTLIB_WIDGETS", raising=False)
    monkeypatch.delitem(sys.modules, "transformers", raising=False)  # as before transformers is imported
    quiet.headless_library_bars()  # not in a kernel: nothing changes
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    monkeypatch.setenv("JPY_SESSION_NAME", "lab.ipynb")  # a live JupyterLab: widgets render, bars stay
    quiet.headless_library_bars()
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ
    monkeypatch.delenv("JPY_SESSION_NAME")  # papermill: no frontend
    quiet.headless_library_bars()
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
