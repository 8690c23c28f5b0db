"""The quantizers `scripts/int8_ceiling.py` measures: each lands on its grid,
and the error-compensating ones lower the output error they minimize."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

_PATH = Path(__file__).resolve().parent.parent / "scripts" / "int8_ceiling.py"
_spec = importlib.util.spec_from_file_location("int8_ceiling", _PATH)
assert _spec is not None and _spec.loader is not None
ceiling = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ceiling)


def _problem(seed: int = 0, n: int = 48, k: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and a Hessian of correlated inputs with a few loud channels
    (what makes activation-aware rounding pay)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = torch.randn(512, k, generator=g) @ mix
    x[:, :4] *= 20
    return w, (x.T @ x / x.shape[0]).float()


def _on_row_grid(q: torch.Tensor, w: torch.Tensor) -> bool:
    d = w.abs().amax(1, keepdim=True) / 127
    steps = q / d
    return bool(torch.allclose(steps, steps.round(), atol=1e-3) and steps.abs().max() <= 127 + 1e-3)


def test_per_channel_is_the_engines_int8() -> None:
    from paged_attention.model.quant.quantize import quantize_int8

    w, _ = _problem()
    record = quantize_int8(w)
    assert torch.allclose(ceiling.per_channel(w), record.values.float() * record.scales[:, None])


def test_gptq_stays_on_the_grid_and_lowers_the_output_error() -> None:
    w, h = _problem()
    q = ceiling.gptq(w, h)
    assert _on_row_grid(q, w)
    assert ceiling.output_error(q - w, h) < 0.8 * ceiling.output_error(ceiling.per_channel(w) - w, h)


def test_awq_search_is_no_worse_than_plain_rounding() -> None:
    w, h = _problem(seed=1)
    s = ceiling.awq_scales([w], h)
    awq = ceiling.per_channel(w.double() * s) / s
    # a = 0 (s = 1, plain rounding) is on the grid the search walks.
    assert ceiling.output_error(awq - w, h) <= ceiling.output_error(ceiling.per_channel(w) - w, h) + 1e-9
    both = ceiling.awq_gptq([w], h)[0]
    assert ceiling.output_error(both - w, h) < ceiling.output_error(ceiling.per_channel(w) - w, h)


def test_groups_and_clipping_reduce_the_weight_error() -> None:
    w, _ = _problem(seed=2)
    plain = (ceiling.per_channel(w) - w).pow(2).sum()
    assert (ceiling.groups_of_32(w) - w).pow(2).sum() < plain
    assert (ceiling.per_channel_clipped(w) - w).pow(2).sum() <= plain
