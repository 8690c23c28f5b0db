"""The one-call decode step (`model/decode_stack.py`, `csrc/decode_stack.c`):
it takes the decode steps it is built for, gives the layer-by-layer path's
logits and KV pool bit for bit, and leaves every other step to the layers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from paged_attention import native
from paged_attention.model.decode_stack import MAX_BATCH, DecodeStack
from paged_attention.model.loader import load_model
from tests.engine_utils import save_random_model
from tests.model_utils import PagedRunner

pytestmark = pytest.mark.skipif(native.load_library() is None, reason="the C kernels do not build here")

# Shapes whose projections are whole tiles of the int4 kernel (64 rows with
# AVX-512, 32 with AVX2): q|k|v (4 + 2 x 2) x 32 = 256 rows, o and down 128,
# gate|up 512.
SHAPES = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)


def _models(tmp_path: Path, arch: str, dtype: torch.dtype):
    folder, _ = save_random_model(tmp_path, arch, **SHAPES)
    models = [load_model(folder, dtype, quantization="int4")[0] for _ in range(2)]
    for model in models:  # transformers starts biases at zero: give them values
        gen = torch.Generator().manual_seed(1)
        for layer in model.quant_layers():
            if layer.bias is not None:
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen))
    return models


def _no_layers(model) -> None:
    """Make the layer-by-layer path fail if it runs."""

    def refuse(*args, **kwargs):
        raise AssertionError("the layers ran where the stack should have")

    for layer in model.layers:
        layer.forward = refuse


# (activations, KV pool): float32 over a bfloat16 pool is dtype "auto" on a
# quantized model where the CPU has fast bfloat16 (engine/resolve.py).
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize(("dtype", "kv_dtype"), DTYPES)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q|k|v biases
def test_stack_equals_the_layers_bit_for_bit(
    tmp_path: Path, arch: str, dtype: torch.dtype, kv_dtype: torch.dtype
) -> None:
    stacked, layered = _models(tmp_path, arch, dtype)
    layered.use_decode_stack = False
    runners = [PagedRunner(m, num_blocks=160, kv_dtype=kv_dtype) for m in (stacked, layered)]
    for runner in runners:  # allocated empty: compare written slots, not leftover bytes
        for layer in range(stacked.config.num_layers):
            runner.pool.key(layer).zero_()
            runner.pool.value(layer).zero_()
    gen = torch.Generator().manual_seed(0)
    seqs = list(range(MAX_BATCH - 2))
    prompts = {s: torch.randint(3, 256, (3 + s,), generator=gen).tolist() for s in seqs}
    for runner in runners:  # prompts: the layers (prompt tokens in the step)
        runner.step([(s, prompts[s]) for s in seqs])
    assert stacked._decode_stack is not None
    next_tokens = {s: prompts[s][-1] for s in seqs}
    # 1 sequence, 3, then 11 (more rows than one int4 call takes), 22, and 1 again.
    for batch in ([0], [1, 2, 3], seqs[:11], seqs, [5]):
        chunks = [(s, [next_tokens[s]]) for s in batch]
        saved = [layer.forward for layer in stacked.layers]
        _no_layers(stacked)
        ours = runners[0].step(chunks)
        for layer, forward in zip(stacked.layers, saved):
            layer.forward = forward
        ref = runners[1].step(chunks)
        for s, a, b in zip(batch, ours, ref):
            assert torch.equal(a, b), (batch, s)
            next_tokens[s] = int(a[-1].argmax())
    for layer in range(stacked.config.num_layers):
        assert torch.equal(runners[0].pool.key(layer), runners[1].pool.key(layer))
        assert torch.equal(runners[0].pool.value(layer), runners[1].pool.value(layer))


def test_steps_the_stack_does_not_take_run_the_layers(tmp_path: Path) -> None:
    model, _ = _models(tmp_path, "llama", torch.float32)
    runner = PagedRunner(model, num_blocks=160)
    seqs = list(range(MAX_BATCH))
    runner.step([(s, [5, 6, 7]) for s in seqs])  # a prompt step
    stack = model._decode_stack
    assert stack is not None
    taken: list[bool] = []
    run = stack.run

    def spy(*args):
        out = run(*args)
        taken.append(out is not None)
        return out

    stack.run = spy  # type: ignore[method-assign]
    runner.step([(s, [8]) for s in seqs])  # MAX_BATCH sequences: the layers
    runner.step([(0, [9]), (1, [9, 10])])  # a prompt token in the step: the layers
    runner.step([(s, [11]) for s in seqs[:3]])  # 3 decodes: the stack
    assert taken == [False, False, True]


def test_build_declines_models_it_cannot_run(tmp_path: Path) -> None:
    folder, _ = save_random_model(tmp_path, "llama", **SHAPES)
    dense, _ = load_model(folder, torch.float32, quantization="none")
    assert DecodeStack.build(dense) is None
    int8, _ = load_model(folder, torch.float32, quantization="int8")
    assert DecodeStack.build(int8) is None
    odd_folder, _ = save_random_model(tmp_path / "odd", "llama", hidden_size=48, intermediate_size=96)
    odd, _ = load_model(odd_folder, torch.float32, quantization="int4")  # rows not whole tiles
    assert DecodeStack.build(odd) is None
    assert DecodeStack.build(load_model(folder, torch.float32, quantization="int4")[0]) is not None


def test_attention_timing_turns_the_stack_off(tmp_path: Path) -> None:
    """The benchmarks time attention around the backend: while they do, the
    stack (which attends inside C) is off, and it is back on afterwards."""
    from paged_attention.bench.block_size import timed_backend

    model, _ = _models(tmp_path, "llama", torch.float32)
    runner = PagedRunner(model, num_blocks=160)
    runner.step([(0, [5, 6, 7])])
    assert model.decode_stack_serves(1) and not model.decode_stack_serves(MAX_BATCH)
    bucket: dict[str, float] = {}
    with timed_backend(model, bucket):
        assert not model.decode_stack_serves(1)
        runner.step([(0, [8])])
    assert bucket["attention"] > 0 and model.decode_stack_serves(1)
