"""Session-wide test set-up."""

from __future__ import annotations

import os

import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter. Triton reads
# this flag when a kernel is defined, so it must be set before any test module
# (or anything they import) first imports the kernels, not in the kernel tests.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
