"""Two-tier paged KV cache with a chained-hash prefix cache.

GPU tier: the block pool the model reads/writes (``KVPool.k``/``.v`` on the paddle default
device; on a CPU-only machine that "device" pool simply lives in host memory).
CPU tier: a same-shaped pool in host memory (``paddle.CPUPlace()``) that evicted prefix blocks
are swapped out to, so a later request with the same prefix swaps them back in (a real tensor
copy) instead of recomputing.  Blocks are identified by a chained hash of the prompt tokens, so
a block only matches when the whole prefix before it is identical.

Engine protocol (one scheduler thread; every public method takes a lock anyway)::

    d = mgr.allocate_prompt(rid, tokens)            # may raise NoFreeBlocks (no state left behind)
    logits = model.prefill(tokens, d.block_table, d.matched_tokens, mgr.pool)
    mgr.mark_computed(rid)                          # publish the new full blocks for reuse
    while generating:                               # token at `pos` is fed this step
        if not mgr.append_slot(rid, pos): preempt someone (free) and retry
        model.decode([(tok, pos, mgr.block_table(rid)), ...], mgr.pool)
    mgr.free(rid)                                   # idempotent

Blocks are published (made matchable) only by ``mark_computed`` so that a request can never hit
a block whose K/V have not been written yet (e.g. when its owner is preempted before prefill).
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import paddle

from .model import ModelConfig

__all__ = ["KVPool", "PrefixCacheManager", "CacheDecision", "NoFreeBlocks", "block_hashes"]


class NoFreeBlocks(Exception):
    """Not enough GPU-tier blocks for the request, even after evicting every unreferenced
    cached block.  The manager's state is unchanged when this is raised."""


class KVPool:
    """K/V storage of both tiers, shaped [layers, num_blocks, heads, block_size, head_dim].

    The GPU tier is on ``paddle.get_device()`` at construction; the CPU tier is always host
    memory.  Swaps copy one whole block (all layers, K and V) between the tiers.
    """

    def __init__(self, cfg: ModelConfig, num_gpu_blocks: int, num_cpu_blocks: int) -> None:
        if num_gpu_blocks <= 0 or num_cpu_blocks < 0:
            raise ValueError("need num_gpu_blocks > 0 and num_cpu_blocks >= 0")
        self.cfg = cfg
        self.device: str = paddle.get_device()
        per_block = [cfg.n_heads, cfg.block_size, cfg.head_dim]
        self.k: paddle.Tensor = paddle.zeros([cfg.n_layers, num_gpu_blocks, *per_block], dtype="float32")
        self.v: paddle.Tensor = paddle.zeros([cfg.n_layers, num_gpu_blocks, *per_block], dtype="float32")
        host = np.zeros([cfg.n_layers, num_cpu_blocks, *per_block], dtype="float32")
        self.cpu_k: paddle.Tensor = paddle.to_tensor(host, place=paddle.CPUPlace())
        self.cpu_v: paddle.Tensor = paddle.to_tensor(host, place=paddle.CPUPlace())
        self.num_gpu_blocks = num_gpu_blocks
        self.num_cpu_blocks = num_cpu_blocks

    @property
    def block_bytes(self) -> int:
        """Bytes of one block, K plus V, all layers (what one swap moves)."""
        c = self.cfg
        return 2 * c.n_layers * c.n_heads * c.block_size * c.head_dim * self.k.element_size()

    def swap_out(self, gpu_block: int, cpu_block: int) -> int:
        """Copy a GPU-tier block into a CPU-tier block; returns bytes copied."""
        self.cpu_k[:, cpu_block] = self.k[:, gpu_block].cpu()
        self.cpu_v[:, cpu_block] = self.v[:, gpu_block].cpu()
        return self.block_bytes

    def swap_in(self, cpu_block: int, gpu_block: int) -> int:
        """Copy a CPU-tier block into a GPU-tier block; returns bytes copied."""
        self.k[:, gpu_block] = self.cpu_k[:, cpu_block].to(self.device)
        self.v[:, gpu_block] = self.cpu_v[:, cpu_block].to(self.device)
        return self.block_bytes

    def read_gpu_block(self, gpu_block: int) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of a GPU-tier block's K and V [layers, heads, block_size, head_dim] (inspection)."""
        return self.k[:, gpu_block].numpy(), self.v[:, gpu_block].numpy()

    def read_cpu_block(self, cpu_block: int) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of a CPU-tier block's K and V (inspection)."""
        return self.cpu_k[:, cpu_block].numpy(), self.cpu_v[:, cpu_block].numpy()


def block_hashes(tokens: Sequence[int], block_size: int) -> list[int]:
    """Chained hash of every FULL block: h_i = H(h_{i-1}, tokens of block i).

    Chaining makes a block's identity include its whole prefix; blake2b (not ``hash()``)
    keeps the values stable across processes so they can be logged and compared.
    """
    out: list[int] = []
    prev = b"\x00" * 8
    for i in range(len(tokens) // block_size):
        chunk = np.asarray(tokens[i * block_size:(i + 1) * block_size], dtype="<i8").tobytes()
        prev = hashlib.blake2b(prev + chunk, digest_size=8).digest()
        out.append(int.from_bytes(prev, "little"))
    return out


@dataclass
class CacheDecision:
    """What the cache did for a new prompt; the engine turns it into a trace event.

    ``matched_tokens`` is ``num_cached`` for ``model.prefill`` (GPU hits plus swapped-in
    tokens); ``source_tier`` is "cpu" whenever any block came from the CPU tier.
    """

    request_id: str
    matched_tokens: int
    matched_blocks: int
    swapped_in_blocks: int
    swapped_in_bytes: int
    missed_tokens: int
    source_tier: str | None
    block_table: list[int] = field(default_factory=list)

    @property
    def kind(self) -> str:
        """Event name: CACHE_SWAP_IN if anything was swapped in, else CACHE_HIT/CACHE_MISS."""
        if self.swapped_in_blocks:
            return "CACHE_SWAP_IN"
        return "CACHE_HIT" if self.matched_blocks else "CACHE_MISS"

    def event_attributes(self) -> dict[str, Any]:
        """Keyword attributes for the cache event (None-valued source_tier omitted)."""
        attrs: dict[str, Any] = {
            "matched_tokens": self.matched_tokens,
            "matched_blocks": self.matched_blocks,
            "missed_tokens": self.missed_tokens,
            "swapped_in_blocks": self.swapped_in_blocks,
            "swapped_in_bytes": self.swapped_in_bytes,
        }
        if self.source_tier is not None:
            attrs["source_tier"] = self.source_tier
        return attrs


class PrefixCacheManager:
    """Block allocator + prefix cache over a ``KVPool`` (``self.pool``; pass it to the model).

    Every GPU block is in exactly one state: free, referenced by >=1 request, or cached
    (published hash, refcount 0, in an LRU and evictable).  CPU blocks are free or hold one
    swapped-out hash (LRU).  A hash lives in at most one tier.
    """

    def __init__(self, cfg: ModelConfig, gpu_blocks: int, cpu_blocks: int) -> None:
        self.cfg = cfg
        self.pool = KVPool(cfg, gpu_blocks, cpu_blocks)
        self._lock = threading.RLock()
        self._free_gpu: deque[int] = deque(range(gpu_blocks))
        self._ref: list[int] = [0] * gpu_blocks
        self._gpu_hash: list[int | None] = [None] * gpu_blocks  # published hash per block
        self._hash_to_gpu: dict[int, int] = {}
        self._gpu_lru: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; oldest first
        self._free_cpu: deque[int] = deque(range(cpu_blocks))
        self._cpu_lru: OrderedDict[int, int] = OrderedDict()  # hash -> cpu block; oldest first
        self._req_blocks: dict[str, list[int]] = {}
        self._pending: dict[str, list[tuple[int, int]]] = {}  # (block, hash) not yet published
        self._counts: Counter[str] = Counter()

    # ------------------------------------------------------------------ internals (lock held)
    def _publish(self, block: int, h: int) -> None:
        """Make a computed block matchable; a duplicate of an already-published hash stays private."""
        if h in self._hash_to_gpu:
            return
        self._hash_to_gpu[h] = block
        self._gpu_hash[block] = h
        stale = self._cpu_lru.pop(h, None)  # keep a hash in one tier only
        if stale is not None:
            self._free_cpu.append(stale)

    def _take_gpu_block(self) -> int:
        """A free GPU block, evicting (swapping out) the LRU cached block if none is free."""
        if self._free_gpu:
            return self._free_gpu.popleft()
        if not self._gpu_lru:
            raise NoFreeBlocks("no free or evictable GPU block")
        block, _ = self._gpu_lru.popitem(last=False)
        h = self._gpu_hash[block]
        assert h is not None
        del self._hash_to_gpu[h]
        self._gpu_hash[block] = None
        self._counts["evictions"] += 1
        if self._free_cpu:
            cpu_block: int | None = self._free_cpu.popleft()
        elif self._cpu_lru:
            _, cpu_block = self._cpu_lru.popitem(last=False)
            self._counts["cpu_drops"] += 1
        else:  # no CPU tier at all: the block is simply forgotten
            cpu_block = None
            self._counts["dropped"] += 1
        if cpu_block is not None:
            self.pool.swap_out(block, cpu_block)
            self._cpu_lru[h] = cpu_block
            self._counts["swap_outs"] += 1
        return block

    # ------------------------------------------------------------------ public API
    def allocate_prompt(self, request_id: str, tokens: Sequence[int]) -> CacheDecision:
        """Match the prompt's full blocks against both tiers, swap CPU hits in, and allocate
        fresh blocks for the rest.  At least the last token is always left to compute."""
        bs = self.cfg.block_size
        n = len(tokens)
        if not 0 < n <= self.cfg.max_context:
            raise ValueError(f"prompt length {n} outside 1..{self.cfg.max_context}")
        hashes = block_hashes(tokens, bs)
        with self._lock:
            if request_id in self._req_blocks:
                raise ValueError(f"request {request_id!r} already holds blocks")
            plan: list[tuple[str, int]] = []  # ("gpu", block) or ("cpu", hash), in prefix order
            for h in hashes[: (n - 1) // bs]:
                if h in self._hash_to_gpu:
                    plan.append(("gpu", self._hash_to_gpu[h]))
                elif h in self._cpu_lru:
                    plan.append(("cpu", h))
                else:
                    break
            hit_blocks = [x for tier, x in plan if tier == "gpu"]
            total_blocks = -(-n // bs)
            need = total_blocks - len(hit_blocks)
            hit_set = set(hit_blocks)
            available = len(self._free_gpu) + sum(1 for b in self._gpu_lru if b not in hit_set)
            if need > available:  # checked before any mutation, so nothing to roll back
                raise NoFreeBlocks(f"request {request_id!r} needs {need} GPU blocks, {available} obtainable")

            for b in hit_blocks:  # pin hits first so eviction below cannot pick them
                self._ref[b] += 1
                self._gpu_lru.pop(b, None)
            reserved = {x: self._cpu_lru.pop(x) for tier, x in plan if tier == "cpu"}  # pin swap sources
            table: list[int] = []
            swapped_bytes = 0
            for tier, x in plan:
                if tier == "gpu":
                    table.append(x)
                    continue
                block = self._take_gpu_block()
                cpu_block = reserved[x]
                swapped_bytes += self.pool.swap_in(cpu_block, block)
                self._free_cpu.append(cpu_block)
                self._ref[block] = 1
                self._publish(block, x)  # its K/V are valid: they were computed before swap-out
                table.append(block)
            pending: list[tuple[int, int]] = []
            for i in range(len(plan), total_blocks):
                block = self._take_gpu_block()
                self._ref[block] = 1
                table.append(block)
                if i < len(hashes):
                    pending.append((block, hashes[i]))
            self._req_blocks[request_id] = table
            self._pending[request_id] = pending

            swapped = len(reserved)
            matched = len(plan) * bs
            self._counts["hits"] += len(hit_blocks)
            self._counts["swap_ins"] += swapped
            self._counts["misses"] += total_blocks - len(plan)
            self._counts["swapped_in_bytes"] += swapped_bytes
            decision = CacheDecision(
                request_id=request_id,
                matched_tokens=matched,
                matched_blocks=len(hit_blocks),
                swapped_in_blocks=swapped,
                swapped_in_bytes=swapped_bytes,
                missed_tokens=n - matched,
                source_tier=("cpu" if swapped else "gpu") if plan else None,
                block_table=list(table),
            )
            self._counts[decision.kind] += 1
            return decision

    def mark_computed(self, request_id: str) -> None:
        """Call after the request's prefill: its new full prompt blocks become matchable."""
        with self._lock:
            for block, h in self._pending.pop(request_id, []):
                self._publish(block, h)

    def append_slot(self, request_id: str, position: int) -> bool:
        """Ensure a block exists for token ``position`` (positions grow one at a time).
        False when no GPU block can be had: the scheduler should preempt someone."""
        with self._lock:
            blocks = self._req_blocks.get(request_id)
            if blocks is None:
                raise ValueError(f"unknown request {request_id!r}")
            if not 0 <= position < self.cfg.max_context:
                raise ValueError(f"position {position} outside 0..{self.cfg.max_context - 1}")
            idx = position // self.cfg.block_size
            if idx < len(blocks):
                return True
            if idx > len(blocks):
                raise ValueError(f"position {position} skips a block (request has {len(blocks)})")
            try:
                block = self._take_gpu_block()
            except NoFreeBlocks:
                return False
            self._ref[block] = 1
            blocks.append(block)
            return True

    def free(self, request_id: str) -> None:
        """Drop the request's references (idempotent).  Published blocks stay cached in the GPU
        tier (LRU, tail blocks first so a prefix's head survives longest); others become free."""
        with self._lock:
            blocks = self._req_blocks.pop(request_id, None)
            self._pending.pop(request_id, None)
            if blocks is None:
                return
            for block in reversed(blocks):
                self._ref[block] -= 1
                if self._ref[block] == 0:
                    if self._gpu_hash[block] is not None:
                        self._gpu_lru[block] = None
                    else:
                        self._free_gpu.append(block)

    def block_table(self, request_id: str) -> list[int]:
        """Current block table of a request (grows with append_slot) - pass this to decode."""
        with self._lock:
            blocks = self._req_blocks.get(request_id)
            if blocks is None:
                raise ValueError(f"unknown request {request_id!r}")
            return list(blocks)

    def refcount(self, gpu_block: int) -> int:
        with self._lock:
            return self._ref[gpu_block]

    def gpu_block_of_hash(self, h: int) -> int | None:
        """GPU block holding a published hash, if any (inspection/tests)."""
        with self._lock:
            return self._hash_to_gpu.get(h)

    def cpu_block_of_hash(self, h: int) -> int | None:
        """CPU block holding a swapped-out hash, if any (inspection/tests)."""
        with self._lock:
            return self._cpu_lru.get(h)

    def obtainable_gpu_blocks(self) -> int:
        """Free plus evictable GPU blocks: an upper bound for admission decisions."""
        with self._lock:
            return len(self._free_gpu) + len(self._gpu_lru)

    def stats(self) -> dict[str, int]:
        """Counters (hits/misses/swap_ins/swap_outs/evictions count blocks) and tier occupancy."""
        with self._lock:
            out = {k: int(self._counts[k]) for k in (
                "hits", "misses", "swap_ins", "swap_outs", "evictions", "cpu_drops", "dropped",
                "swapped_in_bytes", "CACHE_HIT", "CACHE_MISS", "CACHE_SWAP_IN")}
            out.update(
                free_gpu_blocks=len(self._free_gpu),
                cached_gpu_blocks=len(self._gpu_lru),
                used_gpu_blocks=sum(1 for r in self._ref if r > 0),
                free_cpu_blocks=len(self._free_cpu),
                cached_cpu_blocks=len(self._cpu_lru),
                gpu_blocks=self.pool.num_gpu_blocks,
                cpu_blocks=self.pool.num_cpu_blocks,
                running_requests=len(self._req_blocks),
            )
            return out

    def check_invariants(self) -> None:
        """Assert the block bookkeeping is consistent (cheap; used by tests)."""
        with self._lock:
            free, cached = set(self._free_gpu), set(self._gpu_lru)
            used = {b for b, r in enumerate(self._ref) if r > 0}
            assert len(free) == len(self._free_gpu), "duplicate free GPU block"
            assert not (free & cached or free & used or cached & used), "GPU block in two states"
            assert len(free | cached | used) == self.pool.num_gpu_blocks, "GPU block leaked"
            assert all(r >= 0 for r in self._ref)
            for h, b in self._hash_to_gpu.items():
                assert self._gpu_hash[b] == h and h not in self._cpu_lru
            assert all(self._gpu_hash[b] is not None for b in cached)
            cpu_used = set(self._cpu_lru.values())
            assert not (cpu_used & set(self._free_cpu))
            assert len(cpu_used) + len(self._free_cpu) == self.pool.num_cpu_blocks, "CPU block leaked"
            counts: Counter[int] = Counter(b for blocks in self._req_blocks.values() for b in blocks)
            assert all(self._ref[b] == c for b, c in counts.items()) and sum(counts.values()) == sum(self._ref)
