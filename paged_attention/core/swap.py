"""Moving block tables between the device pool and a host (CPU) pool.

Swapping out copies a sequence's blocks to host blocks and frees the device
blocks; swapping in copies them back into newly allocated device blocks and
rewrites the table. Blocks shared between sequences (samples, beams, cached
prefixes) are copied once and stay shared: a full block's first swap records
device -> host, and a sibling swapped later forks that host block instead of
copying again; swap-in records host -> device the same way. A record is
trusted only while the block it points at is still the same allocation
(`BlockPool.generation`), and only for full blocks, which are never
written again.
"""

from __future__ import annotations

from dataclasses import dataclass

from paged_attention.core.block_pool import BlockPool
from paged_attention.core.block_table import BlockTable


@dataclass(frozen=True)
class BlockCopy:
    src: int
    dst: int


class SwapManager:
    def __init__(self, device: BlockPool, host: BlockPool) -> None:
        assert device.block_size == host.block_size, "device and host block sizes differ"
        self.device = device
        self.host = host
        # device block -> (its generation, host block with the same data, that block's generation)
        self._on_host: dict[int, tuple[int, int, int]] = {}
        # host block -> (its generation, device block with the same data, that block's generation)
        self._on_device: dict[int, tuple[int, int, int]] = {}

    # -------------------------------------------------------------- queries
    def _shared_copy(
        self, table: BlockTable, index: int, records: dict[int, tuple[int, int, int]], target: BlockPool
    ) -> int | None:
        """The block already holding this block's data on the other side, if any."""
        if (index + 1) * table.block_size > table.num_tokens:
            return None  # a partly filled block may still be written: never shared
        block = table.block_ids[index]
        record = records.get(block)
        if record is None or not self._valid(block, record, table.pool, target):
            return None
        return record[1]

    @staticmethod
    def _valid(block: int, record: tuple[int, int, int], source: BlockPool, target: BlockPool) -> bool:
        """Both ends are still the allocations that were recorded."""
        generation, other, other_generation = record
        return (
            source.generation(block) == generation
            and target.ref_count(other) > 0
            and target.generation(other) == other_generation
        )

    def blocks_to_swap_out(self, table: BlockTable) -> int:
        return sum(
            self._shared_copy(table, i, self._on_host, self.host) is None for i in range(len(table.block_ids))
        )

    def blocks_to_swap_in(self, table: BlockTable) -> int:
        return sum(
            self._shared_copy(table, i, self._on_device, self.device) is None
            for i in range(len(table.block_ids))
        )

    def can_swap_out(self, table: BlockTable) -> bool:
        return self.host.can_allocate(self.blocks_to_swap_out(table))

    # -------------------------------------------------------------- actions
    def swap_out(self, table: BlockTable) -> list[BlockCopy]:
        """Move `table` to the host. Returns the device->host copies to perform
        (before any freed device block is written again)."""
        assert table.pool is self.device, "table is not on the device"
        assert self.can_swap_out(table), "host pool too small: check can_swap_out first"
        return self._move(table, self._on_host, self._on_device, self.host)

    def swap_in(self, table: BlockTable) -> list[BlockCopy]:
        """Move `table` back to the device; returns host->device copies."""
        assert table.pool is self.host, "table is not on the host"
        assert self.device.can_allocate(self.blocks_to_swap_in(table)), "device pool too small"
        return self._move(table, self._on_device, self._on_host, self.device)

    def _move(
        self,
        table: BlockTable,
        records: dict[int, tuple[int, int, int]],
        reverse: dict[int, tuple[int, int, int]],
        target: BlockPool,
    ) -> list[BlockCopy]:
        source = table.pool
        copies: list[BlockCopy] = []
        new_ids: list[int] = []
        for i, block in enumerate(table.block_ids):
            other = self._shared_copy(table, i, records, target)
            if other is not None:
                target.fork(other)
            else:
                other = target.allocate()
                assert other is not None, "allocation failed after the capacity check"
                copies.append(BlockCopy(block, other))
                if (i + 1) * table.block_size <= table.num_tokens:
                    src_gen, dst_gen = source.generation(block), target.generation(other)
                    records[block] = (src_gen, other, dst_gen)
                    reverse[other] = (dst_gen, block, src_gen)
            new_ids.append(other)
        source.free_blocks(table.block_ids)  # cached blocks turn evictable tail first
        table.block_ids = new_ids
        table.pool = target
        self._forget_stale()
        return copies

    def _forget_stale(self) -> None:
        """Drop records whose blocks have since been freed or reused."""
        for records, source, target in (
            (self._on_host, self.device, self.host),
            (self._on_device, self.host, self.device),
        ):
            for block, record in list(records.items()):
                if source.ref_count(block) == 0 or not self._valid(block, record, source, target):
                    del records[block]
