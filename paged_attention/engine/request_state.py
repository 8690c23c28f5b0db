"""Per-request engine state beyond scheduling: sampling params, RNG, text,
log-probs, and the stop rules applied to every new token."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from paged_attention.outputs import CompletionOutput, RequestOutput
from paged_attention.sampling_params import SamplingParams

if TYPE_CHECKING:
    from paged_attention.tokenizer import Tokenizer


@dataclass(eq=False)
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    stop_ids: frozenset[int]  # eos (unless ignore_eos) + stop_token_ids
    max_total_tokens: int  # max_model_len: generation stops there
    stream: bool = False
    index: int = 0  # which of the request's n samples this sequence is
    group: Any = None  # the SampleGroup this sequence belongs to
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float = 0.0
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    _streamed_upto: int = 0  # text already sent as stream deltas
    _searched_upto: int = 0  # text already searched for stop strings
    _prefix_offset: int = 0  # incremental decoding window: [prefix, read) already in text
    _read_offset: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def needs_text_each_step(self) -> bool:
        return self.stream or bool(self.params.stop)

    def append_token(
        self, token_id: int, logprob: float, top_logprobs: dict[int, float] | None, tokenizer: Tokenizer
    ) -> None:
        """Record one sampled token and decide whether the request is done."""
        now = time.perf_counter()
        if self.first_token_time is None:
            self.first_token_time = now
        self.output_token_ids.append(token_id)
        self.cumulative_logprob += logprob
        if top_logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.append(top_logprobs)
        params = self.params
        if self.needs_text_each_step:
            self._decode_new_tokens(tokenizer)
        if token_id in self.stop_ids:
            self._finish("stop", token_id, now)
        elif params.stop and self._cut_at_stop_string():
            self.finish_time = now
        elif len(self.output_token_ids) >= params.max_tokens:
            self._finish("length", None, now)
        elif len(self.prompt_token_ids) + len(self.output_token_ids) >= self.max_total_tokens:
            self._finish("length", None, now)
        if self.finished and not params.stop:
            self.text = self._decode(tokenizer)

    def fork(self, index: int, generator: torch.Generator | None) -> RequestState:
        """The state of a sibling sample that has produced what this one has."""
        child = copy.copy(self)
        child.index = index
        child.generator = generator
        child.output_token_ids = list(self.output_token_ids)
        child.logprobs = None if self.logprobs is None else list(self.logprobs)
        return child

    def abort(self) -> None:
        self._finish("abort", None, time.perf_counter())

    def _finish(self, reason: str, stop_reason: int | str | None, now: float) -> None:
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.finish_time = now

    def _decode_new_tokens(self, tokenizer: Tokenizer) -> None:
        """Extend `text` by the newest tokens without re-decoding the whole
        output (quadratic over a long stream): decode a short window that ends
        at the new tokens, with and without them, and append the difference.
        The window starts a few tokens back so merges (a leading space, a
        multi-byte character split over tokens) come out as in a full decode;
        an incomplete character (U+FFFD) waits for the next token."""
        ids = self.output_token_ids
        skip = self.params.skip_special_tokens
        before = tokenizer.decode(ids[self._prefix_offset : self._read_offset], skip_special_tokens=skip)
        after = tokenizer.decode(ids[self._prefix_offset :], skip_special_tokens=skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(ids)

    def _decode(self, tokenizer: Tokenizer) -> str:
        return tokenizer.decode(
            self.output_token_ids, skip_special_tokens=self.params.skip_special_tokens
        )

    def _cut_at_stop_string(self) -> bool:
        """Cut the text at the first stop string; True when one was found."""
        stops = self.params.stop or []
        # Only the newly decoded tail can hold a new match.
        horizon = max(len(s) for s in stops) + 16
        search_from = max(0, self._searched_upto - horizon)
        self._searched_upto = len(self.text)
        best: tuple[int, str] | None = None
        for stop in stops:
            idx = self.text.find(stop, search_from)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is None:
            return False
        idx, stop = best
        end = idx + len(stop) if self.params.include_stop_str_in_output else idx
        self.text = self.text[:end]
        self.finish_reason = "stop"
        self.stop_reason = stop
        return True

    def completion(self, index: int | None = None, text: str | None = None) -> CompletionOutput:
        return CompletionOutput(
            index=self.index if index is None else index,
            text=self.text if text is None else text,
            token_ids=list(self.output_token_ids),
            cumulative_logprob=self.cumulative_logprob,
            logprobs=self.logprobs,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )

    def metrics(self) -> dict[str, float]:
        metrics: dict[str, float] = {"arrival_time": self.arrival_time}
        if self.first_token_time is not None:
            metrics["time_to_first_token"] = self.first_token_time - self.arrival_time
        if self.finish_time is not None:
            metrics["latency"] = self.finish_time - self.arrival_time
        return metrics

    def to_output(self, delta: bool = False) -> RequestOutput:
        """This sequence as a RequestOutput; with delta=True only the text new
        since the last delta (for streaming)."""
        text = self.text
        if not self.needs_text_each_step and not self.finished:
            text = ""
        if delta:
            end = len(text)
            if not self.finished and self.params.stop:
                # Hold back what could be the start of a stop string.
                end = max(self._streamed_upto, end - max(len(s) for s in self.params.stop) + 1)
            text = text[self._streamed_upto : end]
            self._streamed_upto = end
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[self.completion(text=text)],
            finished=self.finished,
            num_cached_tokens=self.num_cached_tokens,
            metrics=self.metrics(),
        )
