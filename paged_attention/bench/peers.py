"""Other serving systems for `bench throughput`: transformers' own continuous
batching (`generate_batch`'s manager, transformers 5) and, when the optional
`llama-cpp-python` package is installed, llama.cpp. Each runner takes the same
`BenchRequest` workload as `throughput.run_engine` (greedy, every request
producing exactly its `output_len` tokens) and returns the same keys.

transformers: `model.generate_batch(inputs, max_new_tokens=...)` takes a single
max_new_tokens for all requests, so this module drives the manager that
generate_batch uses (`continuous_batching_context_manager` +
`add_request(ids, max_new_tokens=n, eos_token_id=-1)` per request), which keeps
each request's own length. The manager steps the model on a thread of its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from paged_attention.bench.workload import BenchRequest, throughput_record


# ------------------------------------------------------------ transformers
def _flush_denormals_hook(module, args) -> None:
    # The manager runs the model on its own thread and FTZ/DAZ is per-thread CPU
    # state: set it there, as our engine does around its steps, so that neither
    # side pays for float32 denormals (measured 14x on decode steps).
    import torch

    torch.set_flush_denormal(True)


def _cb_run(hf, workload: list[BenchRequest], page_size: int, max_batch_tokens: int) -> dict[str, int]:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    tokens = sum(len(r.prompt_token_ids) + r.output_len for r in workload)
    # Room for every request at once (plus one partly filled page each): the
    # same "nothing preempted" footing our engine gets from its default pool.
    num_blocks = tokens // page_size + len(workload) + 1
    gen = GenerationConfig(
        do_sample=False, max_new_tokens=max(r.output_len for r in workload), eos_token_id=-1, pad_token_id=0
    )
    cb = ContinuousBatchingConfig(
        page_size=page_size, num_blocks=num_blocks, max_batch_tokens=max_batch_tokens
    )
    produced: dict[str, int] = {}
    with hf.continuous_batching_context_manager(
        generation_config=gen, continuous_batching_config=cb, warmup=False
    ) as manager:
        ids = [
            manager.add_request(r.prompt_token_ids, max_new_tokens=r.output_len, eos_token_id=-1)
            for r in workload
        ]
        while len(produced) < len(ids):
            result = manager.get_result(timeout=1)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' continuous batching thread stopped early")
                continue
            if result.is_finished():
                if result.error is not None:
                    raise RuntimeError(f"transformers continuous batching: {result.error}")
                produced[result.request_id] = len(result.generated_tokens)
    return produced


def run_hf_continuous(
    hf, workload: list[BenchRequest], page_size: int = 256, max_batch_tokens: int = 8192
) -> dict:
    """transformers' continuous batching over the whole workload, queued at once.
    page_size 256 is transformers' default; max_batch_tokens 8192 matches our
    engine's default step budget."""
    import torch

    hook = hf.register_forward_pre_hook(_flush_denormals_hook)
    try:
        with torch.inference_mode():
            _cb_run(hf, workload[:2], page_size, max_batch_tokens)  # warm-up
            start = time.perf_counter()
            produced = _cb_run(hf, workload, page_size, max_batch_tokens)
            elapsed = time.perf_counter() - start
    finally:
        hook.remove()
    tokens = sum(produced.values())
    assert tokens == sum(r.output_len for r in workload), "transformers produced the wrong token count"
    return throughput_record(
        tokens, elapsed, len(workload), page_size=page_size, max_batch_tokens=max_batch_tokens
    )


# --------------------------------------------------------------- llama.cpp
def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def run_llama_cpp(
    gguf_path: str, workload: list[BenchRequest], n_ctx: int = 4096, n_threads: int | None = None
) -> dict:
    """llama.cpp through llama-cpp-python, one request at a time (its Python
    binding has no continuous batching). Returns {"skipped": reason} when the
    package is not installed: it is an optional extra that builds llama.cpp."""
    if not llama_cpp_available():
        return {"skipped": "llama-cpp-python is not installed (pip install 'paged-attention[llama]')"}
    from llama_cpp import Llama

    llm = Llama(model_path=gguf_path, n_ctx=n_ctx, n_threads=n_threads, verbose=False, seed=0)

    def run_one(r: BenchRequest) -> int:
        llm.reset()
        count = 0
        for _token in llm.generate(r.prompt_token_ids, temp=0.0, top_k=1, reset=True):
            count += 1
            if count == r.output_len:
                break
        return count

    run_one(workload[0])  # warm-up
    start = time.perf_counter()
    tokens = sum(run_one(r) for r in workload)
    elapsed = time.perf_counter() - start
    return throughput_record(tokens, elapsed, len(workload), batching="none (one request at a time)")


PEERS: dict[str, Callable[..., dict]] = {"hf_continuous": run_hf_continuous, "llama_cpp": run_llama_cpp}
