"""The CPU fast path: paged attention with torch ops.

Per step (once): gather indices and masks. Per layer: one scatter of the new K/V into the pool,
then

- decodes (one query per sequence), sorted by context length and cut into a few length buckets
  (so short sequences are not padded to the longest: this halved decode attention at batch 64),
  each bucket all at once: one ``index_select`` copies every sequence's
  blocks out of the pool as ``[B, K, H_kv * D]`` (whole blocks are contiguous, so this is a
  memcpy), and the queries become a block-diagonal ``[B, H_q, H_kv * D]`` matrix so that ONE
  batched matmul scores every head against every key, and one more produces the output. The
  extra multiply-adds on the off-diagonal blocks (x H_kv) cost far less than the copies a
  per-head layout needs: 2.9 ms vs 8.5 ms per layer for 64 sequences of 544 tokens (measured,
  bench/attn_micro.py). Models with many KV heads use per-head matmuls instead. Scores come out
  of the bf16 matmul rounded to bf16 (as in HF's eager attention); against an fp32 run this
  deviates no more than SDPA's fp32-internal path does (mean |d logprob| 0.02-0.03 for both over
  4 x 48 greedy tokens of SmolLM2, measured).
- prefills: one fused SDPA call per prompt in the step (a handful, each a large kernel):
  padding them to the longest one costs ~2.5x more (measured) for typical length mixes. A prompt
  with no cached context attends to its own new K/V (causal); one with context (chunked prefill,
  prefix-cache hit) gathers its blocks and uses a bottom-right causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from splitserve.engine.attention.base import k_cache_view, v_cache_view
from splitserve.engine.attention.metadata import AttentionMetadata
from splitserve.kernels.cpu import fused

_BLOCK_DIAGONAL_MAX_KV_HEADS = 8


class TorchAttentionBackend:
    name = "torch"

    def prepare(self, kv_cache: torch.Tensor, meta: AttentionMetadata) -> _TorchAttentionStep:
        return _TorchAttentionStep(kv_cache, meta)


class CpuAttentionBackend:
    """The C++ kernels of ``splitserve.kernels.cpu`` on the torch path's skeleton: decodes read
    K/V blocks in place (no gather copy, no length buckets); prefills (bf16 on AVX512-BF16 CPUs)
    run one tiled flash-attention call for all prompts of the step, context included. Shapes the
    kernels do not take fall back to the torch path (SDPA for prompts)."""

    name = "cpu"

    def __init__(self) -> None:
        from splitserve.kernels import cpu

        if not cpu.available():
            raise RuntimeError("the C++ CPU kernels could not be built (see the log)")
        self._cpu = cpu

    def prepare(self, kv_cache: torch.Tensor, meta: AttentionMetadata) -> _TorchAttentionStep:
        if kv_cache.device.type != "cpu" or kv_cache.dtype not in (torch.float32, torch.bfloat16):
            return _TorchAttentionStep(kv_cache, meta)
        return _TorchAttentionStep(kv_cache, meta, self._cpu, self._layer_views(kv_cache))

    def _layer_views(self, kv_cache: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's (K, V) cache views, made once per pool rather than per layer per step
        (four indexing ops a layer, at batch 1 a visible share of the step)."""
        cached = getattr(self, "_views", None)
        if cached is None or cached[0] is not kv_cache:
            views = [(k_cache_view(kv_cache, i), v_cache_view(kv_cache, i)) for i in
                     range(kv_cache.shape[1])]  # fmt: skip
            self._views = cached = (kv_cache, views)
        return cached[1]


# A new decode bucket starts when a sequence needs this many times the blocks of the bucket's
# shortest one (and the bucket has enough rows to be worth its own matmuls).
_BUCKET_GROWTH = 1.5
_BUCKET_MIN_ROWS = 4


@dataclass(frozen=True)
class _DecodeBucket:
    """Decode rows [start, end) padded to the longest of them, not to the batch's longest."""

    start: int
    end: int
    flat_blocks: torch.Tensor  # [(end - start) * nb] block ids
    num_keys: int  # nb * block_size
    pad: torch.Tensor  # [end - start, 1, num_keys]: True past each sequence's end
    bias: torch.Tensor  # the same as an additive mask in the model dtype (0 or -inf)


@dataclass(frozen=True)
class _Prefill:
    start: int  # offset of its tokens in the prefill group
    end: int
    seq_len: int
    blocks: torch.Tensor | None  # block ids to gather (None: no cached context)
    mask: torch.Tensor | None  # [q, seq_len] bottom-right causal (None: plain causal)


class _TorchAttentionStep:
    def __init__(
        self,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        kernels=None,
        views: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        """``kernels``: the ``splitserve.kernels.cpu`` module, or None for pure torch;
        ``views``: each layer's (K, V) cache views, if the backend keeps them."""
        self.kv_cache = kv_cache
        self.kernels = kernels
        self.views = views
        # Whether the prefill kernel takes this model's shapes: known at the first call (the
        # query head count comes with q); None until then.
        self.prefill_kernel: bool | None = None if kernels is not None else False
        self.meta = meta
        bs = meta.block_size
        device = kv_cache.device
        self.write_block = torch.div(meta.slot_mapping, bs, rounding_mode="floor")
        self.write_offset = meta.slot_mapping % bs
        _, _, _, _, hkv, d = kv_cache.shape

        self.nd = meta.num_decode_tokens
        self.buckets: list[_DecodeBucket] = []
        if self.nd and kernels is None:
            self._bucket_decodes(meta, device)
            self.block_diagonal = hkv <= _BLOCK_DIAGONAL_MAX_KV_HEADS
            if self.block_diagonal:
                self.eye = torch.eye(hkv, dtype=kv_cache.dtype, device=device)

        self.np = meta.num_prefill_tokens
        self.prefills: list[_Prefill] = []
        if self.np and kernels is None:
            self._plan_prefills(meta, device)

    def _plan_prefills(self, meta: AttentionMetadata, device: torch.device) -> None:
        """One SDPA call per prompt: its slice of the new tokens and, with context, the blocks
        to gather and a bottom-right causal mask."""
        bs = meta.block_size
        qsl = meta.prefill_query_start_loc.tolist()
        seq_lens = meta.prefill_seq_lens.tolist()
        tables = meta.prefill_block_tables
        for i, seq_len in enumerate(seq_lens):
            start, end = qsl[i], qsl[i + 1]
            q_len = end - start
            ctx = seq_len - q_len
            if ctx == 0:
                self.prefills.append(_Prefill(start, end, seq_len, None, None))
                continue
            nb = -(-seq_len // bs)
            rows = torch.arange(q_len, device=device)[:, None]
            cols = torch.arange(seq_len, device=device)[None, :]
            mask = cols <= rows + ctx
            self.prefills.append(_Prefill(start, end, seq_len, tables[i, :nb].long(), mask))

    def _bucket_decodes(self, meta: AttentionMetadata, device: torch.device) -> None:
        """Split the decode rows (sorted by length by the runner) into a few buckets, so short
        contexts are not padded to the longest one: gathers and matmuls scale with the padded
        length, and mixed batches otherwise waste up to ~2x of both."""
        bs = meta.block_size
        seq_lens = meta.decode_seq_lens
        nbs = [max(-(-n // bs), 1) for n in seq_lens.tolist()]
        start = 0
        for i in range(1, self.nd + 1):
            if i < self.nd and not (
                nbs[i] > _BUCKET_GROWTH * nbs[start] and i - start >= _BUCKET_MIN_ROWS
            ):
                continue
            nb = max(nbs[start:i])
            keys = torch.arange(nb * bs, device=device)
            pad = (keys[None, :] >= seq_lens[start:i, None]).unsqueeze(1)
            bias = torch.zeros(pad.shape, dtype=self.kv_cache.dtype, device=device)
            self.buckets.append(
                _DecodeBucket(
                    start,
                    i,
                    meta.decode_block_tables[start:i, :nb].reshape(-1).long(),
                    nb * bs,
                    pad,
                    bias.masked_fill_(pad, float("-inf")),
                )
            )
            start = i

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        if self.views is not None:
            k_cache, v_cache = self.views[layer]
        else:
            k_cache = k_cache_view(self.kv_cache, layer)
            v_cache = v_cache_view(self.kv_cache, layer)
        if self.kernels is not None:  # one C++ op: two row copies per token
            fused.write_kv(k, v, k_cache, v_cache, self.meta.slot_mapping)
        else:
            k_cache[self.write_block, self.write_offset] = k
            v_cache[self.write_block, self.write_offset] = v
        meta, nd, scale = self.meta, self.nd, q.shape[-1] ** -0.5
        if self.kernels is not None and self.np and self.prefill_kernel is None:
            self.prefill_kernel = self.kernels.prefill_supported(
                q.dtype, q.shape[1], k.shape[1], q.shape[2]
            )
            if not self.prefill_kernel:  # SDPA per prompt instead
                self._plan_prefills(meta, self.kv_cache.device)
        decoded = prefilled = None
        if nd and self.kernels is not None:
            decoded = self.kernels.paged_decode_attention(
                q[:nd], k_cache, v_cache, meta.decode_block_tables, meta.decode_seq_lens, scale
            )
        if self.np and self.prefill_kernel:
            prefilled = self.kernels.paged_prefill_attention(
                q[nd:], k_cache, v_cache, meta.prefill_block_tables,
                meta.prefill_query_start_loc, meta.prefill_seq_lens, scale,
            )  # fmt: skip
        # A step of only decodes or only kernel prefills returns the kernel's tensor as is.
        if decoded is not None and not self.np:
            return decoded
        if prefilled is not None and not nd:
            return prefilled
        out = torch.empty_like(q)
        if decoded is not None:
            out[:nd] = decoded
        elif nd:
            decode = self._decode_block_diagonal if self.block_diagonal else self._decode_per_head
            for bucket in self.buckets:  # a few length buckets, not sequences
                rows = slice(bucket.start, bucket.end)
                out[rows] = decode(q[rows], k_cache, v_cache, bucket)
        if prefilled is not None:
            out[nd:] = prefilled
        else:
            for p in self.prefills:
                out[nd + p.start : nd + p.end] = self._prefill(
                    p, q[nd + p.start : nd + p.end], k[nd + p.start : nd + p.end],
                    v[nd + p.start : nd + p.end], k_cache, v_cache,
                )  # fmt: skip
        return out

    @staticmethod
    def _gather_decode(cache: torch.Tensor, bucket: _DecodeBucket) -> torch.Tensor:
        _, bs, h, d = cache.shape
        return torch.index_select(cache, 0, bucket.flat_blocks).view(
            bucket.end - bucket.start, bucket.num_keys, h * d
        )

    def _decode_block_diagonal(self, q, k_cache, v_cache, bucket: _DecodeBucket) -> torch.Tensor:
        b, hq, d = q.shape
        hkv = k_cache.shape[2]
        g = hq // hkv
        keys = self._gather_decode(k_cache, bucket)  # [B, K, Hkv*D]
        values = self._gather_decode(v_cache, bucket)
        # qbd[b, h*G + g, h*D + d] = q[b, h, g, d], zero elsewhere
        qbd = torch.einsum("bhgd,hk->bhgkd", q.view(b, hkv, g, d), self.eye).reshape(b, hq, hkv * d)
        # bias + scale * (q . k) in one op; -inf bias past each sequence's end
        scores = torch.baddbmm(
            bucket.bias.expand(b, hq, -1), qbd, keys.transpose(1, 2), alpha=d**-0.5
        )  # [B, Hq, K]
        probs = scores.softmax(-1, dtype=torch.float32).to(q.dtype)
        full = torch.bmm(probs, values).view(b, hkv, g, hkv, d)  # keep each head's own block
        return torch.diagonal(full, dim1=1, dim2=3).permute(0, 3, 1, 2).reshape(b, hq, d)

    def _decode_per_head(self, q, k_cache, v_cache, bucket: _DecodeBucket) -> torch.Tensor:
        b, hq, d = q.shape
        hkv = k_cache.shape[2]
        g = hq // hkv
        keys = self._gather_decode(k_cache, bucket).view(b, -1, hkv, d)
        values = self._gather_decode(v_cache, bucket).view(b, -1, hkv, d)
        qg = q.view(b, hkv, g, d)
        scores = q.new_empty(b, hkv, g, keys.shape[1])
        for h in range(hkv):
            torch.bmm(qg[:, h], keys[:, :, h].transpose(1, 2), out=scores[:, h])
        probs = scores.float().mul_(d**-0.5)
        probs = probs.masked_fill_(bucket.pad.unsqueeze(1), float("-inf")).softmax(-1)
        probs = probs.to(q.dtype)
        out = q.new_empty(b, hkv, g, d)
        for h in range(hkv):
            torch.bmm(probs[:, h], values[:, :, h], out=out[:, h])
        return out.view(b, hq, d)

    @staticmethod
    def _prefill(p: _Prefill, q, k, v, k_cache, v_cache) -> torch.Tensor:
        if p.blocks is None:  # the prompt attends only to itself: plain causal attention
            keys, values, mask, causal = k, v, None, True
        else:
            _, bs, h, d = k_cache.shape
            keys = torch.index_select(k_cache, 0, p.blocks).view(-1, h, d)[: p.seq_len]
            values = torch.index_select(v_cache, 0, p.blocks).view(-1, h, d)[: p.seq_len]
            mask, causal = p.mask, False
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            keys.transpose(0, 1).unsqueeze(0),
            values.transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            is_causal=causal,
            enable_gqa=True,
        )
        return out[0].transpose(0, 1)
