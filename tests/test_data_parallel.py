"""Data-parallel replicas (entrypoints/dp_router.py): the prefix-aware routing
policy over real block pools, and two engines behind one `DataParallelEngine`
giving the same greedy outputs as one engine, a repeated long prefix going to
the replica that cached it (its prefix-hit counter rises, the other's does not)."""

from __future__ import annotations

import asyncio

import pytest

from paged_attention import LLM, SamplingParams
from paged_attention.core.block_pool import BlockPool
from paged_attention.core.block_table import BlockTable
from paged_attention.core.prefix_cache import PrefixChain
from paged_attention.engine.builder import STORIES260K
from paged_attention.entrypoints.async_engine import PromptInput
from paged_attention.entrypoints.dp_router import (
    DataParallelEngine,
    PrefixRouter,
    build_replicas,
    merge_memory_stats,
)

BS = 4


def _cache(pool: BlockPool, tokens: list[int]) -> None:
    """Leave `tokens`' full blocks cached (and evictable) in `pool`."""
    table = BlockTable(pool)
    assert table.append_slots(len(tokens)) is not None
    pool.cache_full_blocks(table, PrefixChain(), tokens)
    table.free()


def test_prefix_hit_wins_unless_its_replica_is_far_busier():
    pools = [BlockPool(32, BS), BlockPool(32, BS)]
    router = PrefixRouter(pools, max_imbalance=2)
    prefix = list(range(100, 112))  # 3 blocks
    _cache(pools[1], prefix)
    prompt = [*prefix, 7, 8]
    route = router.choose([prompt], loads=[0, 2])
    assert (route.replica, route.cached_blocks, route.by_prefix) == (1, 3, True)
    # Three more in flight there than on replica 0: the load wins.
    route = router.choose([prompt], loads=[0, 3])
    assert (route.replica, route.by_prefix) == (0, False)
    assert (router.routed, router.by_prefix) == ([1, 1], [0, 1])


def test_least_loaded_then_turns_and_requests_sent_count_as_cached():
    pools = [BlockPool(32, BS), BlockPool(32, BS), BlockPool(32, BS)]
    router = PrefixRouter(pools)
    assert router.choose([[1, 2, 3]], loads=[4, 1, 2]).replica == 1
    # Equal loads: each replica in turn.
    assert [router.choose([[9]], loads=[0, 0, 0]).replica for _ in range(4)] == [2, 0, 1, 2]
    # A new long prompt goes somewhere by load; a second one sharing its prefix
    # follows it there before any block is cached.
    first = router.choose([list(range(50, 70))], loads=[0, 0, 0])
    assert not first.by_prefix
    second = router.choose([[*range(50, 66), 1, 2]], loads=[0, 0, 0])
    assert (second.replica, second.cached_blocks, second.by_prefix) == (first.replica, 4, True)
    with pytest.raises(ValueError, match="got 2 loads for 3 replicas"):
        router.choose([[1]], loads=[0, 0])
    with pytest.raises(ValueError, match="at least 1 replica"):
        PrefixRouter([])


def test_merged_memory_stats():
    a = {
        "num_blocks": 10,
        "num_used_blocks": 5,
        "block_size": 16,
        "prefix_cache_hit_rate": 0.5,
        "num_running": 2,
    }
    b = {
        "num_blocks": 30,
        "num_used_blocks": 5,
        "block_size": 16,
        "prefix_cache_hit_rate": 0.1,
        "num_running": 1,
    }
    merged = merge_memory_stats([a, b])
    assert merged["num_blocks"] == 40 and merged["num_running"] == 3 and merged["block_size"] == 16
    assert merged["kv_cache_usage"] == 10 / 40 and merged["prefix_cache_hit_rate"] == pytest.approx(0.3)
    assert merged["num_replicas"] == 2


OPTIONS = dict(dtype="float32", num_kv_blocks=128, block_size=BS, seed=0)
PROMPTS = ["Once upon a time", "The cat sat on the mat and", "Lily and Tom went to the park"]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


async def _generate(engine: DataParallelEngine, token_ids: list[int]) -> list[int]:
    submission = engine.submit([PromptInput(token_ids)], GREEDY)
    tokens: list[int] = []
    async for update in submission.choices():
        tokens = update.output.token_ids
    return tokens


def test_two_replicas_answer_as_one_engine_and_follow_the_cached_prefix():
    single = LLM(str(STORIES260K), **OPTIONS)
    tokenizer = single.engine.tokenizer
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    # A long shared prefix (12 full blocks), then two different endings.
    story = tokenizer.encode(" ".join(["One day a little girl named Lily found a needle in her room."] * 3))
    ending = {w: tokenizer.encode(w, add_special_tokens=False) for w in (" She", " He")}
    long_a, long_b = [*story[:48], *ending[" She"]], [*story[:48], *ending[" He"]]
    expected = [o.outputs[0].token_ids for o in single.generate(
        [{"prompt_token_ids": p} for p in [*prompts, long_a, long_b]], GREEDY, use_tqdm=False
    )]  # fmt: skip
    replicas = build_replicas(str(STORIES260K), OPTIONS, 2)
    dp = DataParallelEngine.from_llms(replicas)
    pools = [llm.engine.allocator for llm in replicas]

    async def run() -> tuple[list[list[int]], list[int]]:
        dp.start()
        try:
            together = await asyncio.gather(*(_generate(dp, p) for p in prompts))
            first = await _generate(dp, long_a)
            hits_before = [p.num_hit_tokens for p in pools]
            second = await _generate(dp, long_b)
            return [*together, first, second], hits_before
        finally:
            await dp.stop()

    outputs, hits_before = asyncio.run(run())
    assert outputs == expected
    # Both replicas served the concurrent requests; the second long prompt went
    # where the first one's blocks are, by prefix, and hit them there only.
    assert min(dp.router.routed) >= 1
    assert dp.router.by_prefix == [1, 0] or dp.router.by_prefix == [0, 1]
    target = dp.router.by_prefix.index(1)
    hits = [p.num_hit_tokens - before for p, before in zip(pools, hits_before)]
    assert hits[target] == 48 and hits[1 - target] == 0
    assert all(p.num_free_blocks == p.num_blocks for p in pools)


@pytest.mark.server
def test_served_replicas_behind_one_endpoint():
    """`create_app(llm, replicas=...)`, as `serve --data-parallel-size 2` builds
    it: HTTP answers equal one engine's, the repeated prefix goes to the
    replica holding it, and /debug/memory sums both pools."""
    import httpx

    from paged_attention.entrypoints.server import create_app
    from tests.server_utils import serve_in_thread

    single = LLM(str(STORIES260K), **OPTIONS)
    story = single.engine.tokenizer.encode(
        "One day a little girl named Lily found a needle in her room. " * 3
    )
    prompts = [[*story[:48], 300 + i] for i in range(3)]
    expected = [o.outputs[0].text for o in single.generate(
        [{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False
    )]  # fmt: skip
    first, *others = build_replicas(str(STORIES260K), OPTIONS, 2)
    app = create_app(first, replicas=others, served_model_name="m", warm_up=False)
    router = app.state.ctx.engine.router
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        got = []
        for prompt in prompts:  # one after another: each finds the previous one's blocks
            body = {"model": "m", "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
            reply = http.post("/v1/completions", json=body)
            assert reply.status_code == 200, reply.text
            text = reply.json()["choices"][0]["text"]
            got.append(text)
        memory = http.get("/debug/memory").json()
    assert got == expected
    assert sorted(router.by_prefix) == [0, 2] and sorted(router.routed) == [0, 3]
    assert memory["num_replicas"] == 2 and memory["num_blocks"] == 2 * OPTIONS["num_kv_blocks"]
