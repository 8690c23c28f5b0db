"""Per-step records: what one engine step ran and where its time went.

`LLMEngine.step` appends one `StepStats` to `LLMEngine.step_stats` per step
when the engine is built with `record_step_stats=True` (the list grows with
every step, so it is off by default). Benchmarks read model work and timings
from it instead of wrapping the engine's internals."""

from __future__ import annotations

from dataclasses import dataclass

from paged_attention.core.scheduler import ScheduledBatch


@dataclass(frozen=True)
class StepStats:
    num_seqs: int  # sequences in the batch
    num_tokens: int  # tokens run through the model: prompt chunks and decodes
    num_prompt_tokens: int  # of those, prompt tokens (first computation or a recompute)
    num_preempted: int  # sequences preempted while scheduling this step
    num_swap_out_blocks: int  # blocks copied device -> host this step
    num_swap_in_blocks: int  # blocks copied host -> device this step
    schedule_s: float  # in the scheduler
    execute_s: float  # in the model runner: swap copies, forward pass, logits
    update_s: float  # after the forward pass: sampling, stop rules, freeing blocks

    @property
    def step_s(self) -> float:
        return self.schedule_s + self.execute_s + self.update_s


def count_prompt_tokens(batch: ScheduledBatch) -> int:
    """Prompt tokens in a scheduled (not yet run) batch: the scheduled tokens
    that fall inside each sequence's prompt."""
    return sum(
        max(0, min(n, req.num_prompt_tokens - req.num_computed_tokens))
        for req, n in zip(batch.requests, batch.num_new_tokens)
    )


def step_record(
    batch: ScheduledBatch,
    num_prompt_tokens: int,
    began: float,
    executing: float,
    executed: float,
    ended: float,
) -> StepStats:
    """A step's record from its batch and four perf_counter readings: step
    start, model start, model end, step end."""
    return StepStats(
        num_seqs=len(batch.requests),
        num_tokens=batch.num_tokens,
        num_prompt_tokens=num_prompt_tokens,
        num_preempted=len(batch.preempted),
        num_swap_out_blocks=len(batch.swap_out),
        num_swap_in_blocks=len(batch.swap_in),
        schedule_s=executing - began,
        execute_s=executed - executing,
        update_s=ended - executed,
    )
