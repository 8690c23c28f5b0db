"""Per-request sampling parameters, with vLLM's names and defaults.

All validation happens once, in `__post_init__`, so the sampler and the engine
can trust the values without re-checking them every step. The object is a
plain (mutable) dataclass like vLLM's; mutating a field after construction
bypasses validation, so build a new one (`dataclasses.replace`) instead.

Normalisations done at construction (so downstream code has one spelling):
  * `best_of=None`          -> `n`
  * `temperature=None`      -> 1.0, or 0.0 when `use_beam_search` (left default)
  * `top_k=0`               -> -1 (both mean "no limit")
  * `stop=None | str`       -> list[str]
  * `stop_token_ids=None`   -> []
  * `guided_decoding=dict`  -> GuidedDecodingParams(**dict)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from paged_attention.guided.params import GuidedDecodingParams

# Temperatures below this are treated as greedy: dividing logits by such a
# value overflows float32 for ordinary logit magnitudes, and the distribution
# is indistinguishable from argmax anyway. Same threshold as vLLM.
SAMPLING_EPS = 1e-5

DEFAULT_TEMPERATURE = 1.0


def _is_int(value: object) -> bool:
    # bool is a subclass of int, but n=True is almost certainly a bug.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """How to turn a request's logits into tokens, and when to stop.

    `temperature` is declared `float | None` only so that "left default" can be
    told apart from an explicit 1.0 (beam search needs temperature 0 and takes
    a default as 0); after construction it is always a float.
    """

    n: int = 1
    best_of: int | None = None
    temperature: float | None = None
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = True
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Log-probs of every prompt token after the first (vLLM's): the top N plus
    # the prompt's own token; RequestOutput.prompt_logprobs holds them.
    prompt_logprobs: int | None = None
    # Constrain the output to a JSON schema, regex, choice or grammar.
    guided_decoding: GuidedDecodingParams | dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self._check_counts()
        self._check_distribution()
        self._check_stopping()
        self._check_output()
        self._check_guided()
        if self.use_beam_search:
            self._check_beam_search()

    # -- validation pieces -------------------------------------------------

    def _check_counts(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an int >= 1, got {self.n!r}")
        if self.best_of is None:
            self.best_of = self.n
        if not _is_int(self.best_of) or self.best_of < self.n:
            raise ValueError(f"best_of must be an int >= n (n={self.n}), got {self.best_of!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")

    def _check_distribution(self) -> None:
        if self.temperature is None:
            self.temperature = 0.0 if self.use_beam_search else DEFAULT_TEMPERATURE
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        self.temperature = float(self.temperature)
        # `not (0 < x <= 1)` also rejects NaN.
        if not _is_real(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        self.top_p = float(self.top_p)
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an int, -1 or 0 (no limit) or >= 1, got {self.top_k!r}")
        if self.top_k == 0:
            self.top_k = -1
        if not _is_real(self.min_p) or not (0.0 <= self.min_p <= 1.0):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        self.min_p = float(self.min_p)

    def _check_stopping(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        for s in self.stop:
            # An empty stop string would match at every position and end the
            # request before it produced anything.
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty str, got {s!r}")
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        else:
            self.stop_token_ids = list(self.stop_token_ids)
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise ValueError(f"stop_token_ids must be ints >= 0, got {t!r}")

    def _check_output(self) -> None:
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            raise ValueError(f"logprobs must be None or an int >= 0, got {self.logprobs!r}")
        if self.prompt_logprobs is not None and (
            not _is_int(self.prompt_logprobs) or self.prompt_logprobs < 0
        ):
            raise ValueError(f"prompt_logprobs must be None or an int >= 0, got {self.prompt_logprobs!r}")
        if not _is_real(self.length_penalty) or not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")

    def _check_guided(self) -> None:
        if isinstance(self.guided_decoding, dict):
            self.guided_decoding = GuidedDecodingParams(**self.guided_decoding)
        if self.guided_decoding is not None and not isinstance(self.guided_decoding, GuidedDecodingParams):
            raise ValueError(
                f"guided_decoding must be a GuidedDecodingParams or a dict, got {self.guided_decoding!r}"
            )
        if self.guided_decoding is not None and self.use_beam_search:
            # Beams are ranked over the whole vocabulary's log-probs, outside the sampler.
            raise ValueError("guided_decoding cannot be combined with use_beam_search")

    def _check_beam_search(self) -> None:
        # Beam search keeps the best_of highest-scoring continuations; it is a
        # deterministic search, so every source of randomness must be off.
        assert self.best_of is not None
        if self.best_of < 2:
            raise ValueError(f"best_of (beam width) must be >= 2 with use_beam_search, got {self.best_of}")
        assert self.temperature is not None
        if self.temperature > SAMPLING_EPS:
            raise ValueError(
                "temperature must be 0 with use_beam_search (beam search is "
                f"deterministic), got {self.temperature}"
            )
        if self.top_p < 1.0:
            raise ValueError(
                f"top_p must be 1 with use_beam_search (beam search is deterministic), got {self.top_p}"
            )
        if self.top_k != -1:
            raise ValueError(
                "top_k must be -1 (no limit) with use_beam_search (beam search is "
                f"deterministic), got {self.top_k}"
            )
        if self.min_p > 0.0:
            raise ValueError(
                f"min_p must be 0 with use_beam_search (beam search is deterministic), got {self.min_p}"
            )

    # -- derived -----------------------------------------------------------

    @property
    def guided(self) -> GuidedDecodingParams | None:
        """`guided_decoding` as its one type (a dict was converted on construction)."""
        assert not isinstance(self.guided_decoding, dict), "SamplingParams converts the dict"
        return self.guided_decoding

    @property
    def is_greedy(self) -> bool:
        """True when the next token is the argmax (temperature ~ 0).

        Beam-search params are also temperature 0, so this is True for them
        too: code that handles beam search must check `use_beam_search` first.
        """
        assert self.temperature is not None
        return self.temperature < SAMPLING_EPS
