"""Grammars compiled with xgrammar, one matcher per sequence.

Why xgrammar (measured on this CPU with SmolLM2's 49k-token vocabulary, see
`python -m paged_attention.bench.structured_output`): the cheapest per-step
mask of the three libraries tried (xgrammar, llguidance, outlines-core), a
schema compiles in milliseconds, it reads JSON schema, regex and EBNF, and its
matchers fork (n / best_of samples) and roll back. xgrammar is imported only
when the first guided request arrives (it costs ~1.5 s to import)."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from paged_attention.guided.params import GuidedDecodingParams

if TYPE_CHECKING:
    from paged_attention.tokenizer import Tokenizer

INSTALL_HINT = "pip install 'paged-attention[structured]' (or: pip install xgrammar)"
# Compiled grammars kept per engine (a schema compiles in ~5 ms, a big one in
# seconds; keeping the most recent ones makes repeated requests free).
CACHE_SIZE = 128


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError:
        raise ValueError(f"structured output needs the xgrammar package: {INSTALL_HINT}") from None
    return xgrammar


def choice_grammar(choices: Iterable[str]) -> str:
    """EBNF accepting exactly one of `choices`. json.dumps quotes and escapes
    each string the way xgrammar's EBNF string literals read them."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class GrammarCompiler:
    """Compiles `GuidedDecodingParams` for one tokenizer; thread-safe (the
    server compiles on its event loop to answer bad specs with a 400, the
    engine thread on admission)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: Iterable[int]) -> None:
        xgr = _xgrammar()
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer.hf, vocab_size=vocab_size, stop_token_ids=self.stop_token_ids or None
        )
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        self._cache: OrderedDict[tuple[str, str, bool], Any] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, params: GuidedDecodingParams) -> Any:
        """The xgrammar CompiledGrammar; ValueError naming the problem for a bad spec."""
        key = params.cache_key()
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        compiled = self._compile(params)
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, params: GuidedDecodingParams) -> Any:
        compiler = self._compiler
        any_whitespace = not params.disable_any_whitespace
        kind = params.kind
        try:
            if kind == "json":
                # strict_mode (vLLM's default): properties a schema leaves open
                # are closed, so the model cannot wander into made-up keys.
                return compiler.compile_json_schema(params.schema_text(), any_whitespace=any_whitespace)
            if kind == "json_object":
                # OpenAI's json_object is an object, with any properties.
                return compiler.compile_json_schema(
                    '{"type": "object"}', any_whitespace=any_whitespace, strict_mode=False
                )
            if kind == "regex":
                return compiler.compile_regex(params.regex)
            if kind == "choice":
                return compiler.compile_grammar(choice_grammar(params.choice or ()))
            return compiler.compile_grammar(params.grammar)
        except (RuntimeError, ValueError, TypeError) as err:
            # xgrammar raises RuntimeError (and subclasses) with the parser's message.
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"guided {kind} cannot be compiled: {message}") from None

    def matcher(self, params: GuidedDecodingParams) -> SequenceGrammar:
        return SequenceGrammar(_xgrammar().GrammarMatcher(self.compile(params)))


class SequenceGrammar:
    """One sequence's place in its grammar: writes the step's allowed tokens,
    advances by each accepted token, forks for sibling samples."""

    def __init__(self, matcher: Any, num_accepted: int = 0) -> None:
        self._matcher = matcher
        self.num_accepted = num_accepted  # tokens accepted so far (the sequence's outputs)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> None:
        """Advance by a sampled token. The sampler only draws allowed tokens,
        so a refusal means the mask and the matcher disagree: a bug."""
        if not self._matcher.accept_token(int(token_id)):
            raise AssertionError(f"grammar refused token {token_id} after {self.num_accepted} tokens")
        self.num_accepted += 1

    def replay(self, token_ids: Iterable[int]) -> None:
        """Accept a sequence's tokens in order (rebuilding its state from its output)."""
        for token_id in token_ids:
            self.accept(token_id)

    def fork(self) -> SequenceGrammar:
        return SequenceGrammar(self._matcher.fork(), self.num_accepted)

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted."""
        return bool(self._matcher.is_terminated())
