"""A user request as one or more sequences that share KV blocks.

* `SampleGroup`: n / best_of independent samples. The prompt is prefilled once
  by the first sequence; when its first logits arrive it forks into best_of
  sequences whose tables share every prompt block (copy-on-write happens on
  each sample's first write to the shared, partly filled last block). With
  best_of > n the n most likely samples are returned (`SampleGroup.best`, the
  one ranking rule of the engine and the server alike).
* `BeamGroup`: beam search with the semantics of transformers'
  `generate(num_beams=k, do_sample=False)`: each round every live beam yields
  log-probs; the best 2k (beam, token) continuations are ranked by total
  log-prob; ends (EOS or length) among the top k enter the finished set with
  score logprob / generated_len ** length_penalty; the best k that go on become
  the next beams, forked from their parents (sharing all blocks).
The engine owns the scheduler; groups only decide which sequences exist.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from paged_attention.core.request import Request
from paged_attention.engine.request_state import RequestState, decode_continuation
from paged_attention.outputs import CompletionOutput, RequestOutput
from paged_attention.sampling_params import SamplingParams

if TYPE_CHECKING:
    from paged_attention.tokenizer import Tokenizer

_NEG = -1.0e9


@dataclass(eq=False)
class GroupBase:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    members: list[Request] = field(default_factory=list)  # live sequences
    num_cached_tokens: int = 0
    arrival_time: float = field(default_factory=time.perf_counter)

    @property
    def finished(self) -> bool:
        raise NotImplementedError


@dataclass(eq=False)
class SampleGroup(GroupBase):
    """n = best_of = 1 is a plain request."""

    stream: bool = False  # emit per-sample deltas every step, not one final output
    samples: list[RequestState] = field(default_factory=list)  # by index; one until fan-out
    fanned_out: bool = False

    @property
    def finished(self) -> bool:
        return self.fanned_out and not self.members

    def best(self) -> list[RequestState]:
        """The samples a finished request returns: all of them in index order
        when best_of == n, else the n with the highest cumulative log-probability
        (vLLM's rule), most likely first, ties in index order."""
        n = self.params.n
        if self.params.best_of == n:
            return list(self.samples)
        return sorted(self.samples, key=lambda s: -s.cumulative_logprob)[:n]

    def to_output(self) -> RequestOutput:
        """The finished request: its chosen samples, renumbered 0..n-1 in `best` order."""
        assert self.finished, f"group {self.request_id} still has live sequences"
        completions = [sample.completion(index) for index, sample in enumerate(self.best())]
        return self._output(completions)

    def stream_output(self, stepped: list[RequestState]) -> RequestOutput:
        """A streaming step: the new text of each sample that got a token, by `index`."""
        assert self.stream, f"group {self.request_id} does not stream"
        assert self.params.best_of == self.params.n, (
            f"group {self.request_id} streams best_of {self.params.best_of} > n {self.params.n}"
        )
        return self._output([s.delta() for s in sorted(stepped, key=lambda s: s.index)])

    def _output(self, completions: list[CompletionOutput]) -> RequestOutput:
        return RequestOutput(
            self.request_id,
            self.prompt,
            self.prompt_token_ids,
            completions,
            finished=self.finished,
            num_cached_tokens=self.num_cached_tokens,
            metrics=self.metrics(),
        )

    def metrics(self) -> dict[str, float]:
        """Times of the request as a whole: its first sampled token, its last sample's end."""
        metrics: dict[str, float] = {"arrival_time": self.arrival_time}
        firsts = [s.first_token_time for s in self.samples if s.first_token_time is not None]
        if firsts:
            metrics["time_to_first_token"] = min(firsts) - self.arrival_time
        ends = [s.finish_time for s in self.samples]
        if self.finished and all(t is not None for t in ends):
            metrics["latency"] = max(t for t in ends if t is not None) - self.arrival_time
        return metrics


@dataclass
class Hypothesis:
    score: float  # length-normalised
    logprob: float
    token_ids: list[int]
    finish_reason: str


@dataclass(eq=False)
class BeamGroup(GroupBase):
    eos_token_ids: frozenset[int] = frozenset()
    max_new_tokens: int = 16
    scores: dict[int, float] = field(default_factory=dict)  # id(beam) -> running log-prob
    pending: dict[int, torch.Tensor] = field(default_factory=dict)  # id(beam) -> log-probs
    hypotheses: list[Hypothesis] = field(default_factory=list)
    heuristic_unsatisfied: bool = True
    is_done: bool = False

    @property
    def width(self) -> int:
        assert self.params.best_of is not None, "SamplingParams sets best_of"
        return self.params.best_of

    @property
    def finished(self) -> bool:
        return self.is_done

    def receive(self, beam: Request, logits: torch.Tensor) -> bool:
        """Store one beam's next-token log-probs; True once every live beam has."""
        self.pending[id(beam)] = torch.log_softmax(logits.float(), dim=-1)
        return len(self.pending) == len(self.members)

    def advance(self, fork: Callable[[Request], Request], drop: Callable[[Request], None]) -> None:
        """One beam-search round (all live beams have reported)."""
        beams = self.members
        gen_len = beams[0].num_output_tokens + 1  # generated tokens after this round
        vocab = next(iter(self.pending.values())).shape[-1]
        totals = torch.stack([self.pending[id(b)] + self.scores.get(id(b), 0.0) for b in beams])
        keep = max(2, 1 + len(self.eos_token_ids)) * self.width
        top_scores, top_idx = torch.topk(totals.view(-1), k=min(keep, totals.numel()))
        at_limit = gen_len >= self.max_new_tokens
        candidates = [
            (float(s), beams[i // vocab], i % vocab) for s, i in zip(top_scores.tolist(), top_idx.tolist())
        ]
        stops = [at_limit or tok in self.eos_token_ids for _, _, tok in candidates]

        full = len(self.hypotheses) >= self.width and self.params.early_stopping is True
        if not full and self.heuristic_unsatisfied:
            for rank, ((score, beam, tok), stop) in enumerate(zip(candidates, stops)):
                if stop and rank < self.width:
                    self._add_hypothesis(score, beam, tok, gen_len, at_limit)

        going_on = [c for c, stop in zip(candidates, stops) if not stop][: self.width]
        self.pending.clear()
        if all(stops) or not going_on:
            self._finish(drop)
            return
        self._next_beams(going_on, fork, drop)
        self._update_heuristic(gen_len)
        if not self.heuristic_unsatisfied or (
            len(self.hypotheses) >= self.width and self.params.early_stopping is True
        ):
            self._finish(drop)

    def _add_hypothesis(self, score: float, beam: Request, tok: int, gen_len: int, at_limit: bool) -> None:
        normed = score / (gen_len**self.params.length_penalty)
        reason = "stop" if tok in self.eos_token_ids else "length"
        hyp = Hypothesis(normed, score, [*beam.output_token_ids, tok], reason)
        # Keep the best `width`; earlier entries win ties, as in transformers' merge.
        merged = self.hypotheses + [hyp]
        order = sorted(range(len(merged)), key=lambda i: (-merged[i].score, i))
        self.hypotheses = [merged[i] for i in order[: self.width]]

    def _next_beams(
        self,
        going_on: list[tuple[float, Request, int]],
        fork: Callable[[Request], Request],
        drop: Callable[[Request], None],
    ) -> None:
        used: set[int] = set()
        new_beams: list[Request] = []
        new_scores: dict[int, float] = {}
        # Forks first, so a parent's blocks are shared before any parent is dropped.
        for score, parent, _ in going_on:
            child = parent if id(parent) not in used else fork(parent)
            used.add(id(parent))
            new_beams.append(child)
            new_scores[id(child)] = score
        for idx, (_, _, tok) in enumerate(going_on):
            new_beams[idx].output_token_ids.append(tok)
        for beam in self.members:
            if id(beam) not in used:
                drop(beam)
        self.members = new_beams
        self.scores = new_scores

    def _update_heuristic(self, gen_len: int) -> None:
        """transformers' early-stop heuristic (matters for early_stopping False/'never')."""
        if len(self.hypotheses) < self.width:
            return
        lp = self.params.length_penalty
        if self.params.early_stopping == "never" and lp > 0:
            best_len = self.max_new_tokens
        else:
            best_len = gen_len
        best_running = max(self.scores.values()) / (best_len**lp)
        worst_finished = min(h.score for h in self.hypotheses)
        self.heuristic_unsatisfied = best_running > worst_finished

    def _finish(self, drop: Callable[[Request], None]) -> None:
        for beam in self.members:
            drop(beam)
        self.members = []
        self.is_done = True

    def to_output(self, tokenizer: Tokenizer) -> RequestOutput:
        assert self.is_done, f"beam group {self.request_id} is still running"
        best = heapq.nsmallest(
            self.params.n, enumerate(self.hypotheses), key=lambda item: (-item[1].score, item[0])
        )
        completions = [
            CompletionOutput(
                index=i,
                text=decode_continuation(
                    tokenizer, self.prompt_token_ids, h.token_ids, self.params.skip_special_tokens
                ),
                token_ids=h.token_ids,
                cumulative_logprob=h.logprob,
                finish_reason=h.finish_reason,
                stop_reason=h.token_ids[-1] if h.finish_reason == "stop" else None,
            )
            for i, (_, h) in enumerate(best)
        ]
        return RequestOutput(
            self.request_id,
            self.prompt,
            self.prompt_token_ids,
            completions,
            finished=True,
            num_cached_tokens=self.num_cached_tokens,
        )
