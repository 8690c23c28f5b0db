"""Session-wide test set-up: the Triton interpreter flag and Hypothesis profiles
(see tests/profiles.py: `ci`, derandomized, is the default)."""

from __future__ import annotations

import os

import torch

from tests.profiles import register_profiles

# Without a GPU the Triton kernels run in Triton's CPU interpreter. Triton reads
# this flag when a kernel is defined, so it must be set before any test module
# (or anything they import) first imports the kernels, not in the kernel tests.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

register_profiles()
