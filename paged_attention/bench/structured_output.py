"""Structured output: what one decode step's grammar mask costs, per library.

For each installed library (xgrammar, llguidance, outlines-core) and grammar
(a JSON schema, any JSON object, a regex, a choice), `rows` matchers walk a
valid output token by token on the default model's tokenizer (SmolLM2, 49,152
tokens); each step times filling the step's one packed bitmask for all rows,
then applying it to [rows, vocab] logits as the sampler does. Compile time is
timed once per grammar with its first matcher (outlines-core builds a regex index over the whole
vocabulary, which is why it is slow for open-ended JSON).

    python -m paged_attention.bench.structured_output [--rows 1,8,32] [--output-dir results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from paged_attention.bench.report import format_table, markdown_table, write_json
from paged_attention.guided.bitmask import bitmask_width, unpack_bitmask

REPORT_TITLE = "Structured output: grammar mask cost per decode step"

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "tags", "address"],
}
INSTANCE = {
    "name": "Ada Lovelace",
    "age": 36,
    "tags": ["math", "engines"],
    "address": {"city": "London", "zip": "W1"},
}
REGEX = r"[A-Z][a-z]+ [0-9]{3}-[0-9]{4}, [a-z ]+\."
REGEX_TEXT = "Lovelace 555-0199, analytical engine notes."
CHOICES = ["positive", "negative", "neutral", "mixed feelings"]

# name -> (spec, text the matchers walk)
GRAMMARS: dict[str, tuple[Any, str]] = {
    "json_schema": (SCHEMA, json.dumps(INSTANCE)),
    "json_object": ({"type": "object"}, json.dumps(INSTANCE)),
    "regex": (REGEX, REGEX_TEXT),
    "choice": (CHOICES, "mixed feelings"),
}


def _tokenizer() -> Any:
    from paged_attention.engine.builder import DEFAULT_MODEL_ASSETS
    from paged_attention.tokenizer import load_auto_tokenizer

    return load_auto_tokenizer(DEFAULT_MODEL_ASSETS)


# Each backend: build(hf, vocab) -> (compile(kind, spec) -> grammar, new_matcher(grammar) -> matcher,
# fill(matchers, bitmask), accept(matcher, token)).
Backend = tuple[
    Callable[[str, Any], Any], Callable[[Any], Any], Callable[[list, torch.Tensor], None], Callable
]


def _xgrammar(hf: Any, vocab: int) -> Backend:
    import xgrammar as xgr

    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab), max_threads=1)

    def compile_(kind: str, spec: Any) -> Any:
        if kind.startswith("json"):
            return compiler.compile_json_schema(json.dumps(spec), any_whitespace=False, strict_mode=False)
        if kind == "regex":
            return compiler.compile_regex(spec)
        return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in spec))

    def fill(matchers: list, bitmask: torch.Tensor) -> None:
        for row, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, row)

    def accept(m: Any, token: int) -> None:
        assert m.accept_token(token), token

    return compile_, xgr.GrammarMatcher, fill, accept


def _llguidance(hf: Any, vocab: int) -> Backend:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=vocab)
    executor = llguidance.LLExecutor(num_threads=1)
    compact = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}

    def compile_(kind: str, spec: Any) -> Any:
        if kind.startswith("json"):
            return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(spec), defaults=compact)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec)
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec))

    def fill(matchers: list, bitmask: torch.Tensor) -> None:
        llguidance.torch.fill_next_token_bitmask_par(
            executor, [(m, i) for i, m in enumerate(matchers)], bitmask
        )

    def accept(m: Any, token: int) -> None:
        assert m.consume_token(token), m.get_error()

    return compile_, lambda g: llguidance.LLMatcher(tokenizer, g), fill, accept


def _byte_level_vocab(hf: Any) -> dict[bytes, list[int]]:
    """Token id lists by token bytes, undoing GPT-2's byte-to-unicode alphabet."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    to_char = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in to_char:
            to_char[b], extra = chr(256 + extra), extra + 1
    to_byte = {c: b for b, c in to_char.items()}
    special = set(hf.all_special_tokens)
    vocab: dict[bytes, list[int]] = {}
    for token, token_id in hf.get_vocab().items():
        if token_id == hf.eos_token_id:
            continue
        data = token.encode() if token in special else bytes(to_byte[c] for c in token)
        vocab.setdefault(data, []).append(token_id)
    return vocab


def _outlines_core(hf: Any, vocab: int) -> Backend:
    import outlines_core
    from outlines_core.json_schema import build_regex_from_schema

    vocabulary = outlines_core.Vocabulary(hf.eos_token_id, _byte_level_vocab(hf))

    def compile_(kind: str, spec: Any) -> Any:
        if kind.startswith("json"):
            regex = build_regex_from_schema(json.dumps(spec), whitespace_pattern=r" ?")
        elif kind == "regex":
            regex = spec
        else:
            regex = "(" + "|".join(__import__("re").escape(c) for c in spec) + ")"
        return outlines_core.Index(regex, vocabulary)

    def fill(matchers: list, bitmask: torch.Tensor) -> None:
        for row, m in enumerate(matchers):
            target = bitmask[row]
            m.write_mask_into(target.data_ptr(), target.numel(), 4)

    return compile_, outlines_core.Guide, fill, lambda m, token: m.advance(token)


BACKENDS: dict[str, Callable[[Any, int], Backend]] = {
    "xgrammar": _xgrammar,
    "llguidance": _llguidance,
    "outlines-core": _outlines_core,
}


def measure(name: str, hf: Any, vocab: int, rows_list: list[int], repeats: int) -> list[dict]:
    try:
        compile_, new_matcher, fill, accept = BACKENDS[name](hf, vocab)
    except ImportError as err:
        print(f"{name}: not installed ({err})")
        return []
    results = []
    for kind, (spec, text) in GRAMMARS.items():
        tokens = hf.encode(text, add_special_tokens=False)
        # Compile plus the first matcher: llguidance compiles lazily, on its first matcher.
        start = time.perf_counter()
        grammar = compile_(kind, spec)
        new_matcher(grammar)
        compile_s = time.perf_counter() - start
        for rows in rows_list:
            fills: list[float] = []
            applies: list[float] = []
            logits = torch.randn(rows, vocab)
            bitmask = torch.full((rows, bitmask_width(vocab)), -1, dtype=torch.int32)
            for _ in range(repeats):
                matchers = [new_matcher(grammar) for _ in range(rows)]
                for token in tokens:
                    t0 = time.perf_counter()
                    fill(matchers, bitmask)
                    t1 = time.perf_counter()
                    logits.masked_fill(~unpack_bitmask(bitmask, vocab), float("-inf"))
                    applies.append(time.perf_counter() - t1)
                    fills.append(t1 - t0)
                    for m in matchers:
                        accept(m, token)
            fills.sort()
            results.append(
                {
                    "library": name,
                    "grammar": kind,
                    "rows": rows,
                    "steps": len(fills),
                    "compile_ms": round(compile_s * 1e3, 2),
                    "fill_us_median": round(statistics.median(fills) * 1e6, 1),
                    "fill_us_p90": round(fills[int(0.9 * (len(fills) - 1))] * 1e6, 1),
                    "fill_us_mean": round(statistics.fmean(fills) * 1e6, 1),
                    "apply_us_median": round(statistics.median(applies) * 1e6, 1),
                }
            )
    return results


COLUMNS = (
    "library",
    "grammar",
    "rows",
    "compile_ms",
    "fill_us_median",
    "fill_us_p90",
    "fill_us_mean",
    "apply_us_median",
)


def report_section(data: dict) -> str:
    rows = [[r[c] for c in COLUMNS] for r in data["results"]]
    return (
        f"Tokenizer: {data['tokenizer']} ({data['vocab_size']} tokens), {data['threads']} torch thread(s). "
        "fill: the step's bitmask for all rows; apply: unpack it and mask the logits.\n\n"
        + markdown_table(COLUMNS, rows)
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m paged_attention.bench.structured_output")
    parser.add_argument("--rows", default="1,8,32", help="guided rows per step, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="walks of each output per measurement")
    parser.add_argument("--libraries", default=",".join(BACKENDS))
    parser.add_argument("--output-dir", default="results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a mask is filled on the engine thread, one row after another
    hf = _tokenizer()
    vocab = len(hf)
    rows_list = [int(r) for r in args.rows.split(",")]
    results = []
    for name in args.libraries.split(","):
        results += measure(name, hf, vocab, rows_list, args.repeats)
    data = {"tokenizer": "SmolLM2-135M-Instruct", "vocab_size": vocab, "threads": 1, "results": results}
    print(format_table(COLUMNS, [[r[c] for c in COLUMNS] for r in results], left=2))
    print(f"wrote {write_json(Path(args.output_dir), 'structured_output', data)}")
    return data


if __name__ == "__main__":
    main()
