"""Quantized weight records: the exchange format between checkpoint readers
(GGUF repacking, quantize-at-load, and later AWQ/GPTQ loaders) and the
quantized linear layer, which repacks them into its kernel's layout.

Both hold weights in torch's [out_features, in_features] orientation with one
plain value per element (no bit packing), so a reader only has to unpack its
own format, and a layer can fill a fused projection a row block at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GroupQuantized:
    """w[n, k] = values[n, k] * scales[n, k // group_size] + offsets[n, k // group_size]

    values: uint8 [N, K], each below 2**bits; scales, offsets: float32 [N, K // group_size].
    The offset is a float (GGUF's Q4_1 "min"); an integer zero point z (AWQ,
    GPTQ: w = (q - z) * s) is `offsets = -z * scales` (`from_zero_points`).
    """

    values: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor
    group_size: int
    bits: int = 4

    def __post_init__(self) -> None:
        n, k = self.values.shape
        if self.values.dtype != torch.uint8:
            raise ValueError(f"values must be uint8, got {self.values.dtype}")
        if k % self.group_size:
            raise ValueError(f"in_features {k} is not a multiple of the group size {self.group_size}")
        groups = (n, k // self.group_size)
        for name in ("scales", "offsets"):
            t = getattr(self, name)
            if tuple(t.shape) != groups or t.dtype != torch.float32:
                raise ValueError(f"{name} must be float32 {groups}, got {t.dtype} {tuple(t.shape)}")

    @classmethod
    def from_zero_points(
        cls, values: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, bits: int = 4
    ) -> GroupQuantized:
        """From integer zero points: w = (values - zeros) * scales (AWQ/GPTQ style)."""
        scales = scales.float()
        return cls(values, scales, -(zeros.float() * scales), group_size, bits)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.values.shape[0], self.values.shape[1])

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K]: one multiply and one add per element, in float32."""
        n, k = self.shape
        grouped = self.values.view(n, k // self.group_size, self.group_size).float()
        grouped.mul_(self.scales.unsqueeze(-1)).add_(self.offsets.unsqueeze(-1))
        return grouped.view(n, k)

    def rows(self, start: int, end: int) -> GroupQuantized:
        return GroupQuantized(
            self.values[start:end],
            self.scales[start:end],
            self.offsets[start:end],
            self.group_size,
            self.bits,
        )

    slice_rows = rows

    def slice_cols(self, start: int, end: int) -> GroupQuantized:
        """Columns [start, end) of W: whole groups only (ValueError otherwise)."""
        g = self.group_size
        if start % g or end % g:
            raise ValueError(
                f"columns {start}:{end} do not fall on the group size {g}: each part must be whole groups"
            )
        return GroupQuantized(
            self.values[:, start:end].clone(),
            self.scales[:, start // g : end // g].clone(),
            self.offsets[:, start // g : end // g].clone(),
            g,
            self.bits,
        )


@dataclass(frozen=True)
class ChannelQuantized:
    """w[n, k] = values[n, k] * scales[n]: int8 values [N, K], float32 scales [N]."""

    values: torch.Tensor
    scales: torch.Tensor

    def __post_init__(self) -> None:
        if self.values.dtype != torch.int8 or self.values.dim() != 2:
            raise ValueError(
                f"values must be a 2-D int8 tensor, got {self.values.dtype} {tuple(self.values.shape)}"
            )
        if tuple(self.scales.shape) != (self.values.shape[0],) or self.scales.dtype != torch.float32:
            raise ValueError(
                f"scales must be float32 ({self.values.shape[0]},), got {self.scales.dtype} "
                f"{tuple(self.scales.shape)}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return (self.values.shape[0], self.values.shape[1])

    def dequantize(self) -> torch.Tensor:
        return self.values.float().mul_(self.scales.unsqueeze(-1))

    def slice_rows(self, start: int, end: int) -> ChannelQuantized:
        return ChannelQuantized(self.values[start:end].clone(), self.scales[start:end].clone())

    def slice_cols(self, start: int, end: int) -> ChannelQuantized:
        """Columns [start, end) of W: the per-row scales stay as they are."""
        return ChannelQuantized(self.values[:, start:end].clone(), self.scales)


QuantizedTensor = GroupQuantized | ChannelQuantized
