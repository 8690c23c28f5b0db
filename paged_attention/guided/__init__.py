"""Structured output: a grammar constrains which tokens a sequence may sample.

`params.GuidedDecodingParams` (what to enforce; no heavy imports) rides on
`SamplingParams.guided_decoding`; `grammar.py` compiles it with xgrammar and keeps
one matcher per sequence; `bitmask.py` turns the packed per-step bitmask into
the boolean mask the sampler applies.
"""

from paged_attention.guided.params import GuidedDecodingParams

__all__ = ["GuidedDecodingParams"]
