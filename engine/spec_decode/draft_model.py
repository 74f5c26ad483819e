"""Draft-model proposals (vLLM's ``method: draft_model``): a small model sharing the target's
vocabulary drafts ``k`` tokens greedily, in ``k`` batched forward passes.

The draft keeps its own KV pool, block tables and, per target request, a shadow ``Request`` whose
``num_computed_tokens`` catches up to the target's tokens each step, by the scheduler's one rule:
the first proposal computes the whole prompt, later ones only the tokens the target accepted
since (the draft's KV of drafts the target kept is still right: same tokens, same positions;
what the target rejected is rolled back and its blocks trimmed, as on the target). Its pool has
no prefix cache, so prompts imported from a prefill pod or served from the target's prefix cache
need nothing from anyone: the draft computes what it lacks. Shadows of requests that are no
longer running are freed at the next proposal (a preempted request starts its shadow again).

Drafts are greedy (the draft's argmax), so each draft is one token and the engine's acceptance
rule stays exact rejection sampling for any target temperature. Draft passes are not counted
against the step's token budget (the draft is assumed to be much smaller than the target).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from splitserve.engine.kv_cache_manager import KVCacheManager
from splitserve.engine.model_runner import ModelRunner
from splitserve.engine.request import Request
from splitserve.engine.scheduler import ScheduledRequest, SchedulerOutput
from splitserve.protocol.sampling import SamplingParams

log = logging.getLogger(__name__)
_SHADOW_PARAMS = SamplingParams(temperature=0.0, max_tokens=None)


class DraftModelProposer:
    def __init__(
        self,
        model_path: str,
        target_config,
        backend,
        num_blocks: int,
        vocab_size: int,
        max_num_seqs: int,
    ) -> None:
        """Load the draft like the target (``target_config``: its dtype and device) with a pool
        of ``num_blocks`` blocks of the target's block size (as many tokens as the target's)."""
        from dataclasses import replace

        from splitserve.engine.engine_core import load_model
        from splitserve.engine.kv_memory import allocate_host_kv

        config = replace(target_config, model=model_path, revision=None, speculative=None)
        _, _, _, self.model = load_model(config)
        arch = self.model.arch
        if arch.vocab_size != vocab_size:
            raise ValueError(
                f"speculative_config.model has a vocabulary of {arch.vocab_size} tokens, the "
                f"target {vocab_size}: a draft model must share the target's tokenizer"
            )
        bs = config.cache.block_size
        shape = (num_blocks, arch.num_layers, 2, bs, arch.num_kv_heads, arch.head_dim)
        dtype = config.torch_dtype
        if torch.device(config.device).type == "cpu":
            self.kv_cache = allocate_host_kv(shape, dtype)
            if dtype != torch.float32:  # oneDNN's per-shape state, made now (llama.py)
                self.model.bucket_rows = True
                self.model.warm_up(config.scheduler.max_num_batched_tokens, max_num_seqs)
        else:
            self.kv_cache = torch.zeros(shape, dtype=dtype, device=config.device)
        self.kv = KVCacheManager(num_blocks, bs, enable_prefix_caching=False)
        self.runner = ModelRunner(self.model, self.kv_cache, backend, bs)
        self.shadows: dict[str, Request] = {}
        self._targets: dict[str, Request] = {}  # request id -> the target request it shadows
        self._synced: dict[str, int] = {}  # request id -> its token count at the last sync
        log.info("draft model %s: %d layers, %d KV blocks", model_path, arch.num_layers, num_blocks)

    def propose(self, requests: Sequence[Request], limits: Sequence[int]) -> list[list[int]]:
        """Up to ``limits[i]`` greedy draft tokens after request i's tokens."""
        live = {r.request_id for r in requests}
        for rid in [rid for rid in self.shadows if rid not in live]:
            self._drop(rid)
        drafts: dict[str, list[int]] = {r.request_id: [] for r in requests}
        targets = {r.request_id: r for r in requests}
        alive = [(self._sync(r), k) for r, k in zip(requests, limits, strict=True) if k > 0]
        while alive:
            items = []
            for shadow, k in alive:
                num_new = shadow.num_tokens - shadow.num_computed_tokens
                if self.kv.allocate(shadow, num_new):
                    items.append((ScheduledRequest(shadow, num_new), k))
            if not items:
                break
            sched = SchedulerOutput([item for item, _ in items])
            tables = {s.request.request_id: self.kv.block_ids(s.request.request_id)
                      for s in sched.scheduled}  # fmt: skip
            result = self.runner.execute(sched, tables)
            ids = [s.request.request_id for s in result.sampled]
            chosen = self._greedy(result.logits, [targets[rid] for rid in ids])
            by_id = dict(zip(ids, chosen, strict=True))
            alive = []
            for item, k in items:
                shadow = item.request
                shadow.num_computed_tokens += item.num_new_tokens
                token = by_id[shadow.request_id]
                shadow.all_token_ids.append(token)
                drafts[shadow.request_id].append(token)
                if len(drafts[shadow.request_id]) < k:
                    alive.append((shadow, k))
        return [drafts[r.request_id] for r in requests]

    @staticmethod
    def _greedy(logits: torch.Tensor, targets: Sequence[Request]) -> list[int]:
        """The draft's argmax per row, within the request's ``allowed_token_ids`` where it
        has them (a draft the target could never sample is a wasted row)."""
        tokens = logits.argmax(dim=-1)
        for i, req in enumerate(targets):
            allowed = req.params.allowed_token_ids
            if allowed:
                ids = torch.tensor(allowed, device=logits.device)
                tokens[i] = ids[logits[i, ids].argmax()]
        return tokens.tolist()

    def _sync(self, req: Request) -> Request:
        """The request's shadow, holding its tokens, its KV valid up to what still agrees."""
        shadow = self.shadows.get(req.request_id)
        if shadow is not None and self._targets[req.request_id] is not req:  # an id reused
            self._drop(req.request_id)
            shadow = None
        if shadow is None:
            shadow = Request(req.request_id, req.prompt_token_ids, _SHADOW_PARAMS,
                             self.kv.block_size)  # fmt: skip
            self.shadows[req.request_id] = shadow
            self._targets[req.request_id] = req
        old, new = shadow.all_token_ids, req.all_token_ids
        # Tokens up to the last sync are the target's own (they only grow): compare after them.
        same = min(self._synced.get(req.request_id, 0), shadow.num_computed_tokens)
        limit = min(len(old), len(new), shadow.num_computed_tokens)
        while same < limit and old[same] == new[same]:
            same += 1
        shadow.all_token_ids = list(new)
        # At least the last token runs (its logits are the first draft's), even when the draft
        # has every token already (the target was not scheduled since the last proposal).
        shadow.num_computed_tokens = min(same, len(new) - 1)
        self._synced[req.request_id] = len(new)
        self.kv.trim(shadow)
        return shadow

    def _drop(self, request_id: str) -> None:
        self.kv.free(self.shadows.pop(request_id))
        self._targets.pop(request_id)
        self._synced.pop(request_id, None)

    def check_integrity(self) -> None:
        """The draft pool's books: every block in use belongs to a live shadow."""
        self.kv.check_integrity()
        assert set(self.kv.tables) <= set(self.shadows)
