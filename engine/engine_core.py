"""The engine: one step = schedule -> execute -> sample -> update. Single-threaded by design.

``EngineCore`` owns the model, the KV pool, the scheduler and the sampler. Servers drive it from a
dedicated thread (see ``async_engine``); the offline ``LLM`` drives it in a loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from transformers import AutoConfig, AutoTokenizer

from splitserve.engine.attention import get_attention_backend, resolve_backend_name
from splitserve.engine.config import EngineConfig, ModelShape
from splitserve.engine.detokenizer import IncrementalDetokenizer
from splitserve.engine.histogram import HistogramSnapshot, StepHistogram, token_buckets
from splitserve.engine.kv_cache_manager import KVCacheManager
from splitserve.engine.kv_memory import allocate_host_kv
from splitserve.engine.lora import AdapterInfo, LoadedAdapter, LoRAManager, LoRARequest
from splitserve.engine.model.llama import LlamaArch, LlamaForCausalLM
from splitserve.engine.model.loader import iter_safetensors, resolve_model
from splitserve.engine.model.quant import apply_quantization
from splitserve.engine.model_runner import PROMPT_LOGPROB_ROWS, ModelRunner
from splitserve.engine.outputs import ImportReservation, RequestTiming, SequenceDelta
from splitserve.engine.request import Request, RequestStatus
from splitserve.engine.sampler import Sampler, SamplingRow, TokenLogprobs, skip_draw
from splitserve.engine.scheduler import Scheduler
from splitserve.engine.structured_output import StructuredOutputs
from splitserve.kernels import cpu as cpu_kernels
from splitserve.protocol.lora import with_adapter_key
from splitserve.protocol.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_blocks: int
    num_free_blocks: int
    prefix_cache_queries: int  # prompt tokens looked up
    prefix_cache_hits: int  # prompt tokens found
    num_preemptions: int
    num_held: int = 0  # requests whose blocks are held for a hand-off
    step_tokens: HistogramSnapshot | None = None  # tokens per step that ran (vLLM iteration)
    # bounded caches, by size: compiled grammars (count, bytes), prefix-cached KV blocks
    grammar_cache_entries: int = 0
    grammar_cache_bytes: int = 0
    prefix_cached_blocks: int = 0
    # LoRA (vLLM's lora_requests_info): adapters of running / waiting requests, slot count
    running_loras: tuple[str, ...] = ()
    waiting_loras: tuple[str, ...] = ()
    max_loras: int = 0


@dataclass(frozen=True)
class KVAudit:
    """The KV books: every block in use belongs to a request, a hold or an import reservation.

    ``unaccounted`` > 0 means blocks leaked (a bug): nothing will ever free them.
    """

    used_blocks: int
    accounted_blocks: int
    held_requests: int

    @property
    def unaccounted(self) -> int:
        return max(self.used_blocks - self.accounted_blocks, 0)


def load_model(config: EngineConfig):
    """Resolve, read and build the model; returns (model dir, hf config, tokenizer, model)."""
    model_dir = resolve_model(config.model, config.revision)
    hf_config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    arch = LlamaArch.from_hf_config(hf_config)
    with torch.device("meta"):
        model = LlamaForCausalLM(arch, hf_config)
    # Built on meta (no random init of 100M+ parameters), then materialised and filled.
    model = model.to_empty(device=config.device).to(config.torch_dtype)
    if config.quantization != "gguf":  # gguf: every weight comes from the GGUF file itself
        model.load_weights(iter_safetensors(model_dir))
    if config.quantization is not None:
        apply_quantization(model, config.quantization, config.model)
    if torch.device(config.device).type == "cpu" and cpu_kernels.available():
        model.use_cpu_kernels()  # per-layer elementwise steps as single C++ ops
    model.rotary.rebuild(config.device)  # fp32 tables; rows are cast to the model dtype per step
    return model_dir, hf_config, tokenizer, model.eval()


def eos_token_ids(hf_config, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(hf_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return frozenset(ids)


KVAllocator = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


class EngineCore:
    def __init__(self, config: EngineConfig, allocate_kv: KVAllocator | None = None) -> None:
        """``allocate_kv(shape, dtype)`` may supply the KV pool's memory (e.g. memory a transfer
        library registers); by default a CPU pool sits on transparent huge pages."""
        self.config = config
        self.model_dir, self.hf_config, self.tokenizer, self.model = load_model(config)
        arch = self.model.arch
        dtype = config.torch_dtype
        bs = config.cache.block_size
        bytes_per_block = arch.num_layers * 2 * bs * arch.num_kv_heads * arch.head_dim
        bytes_per_block *= torch.finfo(dtype).bits // 8
        num_blocks = config.cache.num_blocks or max(
            config.cache.kv_cache_memory_bytes // bytes_per_block, 1
        )
        max_len = config.max_model_len or arch.max_position_embeddings
        if max_len > arch.max_position_embeddings:
            raise ValueError(
                f"max_model_len {max_len} exceeds the model's {arch.max_position_embeddings}"
            )
        if arch.sliding_window and max_len > arch.sliding_window:
            # Attention here is full-context; within the window that is exactly the model's.
            log.warning(
                "capping max_model_len %d to the sliding window %d", max_len, arch.sliding_window
            )
            max_len = arch.sliding_window
        # One request alone must always fit in the pool, or preemption could never make room.
        self.max_model_len = min(max_len, num_blocks * bs)
        self.shape = ModelShape(
            num_layers=arch.num_layers,
            num_heads=arch.num_heads,
            num_kv_heads=arch.num_kv_heads,
            head_dim=arch.head_dim,
            hidden_size=arch.hidden_size,
            vocab_size=arch.vocab_size,
            max_model_len=self.max_model_len,
        )
        shape = (num_blocks, arch.num_layers, 2, bs, arch.num_kv_heads, arch.head_dim)
        if allocate_kv is None and torch.device(config.device).type == "cpu":
            self.kv_cache = allocate_host_kv(shape, dtype)
        elif allocate_kv is None:
            self.kv_cache = torch.zeros(shape, dtype=dtype, device=config.device)
        else:
            self.kv_cache = allocate_kv(shape, dtype)
        self.kv = KVCacheManager(num_blocks, bs, config.cache.enable_prefix_caching)
        self.lora: LoRAManager | None = None
        if config.lora is not None:
            self.lora = LoRAManager(config.lora, arch, dtype, config.device)
        max_loras = config.lora.max_loras if config.lora is not None else None
        self.scheduler = Scheduler(config.scheduler, self.kv, max_loras)
        backend = get_attention_backend(
            resolve_backend_name(config.attention_backend, config.device)
        )
        self.runner = ModelRunner(self.model, self.kv_cache, backend, bs, self.lora)
        if torch.device(config.device).type == "cpu" and dtype != torch.float32:
            # oneDNN's per-shape state: a fixed set of shapes, all made now (llama.py, forward)
            t0 = time.monotonic()
            self.model.bucket_rows = True
            self.model.warm_up(
                config.scheduler.max_num_batched_tokens,
                max(config.scheduler.max_num_seqs, PROMPT_LOGPROB_ROWS),
            )
            log.info("matmul shapes warmed up in %.1f s", time.monotonic() - t0)
            if self.lora is not None:  # LoRA matmuls too: all slots, so only rows vary
                self.lora.fixed_width = True
        self.eos_ids = eos_token_ids(self.hf_config, self.tokenizer)
        self.sampler = Sampler(arch.vocab_size, self.eos_ids or None)
        self.structured = StructuredOutputs(self.tokenizer, arch.vocab_size, self.eos_ids)
        self._requests: dict[str, Request] = {}  # sequence id -> request
        self._groups: dict[str, list[str]] = {}  # client request id -> sequence ids
        self._group_lora: dict[str, AdapterInfo] = {}  # request id -> its adapter (counted)
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._forked: set[str] = set()
        self._hold: set[str] = set()  # requests whose blocks outlive them (hand-off)
        self._held_at: dict[str, float] = {}  # request id -> when its blocks became held
        self._reserved: dict[str, Request] = {}  # awaiting imported KV
        self.num_steps_run = 0  # steps that scheduled work (progress, for health checks)
        self.last_step_tokens = self.last_step_seqs = 0
        self.step_tokens = StepHistogram(token_buckets(config.scheduler.max_num_batched_tokens))
        log.info(
            "engine ready: %s, %s, %d KV blocks x %d tokens, max_model_len %d, %s attention",
            self.model_dir.name, dtype, num_blocks, bs, self.max_model_len, backend.name,
        )  # fmt: skip

    # --- requests ------------------------------------------------------------------------------
    def tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        return list(prompt)

    def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise ValueError naming the field if the request can never be served."""
        if not prompt_token_ids:
            raise ValueError("prompt must not be empty")
        vocab = self.shape.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        params.check_token_ids(vocab)
        if params.structured_output is not None:
            self.structured.compile(params.structured_output)  # cached for add_request
        n_prompt = len(prompt_token_ids)
        if n_prompt >= self.max_model_len:
            raise ValueError(
                f"prompt is {n_prompt} tokens, the model's maximum length is "
                f"{self.max_model_len} (including at least one generated token)"
            )
        if params.max_tokens is not None and n_prompt + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"max_tokens {params.max_tokens} + prompt {n_prompt} tokens exceeds the model's "
                f"maximum length {self.max_model_len}"
            )

    # --- LoRA adapters -------------------------------------------------------------------------
    def add_lora(self, lora: LoRARequest) -> AdapterInfo:
        """Load an adapter (PEFT format) under its name; raises ValueError naming the problem
        (``AdapterError``: files, rank, base model; ``LoRAExistsError``: the name is taken)."""
        return self._lora_manager().add(lora)

    def register_lora(self, adapter: LoadedAdapter) -> AdapterInfo:
        """Register an adapter already read (``lora.read`` on another thread, so the engine
        thread does not wait on files); raises ``LoRAExistsError`` if the name is taken."""
        return self._lora_manager().register(adapter)

    def remove_lora(self, name: str) -> bool:
        """Unload ``name`` (False if unknown); its running requests finish with it."""
        return self._lora_manager().remove(name)

    def lora_adapters(self) -> tuple[AdapterInfo, ...]:
        return () if self.lora is None else self.lora.infos()

    def _lora_manager(self) -> LoRAManager:
        if self.lora is None:
            raise ValueError("LoRA is not enabled on this engine (enable_lora / --enable-lora)")
        return self.lora

    def add_request(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        hold_kv: bool = False,
        lora_name: str | None = None,
    ) -> list[int]:
        """Queue a request; returns its prompt token ids. Raises ValueError on bad input
        (``LoRANotFoundError`` when ``lora_name`` is not loaded).

        ``hold_kv``: when the request ends, keep its blocks (held under ``request_id``) instead
        of freeing them, until ``release_kv``; a prefill server leases them to a decode pod.
        ``lora_name``: run with that loaded adapter (its identity joins the prefix hash).
        """
        req = self._new_request(request_id, prompt, params, arrival_time, lora_name)
        if hold_kv:  # the first sample's table is the prompt's: it is held, its forks are not
            self._hold.add(request_id)
        self.scheduler.add(req)
        return req.prompt_token_ids

    def _new_request(
        self, request_id, prompt, params, arrival_time=None, lora_name: str | None = None
    ) -> Request:
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        token_ids = self.tokenize(prompt)
        self.validate(token_ids, params)
        adapter = None
        if lora_name is not None:  # last: nothing below may fail once it is counted
            adapter = self._lora_manager().acquire(lora_name)
            params = replace(params, extra_keys=with_adapter_key(params.extra_keys, adapter))
        req = Request(
            request_id,
            token_ids,
            params,
            self.kv.block_size,
            arrival_time=arrival_time,
            prompt=prompt if isinstance(prompt, str) else None,
            lora=adapter,
        )
        if params.structured_output is not None:
            req.grammar = self.structured.start(params.structured_output)
        self._track(req)
        self._groups[request_id] = [req.request_id]
        if adapter is not None:
            self._group_lora[request_id] = adapter
        return req

    def _end_group(self, group_id: str) -> list[str] | None:
        """Forget a request group (all its samples done); its adapter is no longer in use."""
        adapter = self._group_lora.pop(group_id, None)
        if adapter is not None and self.lora is not None:
            self.lora.release(adapter)
        return self._groups.pop(group_id, None)

    def release_kv(self, request_id: str) -> int:
        """Free blocks held for a finished ``hold_kv`` request; returns how many (0 if none)."""
        self._held_at.pop(request_id, None)
        return self.kv.release_held(request_id)

    def held_since(self) -> dict[str, float]:
        """Request id -> monotonic time its blocks became held, for every hold."""
        return dict(self._held_at)

    # --- KV imported from another engine (the decode side of a hand-off) -------------------------
    def reserve_import(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        lora_name: str | None = None,
    ) -> ImportReservation | None:
        """Allocate local blocks for a prompt whose KV will be copied in from elsewhere.

        Blocks this engine already has cached (same prefix hash and tokens) are reused, so only
        the rest must be transferred. Returns None when the pool can't hold the prompt now
        (back-pressure: the caller may retry or recompute). Raises ValueError on bad input.
        """
        req = self._new_request(request_id, prompt_token_ids, params, None, lora_name)
        hit = self.kv.find_cached_prefix(req)
        if not self.kv.allocate(req, req.num_tokens - hit.num_tokens(self.kv.block_size), hit):
            self._forget(req)
            return None
        # allocate() set num_computed_tokens to the local hit; the rest arrives by transfer.
        ids = self.kv.block_ids(request_id)
        self._reserved[request_id] = req
        return ImportReservation(request_id, tuple(ids[len(hit.blocks) :]), len(hit.blocks))

    def commit_import(
        self, request_id: str, first_tokens: Sequence[tuple[int, TokenLogprobs | None]]
    ) -> list[SequenceDelta]:
        """The reserved blocks now hold the prompt's KV: join the batch with the first tokens.

        ``first_tokens[i]`` is sample i's (token, logprobs) as the prefill engine drew them; the
        n samples fork from the one imported prompt, sharing its blocks (copy-on-write).
        """
        req = self._reserved.pop(request_id)
        self._check_first_tokens(req, first_tokens)
        req.num_computed_tokens = req.num_prompt_tokens
        self.kv.cache_computed_blocks(req)
        self.scheduler.add_running(req)
        seqs = [req, *self._fork(req)] if req.params.n > 1 else [req]
        return [
            self._adopt_first_token(seq, token, lp)
            for seq, (token, lp) in zip(seqs, first_tokens, strict=True)
        ]

    def _check_first_tokens(self, req: Request, first_tokens) -> None:
        if len(first_tokens) != req.params.n:
            raise ValueError(f"{len(first_tokens)} first tokens for n={req.params.n} samples")
        vocab = self.shape.vocab_size
        if any(not 0 <= t < vocab for t, _ in first_tokens):
            raise ValueError(f"first token ids must be in [0, {vocab})")

    def _adopt_first_token(
        self, req: Request, token: int, logprobs: TokenLogprobs | None
    ) -> SequenceDelta:
        """Take a first token sampled by another engine as if this one had drawn it."""
        if req.generator is not None and not req.params.greedy:
            skip_draw(req.generator, self.shape.vocab_size)
        return self._update(req, token, logprobs)

    def recompute_import(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        first_tokens: Sequence[tuple[int, TokenLogprobs | None]],
        lora_name: str | None = None,
    ) -> list[SequenceDelta]:
        """Compute the prompt here after all, keeping the first tokens sampled elsewhere.

        Used when a transfer failed or no blocks could be reserved. The first tokens were already
        decided (and maybe streamed), so the engine recomputes the prompt's KV and continues after
        them, which gives the same greedy output as the hand-off would have. With n > 1 each
        sample recomputes on its own (the prefix cache shares what it can): a rare path.
        """
        req = self._reserved.pop(request_id, None)
        if req is not None:
            self.kv.free(req)
            req.num_computed_tokens = 0
        else:
            req = self._new_request(request_id, prompt_token_ids, params, None, lora_name)
        self._check_first_tokens(req, first_tokens)
        seqs = [req]
        if params.n > 1:
            self._forked.add(req.request_id)  # its siblings exist already: step() must not fork
            for index in range(1, params.n):
                child = Request(
                    f"{request_id}#{index}", req.prompt_token_ids, req.params, self.kv.block_size,
                    sample_index=index, group_id=request_id, arrival_time=req.arrival_time,
                    lora=req.lora,
                )  # fmt: skip
                if params.structured_output is not None:
                    child.grammar = self.structured.start(params.structured_output)
                self._track(child)
                self._groups[request_id].append(child.request_id)
                seqs.append(child)
        deltas = []
        for seq, (token, lp) in zip(seqs, first_tokens, strict=True):
            deltas.append(self._adopt_first_token(seq, token, lp))
            if not seq.is_finished:
                self.scheduler.add(seq)
        return deltas

    def cancel_import(self, request_id: str) -> None:
        req = self._reserved.pop(request_id, None)
        if req is not None:
            self.kv.free(req)
            self._forget(req)

    def abort_request(self, request_id: str) -> bool:
        """Stop every sample of a request now and free its blocks, held ones included.

        False if the request was unknown (or had finished and held nothing): safe to repeat.
        """
        if request_id in self._reserved:
            self.cancel_import(request_id)
            return True
        self._hold.discard(request_id)
        released = self.release_kv(request_id) > 0
        seq_ids = self._end_group(request_id)
        if not seq_ids:
            return released
        for seq_id in seq_ids:
            req = self._requests.pop(seq_id, None)
            if req is not None:
                self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
                self._detok.pop(seq_id, None)
                self._forked.discard(seq_id)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def stats(self) -> EngineStats:
        grammars, grammar_bytes = self.structured.cache_size
        loras = {}
        if self.lora is not None:
            loras = {
                "running_loras": _names(r.lora for r in self.scheduler.running),
                "waiting_loras": _names(r.lora for r in self.scheduler.waiting),
                "max_loras": self.lora.config.max_loras,
            }
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.kv.pool.usage,
            num_blocks=self.kv.pool.num_blocks,
            num_free_blocks=self.kv.pool.num_free_blocks,
            prefix_cache_queries=self.kv.prefix_queries,
            prefix_cache_hits=self.kv.prefix_hits,
            num_preemptions=self.scheduler.num_preemptions,
            num_held=len(self.kv.held),
            step_tokens=self.step_tokens.snapshot(),
            grammar_cache_entries=grammars,
            grammar_cache_bytes=grammar_bytes,
            prefix_cached_blocks=self.kv.pool.num_cached_blocks,
            **loras,
        )

    def audit(self) -> KVAudit:
        """Count the KV books (cheap when idle: only holds and reservations have tables)."""
        pool = self.kv.pool
        return KVAudit(
            used_blocks=pool.num_blocks - pool.num_free_blocks,
            accounted_blocks=self.kv.num_accounted_blocks(),
            held_requests=len(self.kv.held),
        )

    def _track(self, req: Request) -> None:
        self._requests[req.request_id] = req
        self._detok[req.request_id] = IncrementalDetokenizer(
            self.tokenizer, req.prompt_token_ids, req.params
        )

    # --- the step ------------------------------------------------------------------------------
    def step(self) -> list[SequenceDelta]:
        dropped = [self._drop(req) for req in self.scheduler.expire_waiting(time.monotonic())]
        sched = self.scheduler.schedule()
        if sched.empty:
            return dropped
        self.num_steps_run += 1
        self.last_step_tokens = sched.num_batched_tokens
        self.step_tokens.observe(sched.num_batched_tokens)
        self.last_step_seqs = len(sched.scheduled)
        tables = {
            s.request.request_id: self.kv.block_ids(s.request.request_id) for s in sched.scheduled
        }
        result = self.runner.execute(sched, tables)
        for req, logprobs in result.prompt_logprobs:  # the positions after those it has
            req.prompt_logprobs.extend(logprobs)
        self.scheduler.update_after_step(sched)
        if not result.sampled:
            return dropped
        # Expand rows for n > 1: the first sample of a prompt forks its siblings here, sharing
        # the prompt's blocks, and all n draw from the same logits row.
        row_index: list[int] = []
        seqs: list[Request] = []
        for i, item in enumerate(result.sampled):
            req = item.request
            seqs.append(req)
            row_index.append(i)
            if req.params.n > 1 and req.sample_index == 0 and req.request_id not in self._forked:
                for child in self._fork(req):
                    seqs.append(child)
                    row_index.append(i)
        logits = (
            result.logits
            if len(row_index) == len(result.sampled)
            else result.logits[torch.tensor(row_index)]
        )
        rows = [
            SamplingRow(r.params, r.prompt_token_ids, r.output_token_ids, r.generator) for r in seqs
        ]
        out = self.sampler(logits, rows, self.structured.fill_bitmask([r.grammar for r in seqs]))
        return dropped + [
            self._update(req, token, lp)
            for req, token, lp in zip(seqs, out.token_ids, out.logprobs, strict=True)
        ]

    def _drop(self, req: Request) -> SequenceDelta:
        """A request the scheduler expired from the queue: forget it, tell its stream why."""
        waited = time.monotonic() - req.queued_at
        self._hold.discard(req.group_id)
        self._retire(req)
        log.warning("request %s dropped after %.0f s in the queue", req.group_id, waited)
        return SequenceDelta(
            request_id=req.group_id,
            index=req.sample_index,
            token_ids=(),
            text="",
            logprobs=None,
            finish_reason="abort",
            num_prompt_tokens=req.num_prompt_tokens,
            error=f"the engine is overloaded: the request waited {waited:.0f} s in the queue "
            f"(limit {self.config.scheduler.max_queue_seconds:g} s)",
        )

    def _fork(self, parent: Request) -> list[Request]:
        self._forked.add(parent.request_id)
        children = []
        for index in range(1, parent.params.n):
            child = parent.fork(f"{parent.group_id}#{index}", index)
            self.kv.fork(parent, child)
            self._track(child)
            self._groups[parent.group_id].append(child.request_id)
            self.scheduler.add_running(child)
            children.append(child)
        return children

    def _update(self, req: Request, token: int, lp: TokenLogprobs | None) -> SequenceDelta:
        req.append_output_token(token)
        if req.first_token_at is None:
            req.first_token_at = time.monotonic()
        params = req.params
        detok = self._detok[req.request_id]
        finish: RequestStatus | None = None
        stop_reason: int | str | None = None
        # (the sampler never draws EOS / stop tokens before min_tokens is reached, except where
        # a grammar allows them: its end ends the sequence whatever min_tokens / ignore_eos say)
        grammar_ended = req.grammar is not None and req.grammar.advance(token)
        is_stop_token = token in params.stop_token_ids or (
            token in self.eos_ids and not params.ignore_eos
        )
        if grammar_ended or (is_stop_token and req.num_output_tokens > params.min_tokens):
            finish = RequestStatus.FINISHED_STOPPED
            stop_reason = token if token in params.stop_token_ids else None
            text = detok.finish()
        else:
            delta = detok.update([token])
            text = delta.text
            if delta.stop_string is not None:
                finish, stop_reason = RequestStatus.FINISHED_STOPPED, delta.stop_string
        if finish is None and (
            (params.max_tokens is not None and req.num_output_tokens >= params.max_tokens)
            or req.num_tokens >= self.max_model_len
        ):
            finish = RequestStatus.FINISHED_LENGTH
            text += detok.finish()
        held = timing = None
        if finish is not None:
            timing = _timing(req, time.monotonic())
            if req.request_id in self._hold:
                self._hold.discard(req.request_id)
                held = tuple(self.kv.hold(req, req.request_id))
                self._held_at[req.request_id] = time.monotonic()
            self.scheduler.finish(req, finish)
            self._retire(req)
        prompt_logprobs = None
        if (
            params.prompt_logprobs is not None
            and req.num_output_tokens == 1
            and not req.sample_index
        ):
            prompt_logprobs = tuple(req.prompt_logprobs)  # the prompt is done: hand them over once
        return SequenceDelta(
            request_id=req.group_id,
            index=req.sample_index,
            token_ids=(token,),
            text=text,
            logprobs=None if lp is None else (lp,),
            prompt_logprobs=prompt_logprobs,
            finish_reason=None if finish is None else finish.value,
            stop_reason=stop_reason,
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=max(req.num_cached_tokens, 0),
            held_block_ids=held,
            timing=timing,
        )

    def _forget(self, req: Request) -> None:
        self._requests.pop(req.request_id, None)
        self._detok.pop(req.request_id, None)
        self._end_group(req.group_id)

    def _retire(self, req: Request) -> None:
        self._requests.pop(req.request_id, None)
        self._detok.pop(req.request_id, None)
        self._forked.discard(req.request_id)
        group = self._groups.get(req.group_id)
        if group is not None and all(seq_id not in self._requests for seq_id in group):
            self._end_group(req.group_id)

    def check_integrity(self) -> None:
        """Assert the KV bookkeeping is consistent (tests call this after every scenario)."""
        self.kv.check_integrity()
        live = {r.request_id for r in self.scheduler.running} | set(self._reserved)
        assert set(self.kv.tables) <= live, "blocks held by a request that is not running"
        if not self.has_unfinished() and not self.kv.held and not self._reserved:
            assert self.kv.pool.num_free_blocks == self.kv.pool.num_blocks, "leaked KV blocks"
        assert set(self._group_lora) <= set(self._groups), "adapter counted for a gone request"
        if self.lora is not None and not self._groups:
            assert self.lora.total_refs() == 0, "adapter still counted with no request"


def _names(adapters) -> tuple[str, ...]:
    return tuple(sorted({a.name for a in adapters if a is not None}))


def _timing(req: Request, now: float) -> RequestTiming:
    scheduled = req.first_scheduled_at if req.first_scheduled_at is not None else now
    first = req.first_token_at if req.first_token_at is not None else now
    return RequestTiming(
        queued=max(scheduled - req.arrival_time, 0.0),
        prefill=max(first - scheduled, 0.0),
        decode=max(now - first, 0.0),
        inference=max(now - scheduled, 0.0),
        num_preemptions=req.num_preemptions,
    )
