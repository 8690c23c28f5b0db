"""The engine's C kernels (`paged_attention/native.py`): decode attention
(`attention/cpu_kernel.py`) equals plain attention and the PyTorch path, the
backend choice around it behaves, and the int8-group matrix-vector product
equals its weights dequantized.

Scenarios come from test_paged_attention.run_case: NaN-filled pools, shuffled
blocks, GQA groups, several block sizes, decode alone and mixed with prompt
chunks (which the "cpu" backend hands to the PyTorch path in the same call).
"""

from __future__ import annotations

import functools
import random

import pytest
import torch

from paged_attention import native
from paged_attention.attention import cpu_kernel
from paged_attention.attention.backend import select_attention_backend
from paged_attention.attention.random_batch import random_paged_batch
from paged_attention.attention.torch_attention import paged_attention
from paged_attention.model.quant import kernels
from tests.test_paged_attention import _seqs_for, assert_matches, run_case

pytestmark = pytest.mark.skipif(native.load_library() is None, reason="no C compiler to build the kernels")


def kernel_attention() -> functools.partial:
    kernel = cpu_kernel.load_kernel()
    assert kernel is not None
    return functools.partial(cpu_kernel.cpu_paged_attention, kernel)


@pytest.mark.parametrize("mode", ["decode", "mixed"])
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize(("num_kv_heads", "group"), [(1, 1), (2, 3), (3, 4)])
def test_kernel_matches_plain_attention(mode, block_size, num_kv_heads, group):
    seed = block_size * 100 + num_kv_heads * 10 + group
    seqs = _seqs_for(mode, block_size, random.Random(seed))
    case = run_case(
        seqs,
        block_size,
        num_kv_heads,
        group,
        16,
        seed=seed,
        table_mode="allocator",
        attention=kernel_attention(),
    )
    assert cpu_kernel.kernel_runs(case.q, case.pool.key(case.layer), case.pool.value(case.layer))
    assert_matches(case)


def test_long_contexts_and_large_head_dim():
    """Contexts of hundreds of blocks, head_dim 128, uneven lengths in one batch."""
    seqs = [(700, 1), (3, 1), (257, 1), (1023, 1)]
    assert_matches(run_case(seqs, 16, 2, 2, 128, seed=7, attention=kernel_attention()))


def test_bfloat16_rounds_as_the_torch_path():
    """bfloat16: scores and probabilities are rounded where the PyTorch path
    rounds them, so the two agree to bfloat16 precision (the sums' order differs)."""
    k_pool, v_pool, meta = random_paged_batch([5, 40, 0, 130], [1, 1, 1, 1], 16, 3, 64, dtype=torch.bfloat16)
    q = torch.randn(4, 9, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    ours = kernel_attention()(q, k_pool, v_pool, meta, 0.125)
    reference = paged_attention(q, k_pool, v_pool, meta, 0.125)
    assert ours.dtype == torch.bfloat16
    assert not ours.isnan().any()
    torch.testing.assert_close(ours.float(), reference.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("head_dim", [64, 128, 16])  # 64 and 128: AVX512-BF16 path where the CPU has it
@pytest.mark.parametrize("block_size", [1, 4, 16])  # odd pieces (always at 1): a token pairs with zeros
@pytest.mark.parametrize(("num_kv_heads", "group"), [(1, 1), (3, 3), (2, 4)])
def test_bfloat16_kernel_matches_plain_attention(head_dim, block_size, num_kv_heads, group):
    """bfloat16 pools full of NaN outside the written slots, odd and even
    context lengths: the kernel (dot-product instructions on CPUs with
    AVX512-BF16) reads only live slots and agrees with float64 attention over
    the same bfloat16 values to bfloat16 precision."""
    seed = head_dim * 1000 + block_size * 100 + num_kv_heads * 10 + group
    rng = random.Random(seed)
    seqs = [(rng.randint(0, 90), 1) for _ in range(5)] + [(0, 1), (block_size, 1)]
    case = run_case(
        seqs,
        block_size,
        num_kv_heads,
        group,
        head_dim,
        seed=seed,
        dtype=torch.bfloat16,
        attention=kernel_attention(),
    )
    assert not case.out.isnan().any()
    err = (case.out.double() - case.expected).abs().max().item()
    assert err <= 2e-2, f"max abs error {err:.3g}"


def test_backend_choice(monkeypatch):
    assert select_attention_backend("cpu", "auto").name == "cpu"
    assert select_attention_backend("cpu", "cpu").name == "cpu"
    assert select_attention_backend("cpu", "torch").name == "torch"
    # No compiler: "auto" falls back to PyTorch, asking for "cpu" says why not.
    monkeypatch.setattr(native, "_compiler", lambda: None)
    native.load_library.cache_clear()
    try:
        assert select_attention_backend("cpu", "auto").name == "torch"
        with pytest.raises(ValueError, match="C compiler"):
            select_attention_backend("cpu", "cpu")
    finally:
        native.load_library.cache_clear()
    with pytest.raises(ValueError, match="'nope'"):
        select_attention_backend("cpu", "nope")


def test_build_is_cached_per_machine_and_survives_a_bad_compiler(tmp_path, monkeypatch):
    """One library file per (sources, compiler, CPU) in the cache folder; a
    compiler that fails leaves no file behind and gives None."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native.load_library.cache_clear()
    try:
        lib = native.load_library()
        assert lib is not None
        built = sorted((tmp_path / "paged_attention").iterdir())
        assert [p.name for p in built] == [native.library_path(native._compiler() or "cc").name]
        bad = tmp_path / "badcc"
        bad.write_text('#!/bin/sh\n[ "$1" = --version ] && echo bad 1.0 && exit 0\necho broken >&2\nexit 1\n')
        bad.chmod(0o755)
        monkeypatch.setenv("CC", str(bad))
        native.load_library.cache_clear()
        assert native.load_library() is None
        assert sorted((tmp_path / "paged_attention").iterdir()) == built
    finally:
        native.load_library.cache_clear()


def test_engine_generates_the_same_tokens_with_either_cpu_backend():
    """Through the whole engine (batching, chunked prefill, decode), greedy
    tokens are the same with the kernel as with the PyTorch path."""
    from paged_attention.engine.builder import STORIES260K
    from paged_attention.engine.llm import LLM
    from paged_attention.sampling_params import SamplingParams

    prompts = ["Once upon a time", "The little dog", "Lily and Ben went to the park because"]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    tokens = {}
    for backend in ("torch", "cpu"):
        llm = LLM(
            str(STORIES260K), dtype="float32", num_kv_blocks=160, block_size=4, attention_backend=backend
        )
        assert llm.engine.runner.model.attn_backend.name == backend
        outs = llm.generate(prompts, params, use_tqdm=False)
        tokens[backend] = [o.outputs[0].token_ids for o in outs]
    assert tokens["cpu"] == tokens["torch"]


def test_unknown_attention_backend_option_is_refused():
    from paged_attention.config import EngineConfig

    with pytest.raises(ValueError, match="attention_backend must be one of .*'nope'"):
        EngineConfig(attention_backend="nope")


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_group_gemv_matches_dequantized_weights(rows, dtype):
    """A Q8_0-style layer (GGUF 8-bit records): the C kernel serves up to
    equals x @ W^T over the dequantized values to float32 rounding (and to
    bfloat16 output rounding), NATIVE_MAX_ROWS rows per call; PyTorch's
    per-group kernel (where the C library is missing) gives the same values."""
    from paged_attention.model.quant import QuantLinear, QuantScheme, Scratch
    from paged_attention.model.quant.records import GroupQuantized

    g = torch.Generator().manual_seed(rows)
    n, k = 96, 128
    values = torch.randint(0, 256, (n, k), generator=g, dtype=torch.uint8)
    scales = torch.rand(n, k // 32, generator=g) * 0.01
    record = GroupQuantized(values=values, scales=scales, offsets=-128 * scales, group_size=32, bits=8)
    layer = QuantLinear(
        n, k, QuantScheme("gguf"), bias=False, dtype=dtype, scratch=Scratch(), exact_only=True
    )
    layer.load_rows(0, n, record)
    assert layer.kind == "int8g" and layer.native
    x = torch.randn(rows, k, generator=g).to(dtype)
    exact = x.double() @ layer.dequantize().double().t()
    out = layer(x)
    assert out.dtype == dtype and out.shape == (rows, n)
    tol = 1e-5 if dtype == torch.float32 else 1e-2 * exact.abs().max().item()
    assert (out.double() - exact).abs().max().item() <= tol
    # More rows than one call takes (the kernel at every row count): each row as alone.
    layer.dense_rows = 1 << 40
    many = torch.cat([x] * (kernels.NATIVE_MAX_ROWS // rows + 1))
    assert torch.equal(layer(many)[: len(many)].view(-1, rows, n)[-1], out)
    layer.native = False
    torch.testing.assert_close(layer(many)[:rows].float(), out.float(), atol=0.05, rtol=0.02)


@pytest.mark.parametrize(
    ("dtype", "kv_dtype"),
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)],
)
@pytest.mark.parametrize(("num_kv_heads", "group", "block_size"), [(3, 3, 16), (2, 1, 4), (1, 4, 1)])
def test_fused_decode_layer_equals_the_separate_steps(dtype, kv_dtype, num_kv_heads, group, block_size):
    """RoPE + KV write + attention in one call: the pool ends up bit for bit
    as after apply_rotary and write_kv, and the output equals attention over
    it, also for float32 activations over a bfloat16 pool (which rounds what
    it stores, nothing else)."""
    from paged_attention.kv_cache import write_kv
    from paged_attention.model.layers import RotaryEmbedding, apply_rotary

    head_dim, num_heads = 16, num_kv_heads * group
    num_computed = [5, 0, 37, 16]
    k_pool, v_pool, meta = random_paged_batch(
        num_computed, [1] * 4, block_size, num_kv_heads, head_dim, dtype=kv_dtype, seed=group
    )
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(4, (num_heads + 2 * num_kv_heads) * head_dim, generator=g).to(dtype)
    cos, sin = RotaryEmbedding(head_dim, 128, 10000.0, None).cos_sin(torch.tensor(num_computed), dtype)

    ours_k, ours_v = k_pool.clone(), v_pool.clone()
    kernel = cpu_kernel.load_kernel()
    assert kernel is not None
    out = cpu_kernel.decode_layer(kernel, qkv, cos, sin, ours_k, ours_v, meta, 0.25, num_heads)
    assert out is not None and out.shape == (4, num_heads * head_dim) and out.dtype == dtype

    qk_size = (num_heads + num_kv_heads) * head_dim
    qk = apply_rotary(qkv[:, :qk_size].view(4, num_heads + num_kv_heads, head_dim), cos, sin)
    v = qkv[:, qk_size:].view(4, num_kv_heads, head_dim)
    write_kv(k_pool, v_pool, qk[:, num_heads:], v, meta.slot_mapping)
    assert torch.equal(ours_k.nan_to_num(7.0), k_pool.nan_to_num(7.0))
    assert torch.equal(ours_v.nan_to_num(7.0), v_pool.nan_to_num(7.0))
    reference = paged_attention(qk[:, :num_heads].contiguous(), k_pool, v_pool, meta, 0.25).reshape(4, -1)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), reference.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("head_dim", [64, 16])
def test_float32_queries_over_a_bfloat16_pool_compute_in_float32(head_dim):
    """The kernel and the PyTorch path both widen the pool's values and
    compute in float32: equal to float32 precision, unlike bfloat16 queries."""
    k_pool, v_pool, meta = random_paged_batch(
        [5, 40, 0, 130], [1, 1, 1, 1], 16, 3, head_dim, dtype=torch.bfloat16
    )
    q = torch.randn(4, 9, head_dim, generator=torch.Generator().manual_seed(1))
    assert cpu_kernel.kernel_runs(q, k_pool, v_pool)
    ours = kernel_attention()(q, k_pool, v_pool, meta, 0.125)
    reference = paged_attention(q, k_pool, v_pool, meta, 0.125)
    widened = paged_attention(q, k_pool.float(), v_pool.float(), meta, 0.125)
    assert ours.dtype == reference.dtype == torch.float32
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reference, widened, atol=1e-6, rtol=1e-6)


def test_float32_prompt_tokens_over_a_bfloat16_pool_attend_in_bfloat16():
    """Prompt chunks over a bfloat16 pool attend in bfloat16 (PyTorch's flash
    kernel) and come back float32: bfloat16-close to float32 attention over the
    same stored values, while the batch's decode rows stay float32-exact."""
    k_pool, v_pool, meta = random_paged_batch([0, 40, 7], [9, 1, 5], 16, 3, 64, dtype=torch.bfloat16)
    q = torch.randn(15, 9, 64, generator=torch.Generator().manual_seed(2))
    ours = kernel_attention()(q, k_pool, v_pool, meta, 0.125)
    widened = paged_attention(q, k_pool.float(), v_pool.float(), meta, 0.125)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, widened, atol=3e-2, rtol=3e-2)
    decode_row = 9  # the second sequence's one new token
    torch.testing.assert_close(ours[decode_row], widened[decode_row], atol=1e-5, rtol=1e-5)


def test_fused_decode_layer_declines_steps_with_prompt_tokens():
    from paged_attention.model.layers import RotaryEmbedding

    k_pool, v_pool, meta = random_paged_batch([5, 0], [1, 3], 4, 1, 8)
    qkv = torch.randn(4, 3 * 8)
    cos, sin = RotaryEmbedding(8, 64, 10000.0, None).cos_sin(torch.tensor([5, 0, 1, 2]), torch.float32)
    kernel = cpu_kernel.load_kernel()
    assert kernel is not None
    assert cpu_kernel.decode_layer(kernel, qkv, cos, sin, k_pool, v_pool, meta, 0.3, 1) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("rows", [5, 700])  # 700 rows split over threads
def test_add_rms_norm_matches_the_torch_ops(dtype, with_residual, rows):
    """The C residual add + RMSNorm updates x exactly as `x.add_(r)` does and
    normalises as `rms_norm` (float32 to rounding; bfloat16 to its last bit);
    without the kernel the PyTorch ops give the same."""
    from paged_attention.model import layers

    g = torch.Generator().manual_seed(int(with_residual))
    norm = layers.RMSNorm(96, 1e-5, dtype, "cpu")
    norm.weight.copy_(torch.randn(96, generator=g))
    assert norm._native is not None
    x = (torch.randn(rows, 96, generator=g) * 4).to(dtype)
    r = torch.randn(rows, 96, generator=g).to(dtype) if with_residual else None
    ours_x = x.clone()
    ours = norm.add_forward(ours_x, r)
    ref_x = x.clone() if r is None else x.clone().add_(r)
    ref = layers.rms_norm(ref_x, norm.weight, 1e-5)
    assert torch.equal(ours_x, ref_x)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(ours.float(), ref.float(), atol=tol * 8, rtol=tol)
    norm._native = None
    torch_x = x.clone()
    torch.testing.assert_close(norm.add_forward(torch_x, r).float(), ref.float(), atol=tol * 8, rtol=tol)
    assert torch.equal(torch_x, ref_x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 300])  # 300 rows split over threads
def test_swiglu_matches_the_torch_ops(dtype, rows):
    """The C gate equals silu(gate) * up: bfloat16 bit for bit here (both
    round silu, then the product), float32 to its last bits (a different exp);
    inputs span silu's tails, where exp under- and overflows."""
    from paged_attention.model import layers

    mlp = layers.GatedMLP(16, 160, False, dtype, "cpu")
    assert mlp._swiglu is not None
    g = torch.Generator().manual_seed(rows)
    gate_up = (torch.randn(rows, 320, generator=g) * 8).to(dtype)
    gate_up[0, :4] = torch.tensor([-200.0, 200.0, 0.0, -0.0])
    gate, up = gate_up.split(160, dim=-1)
    ref = torch.nn.functional.silu(gate) * up
    ours = mlp.gate(gate_up)
    if dtype == torch.bfloat16:
        assert torch.equal(ours, ref)
    else:
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=4e-7)
    mlp._swiglu = None
    assert torch.equal(mlp.gate(gate_up), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [3, 200])  # 200 rows split over threads
def test_rotary_in_place_equals_apply_rotary(dtype, rows):
    """RoPE of a prompt chunk's q and k heads in C, in place in the qkv rows,
    is `apply_rotary`'s result bit for bit; the v columns are untouched."""
    from paged_attention.model.layers import RotaryEmbedding, apply_rotary, rotate_rows_

    heads, kv_heads, d = 4, 2, 32
    g = torch.Generator().manual_seed(rows)
    qkv = (torch.randn(rows, (heads + 2 * kv_heads) * d, generator=g) * 3).to(dtype)
    positions = torch.randint(0, 500, (rows,), generator=g)
    cos, sin = RotaryEmbedding(d, 512, 10000.0, None).cos_sin(positions, dtype)
    qk = qkv[:, : (heads + kv_heads) * d].view(rows, heads + kv_heads, d)
    ref = apply_rotary(qk, cos, sin)
    ours = qkv.clone()
    assert rotate_rows_(native.library_for(dtype, "cpu"), ours, heads + kv_heads, d, cos, sin)
    assert torch.equal(ours[:, : (heads + kv_heads) * d].view(rows, heads + kv_heads, d), ref)
    assert torch.equal(ours[:, (heads + kv_heads) * d :], qkv[:, (heads + kv_heads) * d :])
    assert not rotate_rows_(None, ours, heads + kv_heads, d, cos, sin)
    assert not rotate_rows_(native.library_for(dtype, "cpu"), ours.half(), heads + kv_heads, d, cos, sin)
