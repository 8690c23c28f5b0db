"""Which slice of each Hugging Face weight a tensor-parallel rank owns, and the
shape of the model one rank runs (Megatron-style).

- q/k/v (weights and Qwen2's biases) and gate/up are split by output rows.
  Attention is split by KV-head group: each rank owns a contiguous run of KV
  heads and the query heads that use them, as evenly as whole groups allow
  (SmolLM2-135M's 3 groups of 3 heads over 2 ranks: 2 groups and 1). With
  fewer KV heads than ranks (N a multiple of Hkv), query heads split evenly
  and each KV head is replicated on the N/Hkv ranks whose query heads use it.
  The MLP's intermediate rows split as evenly as they divide.
- o_proj and down_proj are split by input columns; each rank's partial product
  is summed by one all-reduce. Their biases (if any) live on rank 0 only (zeros
  elsewhere), so the sum adds them once.
- The embedding and LM head are split by vocabulary rows (`shard_vocab`), each
  rank holding ceil(V/N) rows (the last one padded with zeros), or replicated.
- Norms and the rotary tables are replicated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch-free at import: the planner's command line uses check_split
    import torch

    from paged_attention.model.config import ModelConfig

_LAYER = re.compile(r"model\.layers\.\d+\.(.+)$")


def check_split(num_heads: int, num_kv_heads: int, intermediate_size: int, size: int) -> None:
    """ValueError naming the value that `size` ranks cannot split."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {size!r}")
    if num_kv_heads < size and (size % num_kv_heads or num_heads % size):
        raise ValueError(
            f"tensor_parallel_size {size} is more than the model's num_key_value_heads ({num_kv_heads}): "
            f"it must then be a multiple of them and divide num_attention_heads ({num_heads}), so that "
            "each KV head is replicated on the ranks whose query heads use it"
        )
    if intermediate_size < size:
        raise ValueError(
            f"tensor_parallel_size {size} is more than the model's intermediate_size ({intermediate_size})"
        )


def split_evenly(total: int, size: int, rank: int) -> tuple[int, int]:
    """(start, count) of `rank`'s part when `total` units go to `size` ranks as
    evenly as possible: the first total % size ranks take one more."""
    base, extra = divmod(total, size)
    return rank * base + min(rank, extra), base + (rank < extra)


def kv_heads_per_rank(num_kv_heads: int, size: int) -> int:
    """The most KV heads a rank holds: rank 0's share, or one replicated head
    when there are fewer heads than ranks."""
    return -(-num_kv_heads // size)


def check_tensor_parallel(config: ModelConfig, size: int) -> None:
    check_split(config.num_heads, config.num_kv_heads, config.intermediate_size, size)


@dataclass(frozen=True)
class Shard:
    """One rank's part of one checkpoint tensor: rows or columns [start, stop)
    of dimension `dim` (None: the whole tensor), padded to `rows` rows, or
    zeros (`zero`: a bias that only rank 0 adds)."""

    dim: int | None = None
    start: int = 0
    stop: int = 0
    rows: int | None = None
    zero: bool = False

    def shape(self, full: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of this rank's tensor, given the checkpoint's."""
        if self.dim is None:
            return full
        out = list(full)
        out[self.dim] = self.stop - self.start
        if self.rows is not None:
            out[0] = self.rows
        return tuple(out)

    def take(self, tensor: Any) -> Any:
        """This rank's part of a whole tensor or quantized record, as a fresh
        one (so the whole one can be freed). A record is sliced by its rows or
        columns (`slice_rows`/`slice_cols`); one that needs padding rows (a
        vocabulary part) is dequantized first, as it fills a dense weight."""
        if not isinstance(tensor, torch_tensor()):
            if self.dim is None:
                return tensor
            if self.dim == 1:
                return tensor.slice_cols(self.start, self.stop)
            part = tensor.slice_rows(self.start, max(self.start, self.stop))
            return part if self.rows in (None, part.shape[0]) else self.pad(part.dequantize())
        whole: Any = tensor  # a torch.Tensor (torch is imported lazily here)
        if self.zero:
            return whole.new_zeros(whole.shape)
        if self.dim is None:
            return whole
        part = whole.narrow(self.dim, self.start, max(0, self.stop - self.start))
        return self.pad(part.clone())

    def read(self, lazy: Any) -> torch.Tensor:
        """This rank's part read from a safetensors `get_slice` handle: only
        these rows or columns are copied out of the file."""
        import torch

        full = tuple(lazy.get_shape())
        if self.zero:
            return torch.zeros(full)
        if self.dim is None:
            return lazy[:]
        index = slice(self.start, self.stop)
        return self.pad(lazy[index] if self.dim == 0 else lazy[:, index])

    def pad(self, part: torch.Tensor) -> torch.Tensor:
        if self.rows is None or part.shape[0] == self.rows:
            return part
        import torch

        padding = part.new_zeros((self.rows - part.shape[0], *part.shape[1:]))
        return torch.cat((part, padding))


@dataclass(frozen=True)
class TPLayout:
    """How `config` (the whole model) is split over `size` ranks, seen from `rank`."""

    config: ModelConfig
    size: int
    rank: int = 0
    shard_vocab: bool = True

    def __post_init__(self) -> None:
        check_tensor_parallel(self.config, self.size)
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank must be in [0, {self.size}), got {self.rank}")

    # ---------------------------------------------------------------- sizes
    @property
    def replicates_kv(self) -> bool:
        return self.config.num_kv_heads < self.size

    @property
    def num_kv_heads(self) -> int:
        if self.replicates_kv:
            return 1
        return split_evenly(self.config.num_kv_heads, self.size, self.rank)[1]

    @property
    def kv_head_start(self) -> int:
        if self.replicates_kv:  # rank r's query heads all use KV head r * Hkv // N
            return self.rank * self.config.num_kv_heads // self.size
        return split_evenly(self.config.num_kv_heads, self.size, self.rank)[0]

    @property
    def num_heads(self) -> int:
        if self.replicates_kv:
            return self.config.num_heads // self.size
        return self.num_kv_heads * (self.config.num_heads // self.config.num_kv_heads)

    @property
    def head_start(self) -> int:
        if self.replicates_kv:
            return self.rank * self.num_heads
        return self.kv_head_start * (self.config.num_heads // self.config.num_kv_heads)

    @property
    def intermediate_size(self) -> int:
        return split_evenly(self.config.intermediate_size, self.size, self.rank)[1]

    @property
    def intermediate_start(self) -> int:
        return split_evenly(self.config.intermediate_size, self.size, self.rank)[0]

    @property
    def vocab_size(self) -> int:
        """Embedding / LM head rows on this rank (padded: equal on every rank)."""
        vocab = self.config.vocab_size
        return -(-vocab // self.size) if self.shard_vocab else vocab

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_size if self.shard_vocab else 0

    def local_config(self) -> ModelConfig:
        """The model one rank runs: its heads, its MLP rows and its vocabulary rows."""
        return replace(
            self.config,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            intermediate_size=self.intermediate_size,
            vocab_size=self.vocab_size,
        )

    # ---------------------------------------------------------------- slices
    def shard_of(self, name: str) -> Shard:
        """The part of checkpoint tensor `name` this rank loads."""
        cfg, r, d = self.config, self.rank, self.config.head_dim
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            if not self.shard_vocab:
                return Shard()
            start = min(self.vocab_start, cfg.vocab_size)
            stop = min(self.vocab_start + self.vocab_size, cfg.vocab_size)
            return Shard(0, start, stop, rows=self.vocab_size)
        match = _LAYER.match(name)
        if match is None:
            return Shard()
        part = match.group(1)
        q_cols = (self.head_start * d, (self.head_start + self.num_heads) * d)
        inter = (self.intermediate_start, self.intermediate_start + self.intermediate_size)
        if part.startswith("self_attn.q_proj."):
            return Shard(0, *q_cols)
        if part.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
            kv0 = self.kv_head_start
            return Shard(0, kv0 * d, (kv0 + self.num_kv_heads) * d)
        if part.startswith(("mlp.gate_proj.", "mlp.up_proj.")):
            return Shard(0, *inter)
        if part == "self_attn.o_proj.weight":
            return Shard(1, *q_cols)
        if part == "mlp.down_proj.weight":
            return Shard(1, *inter)
        if part in ("self_attn.o_proj.bias", "mlp.down_proj.bias"):
            return Shard(zero=r != 0)
        return Shard()  # norms


def torch_tensor() -> type:
    import torch

    return torch.Tensor


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters (what one rank holds of the weights)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())
