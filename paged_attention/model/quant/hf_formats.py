"""AWQ (AutoAWQ GEMM) and GPTQ (AutoGPTQ / optimum, v1) checkpoints -> int4
`GroupQuantized` records, exactly: each linear layer's packed `qweight`,
`qzeros`, `scales` (and GPTQ's `g_idx`) become one record [out, in] with
w = (q - z) * s, without a float copy of the weight.

* AWQ GEMM: qweight int32 [in, out / 8], each int32 packs 8 output columns
  in the order AWQ_ORDER (nibble i holds column AWQ_ORDER[i]); qzeros int32
  [in / group, out / 8] packed the same way; scales fp16 [in / group, out].
* GPTQ v1: qweight int32 [in / 8, out], 8 input rows per int32 (row r at bits
  4 (r % 8)); qzeros int32 [groups, out / 8] with sequential nibbles holding
  zero - 1 (the v1 off-by-one); scales fp16 [groups, out]; g_idx int32 [in],
  the group of each input row. Only the plain order (g_idx[r] = r // group)
  loads: act-order checkpoints (desc_act with a permuted g_idx) would need the
  activations permuted too, and are refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from paged_attention.model.quant.records import GroupQuantized

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
PARTS = {"awq": ("qweight", "qzeros", "scales"), "gptq": ("qweight", "qzeros", "scales", "g_idx")}
_OPTIONAL = {"g_idx"}
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def unpack_int32(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., c] -> uint8 [..., c, 8]: nibble i (bits 4i..4i+3) at index i."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed 4-bit tensors must be int32, got {packed.dtype}")
    return packed.unsqueeze(-1).bitwise_right_shift(_SHIFTS).bitwise_and_(15).to(torch.uint8)


def _awq_columns(packed: torch.Tensor) -> torch.Tensor:
    """AWQ-packed int32 [r, c] -> uint8 [r, 8c] in natural column order."""
    r, c = packed.shape
    return unpack_int32(packed)[:, :, list(AWQ_REVERSE_ORDER)].reshape(r, 8 * c)


def _sequential_columns(packed: torch.Tensor) -> torch.Tensor:
    r, c = packed.shape
    return unpack_int32(packed).reshape(r, 8 * c)


def unpack_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> GroupQuantized:
    """AutoAWQ GEMM tensors of one linear layer -> GroupQuantized [out, in]."""
    k, packed_n = qweight.shape
    n = packed_n * 8
    _check(qzeros, (k // group_size, packed_n), "qzeros", k % group_size == 0)
    _check(scales, (k // group_size, n), "scales", True)
    values = _awq_columns(qweight).t().contiguous()
    zeros = _awq_columns(qzeros).t()
    return GroupQuantized.from_zero_points(values, scales.t().contiguous(), zeros, group_size)


def unpack_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    group_size: int,
    name: str = "",
) -> GroupQuantized:
    """GPTQ v1 tensors of one linear layer -> GroupQuantized [out, in].

    Raises:
        ValueError: misshapen parts, or a g_idx that is not the plain group
            order (an act-order checkpoint), naming the layer.
    """
    packed_k, n = qweight.shape
    k = packed_k * 8
    if k % group_size:
        raise ValueError(f"{name}: in_features {k} is not a multiple of the group size {group_size}")
    groups = k // group_size
    _check(qzeros, (groups, n // 8), "qzeros", n % 8 == 0)
    _check(scales, (groups, n), "scales", True)
    if g_idx is not None:
        plain = torch.arange(k, dtype=torch.int64) // group_size
        if tuple(g_idx.shape) != (k,) or not torch.equal(g_idx.to(torch.int64), plain):
            raise ValueError(
                f"{name}: g_idx is not the plain group order (an act-order / desc_act checkpoint); "
                "reordered groups would need the activations permuted and do not load here"
            )
    # [k/8, n] -> [k/8, n, 8] -> [k/8, 8, n]: input row 8j + i at nibble i of word j.
    values = unpack_int32(qweight).permute(0, 2, 1).reshape(k, n).t().contiguous()
    zeros = _sequential_columns(qzeros).add_(1).bitwise_and_(15).t()  # v1 stores zero - 1
    return GroupQuantized.from_zero_points(values, scales.t().contiguous(), zeros, group_size)


def _check(t: torch.Tensor, shape: tuple[int, int], what: str, ok: bool) -> None:
    if not ok or tuple(t.shape) != shape:
        raise ValueError(f"{what} has shape {tuple(t.shape)}, expected {shape}")


def group_checkpoint_tensors(
    weights: Iterable[tuple[str, torch.Tensor]], method: str, group_size: int
) -> Iterator[tuple[str, torch.Tensor | GroupQuantized]]:
    """HF-named tensors of an AWQ/GPTQ checkpoint -> the same stream with each
    layer's `prefix.qweight/qzeros/scales[/g_idx]` replaced by one record
    named `prefix.weight` (yielded once the layer's parts have all arrived).

    Raises:
        ValueError: a layer whose parts are incomplete at the end, or a
            `*.weight` tensor beside a quantized layer of the same name.
    """
    parts = PARTS[method]
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        prefix, _, part = name.rpartition(".")
        if part not in parts:
            yield name, tensor
            continue
        have = pending.setdefault(prefix, {})
        have[part] = tensor
        required = [p for p in parts if p not in _OPTIONAL]
        if all(p in have for p in required) and (method != "gptq" or "g_idx" in have):
            yield prefix + ".weight", _record(method, pending.pop(prefix), group_size, prefix)
    for prefix, have in pending.items():
        required = [p for p in parts if p not in _OPTIONAL]
        missing = [p for p in required if p not in have]
        if missing:
            raise ValueError(f"{method} layer {prefix!r} is missing {', '.join(missing)} in the checkpoint")
        # GPTQ without g_idx: the plain group order.
        yield prefix + ".weight", _record(method, have, group_size, prefix)


def _record(method: str, have: dict[str, torch.Tensor], group_size: int, prefix: str) -> GroupQuantized:
    try:
        if method == "awq":
            return unpack_awq(have["qweight"], have["qzeros"], have["scales"], group_size)
        return unpack_gptq(
            have["qweight"], have["qzeros"], have["scales"], have.get("g_idx"), group_size, prefix
        )
    except ValueError as exc:
        raise ValueError(f"{method} layer {prefix!r}: {exc}") from exc
