"""The step loop: schedule, run the model, then `update_from_output`: count
computed tokens, cache full blocks, sample, apply stop rules, free blocks.

A request is a group of sequences (`SampleGroup` for n / best_of samples,
`BeamGroup` for beam search). The scheduler sees only `Request`s; the engine
keeps each live sequence's own state in `_seqs` (a sample's RNG and text, or
the beam group a beam belongs to) and each request's group in `_groups`."""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from paged_attention.core.block_allocator import BlockAllocator
from paged_attention.core.request import Request, RequestStatus
from paged_attention.core.scheduler import ScheduledBatch, Scheduler
from paged_attention.engine.errors import EngineDeadError
from paged_attention.engine.model_runner import ModelRunner, StepResult
from paged_attention.engine.preemption_cost import PreemptionCostModel
from paged_attention.engine.prompt_logprobs import PromptLogprobsCollector
from paged_attention.engine.request_state import RequestState
from paged_attention.engine.sequence_group import BeamGroup, SampleGroup
from paged_attention.engine.step_stats import StepStats, count_prompt_tokens, step_record
from paged_attention.guided.bitmask import TokenMask, allocate_bitmask
from paged_attention.guided.grammar import GrammarCompiler, SequenceGrammar
from paged_attention.kv_cache import KVCachePool
from paged_attention.outputs import RequestOutput
from paged_attention.sampler import Sampler, SamplerOutput, make_generator
from paged_attention.sampling_params import SamplingParams

if TYPE_CHECKING:
    from paged_attention.tokenizer import Tokenizer


class StepError(RuntimeError):
    """A step raised, and the engine has already aborted (and freed) the requests
    it blames: `failures` maps each to the exception. A fault in one request's
    own processing (its detokenizing, stop rules, grammar) blames that request;
    a fault in the forward pass or in batch-wide work blames the step's batch.
    Every other request is intact and the engine can keep stepping; `outputs`
    holds what the step produced for them."""

    def __init__(self, failures: dict[str, Exception], outputs: list[RequestOutput]) -> None:
        first = next(iter(failures.values()))
        super().__init__(f"{type(first).__name__}: {first} (requests {', '.join(sorted(failures))})")
        self.failures = failures
        self.outputs = outputs


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
        tokenizer: Tokenizer,
        eos_token_ids: frozenset[int],
        max_model_len: int,
        vocab_size: int,
        seed: int = 0,
        cost_model: PreemptionCostModel | None = None,
        record_step_stats: bool = False,
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
        self.cost_model = cost_model
        self.sampler = Sampler()
        self.stats = EngineStats()
        # One record per step when asked for (see engine/step_stats.py), else None.
        self.step_stats: list[StepStats] | None = [] if record_step_stats else None
        self._groups: dict[str, SampleGroup | BeamGroup] = {}  # by request id
        # Per live sequence: a sample's state, or a beam's group (a beam's own
        # state is its row in the group).
        self._seqs: dict[Request, RequestState | BeamGroup] = {}
        self._arrivals = itertools.count()
        self._ids = itertools.count()
        # Structured output: each guided sample's grammar state, by sequence.
        # The compiler is built on the first guided request (it loads xgrammar
        # and reads the vocabulary); the lock because the server validates
        # requests on its event loop while the engine thread runs.
        self._grammars: dict[Request, SequenceGrammar] = {}
        self._grammar_compiler: GrammarCompiler | None = None
        self._grammar_lock = threading.Lock()
        self._prompt_logprobs = PromptLogprobsCollector(runner.model)

    # --------------------------------------------------------------- requests
    def validate_request(
        self, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0, stream: bool = False
    ) -> None:
        """Every check `add_request` makes, without queueing anything: callers
        validate a whole batch first so that bad input queues none of it.
        TypeError for a wrong type, ValueError for a bad value."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise TypeError(f"priority must be an int, got {priority!r}")
        if stream and params.use_beam_search:
            raise ValueError("beam search cannot stream: beams are ranked only when the search ends")
        if stream and params.best_of != params.n:
            raise ValueError(
                f"best_of ({params.best_of}) must equal n ({params.n}) when streaming: "
                "the best samples are known only when all have finished"
            )
        self.validate_prompt(prompt_token_ids, params)

    def validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        bad_type = next((t for t in prompt_token_ids if not isinstance(t, int) or isinstance(t, bool)), None)
        if bad_type is not None:
            raise TypeError(f"prompt token ids must be ints, got {bad_type!r} ({type(bad_type).__name__})")
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
        if params.guided is not None:
            self.grammar_compiler().compile(params.guided)  # a bad spec fails here, before queueing

    def grammar_compiler(self) -> GrammarCompiler:
        with self._grammar_lock:
            if self._grammar_compiler is None:
                self._grammar_compiler = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids)
            return self._grammar_compiler

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
        """Queue a request. Raises TypeError/ValueError (queueing nothing) on bad input."""
        self.validate_request(prompt_token_ids, params, priority, stream)
        request_id = str(next(self._ids)) if request_id is None else request_id
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        arrival = next(self._arrivals)
        prompt_ids = list(prompt_token_ids)
        req = Request.create(
            request_id,
            prompt_ids,
            self.allocator,
            params.max_tokens,
            priority=priority,
            arrival_index=arrival,
            use_prefix_cache=params.prompt_logprobs is None,
        )
        group: SampleGroup | BeamGroup
        if params.use_beam_search:
            group = BeamGroup(
                request_id,
                prompt,
                prompt_ids,
                params,
                [req],
                eos_token_ids=frozenset(params.stop_token_ids or ())
                | (frozenset() if params.ignore_eos else self.eos_token_ids),
                max_new_tokens=min(params.max_tokens, self.max_model_len - len(prompt_ids)),
            )
            self._seqs[req] = group
        else:
            stop_ids = set(params.stop_token_ids or ())
            # A grammar allows EOS only once it is complete: ending there is
            # the grammar's own stop, ignore_eos or not.
            if not params.ignore_eos or params.guided is not None:
                stop_ids |= self.eos_token_ids
            group = SampleGroup(request_id, prompt, prompt_ids, params, [req], stream=stream)
            state = RequestState(
                req,
                group,
                params,
                self._generator(params, arrival, 0),
                stop_ids=frozenset(stop_ids),
                max_total_tokens=self.max_model_len,
                stream=stream,
            )
            group.samples.append(state)
            self._seqs[req] = state
            if params.guided is not None:
                self._grammars[req] = self.grammar_compiler().matcher(params.guided)
        self._groups[request_id] = group
        if params.prompt_logprobs is not None:
            self._prompt_logprobs.add(req, request_id, params.prompt_logprobs)
        self.scheduler.add(req)
        return request_id

    def _generator(self, params: SamplingParams, arrival: int, index: int):
        """Sample i of a request draws from seed + i (or engine seed + arrival + i)."""
        if params.is_greedy:
            return None
        seed = None if params.seed is None else params.seed + index
        return make_generator(seed, self.seed + 7919 * arrival + index)

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is and free all its blocks now."""
        group = self._groups.pop(request_id, None)
        if group is None:
            return False
        self._prompt_logprobs.forget(request_id)
        if isinstance(group, SampleGroup):
            for sample in group.samples:
                if not sample.finished:
                    sample.abort()
        for req in group.members:
            self._release(req)
        group.members = []
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_unfinished(self) -> int:
        return len(self._groups)

    # ------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """One iteration. Returns the output of every request that finished, and
        for every streaming request whose samples got tokens, their deltas."""
        began = time.perf_counter()
        batch = self.scheduler.schedule()
        if batch.is_empty:  # the scheduler only returns one when no work is left
            assert not (batch.swap_out or batch.swap_in), "swap copies in an empty step"
            return []
        prompt_tokens = count_prompt_tokens(batch) if self.step_stats is not None else 0
        start = time.perf_counter()
        try:
            result = self.runner.execute(batch)
            executed = time.perf_counter()
            if self.cost_model is not None:  # learn the prefill speed recompute would run at
                self.cost_model.observe_step(batch.num_tokens, time.perf_counter() - start)
            self.stats.num_steps += 1
            self.stats.peak_used_blocks = max(self.stats.peak_used_blocks, self.allocator.num_used_blocks)
            outputs = self.update_from_output(batch, result)
        except StepError as err:
            self._abort_all(err.failures)
            raise
        except EngineDeadError as err:
            # Not a StepError: nothing can run any more. The batch's requests
            # are freed all the same, and the error goes up as it is.
            self._abort_all(dict.fromkeys(self._batch_request_ids(batch), err))
            raise
        except Exception as err:
            # Half-applied: the batch's KV and counts no longer agree. Its
            # requests go; the others never entered this step.
            failures = dict.fromkeys(self._batch_request_ids(batch), err)
            self._abort_all(failures)
            raise StepError(failures, []) from err
        if self.step_stats is not None:
            self.step_stats.append(
                step_record(batch, prompt_tokens, began, start, executed, time.perf_counter())
            )
        return outputs

    def update_from_output(self, batch: ScheduledBatch, result: StepResult) -> list[RequestOutput]:
        """Everything a forward pass changes, in order: computed-token counts,
        full blocks into the prefix cache (and the prompt's hits noted), sampled
        tokens appended (a request's samples forked once its prompt is done),
        stop rules, finished sequences freed, beam rounds advanced; returns the
        step's outputs."""
        self._prompt_logprobs.collect(batch)  # before the computed counts move on
        caching = self.allocator.enable_prefix_caching
        for req, n in zip(batch.requests, batch.num_new_tokens):
            req.num_computed_tokens += n
            if req.num_computed_tokens <= req.num_prompt_tokens:
                self.stats.num_prompt_tokens += n
            if caching:
                self.allocator.cache_full_blocks(req.block_table, req.prefix_chain, req.token_ids)
                if req.num_cached_tokens:
                    self._note_cached(req)

        samples: list[RequestState] = []
        rows: list[int] = []  # each sample's row of result.logits
        beam_groups: list[BeamGroup] = []
        for row, req in enumerate(result.sampling_requests):
            state = self._seqs[req]
            if isinstance(state, BeamGroup):
                # A beam recomputed after a preemption may report twice in a
                # round; the group still advances once.
                if state.receive(req, result.logits[row]) and state not in beam_groups:
                    beam_groups.append(state)
                continue
            if state.group.fanned_out:
                forked = [state]
            else:  # the prompt's first logits: every sample draws from them
                forked = self._fan_out(state)
            samples += forked
            rows += [row] * len(forked)

        stepped: dict[SampleGroup, list[RequestState]] = {}
        faults: dict[str, Exception] = {}  # request id -> what its own processing raised
        if samples:
            sampled = self._sample(samples, result.logits, rows)
            for i, sample in enumerate(samples):
                if sample.group.request_id in faults:
                    continue
                try:
                    sample.append_token(
                        sampled.token_ids[i], sampled.logprobs[i], sampled.top_logprobs[i], self.tokenizer
                    )
                    grammar = self._grammars.get(sample.seq)
                    if grammar is not None:
                        grammar.accept(sampled.token_ids[i])
                    if sample.finished:
                        sample.group.members.remove(sample.seq)
                        self._release(sample.seq)
                except Exception as err:  # this request's own rules: it alone fails
                    faults[sample.group.request_id] = err
                    continue
                stepped.setdefault(sample.group, []).append(sample)

        outputs: list[RequestOutput] = []
        for group, stepped_samples in stepped.items():
            if group.request_id in faults:
                continue
            try:
                if group.stream:
                    outputs.append(group.stream_output(stepped_samples))
                elif group.finished:
                    outputs.append(group.to_output())
            except Exception as err:
                faults[group.request_id] = err
                continue
            if group.finished:
                del self._groups[group.request_id]
        for beams in beam_groups:
            try:
                beams.advance(self._fork_beam, self._release)
                if beams.finished:
                    outputs.append(beams.to_output(self.tokenizer))
            except Exception as err:
                faults[beams.request_id] = err
                continue
            if beams.finished:
                del self._groups[beams.request_id]
        self._prompt_logprobs.attach(outputs)
        if faults:
            raise StepError(faults, outputs)
        return outputs

    def _batch_request_ids(self, batch: ScheduledBatch) -> list[str]:
        """The requests a failed step touched: those it ran, and those it
        swapped out (their host copy was to happen in this step)."""
        touched = batch.requests + [r for r in batch.preempted if r.status is RequestStatus.SWAPPED]
        ids: dict[str, None] = {}
        for req in touched:
            state = self._seqs.get(req)
            if state is not None:
                ids[state.request_id if isinstance(state, BeamGroup) else state.group.request_id] = None
        return list(ids)

    def _abort_all(self, failures: dict[str, Exception]) -> None:
        for request_id in failures:
            self.abort(request_id)

    def _note_cached(self, req: Request) -> None:
        """Report prefix-cache reuse on the request's output (first admission)."""
        state = self._seqs[req]
        group = state if isinstance(state, BeamGroup) else state.group
        if not group.num_cached_tokens:
            group.num_cached_tokens = req.num_cached_tokens

    def _fan_out(self, first: RequestState) -> list[RequestState]:
        """After the prompt is computed once, fork it into the other best_of - 1
        samples; every prompt block is shared (copy-on-write on first write).
        Returns all the request's samples, by index."""
        group = first.group
        assert group.samples == [first], f"request {group.request_id} fanned out twice"
        assert group.params.best_of is not None, "SamplingParams sets best_of"
        group.fanned_out = True
        grammar = self._grammars.get(first.seq)
        for index in range(1, group.params.best_of):
            child = self._fork_request(first.seq, f"{first.seq.request_id}#{index}")
            sample = first.fork(child, index, self._generator(group.params, child.arrival_index, index))
            self._seqs[child] = sample
            if grammar is not None:
                self._grammars[child] = grammar.fork()
            group.members.append(child)
            group.samples.append(sample)
        return list(group.samples)

    def _fork_request(self, parent: Request, request_id: str) -> Request:
        child = parent.fork(request_id)
        self.scheduler.add_fork(child, parent)
        return child

    def _fork_beam(self, parent: Request) -> Request:
        child = self._fork_request(parent, f"{parent.request_id}+")
        self._seqs[child] = self._seqs[parent]
        return child

    def _release(self, req: Request) -> None:
        """A sequence is done (finished, dropped or aborted): free its blocks, forget it."""
        self.scheduler.finish(req)
        del self._seqs[req]
        self._grammars.pop(req, None)
        self._prompt_logprobs.release(req)

    def _sample(self, samples: list[RequestState], logits: torch.Tensor, rows: list[int]) -> SamplerOutput:
        if rows != list(range(logits.shape[0])):
            logits = logits.index_select(0, torch.tensor(rows, device=logits.device))
        sampled = self.sampler.sample(
            logits,
            [s.params for s in samples],
            [s.generator for s in samples],
            self._token_mask(samples, logits),
        )
        self.stats.num_generated_tokens += len(samples)
        return sampled

    def _token_mask(self, samples: list[RequestState], logits: torch.Tensor) -> TokenMask | None:
        """One bitmask for the step's guided samples, each row filled by its grammar."""
        rows = [i for i, s in enumerate(samples) if s.seq in self._grammars]
        if not rows:
            return None
        bitmask = allocate_bitmask(len(rows), logits.shape[1])
        for j, i in enumerate(rows):
            self._grammars[samples[i].seq].fill(bitmask, j)
        return TokenMask(rows, bitmask)

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
            "num_swapped": len(self.scheduler.swapped),
            "num_preemptions": self.scheduler.num_preemptions,
            "num_swapped_out": self.scheduler.num_swapped_out,
            "num_recomputed_tokens": self.scheduler.num_recomputed_tokens,
            "num_steps": self.stats.num_steps,
            "peak_used_blocks": self.stats.peak_used_blocks,
            "num_cached_blocks": self.allocator.num_cached_blocks,
            "prefix_cache_hit_rate": self.allocator.hit_rate,
            **self._host_pool_stats(),
        }

    def _host_pool_stats(self) -> dict[str, int | float]:
        """The host swap pool: its size, the blocks swapped sequences hold, and
        the blocks it has ever handed out (the host pages it has committed)."""
        swapper = self.scheduler.swapper
        if swapper is None:
            return {"num_host_blocks": 0, "num_host_used_blocks": 0, "num_host_touched_blocks": 0}
        host = swapper.host
        return {
            "num_host_blocks": host.num_blocks,
            "num_host_used_blocks": host.num_used_blocks,
            "num_host_touched_blocks": host.num_touched_blocks,
        }

    def check_invariants(self) -> None:
        self.scheduler.check_invariants()
        live = {id(r) for r in self.scheduler.requests()}
        members = {id(r) for g in self._groups.values() for r in g.members}
        assert live == members, f"scheduler holds {len(live)} sequences, request groups {len(members)}"
        tracked = {id(r) for r in self._seqs}
        assert tracked == live, f"engine tracks {len(tracked)} sequences, scheduler holds {len(live)}"
        for req, state in self._seqs.items():
            assert isinstance(state, BeamGroup) or state.seq is req, (
                f"sequence {req.request_id} maps to sample {state.seq.request_id}"
            )
        for req, grammar in self._grammars.items():
            # Recompute preemption keeps a sequence's outputs, so its grammar
            # state stays valid; it must always have seen exactly those tokens.
            assert req in self._seqs, f"grammar kept for released sequence {req.request_id}"
            assert grammar.num_accepted == req.num_output_tokens, (
                f"sequence {req.request_id}: grammar saw {grammar.num_accepted} of "
                f"{req.num_output_tokens} output tokens"
            )
        self._prompt_logprobs.check_invariants(live)
        if not live:
            assert self.allocator.num_free_blocks == self.allocator.num_blocks, (
                f"idle engine leaked {self.allocator.num_used_blocks} blocks"
            )
