"""Fixtures for the data-layer tests: every test gets its own TOKENTRAIN_CACHE."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.mktemp("tt_cache")
    monkeypatch.setenv("TOKENTRAIN_CACHE", str(cache))
    return cache


@pytest.fixture
def cache_dir(_isolated_cache):
    return _isolated_cache


@pytest.fixture
def info_logs(caplog):
    caplog.set_level(logging.INFO, logger="tokentrain")
    return caplog
