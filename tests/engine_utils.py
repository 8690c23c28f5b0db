"""Helpers for engine tests: random-weight HF models, HF greedy reference, and an
engine driver that checks invariants after every step."""

from __future__ import annotations

from pathlib import Path

import torch

from paged_attention.outputs import RequestOutput
from paged_attention.sampling_params import SamplingParams

_CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}


def save_random_model(tmp_path: Path, arch: str, seed: int = 0, **overrides):
    """A small random-weight model saved as safetensors; returns (folder, hf_model).

    Weights are drawn wider than transformers' default (std 0.02) so that
    logits have clear winners and greedy parity is not decided by float noise.
    """
    import transformers

    config_cls, model_cls = (getattr(transformers, n) for n in _CONFIGS[arch])
    kwargs = dict(
        vocab_size=256,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.25,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    hf = model_cls(config_cls(**kwargs)).eval()
    folder = tmp_path / arch
    hf.save_pretrained(folder)
    _copy_tokenizer(folder)
    return folder, hf


def _copy_tokenizer(folder: Path) -> None:
    """Random models need some tokenizer on disk: reuse the shipped one."""
    import shutil

    from paged_attention.engine.builder import STORIES260K

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(STORIES260K / name, folder / name)


@torch.inference_mode()
def hf_greedy(hf, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt_ids) :].tolist()


def drain(engine, max_steps: int = 100_000) -> dict[str, RequestOutput]:
    """Step `engine` until it has no work, checking every invariant after every
    step; fails (rather than hangs) if it is still busy after `max_steps`.
    Returns the finished requests' outputs by request id."""
    done: dict[str, RequestOutput] = {}
    engine.check_invariants()
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return done
        for out in engine.step():
            done[out.request_id] = out
        engine.check_invariants()
    raise AssertionError(f"engine still busy after {max_steps} steps: {engine.memory_stats()}")


def drive(llm, prompts, params: SamplingParams, max_steps: int = 100_000) -> list[RequestOutput]:
    """Like llm.generate, through `drain` (invariants after every step, a step cap)."""
    ids = llm.add_requests(prompts, params, None)
    done = drain(llm.engine, max_steps)
    return [done[i] for i in ids]
