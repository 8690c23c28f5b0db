"""Benchmark workloads and models, reproducible from a seed."""

from __future__ import annotations

import random
from dataclasses import dataclass


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
