"""Model + paged KV cache + prefix cache: correctness against a cache-free recomputation."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

try:  # installed package (pip install -e .) or the example folder on sys.path
    import minifd  # noqa: F401
except ImportError:  # pragma: no cover - depends on how the repo was set up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from minifd import tokenizer  # noqa: E402
from minifd.kv_cache import NoFreeBlocks, PrefixCacheManager, block_hashes  # noqa: E402
from minifd.model import ModelConfig, TinyTransformer, sample  # noqa: E402

CFG = ModelConfig()
BS = CFG.block_size
ATOL = 1e-4


@pytest.fixture(scope="module")
def model() -> TinyTransformer:
    return TinyTransformer(CFG)


def _prompt(seed: int, n: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 256, n)]


def _run_prompt(model: TinyTransformer, mgr: PrefixCacheManager, rid: str, tokens: list[int]):
    """The engine's prompt path: allocate, prefill only the uncached part, publish."""
    d = mgr.allocate_prompt(rid, tokens)
    logits = model.prefill(tokens, d.block_table, d.matched_tokens, mgr.pool).numpy()
    mgr.mark_computed(rid)
    return d, logits


# ---------------------------------------------------------------- tokenizer / sampling


def test_tokenizer_round_trip_and_specials() -> None:
    text = "héllo, 世界 🙂"
    ids = tokenizer.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids + [tokenizer.EOS_ID]) == text  # special ids skipped
    assert tokenizer.decode([0xFF, ord("a")]) == "\ufffda"  # broken UTF-8 replaced, not raised
    assert tokenizer.VOCAB_SIZE == tokenizer.EOS_ID + 1 == CFG.vocab_size


def test_sample_greedy_seeded_and_top_p() -> None:
    logits = np.array([0.1, 3.0, 2.9, -1.0], dtype=np.float32)
    assert sample(logits, 0.0, 1.0, None) == 1
    draws = [sample(logits, 1.0, 1.0, s) for s in range(50)]
    assert draws == [sample(logits, 1.0, 1.0, s) for s in range(50)]  # seed -> reproducible
    assert {1, 2} <= set(draws)  # real sampling, not argmax
    assert all(sample(logits, 1.0, 0.01, s) == 1 for s in range(20))  # nucleus of one token
    rng = np.random.default_rng(7)
    assert len({sample(logits, 5.0, 1.0, rng) for _ in range(60)}) > 2  # a Generator advances


# ---------------------------------------------------------------- model


def test_weights_are_deterministic(model: TinyTransformer) -> None:
    toks = tokenizer.encode("deterministic weights")
    again = TinyTransformer(CFG).forward_full(toks).numpy()
    np.testing.assert_array_equal(model.forward_full(toks).numpy(), again)
    other = TinyTransformer(ModelConfig(seed=CFG.seed + 1)).forward_full(toks).numpy()
    assert not np.allclose(again, other)
    assert again.shape == (len(toks), CFG.vocab_size) and np.isfinite(again).all()


def test_cached_prefix_prefill_matches_full_prefill(model: TinyTransformer) -> None:
    mgr = PrefixCacheManager(CFG, gpu_blocks=16, cpu_blocks=4)
    shared = _prompt(1, 2 * BS + 5)
    d1, l1 = _run_prompt(model, mgr, "a", shared)
    assert d1.kind == "CACHE_MISS" and d1.matched_tokens == 0
    np.testing.assert_allclose(l1, model.forward_full(shared).numpy()[-1], atol=ATOL)

    # Same 2 full blocks, different continuation: only the suffix is computed.
    prompt = shared[: 2 * BS] + _prompt(2, 11)
    d2 = mgr.allocate_prompt("b", prompt)
    assert d2.kind == "CACHE_HIT" and d2.matched_tokens == 2 * BS and d2.missed_tokens == 11
    assert d2.block_table[:2] == d1.block_table[:2]  # physically shared blocks
    cached = model.prefill(prompt, d2.block_table, d2.matched_tokens, mgr.pool).numpy()
    fresh_mgr = PrefixCacheManager(CFG, gpu_blocks=4, cpu_blocks=0)
    d3 = fresh_mgr.allocate_prompt("c", prompt)
    full = model.prefill(prompt, d3.block_table, 0, fresh_mgr.pool).numpy()
    np.testing.assert_allclose(cached, full, atol=ATOL)
    np.testing.assert_allclose(cached, model.forward_full(prompt).numpy()[-1], atol=ATOL)
    # The cached run really skipped work: a wrong prefix in the cache changes the answer.
    mgr.pool.v[:, d2.block_table[0]] = mgr.pool.v[:, d2.block_table[0]] * 0.0
    broken = model.prefill(prompt, d2.block_table, d2.matched_tokens, mgr.pool).numpy()
    assert not np.allclose(broken, full, atol=ATOL)


def test_paged_batched_greedy_decode_equals_recompute(model: TinyTransformer) -> None:
    mgr = PrefixCacheManager(CFG, gpu_blocks=12, cpu_blocks=0)
    seqs = {"x": _prompt(3, BS - 3), "y": _prompt(4, 2 * BS + 1)}  # both cross a block boundary
    nxt = {}
    for rid, toks in seqs.items():
        _, logits = _run_prompt(model, mgr, rid, toks)
        nxt[rid] = int(np.argmax(logits))
    for _ in range(8):
        batch = []
        for rid, toks in seqs.items():
            pos = len(toks)
            toks.append(nxt[rid])
            assert mgr.append_slot(rid, pos)
            batch.append((nxt[rid], pos, mgr.block_table(rid)))
        out = model.decode(batch, mgr.pool).numpy()
        assert out.shape == (2, CFG.vocab_size)
        for row, (rid, toks) in zip(out, seqs.items()):
            ref = model.forward_full(toks).numpy()[-1]  # no cache at all
            np.testing.assert_allclose(row, ref, atol=ATOL)
            nxt[rid] = sample(row, 0.0, 1.0, None)
            assert nxt[rid] == int(np.argmax(ref))
    assert len(mgr.block_table("x")) == 2 and len(mgr.block_table("y")) == 3
    mgr.check_invariants()


# ---------------------------------------------------------------- prefix cache manager


def test_miss_hit_then_swap_in_after_eviction(model: TinyTransformer) -> None:
    mgr = PrefixCacheManager(CFG, gpu_blocks=6, cpu_blocks=8)
    prefix = _prompt(10, 2 * BS)
    hashes = block_hashes(prefix, BS)

    d1, _ = _run_prompt(model, mgr, "r1", prefix + _prompt(11, 5))
    assert (d1.kind, d1.source_tier, d1.missed_tokens) == ("CACHE_MISS", None, 2 * BS + 5)
    mgr.free("r1")
    originals = [mgr.pool.read_gpu_block(mgr.gpu_block_of_hash(h)) for h in hashes]

    d2, _ = _run_prompt(model, mgr, "r2", prefix + _prompt(12, 7))
    assert (d2.kind, d2.source_tier, d2.matched_blocks, d2.matched_tokens) == ("CACHE_HIT", "gpu", 2, 2 * BS)
    assert d2.swapped_in_bytes == 0
    mgr.free("r2")

    for i in range(2):  # unrelated traffic pushes the prefix out of the 6-block GPU tier
        _run_prompt(model, mgr, f"other{i}", _prompt(100 + i, 5 * BS))
        mgr.free(f"other{i}")
    assert all(mgr.gpu_block_of_hash(h) is None for h in hashes)
    for h, (k, v) in zip(hashes, originals):
        cpu_block = mgr.cpu_block_of_hash(h)
        assert cpu_block is not None
        ck, cv = mgr.pool.read_cpu_block(cpu_block)
        np.testing.assert_array_equal(ck, k)
        np.testing.assert_array_equal(cv, v)
    assert mgr.stats()["swap_outs"] >= 2 and mgr.stats()["evictions"] >= 2

    prompt3 = prefix + _prompt(13, 3)
    d3 = mgr.allocate_prompt("r3", prompt3)
    assert d3.kind == "CACHE_SWAP_IN" and d3.source_tier == "cpu"
    assert d3.swapped_in_blocks == 2 and d3.matched_blocks == 0 and d3.matched_tokens == 2 * BS
    assert d3.swapped_in_bytes == 2 * mgr.pool.block_bytes > 0
    for block, (k, v) in zip(d3.block_table[:2], originals):
        gk, gv = mgr.pool.read_gpu_block(block)
        np.testing.assert_array_equal(gk, k)
        np.testing.assert_array_equal(gv, v)
    logits = model.prefill(prompt3, d3.block_table, d3.matched_tokens, mgr.pool).numpy()
    np.testing.assert_allclose(logits, model.forward_full(prompt3).numpy()[-1], atol=ATOL)
    assert all(mgr.cpu_block_of_hash(h) is None for h in hashes)  # moved, not duplicated
    s = mgr.stats()
    assert (s["CACHE_MISS"], s["CACHE_HIT"], s["CACHE_SWAP_IN"]) == (3, 1, 1)
    assert s["swap_ins"] == 2 and s["hits"] == 2
    mgr.check_invariants()


def test_never_matches_whole_prompt_and_chained_hash() -> None:
    mgr = PrefixCacheManager(CFG, gpu_blocks=8, cpu_blocks=0)
    toks = _prompt(20, 2 * BS)  # exactly two full blocks
    mgr.allocate_prompt("a", toks)
    mgr.mark_computed("a")
    d = mgr.allocate_prompt("b", toks)
    assert d.matched_tokens == BS and d.missed_tokens == BS  # last block recomputed
    # Same second block after a different first block: chained hash must not match it.
    other = _prompt(21, BS) + toks[BS:] + [1]
    assert mgr.allocate_prompt("c", other).kind == "CACHE_MISS"


def test_unpublished_blocks_are_never_hit() -> None:
    mgr = PrefixCacheManager(CFG, gpu_blocks=8, cpu_blocks=2)
    toks = _prompt(30, 2 * BS + 1)
    mgr.allocate_prompt("a", toks)  # prefill not run yet
    assert mgr.allocate_prompt("b", toks).kind == "CACHE_MISS"
    mgr.free("a")  # e.g. preempted before prefill: its K/V are garbage and must be dropped
    mgr.free("b")
    assert mgr.stats()["cached_gpu_blocks"] == 0 and mgr.stats()["free_gpu_blocks"] == 8
    assert mgr.allocate_prompt("c", toks).kind == "CACHE_MISS"


def test_no_free_blocks_rolls_back() -> None:
    mgr = PrefixCacheManager(CFG, gpu_blocks=5, cpu_blocks=2)
    prefix = _prompt(40, 2 * BS)
    mgr.allocate_prompt("cached", prefix + [7])
    mgr.mark_computed("cached")
    mgr.free("cached")  # 2 cached blocks + 3 free
    mgr.allocate_prompt("running", _prompt(41, BS + 1))  # holds 2 -> 1 free, 2 cached
    before = mgr.stats()
    with pytest.raises(NoFreeBlocks):  # shares the cached prefix but needs 3 more blocks
        mgr.allocate_prompt("big", prefix + _prompt(42, 2 * BS + 1))
    assert mgr.stats() == before
    assert all(mgr.refcount(b) == 0 for b in range(5) if b not in mgr.block_table("running"))
    with pytest.raises(ValueError):
        mgr.block_table("big")
    mgr.check_invariants()
    d = mgr.allocate_prompt("fits", prefix + [9])  # the cache survived the failed attempt
    assert d.kind == "CACHE_HIT" and d.matched_blocks == 2
    assert mgr.stats()["free_gpu_blocks"] == 0
    with pytest.raises(NoFreeBlocks):
        mgr.allocate_prompt("none", [1, 2, 3])
    mgr.check_invariants()


def test_refcounts_return_to_free_and_append_slot_pressure() -> None:
    mgr = PrefixCacheManager(CFG, gpu_blocks=6, cpu_blocks=0)
    prefix = _prompt(50, BS)
    da = mgr.allocate_prompt("a", prefix + [1, 2])
    mgr.mark_computed("a")
    db = mgr.allocate_prompt("b", prefix + [3])
    shared = da.block_table[0]
    assert db.block_table[0] == shared and mgr.refcount(shared) == 2
    assert mgr.stats()["used_gpu_blocks"] == 3

    # Decode "a" across block boundaries until the pool runs dry -> False, not an exception.
    pos = BS + 2
    while mgr.append_slot("a", pos):
        pos += 1
    assert pos == 5 * BS  # 6 blocks: shared + b's tail + 4 for "a"
    assert len(mgr.block_table("a")) == 5 and mgr.stats()["free_gpu_blocks"] == 0
    with pytest.raises(ValueError):
        mgr.append_slot("a", pos + BS)  # skipping a block is a caller bug
    mgr.check_invariants()

    mgr.free("b")
    assert mgr.refcount(shared) == 1 and mgr.append_slot("a", pos)  # b's private tail came back
    mgr.free("a")
    mgr.free("a")  # idempotent
    s = mgr.stats()
    assert all(mgr.refcount(b) == 0 for b in range(6))
    assert s["used_gpu_blocks"] == 0 and s["cached_gpu_blocks"] == 1  # the published prefix block
    assert s["free_gpu_blocks"] + s["cached_gpu_blocks"] == 6
    mgr.check_invariants()
