"""Building blocks of the Llama family: RMSNorm, rotary embedding, SwiGLU MLP.

Each computes what transformers computes, in the same dtypes and the same
order of rounding: float32 logits match Hugging Face well within 1e-4, and in
bfloat16 these blocks round where HF rounds (matmuls and attention kernels
still accumulate differently). They call functional ops on their own parameters
(no nested `nn.Linear` modules): small models on 2 CPU cores are bound by
Python and dispatch overhead, so every op per layer counts.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from paged_attention import native
from paged_attention.model.config import RopeScaling
from paged_attention.model.quant import NONE, QuantLinear, QuantScheme, Scratch


def empty_param(*shape: int, dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    """An uninitialised, frozen parameter: weights always come from a checkpoint,
    so random initialisation would only cost time."""
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


# --------------------------------------------------------------------- RMSNorm
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's LlamaRMSNorm: normalise in float32, cast back to x's dtype, then
    scale by the weight in that dtype (two roundings in bfloat16, as in HF)."""
    if x.dtype == torch.float32:
        # One fused op instead of five; equal to HF's up to float32 rounding.
        return torch.rms_norm(x, weight.shape, weight, eps)
    # Lower precision: normalise in float32 (the fused op gave HF's float32
    # values bit for bit), round, then scale in x's dtype as HF does: four
    # ops instead of HF's eight, on every layer of every step.
    return torch.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype).mul_(weight)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps
        lib = native.library_for(dtype, device)
        self._native: Any = None if lib is None else lib.add_rms_norm  # a ctypes function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """x += residual (in place, the residual stream), then the norm of x.
        On the CPU one C call (`csrc/rms_norm.c`): five PyTorch operators per
        norm were a tenth of a one-token step, and at a prompt chunk's
        thousands of rows each is a pass over memory (C: 3.2 vs 9.2 ms at
        8,192 bfloat16 rows on two threads)."""
        native_ok = self._native is not None and native.takes(
            x, self.weight, *(() if residual is None else (residual,))
        )
        if not native_ok:
            if residual is not None:
                x.add_(residual)
            return self.forward(x)
        y = torch.empty_like(x)
        self._native(
            native.DTYPE_CODES[x.dtype],
            x.data_ptr(),
            None if residual is None else residual.data_ptr(),
            self.weight.data_ptr(),
            y.data_ptr(),
            x.shape[0],
            x.shape[1],
            self.eps,
            torch.get_num_threads(),
        )
        return y

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


# ------------------------------------------------------------- rotary (RoPE)
def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] in float32, computed as transformers'
    `ROPE_INIT_FUNCTIONS` do (same ops, same dtype) for default, linear, llama3."""
    assert head_dim % 2 == 0, f"head_dim must be even, got {head_dim}"
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    assert scaling.rope_type == "llama3", f"unknown rope type {scaling.rope_type!r}"
    assert scaling.low_freq_factor is not None and scaling.high_freq_factor is not None
    assert scaling.original_max_position_embeddings is not None
    factor = scaling.factor
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    old_context_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context_len / low
    high_freq_wavelen = old_context_len / high
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are slowed by `factor`, short ones kept,
    # and the band between is interpolated smoothly.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Cos/sin tables for every position up to `max_positions`, built once in
    float32 and gathered per step by position (once per forward, shared by
    all layers).

    The tables are stored at full head width, `cos = [c, c]` and the sine with
    the rotate-half sign folded in, `sin = [-s, s]`, so applying RoPE is one
    cat and three elementwise ops. (-x) * s == x * (-s) exactly, so results are
    bitwise those of HF's `q * cos + rotate_half(q) * sin`.
    """

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float,
        scaling: RopeScaling | None,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        # Elementwise product, as HF does (not a matmul), so angles match bitwise.
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        cos, sin = freqs.cos(), freqs.sin()
        self.max_positions = max_positions
        self.cos_table: torch.Tensor
        self.sin_table: torch.Tensor
        # Not persistent: derived from the config, never part of a checkpoint.
        self.register_buffer("cos_table", torch.cat((cos, cos), dim=-1).to(device), persistent=False)
        self.register_buffer("sin_table", torch.cat((-sin, sin), dim=-1).to(device), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) each [T, 1, head_dim] in `dtype` (HF casts them to the
        activation dtype before use). Positions must be < max_positions; the
        engine bounds sequence lengths, so this is not re-checked per step."""
        cos = self.cos_table.index_select(0, positions)
        sin = self.sin_table.index_select(0, positions)
        if dtype != cos.dtype:
            cos, sin = cos.to(dtype), sin.to(dtype)
        return cos.unsqueeze(1), sin.unsqueeze(1)


def rotate_rows_(
    kernels: Any, x: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor
) -> bool:
    """RoPE in place on the first `heads` heads of each row of x [T, width]
    (the q and k columns of the fused qkv output) with the C kernel, equal to
    `apply_rotary` bit for bit; False where it does not apply (no kernels,
    other dtypes or layouts), and the caller then runs `apply_rotary`."""
    if kernels is None or x.dim() != 2 or not native.takes(x, cos, sin):
        return False
    # The kernel trusts these bounds: it reads t * head_dim table entries and t * width activations.
    assert cos.shape == sin.shape and cos.numel() == x.shape[0] * head_dim, (cos.shape, x.shape, head_dim)
    assert heads * head_dim <= x.shape[1], f"{heads} heads of {head_dim} do not fit rows of {x.shape[1]}"
    status = kernels.rotary_inplace(
        native.DTYPE_CODES[x.dtype],
        x.data_ptr(),
        x.shape[1],
        cos.data_ptr(),
        sin.data_ptr(),
        x.shape[0],
        heads,
        head_dim,
        torch.get_num_threads(),
    )
    native.check(status, "rotary_inplace")
    return True


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, D] by (cos, sin) [T, 1, D] from `RotaryEmbedding.cos_sin`
    (rotate-half convention: dimension i pairs with i + D/2)."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    out = x * cos
    return out.add_(swapped.mul_(sin))


# ------------------------------------------------------------------- SwiGLU
class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul
    (rows [0, I) are gate_proj, rows [I, 2I) up_proj). With a quantized
    scheme both matmuls are `QuantLinear`s (`gate_up_proj`, `down_proj`)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device | str,
        scheme: QuantScheme = NONE,
        scratch: Scratch | None = None,
        name: str = "mlp",
    ) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        lib = native.library_for(dtype, device)
        self._swiglu: Any = None if lib is None else lib.swiglu  # a ctypes function
        self.gate_up_proj: QuantLinear | None = None
        self.down_proj: QuantLinear | None = None
        if scheme.quantized:
            assert scratch is not None, "quantized layers share a Scratch"
            self.gate_up_proj = QuantLinear(
                2 * intermediate_size,
                hidden_size,
                scheme,
                bias=bias,
                dtype=dtype,
                scratch=scratch,
                name=f"{name}.gate_up_proj",
            )
            self.down_proj = QuantLinear(
                hidden_size,
                intermediate_size,
                scheme,
                bias=bias,
                dtype=dtype,
                scratch=scratch,
                name=f"{name}.down_proj",
            )
            return
        self.gate_up_weight = empty_param(2 * intermediate_size, hidden_size, dtype=dtype, device=device)
        self.down_weight = empty_param(hidden_size, intermediate_size, dtype=dtype, device=device)
        self.gate_up_bias = empty_param(2 * intermediate_size, dtype=dtype, device=device) if bias else None
        self.down_bias = empty_param(hidden_size, dtype=dtype, device=device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None and self.down_proj is not None:
            # Prompts under float32 activations with bfloat16 matmuls: gate|up's
            # output and the SwiGLU stay bfloat16, which down's matmul reads
            # anyway (512-token prefill: 3 float32 round trips of [T, 2I] saved).
            gate_up = self.gate_up_proj.forward(x, dense_out=True)
            return self.down_proj.forward(self.gate(gate_up))
        gate_up = F.linear(x, self.gate_up_weight, self.gate_up_bias)
        return F.linear(self.gate(gate_up), self.down_weight, self.down_bias)

    def gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up from the fused projection's output [T, 2I]: one C
        pass on the CPU (`csrc/swiglu.c`; PyTorch's silu over the strided gate
        half was as slow as copying it), else two PyTorch operators."""
        n = self.intermediate_size
        if self._swiglu is None or gate_up.dim() != 2 or not native.takes(gate_up):
            gate, up = gate_up.split(n, dim=-1)
            return F.silu(gate).mul_(up)
        assert gate_up.shape[1] == 2 * n, f"gate/up rows of {gate_up.shape[1]}, expected {2 * n}"
        out = gate_up.new_empty(gate_up.shape[0], n)
        status = self._swiglu(
            native.DTYPE_CODES[gate_up.dtype],
            gate_up.data_ptr(),
            gate_up.shape[1],
            out.data_ptr(),
            gate_up.shape[0],
            n,
            torch.get_num_threads(),
        )
        native.check(status, "swiglu")
        return out
