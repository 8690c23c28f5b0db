"""One sampled sequence's engine state beyond scheduling: sampling params, RNG,
text, log-probs, and the stop rules applied to every new token. Its tokens are
its `Request`'s output_token_ids (the scheduler counts them there)."""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from paged_attention.core.request import Request
from paged_attention.outputs import CompletionOutput
from paged_attention.sampling_params import SamplingParams

if TYPE_CHECKING:
    from paged_attention.engine.sequence_group import SampleGroup
    from paged_attention.tokenizer import Tokenizer


# Prompt tokens decoded in front of the output, as vLLM does: a word that starts
# the output keeps its leading space ("Lily went" + " to"), which decoding the
# output alone drops, and a character split across the prompt/output boundary
# comes out whole.
PROMPT_CONTEXT_TOKENS = 5


def decode_continuation(
    tokenizer: Tokenizer, prompt_ids: Sequence[int], output_ids: Sequence[int], skip_special_tokens: bool
) -> str:
    """The text `output_ids` add after the prompt: the decode of the last few
    prompt tokens plus the output, less the decode of those prompt tokens."""
    context = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
    before = tokenizer.decode(context, skip_special_tokens=skip_special_tokens)
    full = tokenizer.decode(context + list(output_ids), skip_special_tokens=skip_special_tokens)
    if full.startswith(before):
        return full[len(before) :]
    return tokenizer.decode(list(output_ids), skip_special_tokens=skip_special_tokens)


@dataclass(frozen=True)
class StopStrings:
    """A request's stop strings as one regex alternation, built once per request.

    A search finds the leftmost match and, among stops matching at that position,
    the first in the request's list: the rule the per-string search had."""

    pattern: re.Pattern[str]
    max_len: int

    @classmethod
    def of(cls, stops: Sequence[str]) -> StopStrings:
        return cls(re.compile("|".join(re.escape(s) for s in stops)), max(len(s) for s in stops))


@dataclass(eq=False)
class RequestState:
    seq: Request  # the scheduler's sequence; holds this sample's tokens
    group: SampleGroup  # the user request this sample belongs to
    params: SamplingParams
    generator: torch.Generator | None
    stop_ids: frozenset[int]  # eos (unless ignore_eos) + stop_token_ids
    max_total_tokens: int  # max_model_len: generation stops there
    stream: bool = False
    index: int = 0  # which of the request's best_of samples this sequence is
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float = 0.0
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    _streamed_upto: int = 0  # text already sent as stream deltas
    _searched_upto: int = 0  # text already searched for stop strings
    # Incremental decoding window over (prompt context + output) tokens: the
    # tokens in [prefix, read) are already in `text`. None until the first decode.
    _prefix_offset: int | None = None
    _read_offset: int = 0
    _stops: StopStrings | None = None  # built on first use; shared by forks (immutable)

    @property
    def output_token_ids(self) -> list[int]:
        return self.seq.output_token_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def needs_text_each_step(self) -> bool:
        return self.stream or bool(self.params.stop)

    def append_token(
        self, token_id: int, logprob: float, top_logprobs: dict[int, float] | None, tokenizer: Tokenizer
    ) -> None:
        """Append one sampled token to the sequence and decide whether it is done."""
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
        elif self.seq.num_tokens >= self.max_total_tokens:
            self._finish("length", None, now)
        if self.finished and not params.stop:
            self.text = self._decode(tokenizer)

    def fork(self, seq: Request, index: int, generator: torch.Generator | None) -> RequestState:
        """The state of sibling sample `index` running as `seq` (forked from this
        one's sequence, so it has produced what this one has)."""
        assert seq.output_token_ids == self.output_token_ids, (
            f"sample {index} forked from {self.seq.request_id} with other tokens"
        )
        child = copy.copy(self)
        child.seq = seq
        child.index = index
        child.generator = generator
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
        context = self.seq.prompt_token_ids[-PROMPT_CONTEXT_TOKENS:]
        if self._prefix_offset is None:  # the window starts inside the prompt
            self._prefix_offset, self._read_offset = 0, len(context)
        skip = self.params.skip_special_tokens
        before = tokenizer.decode(
            self._window(context, self._prefix_offset, self._read_offset), skip_special_tokens=skip
        )
        after = tokenizer.decode(self._window(context, self._prefix_offset, None), skip_special_tokens=skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(context) + len(self.output_token_ids)

    def _window(self, context: list[int], start: int, end: int | None) -> list[int]:
        """Tokens [start, end) of context + output, without building the whole list."""
        out = self.output_token_ids
        stop = None if end is None else end - len(context)
        if start >= len(context):
            return out[start - len(context) : stop]
        return context[start:] + out[:stop]

    def _decode(self, tokenizer: Tokenizer) -> str:
        return decode_continuation(
            tokenizer, self.seq.prompt_token_ids, self.output_token_ids, self.params.skip_special_tokens
        )

    def _stop_strings(self) -> StopStrings:
        if self._stops is None:
            self._stops = StopStrings.of(self.params.stop or [])
        return self._stops

    def _cut_at_stop_string(self) -> bool:
        """Cut the text at the first stop string; True when one was found.

        The text only grows, and an earlier search found nothing, so a match
        must end in the newly decoded tail: it starts at most max_len - 1
        characters before it. One regex search over that window costs
        O(new text + longest stop) per step, whatever the number of stops."""
        stops = self._stop_strings()
        search_from = max(0, self._searched_upto - stops.max_len + 1)
        self._searched_upto = len(self.text)
        match = stops.pattern.search(self.text, search_from)
        if match is None:
            return False
        idx, stop = match.start(), match.group()
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

    def delta(self) -> CompletionOutput:
        """This sequence with only the text new since its last delta (streaming);
        token ids and log-probs are all of them so far."""
        end = len(self.text)
        if not self.finished and self.params.stop:
            # Hold back what could be the start of a stop string.
            end = max(self._streamed_upto, end - self._stop_strings().max_len + 1)
        text = self.text[self._streamed_upto : end]
        self._streamed_upto = end
        return self.completion(text=text)
