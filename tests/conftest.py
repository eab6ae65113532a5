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


@pytest.fixture
def fake_servers():
    """``fakes.FakeServers``: fake HTTP servers on 127.0.0.1, stopped after the test."""
    from fakes import FakeServers

    servers = FakeServers()
    yield servers
    servers.close()
