"""Automatic prefix caching: the records of the hash chain.

A full block is named by a hash chained through every block before it,
`hash_block(parent_hash, token_ids)`, so equal hashes mean "the same tokens
after the same prefix" -- almost always. A hit is confirmed, never trusted: the
entry must hold the very token ids asked for *and* hang off the entry that the
previous hit matched (entries carry serials that are never reused). By
induction a chain of hits holds exactly the query's tokens from position 0, so
a hash collision can cost a miss but can never hand out another prefix's KV.

The hash -> block map, and the eviction of cached blocks nobody holds, belong
to `BlockPool` (core/block_pool.py), which owns every block's lifecycle. This
module only defines what the pool and a request exchange: cache entries and a
request's progress along the chain. It imports nothing from the rest of core.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

# Tokens of a sequence: a list, or a `Request.token_ids(start, end)`-style
# function, so the engine can hand over only the new blocks' tokens each step
# instead of copying the whole sequence.
TokenSource = Sequence[int] | Callable[[int, int], Sequence[int]]


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Chained hash of one full block. Python's hash is enough: entries live
    only as long as the process, and every hit is confirmed by content."""
    return hash((parent_hash, token_ids))


@dataclass(frozen=True, eq=False)
class CachedBlock:
    """One cache entry. Compared by identity: a re-registered block is a new entry."""

    block_id: int
    block_hash: int
    parent_hash: int | None  # None for a sequence's first block
    parent_serial: int | None  # serial of the entry this one extends; None for the first block
    token_ids: tuple[int, ...]
    serial: int  # unique per pool, never reused


@dataclass
class PrefixChain:
    """How far a sequence's blocks have been offered to the prefix cache.

    The first `num_hashed_blocks` (full) blocks have been offered; `tail` is
    the entry standing for exactly those tokens (the sequence's own, or an
    identical block's), None before the first block or once the chain broke.
    A request owns one; it starts over whenever its blocks are freed.
    """

    num_hashed_blocks: int = 0
    tail: CachedBlock | None = None

    def copy(self) -> PrefixChain:
        """For a fork: shared blocks share their hashes, so the child goes on
        from the same point."""
        return replace(self)

    def check_invariants(self, num_full_blocks: int) -> None:
        assert 0 <= self.num_hashed_blocks <= num_full_blocks, (
            f"{self.num_hashed_blocks} hashed blocks but only {num_full_blocks} full"
        )
        assert self.num_hashed_blocks > 0 or self.tail is None, "a chain tail before any block"


def read_tokens(source: TokenSource, start: int, end: int) -> tuple[int, ...]:
    if callable(source):
        return tuple(source(start, end))
    return tuple(source[start:end])
