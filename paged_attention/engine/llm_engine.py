"""The step loop: schedule, run the model, sample, apply stop rules, free blocks."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from paged_attention.core.block_allocator import BlockAllocator
from paged_attention.core.request import Request
from paged_attention.core.scheduler import Scheduler
from paged_attention.engine.model_runner import ModelRunner
from paged_attention.engine.request_state import RequestState
from paged_attention.kv_cache import KVCachePool
from paged_attention.outputs import RequestOutput
from paged_attention.sampler import Sampler, make_generator
from paged_attention.sampling_params import SamplingParams


@dataclass
class EngineStats:
    num_steps: int = 0
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    peak_used_blocks: int = 0


class LLMEngine:
    def __init__(
        self,
        runner: ModelRunner,
        kv_cache: KVCachePool,
        allocator: BlockAllocator,
        scheduler: Scheduler,
        tokenizer,
        eos_token_ids: frozenset[int],
        max_model_len: int,
        vocab_size: int,
        seed: int = 0,
    ) -> None:
        self.runner = runner
        self.kv_cache = kv_cache
        self.allocator = allocator
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.seed = seed
        self.sampler = Sampler()
        self.stats = EngineStats()
        self._requests: dict[str, Request] = {}
        self._arrivals = itertools.count()
        self._ids = itertools.count()

    # --------------------------------------------------------------- requests
    def validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if not prompt_token_ids:
            raise ValueError("prompt is empty: it must have at least 1 token")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt_token_ids)} tokens; max_model_len is {self.max_model_len} "
                f"(the prompt must leave room for at least 1 generated token)"
            )
        vocab = self.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")

    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        prompt: str | None = None,
        request_id: str | None = None,
        priority: int = 0,
        stream: bool = False,
    ) -> str:
        """Queue a request. Raises ValueError (queueing nothing) on bad input."""
        self.validate_prompt(prompt_token_ids, params)
        request_id = str(next(self._ids)) if request_id is None else request_id
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        arrival = next(self._arrivals)
        stop_ids = set(params.stop_token_ids or ())
        if not params.ignore_eos:
            stop_ids |= self.eos_token_ids
        state = RequestState(
            request_id=request_id,
            prompt=prompt,
            prompt_token_ids=list(prompt_token_ids),
            params=params,
            generator=None if params.is_greedy else make_generator(params.seed, self.seed + arrival),
            stop_ids=frozenset(stop_ids),
            max_total_tokens=self.max_model_len,
            stream=stream,
        )
        req = Request.create(
            request_id, prompt_token_ids, self.allocator, params.max_tokens,
            priority=priority, arrival_index=arrival, payload=state,
        )
        self._requests[request_id] = req
        self.scheduler.add(req)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is and free its blocks now."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        req.payload.abort()
        self.scheduler.finish(req)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_unfinished(self) -> int:
        return len(self._requests)

    # ------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """One iteration. Returns outputs of requests that finished, plus a
        delta for every streaming request that produced text."""
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return []
        result = self.runner.execute(batch)
        self.stats.num_steps += 1
        self.stats.peak_used_blocks = max(self.stats.peak_used_blocks, self.allocator.num_used_blocks)
        for req, n in zip(batch.requests, batch.num_new_tokens):
            req.num_computed_tokens += n
            if req.num_computed_tokens <= req.num_prompt_tokens:
                self.stats.num_prompt_tokens += n
        outputs: list[RequestOutput] = []
        if not result.sampling_requests:
            return outputs
        states = [r.payload for r in result.sampling_requests]
        sampled = self.sampler.sample(
            result.logits, [s.params for s in states], [s.generator for s in states]
        )
        self.stats.num_generated_tokens += len(states)
        for i, (req, state) in enumerate(zip(result.sampling_requests, states)):
            token = sampled.token_ids[i]
            req.output_token_ids.append(token)
            state.append_token(token, sampled.logprobs[i], sampled.top_logprobs[i], self.tokenizer)
            if state.finished:
                self.scheduler.finish(req)
                del self._requests[req.request_id]
                outputs.append(state.to_output(delta=state.stream))
            elif state.stream:
                outputs.append(state.to_output(delta=True))
        return outputs

    # ------------------------------------------------------------ inspection
    def memory_stats(self) -> dict[str, int | float]:
        used = self.allocator.num_used_blocks
        return {
            "num_blocks": self.allocator.num_blocks,
            "num_free_blocks": self.allocator.num_free_blocks,
            "num_used_blocks": used,
            "block_size": self.allocator.block_size,
            "bytes_per_block": self.kv_cache.bytes_per_block,
            "kv_cache_usage": used / self.allocator.num_blocks,
            "num_running": len(self.scheduler.running),
            "num_waiting": self.scheduler.num_waiting,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_steps": self.stats.num_steps,
            "peak_used_blocks": self.stats.peak_used_blocks,
        }

    def check_invariants(self) -> None:
        self.scheduler.check_invariants()
        live = {r.request_id for r in self.scheduler.requests()}
        assert live == set(self._requests), (
            f"engine tracks {sorted(self._requests)} but the scheduler holds {sorted(live)}"
        )
        if not live:
            assert self.allocator.num_free_blocks == self.allocator.num_blocks, (
                f"idle engine leaked {self.allocator.num_used_blocks} blocks"
            )
