"""Legacy-completions log-probs for `echo` with `logprobs`: the prompt's tokens
come first, from `RequestOutput.prompt_logprobs` (the engine computes them
when `SamplingParams.prompt_logprobs` is set), then the completion's, as
OpenAI and vLLM return them. The prompt's first token has no log-prob (null),
and every token's `text_offset` counts from the start of the echoed text."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from paged_attention.entrypoints.openai_protocol import CompletionLogprobs


def prompt_logprobs_for_echo(
    prompt_token_ids: Sequence[int],
    prompt_logprobs: Sequence[dict[int, float] | None],
    token_text: Callable[[int], str],
    special_token_ids: frozenset[int] = frozenset(),
) -> CompletionLogprobs:
    """The prompt part. Special tokens (BOS) are not part of the echoed text,
    so they are listed with empty text, keeping the offsets those of the text."""
    if len(prompt_logprobs) != len(prompt_token_ids):
        raise ValueError(
            f"need one prompt log-prob entry per prompt token ({len(prompt_token_ids)}), "
            f"got {len(prompt_logprobs)}"
        )
    result = CompletionLogprobs()
    offset = 0
    for token_id, top in zip(prompt_token_ids, prompt_logprobs):
        text = "" if token_id in special_token_ids else token_text(token_id)
        result.tokens.append(text)
        result.text_offset.append(offset)
        if top is None:
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
        else:
            result.token_logprobs.append(top.get(token_id))
            result.top_logprobs.append({token_text(t): lp for t, lp in top.items()})
        offset += len(text)
    return result


def join_logprobs(first: CompletionLogprobs, then: CompletionLogprobs) -> CompletionLogprobs:
    """`first` followed by `then`, whose offsets count from the end of `first`'s text."""
    shift = (first.text_offset[-1] + len(first.tokens[-1])) if first.tokens else 0
    return CompletionLogprobs(
        tokens=first.tokens + then.tokens,
        token_logprobs=first.token_logprobs + then.token_logprobs,
        top_logprobs=first.top_logprobs + then.top_logprobs,
        text_offset=first.text_offset + [shift + o for o in then.text_offset],
    )
