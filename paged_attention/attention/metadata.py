"""What attention needs to know about one engine step, built once per step and
shared by every layer.

The step's new tokens are packed: sequence i contributes `query_lens[i]`
consecutive tokens. Sequence i already has `num_computed[i]` tokens in the
pool; after this step it has `context_lens[i] = num_computed[i] + query_lens[i]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate

import torch


@dataclass
class AttentionMetadata:
    query_lens: list[int]
    context_lens: list[int]
    query_start: list[int]  # [B + 1] offsets into the packed new tokens
    context_start: list[int]  # [B + 1] offsets into `context_slots`
    slot_mapping: torch.Tensor  # [T] long: flat pool slot of each new token
    context_slots: torch.Tensor  # [sum(context_lens)] long: slots of every context token
    block_size: int
    block_tables: list[list[int]]
    _masks: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return self.query_start[-1]

    @property
    def is_decode_only(self) -> bool:
        return all(n == 1 for n in self.query_lens)

    def causal_mask(self, i: int) -> torch.Tensor | None:
        """Bool mask [query_len, context_len] for sequence i, or None when no
        mask is needed (a single query sees the whole context). Query j sits at
        absolute position context_len - query_len + j and sees keys up to it."""
        q_len, ctx = self.query_lens[i], self.context_lens[i]
        if q_len == 1:
            return None
        key = q_len * 1_000_003 + ctx  # masks depend only on the two lengths
        mask = self._masks.get(key)
        if mask is None:
            device = self.slot_mapping.device
            q_pos = torch.arange(ctx - q_len, ctx, device=device)
            mask = torch.arange(ctx, device=device)[None, :] <= q_pos[:, None]
            self._masks[key] = mask
        return mask

    @classmethod
    def build(
        cls,
        block_tables: Sequence[Sequence[int]],
        num_computed: Sequence[int],
        query_lens: Sequence[int],
        block_size: int,
        num_blocks: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Derive slots from block tables. Checks every block id against the
        pool once here, so the per-layer kernels need not."""
        assert len(block_tables) == len(num_computed) == len(query_lens), "batch lengths differ"
        context_lens = [c + q for c, q in zip(num_computed, query_lens)]
        tables = [list(t) for t in block_tables]
        for table, ctx in zip(tables, context_lens):
            assert len(table) * block_size >= ctx, (
                f"block table {table} holds {len(table) * block_size} slots, needs {ctx}"
            )
            for block_id in table:
                if not 0 <= block_id < num_blocks:
                    raise ValueError(
                        f"block table points at block {block_id}, outside the pool (0..{num_blocks - 1})"
                    )
        max_blocks = max((len(t) for t in tables), default=0)
        padded = torch.tensor(
            [t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.long
        ).view(len(tables), max_blocks)
        # [B, max_blocks * block_size]: every slot of every table, in token order.
        slots = (padded[:, :, None] * block_size + torch.arange(block_size)).reshape(
            len(tables), max_blocks * block_size
        )
        positions = torch.arange(slots.shape[1])
        ctx_t = torch.tensor(context_lens, dtype=torch.long)
        start_t = torch.tensor(list(num_computed), dtype=torch.long)
        in_context = positions[None, :] < ctx_t[:, None]
        is_new = in_context & (positions[None, :] >= start_t[:, None])
        return cls(
            query_lens=list(query_lens),
            context_lens=context_lens,
            query_start=[0, *accumulate(query_lens)],
            context_start=[0, *accumulate(context_lens)],
            slot_mapping=slots[is_new].to(device),
            context_slots=slots[in_context].to(device),
            block_size=block_size,
            block_tables=tables,
        )
