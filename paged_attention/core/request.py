"""A request as the scheduler sees it: tokens, how many are in the KV pool, its blocks.

One idea covers prefill, chunked prefill and decode alike: each step the
scheduler lets `num_computed_tokens` catch up with `num_tokens`; a request
whose computed count reaches its token count after a step gets a new token
sampled. Invariant: 0 <= num_computed_tokens <= num_tokens, and the block table
holds exactly num_computed_tokens tokens between steps.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from paged_attention.core.block_allocator import BlockAllocator
from paged_attention.core.block_table import BlockTable
from paged_attention.core.prefix_cache import PrefixChain


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    block_table: BlockTable
    max_tokens: int
    priority: int = 0
    arrival_index: int = 0
    # The one list of generated tokens; the engine keeps everything else about
    # a sequence (sampling state, text) keyed by this request.
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache on admission
    # False: admission never reuses cached blocks (prompt log-probs need every
    # prompt position computed); the request's own full blocks are still cached.
    use_prefix_cache: bool = True
    # How far the prefix cache's hash chain has got along the table's blocks.
    prefix_chain: PrefixChain = field(default_factory=PrefixChain)

    @classmethod
    def create(
        cls,
        request_id: str,
        prompt_token_ids: list[int],
        allocator: BlockAllocator,
        max_tokens: int,
        **kwargs: Any,
    ) -> Request:
        return cls(request_id, list(prompt_token_ids), BlockTable(allocator), max_tokens, **kwargs)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output without building the whole list."""
        n_prompt = len(self.prompt_token_ids)
        if end <= n_prompt:
            return self.prompt_token_ids[start:end]
        if start >= n_prompt:
            return self.output_token_ids[start - n_prompt : end - n_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n_prompt]

    def fork(self, request_id: str) -> Request:
        """A sibling sequence that has produced what this one has, sharing every
        block (copy-on-write) and the prefix cache's chain along them."""
        return Request(
            request_id,
            self.prompt_token_ids,
            self.block_table.fork(),
            self.max_tokens,
            priority=self.priority,
            arrival_index=self.arrival_index,
            output_token_ids=list(self.output_token_ids),
            num_computed_tokens=self.num_computed_tokens,
            prefix_chain=self.prefix_chain.copy(),
        )

    def free_blocks(self) -> None:
        """Give back every KV block; the hash chain starts over with the table."""
        self.block_table.free()
        self.prefix_chain = PrefixChain()

    def check_invariants(self) -> None:
        assert 0 <= self.num_computed_tokens <= self.num_tokens, (
            f"request {self.request_id}: computed {self.num_computed_tokens} of {self.num_tokens}"
        )
        assert self.block_table.num_tokens == self.num_computed_tokens, (
            f"request {self.request_id}: table holds {self.block_table.num_tokens} tokens, "
            f"computed {self.num_computed_tokens}"
        )
        self.block_table.check_invariants()
        self.prefix_chain.check_invariants(self.block_table.num_full_blocks)
