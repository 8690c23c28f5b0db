"""Prompt log-probs in the server's answers, from `RequestOutput.prompt_logprobs`
(the engine computes them when `SamplingParams.prompt_logprobs` is set).

Legacy completions with `echo` and `logprobs` list the prompt's tokens first,
then the completion's, as OpenAI and vLLM return them: the prompt's first
token has no log-prob (null), and every token's `text_offset` counts from the
start of the echoed text. vLLM's `prompt_logprobs` request field returns them
in vLLM's shape instead: per prompt token, null first, then token id ->
{logprob, rank, decoded_token}.

A prompt token's text is its share of the prompt's decoded text (decoded a
few tokens at a time, so a word's leading space and a character split over
tokens come out as in a full decode), placed in the echoed text: "Once" at
its start, not " Once", and a BOS that is not in it "". Alternatives are
named as the completion's are (`TokenText`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from paged_attention.entrypoints.openai_protocol import CompletionLogprobs, PromptLogprob

# How far past the expected place a prompt token's text is looked for in the
# echoed text (only whitespace may be skipped to reach it).
_ALIGN_SLACK = 16


def token_pieces(tokenizer: Any, token_ids: Sequence[int], *, skip_special_tokens: bool) -> list[str]:
    """Each token's share of `tokenizer.decode(token_ids)`, in time linear in
    the tokens: a short window ending at each token is decoded with and
    without it. A token that completes nothing yet (a skipped special token,
    part of a character) gets "" and its text goes to the token completing it."""
    ids = list(token_ids)
    pieces: list[str] = []
    prefix = read = 0  # the window [prefix, read) is already in the pieces
    for end in range(1, len(ids) + 1):
        before = tokenizer.decode(ids[prefix:read], skip_special_tokens=skip_special_tokens) if read else ""
        after = tokenizer.decode(ids[prefix:end], skip_special_tokens=skip_special_tokens)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            pieces.append(after[len(before) :])
            prefix, read = read, end
        else:
            pieces.append("")
    if pieces and read < len(ids):  # the text ends in what looked like part of a character
        before = tokenizer.decode(ids[prefix:read], skip_special_tokens=skip_special_tokens) if read else ""
        after = tokenizer.decode(ids[prefix:], skip_special_tokens=skip_special_tokens)
        pieces[-1] = after[len(before) :]
    return pieces


def prompt_pieces(tokenizer: Any, token_ids: Sequence[int], text: str) -> tuple[list[str], list[int]]:
    """Each prompt token's text as it appears in `text`, the echoed prompt, and
    where it starts there. A prompt sent as text is echoed as sent (without the
    BOS the tokenizer added), one sent as token ids as their full decode
    (special tokens included): the tokens' pieces of the full decode are
    aligned to it (`align_pieces`)."""
    special = frozenset(getattr(tokenizer, "all_special_ids", ()))
    pieces = token_pieces(tokenizer, token_ids, skip_special_tokens=False)
    return align_pieces(pieces, [t in special for t in token_ids], text)


def align_pieces(pieces: Sequence[str], is_special: Sequence[bool], text: str) -> tuple[list[str], list[int]]:
    """`pieces` placed in `text` one after the other, each (piece, offset):
    as it is where it is; a special token that is not there is "" (a BOS the
    tokenizer added); one whose leading whitespace the text lacks (the first
    word after a BOS) without it; one a little further on past whitespace
    there; else as it is, where the previous one ended. Pieces that make up
    `text` exactly come back unchanged, their offsets the running sum."""
    aligned: list[str] = []
    offsets: list[int] = []
    pos = 0
    for piece, special in zip(pieces, is_special, strict=True):
        if piece and not text.startswith(piece, pos):
            stripped = piece.lstrip()
            found = text.find(piece, pos, pos + len(piece) + _ALIGN_SLACK)
            if special:
                piece = ""
            elif stripped != piece and text.startswith(stripped, pos):
                piece = stripped
            elif found != -1 and not text[pos:found].strip():
                pos = found
        aligned.append(piece)
        offsets.append(pos)
        pos = min(pos + len(piece), len(text))
    return aligned, offsets


def _top(entry: dict[int, float], own: int, num_top: int | None) -> dict[int, float]:
    """The `num_top` most likely of `entry` plus `own` (the engine may have
    computed more, for another field of the same request)."""
    if num_top is None or len(entry) <= num_top:
        return entry
    top = dict(sorted(entry.items(), key=lambda kv: -kv[1])[:num_top])
    top.setdefault(own, entry[own])
    return top


def _name(token_id: int, own: int, piece: str, token_text: Callable[[int], str]) -> str:
    """The prompt's own token by its text in the prompt; others as TokenText names them."""
    return piece if token_id == own and piece else token_text(token_id)


def prompt_logprobs_for_echo(
    prompt_token_ids: Sequence[int],
    prompt_logprobs: Sequence[dict[int, float] | None],
    pieces: Sequence[str],
    offsets: Sequence[int],
    token_text: Callable[[int], str],
    num_top: int | None = None,
) -> CompletionLogprobs:
    """The echoed prompt's part of legacy-completions log-probs: `pieces` as
    the tokens at `offsets` (both from `prompt_pieces`), `num_top`
    alternatives (None: all the engine gave) plus the prompt's token."""
    if not len(prompt_logprobs) == len(pieces) == len(offsets) == len(prompt_token_ids):
        raise ValueError(
            f"need one prompt log-prob entry, piece and offset per prompt token ({len(prompt_token_ids)}), "
            f"got {len(prompt_logprobs)}, {len(pieces)} and {len(offsets)}"
        )
    result = CompletionLogprobs(tokens=list(pieces), text_offset=list(offsets))
    for token_id, piece, entry in zip(prompt_token_ids, pieces, prompt_logprobs):
        if entry is None:
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
        else:
            result.token_logprobs.append(entry.get(token_id))
            top = _top(entry, token_id, num_top)
            result.top_logprobs.append({_name(t, token_id, piece, token_text): lp for t, lp in top.items()})
    return result


def join_logprobs(first: CompletionLogprobs, then: CompletionLogprobs) -> CompletionLogprobs:
    """`first` followed by `then`; both count offsets from the start of the
    echoed text (build the completion's with start_offset=len(prompt text))."""
    return CompletionLogprobs(
        tokens=first.tokens + then.tokens,
        token_logprobs=first.token_logprobs + then.token_logprobs,
        top_logprobs=first.top_logprobs + then.top_logprobs,
        text_offset=first.text_offset + then.text_offset,
    )


def vllm_prompt_logprobs(
    prompt_token_ids: Sequence[int],
    prompt_logprobs: Sequence[dict[int, float] | None],
    pieces: Sequence[str],
    token_text: Callable[[int], str],
    num_top: int,
    computed_top: int,
) -> list[dict[int, PromptLogprob] | None]:
    """vLLM's `prompt_logprobs` on a choice: per prompt token, None for the
    first, else the prompt's token and the `num_top` most likely, each with
    its log-prob, rank and text. The engine computed the top `computed_top`
    (>= num_top) and added the prompt's token when outside them, whose rank
    it did not compute: None."""
    if not len(prompt_logprobs) == len(pieces) == len(prompt_token_ids):
        raise ValueError(
            f"need one prompt log-prob entry and one piece per prompt token ({len(prompt_token_ids)}), "
            f"got {len(prompt_logprobs)} and {len(pieces)}"
        )
    result: list[dict[int, PromptLogprob] | None] = []
    for own, piece, entry in zip(prompt_token_ids, pieces, prompt_logprobs):
        if entry is None:
            result.append(None)
            continue
        own_outside = len(entry) > computed_top  # the engine's top N, then the prompt's token
        ranked = [(t, v) for t, v in entry.items() if t != own or not own_outside]
        ranked.sort(key=lambda kv: -kv[1])
        rank = {t: 1 + sum(other > v for _, other in ranked) for t, v in ranked}
        shown = [(own, entry[own])] + [(t, v) for t, v in ranked[:num_top] if t != own]
        result.append(
            {
                t: PromptLogprob(logprob=v, rank=rank.get(t), decoded_token=_name(t, own, piece, token_text))
                for t, v in shown
            }
        )
    return result
