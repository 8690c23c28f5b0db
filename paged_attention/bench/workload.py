"""Benchmark workloads and models, reproducible from a seed."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int


def throughput_record(output_tokens: int, elapsed_s: float, num_requests: int, **extra) -> dict:
    """The figures every system in a throughput run reports, plus its own `extra`."""
    return {
        "elapsed_s": elapsed_s,
        "output_tokens": output_tokens,
        "tokens_per_s": output_tokens / elapsed_s,
        "requests_per_s": num_requests / elapsed_s,
        **extra,
    }


def uniform_workload(
    num_requests: int = 128,
    prompt_len: tuple[int, int] = (16, 512),
    output_len: tuple[int, int] = (16, 256),
    vocab_size: int = 32000,
    seed: int = 0,
) -> list[BenchRequest]:
    """Prompt and output lengths uniform in the given inclusive ranges; random
    token ids (never the special ids 0..2)."""
    rng = random.Random(seed)
    return [
        BenchRequest(
            [rng.randrange(3, vocab_size) for _ in range(rng.randint(*prompt_len))],
            rng.randint(*output_len),
        )
        for _ in range(num_requests)
    ]


# A stories15M-shaped Llama (llama2.c's 15M TinyStories model), random weights.
STORIES15M_CONFIG = dict(
    vocab_size=32000,
    hidden_size=288,
    intermediate_size=768,
    num_hidden_layers=6,
    num_attention_heads=6,
    num_key_value_heads=6,
    max_position_embeddings=1024,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=True,
)


# ------------------------------------------------------------ HTTP serving
@dataclass(frozen=True)
class LoadRequest:
    """One request of `bench serve`: token ids, so every server (ours,
    llama-server) sees the same prompt whatever its tokenizer would make of text."""

    prompt: tuple[int, ...]
    max_tokens: int


def make_workload(
    num_requests: int,
    input_len: tuple[int, int],
    output_len: tuple[int, int],
    seed: int = 0,
    token_pool: Sequence[int] = range(3, 256),
) -> list[LoadRequest]:
    """Distinct prompts of random ids drawn from `token_pool`, lengths uniform in
    the inclusive ranges. Distinct, so no request hits another's prefix cache."""
    if num_requests < 1:
        raise ValueError(f"--num-requests must be >= 1, got {num_requests}")
    if len(token_pool) < 2:
        raise ValueError(f"need at least 2 token ids to draw prompts from, got {len(token_pool)}")
    rng = random.Random(seed)
    seen: set[tuple[int, ...]] = set()
    out: list[LoadRequest] = []
    for _ in range(100 * num_requests):  # only short prompts from a small pool ever repeat
        prompt = tuple(rng.choice(token_pool) for _ in range(rng.randint(*input_len)))
        if prompt not in seen:
            seen.add(prompt)
            out.append(LoadRequest(prompt, rng.randint(*output_len)))
            if len(out) == num_requests:
                return out
    raise ValueError(
        f"cannot draw {num_requests} distinct prompts of {input_len} tokens from {len(token_pool)} ids"
    )


def model_token_pool(model: str | Path | None) -> list[int]:
    """Ids a random prompt may use for `model` (a .gguf file, a Hugging Face
    folder, None for the default GGUF): a GGUF's normal tokens (its control
    tokens left out), else 3..vocab_size-1 (past the usual <unk>/<s>/</s>)."""
    if model is None:
        from paged_attention.model.gguf.default_model import default_gguf_path

        model = default_gguf_path()
    path = Path(model)
    if path.suffix == ".gguf":
        from paged_attention.model.gguf.reader import read_gguf_header

        meta = read_gguf_header(path).metadata
        types = meta.get("tokenizer.ggml.token_type")
        if isinstance(types, list):
            return [i for i, kind in enumerate(types) if kind == _GGUF_NORMAL_TOKEN]
        from paged_attention.model.gguf.reader import SkippedStrings

        tokens = meta["tokenizer.ggml.tokens"]
        return list(range(3, tokens.count if isinstance(tokens, SkippedStrings) else len(tokens)))
    config = json.loads((path / "config.json").read_text())
    return list(range(3, int(config["vocab_size"])))


_GGUF_NORMAL_TOKEN = 1  # llama.cpp's LLAMA_TOKEN_TYPE_NORMAL; 3 is CONTROL
