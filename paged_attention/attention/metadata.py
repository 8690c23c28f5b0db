"""What attention needs to know about one engine step, built once per step and
shared by every layer.

The step's new tokens are packed: sequence i contributes `query_lens[i]`
consecutive tokens. Sequence i already has `num_computed[i]` tokens in the
pool; after this step it has `context_lens[i] = num_computed[i] + query_lens[i]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import accumulate

import torch

from paged_attention.kv_cache import slot_rows

# Splitting the decode batch into one more padded bucket costs a few more
# kernel calls per layer; it pays only when it skips this many padded slots.
MIN_PADDING_SAVED = 4096
# A sequence whose blocks fall below this share of its bucket's longest one
# is a candidate to start a new bucket.
BUCKET_FILL = 0.75


@dataclass(frozen=True)
class DecodeBucket:
    """Decode sequences (one query each) padded to a common number of blocks,
    so that attention over all of them is two batched matmuls."""

    rows: torch.Tensor  # [b] long: the sequences' query rows in the packed batch
    block_ids: torch.Tensor  # [b * num_blocks] long: block tables, padded with a full block
    padding: torch.Tensor  # [b, 1, num_blocks * block_size] bool: True beyond the context
    tail_slots: (
        torch.Tensor
    )  # [n] long: unwritten slots of last blocks, flat over [b, num_blocks * block_size]
    num_blocks: int
    all_rows: bool  # rows == 0..T-1: the step is this bucket alone
    _by_heads: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    _value_slots: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False
    )

    @property
    def num_seqs(self) -> int:
        return self.rows.numel()

    def value_slots(self, num_kv_heads: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For `embedding_bag` over a value pool viewed [N * Hkv * block_size, D]:
        one bag of padded-length slots per (sequence, query head), flat, and the
        bags' offsets. Slots beyond a context point at the sequence's first slot
        (written, so finite: its weight 0 then contributes exactly 0). Built
        once per step, on the first layer."""
        key = (num_kv_heads, group)
        cached = self._value_slots.get(key)
        if cached is None:
            b, length = self.num_seqs, self.padding.shape[-1]
            block_rows, _ = self.head_rows(num_kv_heads)
            bs = length // self.num_blocks
            offsets = torch.arange(bs, device=self.block_ids.device)
            slots = (block_rows.view(-1, 1) * bs + offsets).view(b, num_kv_heads, length)
            slots = torch.where(self.padding, slots[:, :, :1], slots)
            if group > 1:  # each KV head's slots serve its group of query heads
                slots = slots.repeat_interleave(group, dim=1)
            bag_starts = torch.arange(0, slots.numel(), length, device=slots.device)
            cached = self._value_slots[key] = (slots.reshape(-1), bag_starts)
        return cached

    def head_rows(self, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The bucket's (block, head) rows of a pool viewed [N * Hkv, block_size * D],
        in [b, Hkv, num_blocks] order, so the gathered K/V is [b * Hkv, tokens, D];
        and the rows of that gathered tensor, viewed [b * Hkv * tokens, D], that are
        unwritten slots. Built once per step, on the first layer."""
        cached = self._by_heads.get(num_kv_heads)
        if cached is None:
            b, length = self.num_seqs, self.padding.shape[-1]
            heads = torch.arange(num_kv_heads, device=self.block_ids.device)
            blocks = self.block_ids.view(b, 1, self.num_blocks) * num_kv_heads + heads.view(1, -1, 1)
            seq, pos = self.tail_slots // length, self.tail_slots % length
            tails = ((seq * num_kv_heads)[:, None] + heads[None, :]) * length + pos[:, None]
            cached = self._by_heads[num_kv_heads] = (blocks.reshape(-1), tails.reshape(-1))
        return cached


@dataclass(frozen=True)
class PrefillGather:
    """The sequences with more than one new token, and their context slots."""

    seqs: list[int]  # indices into the batch
    slots: torch.Tensor  # context slots of those sequences, concatenated
    start: list[int]  # [len(seqs) + 1] offsets into `slots`
    block_size: int
    _by_heads: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def head_rows(self, num_kv_heads: int) -> torch.Tensor:
        """[Hkv, len(slots)] rows of a pool viewed [N * Hkv * block_size, D]:
        gathered, each head's context is contiguous. Built once per step."""
        rows = self._by_heads.get(num_kv_heads)
        if rows is None:
            rows = self._by_heads[num_kv_heads] = slot_rows(
                self.slots, num_kv_heads, self.block_size, heads_first=True
            )
        return rows


def padded_tables(tables: Sequence[Sequence[int]], min_width: int = 0) -> torch.Tensor:
    """Block tables as one long tensor [B, max(longest, min_width)], rows padded with block 0."""
    width = max(min_width, max((len(t) for t in tables), default=0))
    return torch.tensor([[*t, *[0] * (width - len(t))] for t in tables], dtype=torch.long).view(
        len(tables), width
    )


@dataclass(frozen=True)
class DecodeTables:
    """The decode sequences (one new token each) as the CPU kernel reads them."""

    block_tables: torch.Tensor  # [b, max_blocks] long, rows padded with block 0
    context_lens: torch.Tensor  # [b] long
    rows: torch.Tensor  # [b] long: each sequence's query row in the packed batch


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
    # Gather buffers reused by every layer of the step (large fresh allocations
    # would be page-faulted in again at each layer).
    _workspace: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)
    _write_rows: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

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

    def workspace(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised buffer kept for the step, one per (name, shape, dtype)."""
        key = (name, shape, dtype)
        buf = self._workspace.get(key)
        if buf is None:
            buf = torch.empty(shape, dtype=dtype, device=self.slot_mapping.device)
            self._workspace[key] = buf
        return buf

    def write_rows(self, num_kv_heads: int) -> torch.Tensor:
        """`slot_rows` of the new tokens' slots: where `write_kv` puts each
        (token, head). Built once per step, on the first layer."""
        rows = self._write_rows.get(num_kv_heads)
        if rows is None:
            rows = self._write_rows[num_kv_heads] = slot_rows(
                self.slot_mapping, num_kv_heads, self.block_size
            )
        return rows

    @cached_property
    def decode_buckets(self) -> list[DecodeBucket]:
        """The decode sequences, longest first, cut into buckets of similar
        length so that padding stays small; built on first use, once a step."""
        bs = self.block_size
        blocks = {i: -(-self.context_lens[i] // bs) for i, n in enumerate(self.query_lens) if n == 1}
        order = sorted(blocks, key=lambda i: -self.context_lens[i])
        if not order:
            return []
        cuts = [0]
        for j in range(1, len(order)):
            head = blocks[order[cuts[-1]]]
            saved = (len(order) - j) * (head - blocks[order[j]]) * bs
            if blocks[order[j]] < BUCKET_FILL * head and saved >= MIN_PADDING_SAVED:
                cuts.append(j)
        cuts.append(len(order))
        device = self.slot_mapping.device
        buckets = []
        for lo, hi in zip(cuts, cuts[1:]):
            width = blocks[order[lo]]
            # Padding blocks repeat the longest sequence's first block: it is
            # full of written (finite) K/V whenever padding exists (width > 1).
            filler = self.block_tables[order[lo]][0]
            seqs = sorted(order[lo:hi])  # batch order: a lone bucket needs no row shuffling
            ids: list[int] = []
            tails: list[int] = []
            for k, i in enumerate(seqs):
                used = blocks[i]
                ids += self.block_tables[i][:used]
                ids += [filler] * (width - used)
                # Unwritten slots at the end of the last block may hold NaN.
                tails += range(k * width * bs + self.context_lens[i], k * width * bs + used * bs)
            ctx = torch.tensor([self.context_lens[i] for i in seqs])
            pad = torch.arange(width * bs)[None, :] >= ctx[:, None]
            rows = [self.query_start[i] for i in seqs]
            buckets.append(
                DecodeBucket(
                    rows=torch.tensor(rows, dtype=torch.long, device=device),
                    block_ids=torch.tensor(ids, dtype=torch.long, device=device),
                    padding=pad[:, None, :].to(device),
                    tail_slots=torch.tensor(tails, dtype=torch.long, device=device),
                    num_blocks=width,
                    all_rows=rows == list(range(self.num_tokens)),
                )
            )
        return buckets

    @cached_property
    def decode_tables(self) -> DecodeTables:
        """Block tables, lengths and query rows of the decode sequences; built
        on first use, once a step."""
        seqs = [i for i, n in enumerate(self.query_lens) if n == 1]
        # At least one column: the kernel reads the row stride even of an empty batch.
        tables = padded_tables([self.block_tables[i] for i in seqs], min_width=1)
        device = self.slot_mapping.device
        return DecodeTables(
            block_tables=tables.to(device),
            context_lens=torch.tensor([self.context_lens[i] for i in seqs], dtype=torch.long, device=device),
            rows=torch.tensor([self.query_start[i] for i in seqs], dtype=torch.long, device=device),
        )

    @cached_property
    def prefill_gather(self) -> PrefillGather:
        """Sequences with several new tokens (prompt chunks) and their context slots."""
        seqs = [i for i, n in enumerate(self.query_lens) if n != 1]
        cs = self.context_start
        if len(seqs) == self.num_seqs:
            slots = self.context_slots
        elif seqs:
            slots = torch.cat([self.context_slots[cs[i] : cs[i + 1]] for i in seqs])
        else:
            slots = self.context_slots[:0]
        start = [0, *accumulate(self.context_lens[i] for i in seqs)]
        return PrefillGather(seqs, slots, start, self.block_size)

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
        padded = padded_tables(tables)
        max_blocks = padded.shape[1]
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
