"""Prompt log-probs (`SamplingParams.prompt_logprobs`, vLLM's): for every prompt
token after the first, the log-softmax of the raw logits at the position before
it -- the top N tokens plus the prompt's own token.

The model runner projects only each request's last position to logits, so
while some request wants prompt log-probs a forward hook on the model keeps the
step's final hidden states, and `collect` projects the rows of the prompt
positions that request computed this step. Chunked prefill fills the list over
several steps and recompute preemption recomputes positions already recorded,
so each position is recorded exactly once, in order. Such requests skip the
prefix cache on admission (`Request.use_prefix_cache`): a cached position has
no hidden state to project."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from paged_attention.core.request import Request
from paged_attention.core.scheduler import ScheduledBatch
from paged_attention.outputs import RequestOutput


@dataclass
class PromptLogprobs:
    request_id: str
    prompt_token_ids: list[int]
    num_top: int
    # entries[i]: log-probs for prompt token i; token 0 has nothing before it.
    entries: list[dict[int, float] | None] = field(default_factory=lambda: [None])

    @property
    def done(self) -> bool:
        return len(self.entries) == len(self.prompt_token_ids)


class PromptLogprobsCollector:
    def __init__(self, model: Any) -> None:
        self._model = model  # has compute_logits(hidden rows) -> logits
        self._computing: dict[Request, PromptLogprobs] = {}  # prefilling sequences that asked
        self._by_request: dict[str, PromptLogprobs] = {}  # until the request's last output
        self._hidden: torch.Tensor | None = None
        self._hook: Any = None

    def add(self, seq: Request, request_id: str, num_top: int) -> None:
        record = PromptLogprobs(request_id, list(seq.prompt_token_ids), num_top)
        self._by_request[request_id] = record
        if record.done:  # a one-token prompt: nothing to compute
            return
        self._computing[seq] = record
        if self._hook is None:
            self._hook = self._model.register_forward_hook(self._keep_hidden)

    def _keep_hidden(self, _module: Any, _args: Any, output: torch.Tensor) -> None:
        self._hidden = output

    @torch.inference_mode()
    def collect(self, batch: ScheduledBatch) -> None:
        """Record the prompt positions computed in `batch`; call before the
        requests' computed-token counts move on."""
        hidden, self._hidden = self._hidden, None
        if not self._computing:
            return
        offset = 0  # packed row of the request's first new token
        for seq, n in zip(batch.requests, batch.num_new_tokens):
            record = self._computing.get(seq)
            if record is not None:
                start = seq.num_computed_tokens
                # Position p predicts prompt token p + 1; the last prompt
                # position predicts the first output token (the sampler's row).
                first = max(start, len(record.entries) - 1)
                end = min(start + n, len(record.prompt_token_ids) - 1)
                if first < end:
                    assert hidden is not None, "prompt positions computed without the model's hidden states"
                    rows = torch.arange(offset + first - start, offset + end - start, device=hidden.device)
                    self._record(record, hidden.index_select(0, rows), first)
                if record.done:
                    del self._computing[seq]
            offset += n
        self._unhook_if_idle()

    def _record(self, record: PromptLogprobs, hidden: torch.Tensor, first: int) -> None:
        logprobs = torch.log_softmax(self._model.compute_logits(hidden).float(), dim=-1)
        targets = record.prompt_token_ids[first + 1 : first + 1 + hidden.shape[0]]
        own = (
            logprobs.gather(1, torch.tensor(targets, device=logprobs.device).unsqueeze(1)).squeeze(1).tolist()
        )
        k = min(record.num_top, logprobs.shape[1])
        values, indices = logprobs.topk(k, dim=-1)
        for token, token_lp, top_ids, top_values in zip(targets, own, indices.tolist(), values.tolist()):
            entry = dict(zip(top_ids, top_values))
            entry.setdefault(token, token_lp)
            record.entries.append(entry)

    def attach(self, outputs: list[RequestOutput]) -> None:
        """Put each output's prompt log-probs on it (the whole list, every
        output, as vLLM does); a finished request's record is dropped."""
        for out in outputs:
            record = self._by_request.get(out.request_id)
            if record is None:
                continue
            out.prompt_logprobs = record.entries
            if out.finished:
                del self._by_request[out.request_id]

    def release(self, seq: Request) -> None:
        """`seq` left the engine (finished, dropped, aborted)."""
        if self._computing.pop(seq, None) is not None:
            self._unhook_if_idle()

    def forget(self, request_id: str) -> None:
        self._by_request.pop(request_id, None)

    def _unhook_if_idle(self) -> None:
        if not self._computing and self._hook is not None:
            self._hook.remove()
            self._hook = None
            self._hidden = None

    def check_invariants(self, live: set[int]) -> None:
        for seq, record in self._computing.items():
            assert id(seq) in live, f"prompt log-probs kept for released sequence {seq.request_id}"
            assert not record.done, f"request {record.request_id}: finished prompt log-probs still computing"
