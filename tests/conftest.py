"""Shared fixtures. Data comes from AGENTLIB_DATA_DIR or data/cache (``make data``)."""

from __future__ import annotations

import pytest

from agentlib.paths import data_dir


@pytest.fixture(scope="session")
def data_root():
    try:
        return data_dir()
    except FileNotFoundError as e:
        pytest.fail(str(e))
