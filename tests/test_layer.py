"""The seed's low-level API, exactly as its README showed it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from paged_attention import BlockAllocator, PagedAttention, PagedKVCache


def plain_attention(layer: PagedAttention, x: torch.Tensor) -> torch.Tensor:
    """The same weights as an ordinary causal attention layer over [1, T, hidden]."""
    t = x.shape[1]
    q = layer.q_proj(x).view(1, t, layer.num_heads, layer.head_dim).transpose(1, 2)
    k = layer.k_proj(x).view(1, t, layer.num_kv_heads, layer.head_dim).transpose(1, 2)
    v = layer.v_proj(x).view(1, t, layer.num_kv_heads, layer.head_dim).transpose(1, 2)
    group = layer.num_heads // layer.num_kv_heads
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return layer.o_proj(out.transpose(1, 2).reshape(1, t, layer.hidden_dim))


def test_readme_example_runs():
    allocator = BlockAllocator(total_blocks=128, block_size=16, hidden_dim=512)
    kv_cache = PagedKVCache(block_size=16, hidden_dim=512, allocator=allocator)
    attention = PagedAttention(hidden_dim=512, num_heads=8, block_size=16)
    query = torch.randn(1, 1, 512)  # new token query
    output = attention(query, kv_cache)
    assert output.shape == (1, 1, 512)
    assert kv_cache.num_tokens == 1 and allocator.num_free_blocks == 127


@torch.no_grad()
def test_token_by_token_equals_plain_attention_over_40_tokens():
    torch.manual_seed(0)
    allocator = BlockAllocator(total_blocks=128, block_size=16, hidden_dim=512)
    kv_cache = PagedKVCache(block_size=16, hidden_dim=512, allocator=allocator)
    attention = PagedAttention(hidden_dim=512, num_heads=8, block_size=16)
    x = torch.randn(1, 40, 512)
    paged = torch.cat([attention(x[:, i : i + 1], kv_cache) for i in range(40)], dim=1)
    torch.testing.assert_close(paged, plain_attention(attention, x), atol=1e-5, rtol=1e-5)
    assert kv_cache.block_ids == [0, 1, 2]  # 40 tokens: 3 blocks, taken as the sequence grew
    assert allocator.num_free_blocks == 125
    allocator.check_invariants([kv_cache.block_table])
    kv_cache.free()
    assert allocator.num_free_blocks == 128


@torch.no_grad()
def test_chunks_and_gqa_equal_plain_attention():
    torch.manual_seed(1)
    allocator = BlockAllocator(num_blocks=16, block_size=4)
    attention = PagedAttention(hidden_dim=64, num_heads=8, block_size=4, num_kv_heads=2)
    kv_cache = PagedKVCache(block_size=4, hidden_dim=16, allocator=allocator)
    x = torch.randn(1, 23, 64)
    chunks = [x[:, :7], x[:, 7:8], x[:, 8:19], x[:, 19:]]
    paged = torch.cat([attention(c, kv_cache) for c in chunks], dim=1)
    torch.testing.assert_close(paged, plain_attention(attention, x), atol=1e-5, rtol=1e-5)


def test_bad_input_is_named():
    allocator = BlockAllocator(total_blocks=2, block_size=16, hidden_dim=512)
    with pytest.raises(ValueError, match="block_size 8 differs"):
        PagedKVCache(block_size=8, hidden_dim=512, allocator=allocator)
    with pytest.raises(ValueError, match="hidden_dim 256 differs"):
        PagedKVCache(block_size=16, hidden_dim=256, allocator=allocator)
    with pytest.raises(ValueError, match=r"num_heads \(6\).*num_kv_heads \(4\)"):
        PagedAttention(hidden_dim=48, num_heads=6, block_size=16, num_kv_heads=4)
    cache = PagedKVCache(block_size=16, hidden_dim=512, allocator=allocator)
    layer = PagedAttention(hidden_dim=512, num_heads=8, block_size=16)
    with pytest.raises(ValueError, match="one sequence"):
        layer(torch.randn(2, 1, 512), cache)
    with pytest.raises(RuntimeError, match="KV cache is full"):
        layer(torch.randn(1, 33, 512), cache)
    assert cache.num_tokens == 0  # a failed append leaves the cache as it was
