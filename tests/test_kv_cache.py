"""KVCachePool: shapes, byte sizes, writes through the slot mapping, block copies."""

from __future__ import annotations

import pytest
import torch

from paged_attention.core.block_allocator import BlockAllocator
from paged_attention.core.block_table import BlockTable, CopyOnWrite
from paged_attention.kv_cache import KVCachePool, write_kv


# ------------------------------------------------------------------ shapes
def test_shapes_and_views():
    pool = KVCachePool(num_layers=3, num_blocks=5, block_size=4, num_kv_heads=2, head_dim=8)
    assert pool.data.shape == (3, 2, 5, 2, 4, 8)  # [layer, k|v, block, head, slot, dim]
    assert pool.data.dtype == torch.float32
    assert pool.device == torch.device("cpu")
    pool.data.zero_()  # the pool starts uninitialised; only written slots are read
    for layer in range(3):
        assert pool.key(layer).shape == (5, 2, 4, 8)
        assert pool.value(layer).shape == (5, 2, 4, 8)
        # Views into the one allocation, not copies.
        assert pool.key(layer).data_ptr() == pool.data[layer, 0].data_ptr()
        assert pool.value(layer).data_ptr() == pool.data[layer, 1].data_ptr()
        assert pool.key(layer).is_contiguous()
    pool.key(1)[2, 1, 3, 5] = 7.0
    assert pool.data[1, 0, 2, 1, 3, 5] == 7.0
    pool.value(2)[4, 0, 0, 0] = -3.0
    assert pool.data[2, 1, 4, 0, 0, 0] == -3.0
    assert int((pool.data != 0).sum()) == 2


@pytest.mark.parametrize(
    "layers, kv_heads, head_dim, block_size, dtype, element",
    [
        (1, 1, 1, 1, torch.float32, 4),
        (3, 2, 8, 4, torch.float32, 4),
        (3, 2, 8, 4, torch.float16, 2),
        (2, 4, 16, 16, torch.bfloat16, 2),
        (5, 3, 12, 32, torch.float64, 8),
        (30, 3, 64, 16, torch.bfloat16, 2),  # SmolLM2-135M-like
    ],
)
def test_bytes_per_token_and_block_match_hand_computation(
    layers, kv_heads, head_dim, block_size, dtype, element
):
    per_token = 2 * layers * kv_heads * head_dim * element
    pool = KVCachePool(layers, 3, block_size, kv_heads, head_dim, dtype=dtype)
    assert pool.bytes_per_token == per_token
    assert pool.bytes_per_block == per_token * block_size
    assert pool.total_bytes == per_token * block_size * 3
    assert pool.total_bytes == pool.data.numel() * pool.data.element_size()
    assert KVCachePool.bytes_per_token_for(layers, kv_heads, head_dim, dtype) == per_token


def test_bytes_literal_values():
    # 2 (K and V) * 4 layers * 2 heads * 8 dim * 2 bytes = 256 bytes per token.
    pool = KVCachePool(4, 10, 16, 2, 8, dtype=torch.float16)
    assert pool.bytes_per_token == 256
    assert pool.bytes_per_block == 4096
    assert pool.total_bytes == 40960


@pytest.mark.parametrize("name", ["num_layers", "num_blocks", "num_kv_heads", "head_dim"])
@pytest.mark.parametrize("bad", [0, -2])
def test_bad_sizes_rejected(name, bad):
    kwargs = dict(num_layers=2, num_blocks=4, block_size=4, num_kv_heads=2, head_dim=8)
    kwargs[name] = bad
    with pytest.raises(ValueError, match=rf"{name} must be >= 1, got {bad}\b"):
        KVCachePool(**kwargs)


@pytest.mark.parametrize("bad", [0, 3, 512])
def test_bad_block_size_rejected(bad):
    with pytest.raises(ValueError, match=rf"got {bad}\b"):
        KVCachePool(num_layers=1, num_blocks=1, block_size=bad, num_kv_heads=1, head_dim=1)


# ------------------------------------------------------------------ writes
def test_write_through_slot_mapping_lands_in_block_and_offset():
    torch.manual_seed(0)
    layers, nb, bs, h, d = 2, 6, 4, 2, 3
    pool = KVCachePool(layers, nb, bs, h, d)
    pool.data.fill_(-7.5)  # a sentinel: the pool starts uninitialised
    slots = [17, 2, 23, 8, 9, 0]  # arbitrary, distinct
    k = torch.randn(len(slots), h, d)
    v = torch.randn(len(slots), h, d)
    pool.write(1, k, v, torch.tensor(slots))
    for i, s in enumerate(slots):
        block, offset = divmod(s, bs)
        assert torch.equal(pool.key(1)[block, :, offset], k[i])
        assert torch.equal(pool.value(1)[block, :, offset], v[i])
    # Nothing else changed: layer 0 untouched, other slots of layer 1 keep the sentinel.
    assert bool((pool.data[0] == -7.5).all())
    written = torch.zeros(nb * bs, dtype=torch.bool)
    written[slots] = True
    flat_k = pool.key(1).transpose(1, 2).reshape(nb * bs, h, d)
    flat_v = pool.value(1).transpose(1, 2).reshape(nb * bs, h, d)
    assert bool((flat_k[~written] == -7.5).all())
    assert bool((flat_v[~written] == -7.5).all())


def test_write_kv_on_bare_pools_converts_dtype():
    bs, h, d = 2, 1, 4
    k_pool = torch.zeros(3, h, bs, d, dtype=torch.float16)
    v_pool = torch.zeros(3, h, bs, d, dtype=torch.float16)
    k = torch.arange(2 * h * d, dtype=torch.float32).reshape(2, h, d) + 0.5
    v = -k
    write_kv(k_pool, v_pool, k, v, torch.tensor([5, 2]))
    assert k_pool.dtype == torch.float16
    assert torch.equal(k_pool[2, :, 1], k[0].half())
    assert torch.equal(k_pool[1, :, 0], k[1].half())
    assert torch.equal(v_pool[2, :, 1], v[0].half())
    assert torch.equal(v_pool[1, :, 0], v[1].half())
    assert int((k_pool != 0).any(-1).any(1).sum()) == 2  # two (block, slot) pairs written


def test_write_through_a_block_table_reads_back_in_token_order():
    torch.manual_seed(1)
    bs, h, d = 4, 2, 3
    alloc = BlockAllocator(6, bs)
    alloc.allocate_many(6)
    for b in (3, 5, 0, 2, 4, 1):
        alloc.free(b)
    pool = KVCachePool(1, 6, bs, h, d)
    t = BlockTable(alloc)
    k = torch.randn(10, h, d)
    v = torch.randn(10, h, d)
    done = 0
    for chunk in (3, 1, 6):
        slots, cow = t.append_slots(chunk)
        assert cow is None
        pool.write(0, k[done : done + chunk], v[done : done + chunk], torch.tensor(slots))
        done += chunk
    assert t.block_ids == [3, 5, 0]
    gathered_k = torch.cat([pool.key(0)[b].transpose(0, 1) for b in t.block_ids])[:10]
    gathered_v = torch.cat([pool.value(0)[b].transpose(0, 1) for b in t.block_ids])[:10]
    assert torch.equal(gathered_k, k)
    assert torch.equal(gathered_v, v)


# ------------------------------------------------------------- copy_blocks
def test_copy_blocks_copies_all_layers():
    torch.manual_seed(2)
    pool = KVCachePool(3, 6, 4, 2, 3)
    pool.data.normal_()
    before = pool.data.clone()
    pool.copy_blocks([CopyOnWrite(src=1, dst=4), CopyOnWrite(src=0, dst=5)])
    for layer in range(3):
        for kv in (0, 1):
            assert torch.equal(pool.data[layer, kv, 4], before[layer, kv, 1])
            assert torch.equal(pool.data[layer, kv, 5], before[layer, kv, 0])
            for b in range(4):  # sources and bystanders unchanged
                assert torch.equal(pool.data[layer, kv, b], before[layer, kv, b])
    assert torch.equal(pool.key(2)[4], before[2, 0, 1])
    assert torch.equal(pool.value(2)[5], before[2, 1, 0])


def test_copy_blocks_with_no_copies_is_a_no_op():
    pool = KVCachePool(2, 3, 2, 1, 2)
    pool.data.uniform_()
    before = pool.data.clone()
    pool.copy_blocks([])
    pool.copy_blocks(iter(()))
    assert torch.equal(pool.data, before)


def test_copy_on_write_end_to_end_keeps_both_sequences_intact():
    """A forked sequence writes its next token after copying the shared
    partly filled block; the parent's KV stays as it was."""
    torch.manual_seed(3)
    layers, bs, h, d = 2, 4, 1, 2
    alloc = BlockAllocator(5, bs)
    pool = KVCachePool(layers, 5, bs, h, d)
    parent = BlockTable(alloc)
    prompt_k = torch.randn(layers, 6, h, d)
    prompt_v = torch.randn(layers, 6, h, d)
    slots, _ = parent.append_slots(6)
    for layer in range(layers):
        pool.write(layer, prompt_k[layer], prompt_v[layer], torch.tensor(slots))
    child = parent.fork()

    new_k = torch.randn(layers, 1, h, d)
    new_v = torch.randn(layers, 1, h, d)
    slots, cow = child.append_slots(1)
    assert cow == CopyOnWrite(1, 2)
    pool.copy_blocks([cow])
    for layer in range(layers):
        pool.write(layer, new_k[layer], new_v[layer], torch.tensor(slots))

    other_k = torch.randn(layers, 1, h, d)
    slots, cow = parent.append_slots(1)
    assert cow is None
    for layer in range(layers):
        pool.write(layer, other_k[layer], other_k[layer], torch.tensor(slots))

    def read(table: BlockTable, layer: int, kv: int) -> torch.Tensor:
        flat = pool.data[layer, kv].transpose(1, 2).reshape(-1, h, d)
        return flat[torch.tensor(table.slots(0, table.num_tokens))]

    for layer in range(layers):
        assert torch.equal(read(child, layer, 0), torch.cat([prompt_k[layer], new_k[layer]]))
        assert torch.equal(read(child, layer, 1), torch.cat([prompt_v[layer], new_v[layer]]))
        assert torch.equal(read(parent, layer, 0), torch.cat([prompt_k[layer], other_k[layer]]))
        assert torch.equal(read(parent, layer, 1), torch.cat([prompt_v[layer], other_k[layer]]))


# ------------------------------------------------------------ host swap pool
def test_host_pool_is_capped_at_the_device_pool():
    from paged_attention.engine.builder import PoolPlan, host_pool_blocks

    plan = PoolPlan(num_blocks=64, block_size=4, bytes_per_block=5120, max_model_len=128)
    assert host_pool_blocks(4.0, plan) == 64  # 4 GiB would be 838,860 blocks
    assert host_pool_blocks(0.0002, plan) == 41  # 214,748 bytes: fewer than the device's
    assert host_pool_blocks(0, plan) == 0


def test_engine_host_pool_matches_the_device_pool_and_is_logged(caplog):
    import logging

    from paged_attention import LLM
    from paged_attention.engine.builder import STORIES260K

    with caplog.at_level(logging.INFO, logger="paged_attention"):
        engine = LLM(
            str(STORIES260K),
            dtype="float32",
            num_kv_blocks=64,
            block_size=4,
            max_model_len=128,
            swap_space=4.0,
        ).engine
    swapper = engine.scheduler.swapper
    assert swapper is not None
    assert engine.allocator.num_blocks == swapper.host.num_blocks == 64
    assert engine.runner.host_cache.num_blocks == 64
    assert "swap space: 64 host blocks" in caplog.text
    swapper.host.check_invariants([])
