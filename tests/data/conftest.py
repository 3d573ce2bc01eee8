"""Fixtures of the data-layer tests (the per-test TOKENTRAIN_CACHE is tests/conftest.py's)."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture
def cache_dir(_isolated_cache):
    return _isolated_cache


@pytest.fixture
def info_logs(caplog):
    caplog.set_level(logging.INFO, logger="tokentrain")
    return caplog
