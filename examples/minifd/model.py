"""A tiny decoder-only Paddle transformer that reads and writes a paged KV cache.

The weights are random but deterministic (seeded, generated on the host with numpy, so the
same config gives the same weights on CPU and GPU); nothing is downloaded.  The point is real
work with the memory layout of a serving engine: prompt prefill that skips cached prefix
tokens, and batched decode whose K/V live in fixed-size blocks addressed by a block table.
Everything runs on ``paddle.get_device()``; no place is hard-coded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from .tokenizer import VOCAB_SIZE

if TYPE_CHECKING:  # pragma: no cover - import only for annotations (avoids a cycle)
    from .kv_cache import KVPool

def host_tensor(arr: np.ndarray) -> paddle.Tensor:
    """A tensor on the default device from a host array, without ``paddle.to_tensor``: in Paddle 3.x
    each ``to_tensor`` call keeps ~100 bytes that are never freed (the engine's per-request leak, found
    with tracemalloc); ``paddle.assign`` copies the same data and keeps nothing."""
    return paddle.assign(np.ascontiguousarray(arr))


#: One decode-batch entry: (token fed this step, its position, the request's block table).
DecodeItem = tuple[int, int, Sequence[int]]


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of the model and of its KV cache blocks (shared by model and cache manager)."""

    vocab_size: int = VOCAB_SIZE
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    max_context: int = 256
    block_size: int = 16
    seed: int = 1234
    mlp_ratio: int = 4
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.dim % self.n_heads != 0 or (self.dim // self.n_heads) % 2 != 0:
            raise ValueError("dim must split into n_heads heads of even size (rotary needs pairs)")
        if self.block_size <= 0 or self.max_context <= 0:
            raise ValueError("block_size and max_context must be positive")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class RMSNorm(nn.Layer):
    """RMSNorm: cheaper than LayerNorm and what current decoder LLMs use."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = self.create_parameter([dim], default_initializer=nn.initializer.Constant(1.0))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return x * paddle.rsqrt(paddle.mean(x * x, axis=-1, keepdim=True) + self.eps) * self.weight


class DecoderBlock(nn.Layer):
    """Pre-norm attention + MLP block; attention itself is done by TinyTransformer because
    where K/V come from (cache blocks or the sequence itself) depends on the call."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias_attr=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias_attr=False)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.w_up = nn.Linear(cfg.dim, cfg.mlp_ratio * cfg.dim, bias_attr=False)
        self.w_down = nn.Linear(cfg.mlp_ratio * cfg.dim, cfg.dim, bias_attr=False)

    def mlp(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.w_down(F.gelu(self.w_up(self.mlp_norm(x))))


# attend(layer_index, q, k, v) -> attention output [N, dim]; q/k/v are [N, H, head_dim].
_AttendFn = Callable[[int, paddle.Tensor, paddle.Tensor, paddle.Tensor], paddle.Tensor]


class TinyTransformer(nn.Layer):
    """Decoder-only transformer with rotary positions over a paged KV cache.

    ``prefill`` and ``decode`` are the serving paths (they use a ``KVPool``);
    ``forward_full`` is the cache-free reference used to prove them right.
    """

    def __init__(self, cfg: ModelConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or ModelConfig()
        paddle.seed(cfg.seed)  # any paddle-side randomness is reproducible too
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.LayerList([DecoderBlock(cfg) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias_attr=False)
        self._init_weights(cfg.seed)
        inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
        angles = np.outer(np.arange(cfg.max_context), inv_freq)  # [max_context, head_dim/2]
        self.register_buffer("rope_cos", host_tensor(np.cos(angles).astype("float32")), persistable=False)
        self.register_buffer("rope_sin", host_tensor(np.sin(angles).astype("float32")), persistable=False)
        self.eval()

    @paddle.no_grad()
    def _init_weights(self, seed: int) -> None:
        """Fill weights from a host numpy RNG so they are identical on every device
        (paddle's CPU and GPU generators give different streams for the same seed)."""
        rng = np.random.default_rng(seed)
        for name, p in self.named_parameters():
            shape = list(p.shape)
            if len(shape) == 1:  # norm gains
                arr = np.ones(shape)
            elif name.startswith("embed"):
                arr = rng.normal(0.0, 1.0, shape)
            else:  # Linear weight [in, out]: unit-variance outputs keep logits well spread
                arr = rng.normal(0.0, 1.0 / math.sqrt(shape[0]), shape)
            p.set_value(arr.astype("float32"))

    @property
    def device(self) -> str:
        """Device string the parameters were created on (``paddle.get_device()`` at build)."""
        return str(self.embed.weight.place)

    # ------------------------------------------------------------------ shared pieces
    def _rope(self, x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor) -> paddle.Tensor:
        """Rotate-half rotary embedding; x [N, H, hd], cos/sin [N, 1, hd/2]."""
        half = self.cfg.head_dim // 2
        x1, x2 = x[..., :half], x[..., half:]
        return paddle.concat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)

    def _run(self, tokens: Sequence[int], positions: Sequence[int], attend: _AttendFn) -> paddle.Tensor:
        """Run all layers over N tokens at the given positions; returns final hidden [N, dim]."""
        cfg = self.cfg
        n = len(tokens)
        pos_t = host_tensor(np.asarray(positions, dtype="int64"))
        cos = paddle.index_select(self.rope_cos, pos_t).unsqueeze(1)
        sin = paddle.index_select(self.rope_sin, pos_t).unsqueeze(1)
        x = self.embed(host_tensor(np.asarray(tokens, dtype="int64")))
        for i, blk in enumerate(self.layers):
            qkv = blk.wqkv(blk.attn_norm(x)).reshape([n, 3, cfg.n_heads, cfg.head_dim])
            q = self._rope(qkv[:, 0], cos, sin)
            k = self._rope(qkv[:, 1], cos, sin)
            x = x + blk.wo(attend(i, q, k, qkv[:, 2]))
            x = x + blk.mlp(x)
        return self.norm(x)

    def _attention(self, q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor, mask: paddle.Tensor) -> paddle.Tensor:
        """Masked softmax attention. q [B,H,n,hd], k/v [B,H,S,hd], mask [B,1,n,S] (True = may attend)."""
        scores = paddle.matmul(q, k, transpose_y=True) * (1.0 / math.sqrt(self.cfg.head_dim))
        scores = paddle.where(mask, scores, paddle.full_like(scores, -1e30))
        return paddle.matmul(F.softmax(scores, axis=-1), v)  # [B, H, n, hd]

    def _write_kv(self, kv: "KVPool", layer: int, k: paddle.Tensor, v: paddle.Tensor,
                  blocks: np.ndarray, offsets: np.ndarray) -> None:
        """Scatter N tokens' K/V ([N, H, hd]) into their cache slots with one in-place op each."""
        h = self.cfg.n_heads
        n = len(blocks)
        idx = (
            paddle.full([n * h], layer, dtype="int64"),
            host_tensor(np.repeat(blocks, h)),
            host_tensor(np.tile(np.arange(h, dtype="int64"), n)),
            host_tensor(np.repeat(offsets, h)),
        )
        paddle.index_put_(kv.k, idx, k.reshape([n * h, -1]))
        paddle.index_put_(kv.v, idx, v.reshape([n * h, -1]))

    def _gather_blocks(self, pool: paddle.Tensor, layer: int, block_ids: np.ndarray) -> paddle.Tensor:
        """Blocks [B, nb] of one layer -> contiguous [B, H, nb*block_size, hd]."""
        b, nb = block_ids.shape
        index = np.stack([np.full(b * nb, layer, dtype="int64"), block_ids.reshape(-1)], axis=1)
        g = paddle.gather_nd(pool, host_tensor(index))  # [B*nb, H, bs, hd]
        g = g.reshape([b, nb, self.cfg.n_heads, self.cfg.block_size, self.cfg.head_dim])
        return g.transpose([0, 2, 1, 3, 4]).reshape([b, self.cfg.n_heads, nb * self.cfg.block_size, -1])

    def _check_len(self, n: int) -> None:
        if not 0 < n <= self.cfg.max_context:
            raise ValueError(f"sequence length {n} outside 1..max_context={self.cfg.max_context}")

    # ------------------------------------------------------------------ public paths
    @paddle.no_grad()
    def forward_full(self, tokens: Sequence[int]) -> paddle.Tensor:
        """Cache-free causal forward over the whole sequence -> logits [T, vocab] (reference)."""
        t = len(tokens)
        self._check_len(t)
        causal = host_tensor(np.tril(np.ones((t, t), dtype=bool))[None, None])

        def attend(_: int, q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor) -> paddle.Tensor:
            out = self._attention(*(x.transpose([1, 0, 2]).unsqueeze(0) for x in (q, k, v)), causal)
            return out[0].transpose([1, 0, 2]).reshape([t, self.cfg.dim])

        return self.lm_head(self._run(tokens, range(t), attend))

    def forward(self, tokens: Sequence[int]) -> paddle.Tensor:  # nn.Layer protocol
        return self.forward_full(tokens)

    @paddle.no_grad()
    def prefill(self, tokens: Sequence[int], block_table: Sequence[int], num_cached: int,
                kv: "KVPool") -> paddle.Tensor:
        """Compute only ``tokens[num_cached:]``; K/V of the first ``num_cached`` tokens are read
        from the cached blocks, the new K/V are written into ``block_table``'s blocks.
        Returns the logits of the last position, shape [vocab]."""
        cfg = self.cfg
        total = len(tokens)
        self._check_len(total)
        if not 0 <= num_cached < total:
            raise ValueError(f"num_cached={num_cached} must be in [0, {total}) - the last token is always computed")
        nb = -(-total // cfg.block_size)
        if len(block_table) < nb:
            raise ValueError(f"block_table has {len(block_table)} blocks, {total} tokens need {nb}")
        table = np.asarray(block_table[:nb], dtype="int64")
        pos = np.arange(num_cached, total, dtype="int64")
        blocks, offsets = table[pos // cfg.block_size], pos % cfg.block_size
        visible = np.arange(nb * cfg.block_size)[None, :] <= pos[:, None]  # [n, S]
        mask = host_tensor(visible[None, None])  # [1, 1, n, S]
        n = len(pos)

        def attend(layer: int, q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor) -> paddle.Tensor:
            self._write_kv(kv, layer, k, v, blocks, offsets)
            kc = self._gather_blocks(kv.k, layer, table[None])
            vc = self._gather_blocks(kv.v, layer, table[None])
            out = self._attention(q.transpose([1, 0, 2]).unsqueeze(0), kc, vc, mask)
            return out[0].transpose([1, 0, 2]).reshape([n, cfg.dim])

        hidden = self._run(tokens[num_cached:], pos, attend)
        return self.lm_head(hidden[-1])

    @paddle.no_grad()
    def decode(self, batch: Sequence[DecodeItem], kv: "KVPool") -> paddle.Tensor:
        """One decode step for a batch of (last_token, position, block_table): writes each
        token's K/V at ``position`` and attends over positions 0..position.
        Returns next-token logits [B, vocab] in batch order."""
        cfg = self.cfg
        if not batch:
            raise ValueError("empty decode batch")
        toks = [int(t) for t, _, _ in batch]
        pos = np.asarray([p for _, p, _ in batch], dtype="int64")
        if pos.min() < 0 or pos.max() >= cfg.max_context:
            raise ValueError(f"decode positions must be in [0, {cfg.max_context})")
        nbs = pos // cfg.block_size + 1
        max_nb = int(nbs.max())
        table = np.zeros((len(batch), max_nb), dtype="int64")
        for r, (_, p, bt) in enumerate(batch):
            if len(bt) < nbs[r]:
                raise ValueError(f"block_table of batch row {r} has no block for position {p}")
            table[r, : nbs[r]] = bt[: nbs[r]]
            table[r, nbs[r]:] = bt[0]  # padding; masked out below
        blocks = table[np.arange(len(batch)), pos // cfg.block_size]
        offsets = pos % cfg.block_size
        visible = np.arange(max_nb * cfg.block_size)[None, :] <= pos[:, None]  # [B, S]
        mask = host_tensor(visible[:, None, None, :])  # [B, 1, 1, S]
        b = len(batch)

        def attend(layer: int, q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor) -> paddle.Tensor:
            self._write_kv(kv, layer, k, v, blocks, offsets)
            kc = self._gather_blocks(kv.k, layer, table)
            vc = self._gather_blocks(kv.v, layer, table)
            out = self._attention(q.unsqueeze(2), kc, vc, mask)  # [B, H, 1, hd]
            return out.reshape([b, cfg.dim])

        return self.lm_head(self._run(toks, pos, attend))


def sample(logits: paddle.Tensor | np.ndarray, temperature: float, top_p: float = 1.0,
           generator_seed: int | np.random.Generator | None = None) -> int:
    """Pick the next token from one row of logits.

    ``temperature == 0`` is greedy (argmax).  Otherwise softmax(logits / T) restricted to the
    smallest nucleus with mass >= top_p.  ``generator_seed`` is an int (reproducible single
    draw), a ``numpy.random.Generator`` (keep one per request so successive steps differ but
    the whole request is reproducible), or None (fresh entropy).  Sampling is done on the host:
    one [vocab] row is tiny, and numpy makes the result device-independent.
    """
    if temperature < 0:
        raise ValueError("temperature must be >= 0")
    if not 0.0 < top_p <= 1.0:
        raise ValueError("top_p must be in (0, 1]")
    arr = logits.numpy() if isinstance(logits, paddle.Tensor) else np.asarray(logits)
    arr = arr.reshape(-1).astype(np.float64)
    if temperature == 0:
        return int(arr.argmax())
    z = arr / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        sorted_p = probs[order]
        keep = (np.cumsum(sorted_p) - sorted_p) < top_p  # mass before this token < top_p
        keep[0] = True
        nucleus = np.zeros_like(probs)
        nucleus[order[keep]] = sorted_p[keep]
        probs = nucleus / nucleus.sum()
    rng = generator_seed if isinstance(generator_seed, np.random.Generator) else np.random.default_rng(generator_seed)
    return int(rng.choice(len(probs), p=probs))
