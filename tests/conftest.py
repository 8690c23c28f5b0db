"""Session-wide test set-up: the Triton interpreter flag, Hypothesis profiles
(see tests/profiles.py: `ci`, derandomized, is the default) and a fixed torch
seed before every test."""

from __future__ import annotations

import os
import shutil
import tempfile

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


_CACHE_DIR = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    """The suite never writes into the user's cache (GGUF conversions, tokenizer
    backends): each session gets a fresh cache folder, removed at the end.
    Subprocesses the tests start inherit it."""
    config.stash[_CACHE_DIR] = tempfile.mkdtemp(prefix="paged-attention-test-cache-")
    os.environ["XDG_CACHE_HOME"] = config.stash[_CACHE_DIR]


def pytest_unconfigure(config: pytest.Config) -> None:
    folder = config.stash.get(_CACHE_DIR, None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def _seeded_torch() -> None:
    """Each test starts from the same torch RNG state: a test that draws
    unseeded tensors sees the same numbers on every run and in any order
    (PyTorch seeds its default generator randomly per process)."""
    torch.manual_seed(0)
