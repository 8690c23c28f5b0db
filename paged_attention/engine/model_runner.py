"""Turns a scheduled batch into tensors, runs the model over the paged cache,
and returns logits for the requests that are due a new token."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from paged_attention.attention.metadata import AttentionMetadata
from paged_attention.core.block_table import CopyOnWrite
from paged_attention.core.request import Request
from paged_attention.core.scheduler import ScheduledBatch
from paged_attention.core.swap import BlockCopy
from paged_attention.engine.cuda_graphs import DecodeCudaGraphs
from paged_attention.engine.denormals import flush_denormals
from paged_attention.engine.host_malloc import keep_freed_memory
from paged_attention.kv_cache import KVCachePool, copy_between_pools
from paged_attention.model.llama import CausalLM


@dataclass
class StepInput:
    """One step's work in plain ints and block ids: everything a rank needs to
    run it. Built from the scheduled batch on the driver; under tensor
    parallelism the driver broadcasts it and every rank runs it on its shard."""

    input_ids: list[int]
    positions: list[int]
    block_tables: list[list[int]]
    num_computed: list[int]
    num_new_tokens: list[int]
    sample_rows: list[int]  # packed rows whose logits are due (a prompt or chunk is done)
    copies: list[CopyOnWrite]
    swap_out: list[BlockCopy]
    swap_in: list[BlockCopy]

    @classmethod
    def from_batch(cls, batch: ScheduledBatch) -> tuple[StepInput, list[Request]]:
        """The step and the requests to sample (one per sample row)."""
        input_ids: list[int] = []
        positions: list[int] = []
        sample_rows: list[int] = []
        sampling: list[Request] = []
        for req, n in zip(batch.requests, batch.num_new_tokens):
            start = req.num_computed_tokens
            input_ids.extend(req.token_ids(start, start + n))
            positions.extend(range(start, start + n))
            if start + n == req.num_tokens:
                sample_rows.append(len(input_ids) - 1)
                sampling.append(req)
        step = cls(
            input_ids,
            positions,
            [r.block_table.block_ids for r in batch.requests],
            [r.num_computed_tokens for r in batch.requests],
            batch.num_new_tokens,
            sample_rows,
            batch.copies,
            batch.swap_out,
            batch.swap_in,
        )
        return step, sampling


@dataclass
class StepResult:
    sampling_requests: list[Request]  # requests whose prompt (or chunk) is done: sample now
    logits: torch.Tensor  # [len(sampling_requests), vocab] float32


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        kv_cache: KVCachePool,
        host_cache: KVCachePool | None = None,
        cuda_graphs: DecodeCudaGraphs | None = None,
    ) -> None:
        self.model = model
        self.cuda_graphs = cuda_graphs  # decode-only steps replay captured graphs
        self.kv_cache = kv_cache
        self.host_cache = host_cache  # the swap space, when there is one
        self.device = kv_cache.device
        if self.device.type == "cpu":
            keep_freed_memory()  # large activations reuse heap pages instead of faulting in new ones

    def execute(self, batch: ScheduledBatch) -> StepResult:
        step, sampling = StepInput.from_batch(batch)
        return StepResult(sampling, self.execute_step(step))

    def execute_step(self, step: StepInput) -> torch.Tensor:
        """Run one step; float32 logits [len(step.sample_rows), vocab]."""
        with flush_denormals(self.device.type == "cpu"):
            return self._execute(step)

    def shutdown(self) -> None:
        """Release what the runner started: nothing here (the tensor-parallel
        driver's runner stops its workers)."""

    @torch.inference_mode()
    def _execute(self, step: StepInput) -> torch.Tensor:
        # Swap-outs first: the device blocks they free may be written this step.
        if step.swap_out or step.swap_in:
            assert self.host_cache is not None, "swap copies without a host pool"
            copy_between_pools(self.kv_cache, self.host_cache, step.swap_out)
            copy_between_pools(self.host_cache, self.kv_cache, step.swap_in)
        self.kv_cache.copy_blocks(step.copies)
        meta = AttentionMetadata.build(
            step.block_tables,
            step.num_computed,
            step.num_new_tokens,
            self.kv_cache.block_size,
            self.kv_cache.num_blocks,
            self.device,
        )
        ids_t = torch.tensor(step.input_ids, dtype=torch.long, device=self.device)
        pos_t = torch.tensor(step.positions, dtype=torch.long, device=self.device)
        if self.cuda_graphs is not None and self.cuda_graphs.can_run(meta):
            hidden = self.cuda_graphs.run(ids_t, pos_t, meta)  # valid until the next run
        else:
            hidden = self.model(ids_t, pos_t, self.kv_cache, meta)
        if not step.sample_rows:
            return hidden.new_empty((0, 0), dtype=torch.float32)
        rows = torch.tensor(step.sample_rows, dtype=torch.long, device=self.device)
        return self.model.compute_logits(hidden.index_select(0, rows))
