"""Checks every loaded weight passes before the model (or a cache) takes it:
a NaN or Inf in a checkpoint is an error naming the tensor and the file, not
garbage text later, and a converted cache is only written from weights that
passed."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import torch

from paged_attention.model.quant.records import ChannelQuantized, GroupQuantized

Weight = TypeVar("Weight", torch.Tensor, GroupQuantized, ChannelQuantized)


def check_finite(name: str, value: Weight, source: Path) -> Weight:
    """`value` unchanged, or ValueError when it holds NaN or Inf (for a
    quantized record: in its scales or offsets)."""
    if isinstance(value, torch.Tensor):
        parts = [value] if value.is_floating_point() else []
    else:
        parts = [value.scales, *([value.offsets] if isinstance(value, GroupQuantized) else [])]
    for part in parts:
        if not bool(torch.isfinite(part).all()):
            bad = int((~torch.isfinite(part)).sum())
            raise ValueError(
                f"weight {name!r} in {source} holds {bad} NaN/Inf value(s): the checkpoint is corrupt"
            )
    return value
