"""Session-wide test set-up: the Triton interpreter flag and Hypothesis profiles
(see tests/profiles.py: `ci`, derandomized, is the default)."""

from __future__ import annotations

import os

import pytest
import torch

from tests.profiles import register_profiles

# Without a GPU the Triton kernels run in Triton's CPU interpreter. Triton reads
# this flag when a kernel is defined, so it must be set before any test module
# (or anything they import) first imports the kernels, not in the kernel tests.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

register_profiles()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test in a tests/test_server*.py file drives the HTTP server: mark it
    `server`, so `-m "not server"` skips them all, including files added later."""
    for item in items:
        if item.path.name.startswith("test_server"):
            item.add_marker(pytest.mark.server)
