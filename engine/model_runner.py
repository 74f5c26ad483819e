"""Turns a SchedulerOutput into one forward pass and the logits of the rows to sample."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splitserve.engine.attention import AttentionBackend, AttentionMetadata
from splitserve.engine.logprobs import TokenLogprobs, compute_token_logprobs
from splitserve.engine.lora.manager import LoRAManager
from splitserve.engine.model.llama import LlamaForCausalLM
from splitserve.engine.request import Request
from splitserve.engine.scheduler import ScheduledRequest, SchedulerOutput

# Prompt-logprob rows go through the LM head in slices of this many (a [rows, vocab] float32
# logits tensor each: 256 x 49152 x 4 B = 50 MB for SmolLM2).
PROMPT_LOGPROB_ROWS = 256


@dataclass(frozen=True)
class RunnerOutput:
    logits: torch.Tensor  # [len(sampled), vocab] float32
    sampled: list[ScheduledRequest]  # the requests that caught up this step, in logits order
    # (request, logprobs of the next prompt token at each prompt position it lacked that ran
    # this step, in order) for requests with params.prompt_logprobs
    prompt_logprobs: list[tuple[Request, list[TokenLogprobs]]] = field(default_factory=list)


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_cache: torch.Tensor,
        backend: AttentionBackend,
        block_size: int,
        lora: LoRAManager | None = None,
    ) -> None:
        self.lora = lora
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.block_size = block_size
        self.device = kv_cache.device

    def execute(self, sched: SchedulerOutput, block_tables: dict[str, list[int]]) -> RunnerOutput:
        """Run the step. ``block_tables`` maps request id -> block ids (after allocation)."""
        with torch.inference_mode():
            for src, dst in sched.block_copies:  # copy-on-write before anything writes
                self.kv_cache[dst].copy_(self.kv_cache[src])
            # Decodes (one new token) first, then prefills: the layout backends expect.
            decodes = [s for s in sched.scheduled if s.num_new_tokens == 1]
            # Shortest contexts first: the torch backend buckets decodes by length.
            decodes.sort(key=lambda s: s.request.num_computed_tokens)
            prefills = [s for s in sched.scheduled if s.num_new_tokens > 1]
            batch = decodes + prefills
            input_ids, positions, meta = self._prepare(batch, len(decodes), block_tables)
            attn = self.backend.prepare(self.kv_cache, meta)
            lora = None
            if self.lora is not None:
                lora = self.lora.prepare_step(
                    [s.request.lora for s in batch], [s.num_new_tokens for s in batch]
                )
            hidden = self.model(input_ids, positions, attn, lora)
            ends = torch.tensor([s.num_new_tokens for s in batch]).cumsum(0) - 1
            prompt_logprobs = self._prompt_logprobs(batch, ends.tolist(), hidden)
            sampled_idx = [i for i, s in enumerate(batch) if s.completes]
            sampled = [batch[i] for i in sampled_idx]
            if not sampled:
                empty = hidden.new_empty(0, self.model.arch.vocab_size).float()
                return RunnerOutput(empty, [], prompt_logprobs)
            rows = ends[torch.tensor(sampled_idx)].to(self.device)
            logits = self.model.compute_logits(hidden[rows])
        return RunnerOutput(logits, sampled, prompt_logprobs)

    def _prompt_logprobs(
        self, batch: list[ScheduledRequest], ends: list[int], hidden: torch.Tensor
    ) -> list[tuple[Request, list[TokenLogprobs]]]:
        """Logprobs of each next prompt token at the prompt positions this step computed, for
        the requests that asked (prompt positions already done, e.g. before a preemption, are
        not redone). Only those rows pay for the LM head over the whole vocabulary."""
        results = []
        vocab = self.model.arch.vocab_size
        for item, end in zip(batch, ends, strict=True):
            req = item.request
            k = req.params.prompt_logprobs
            if k is None:
                continue
            start = req.num_computed_tokens  # position of the item's first new token
            first = max(start, len(req.prompt_logprobs))
            stop = min(start + item.num_new_tokens, req.num_prompt_tokens - 1)
            if first >= stop:
                continue
            base = end + 1 - item.num_new_tokens - start  # hidden row of prompt position 0
            out: list[TokenLogprobs] = []
            for lo in range(first, stop, PROMPT_LOGPROB_ROWS):
                hi = min(lo + PROMPT_LOGPROB_ROWS, stop)
                rows = hidden[base + lo : base + hi]
                logits = self.model.compute_logits(rows)[:, :vocab]
                targets = torch.tensor(req.prompt_token_ids[lo + 1 : hi + 1], device=logits.device)
                out.extend(compute_token_logprobs(logits, targets, [k] * (hi - lo)))
            results.append((req, out))
        return results

    def _prepare(self, batch: list[ScheduledRequest], num_decodes: int, block_tables):
        if num_decodes == len(batch):
            return self._prepare_decodes(batch, block_tables)
        bs = self.block_size
        tokens: list[int] = []
        starts: list[int] = []
        q_lens: list[int] = []
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        for item in batch:
            req = item.request
            start = req.num_computed_tokens
            end = start + item.num_new_tokens
            tokens.extend(req.all_token_ids[start:end])
            starts.append(start)
            q_lens.append(item.num_new_tokens)
            seq_lens.append(end)
            tables.append(block_tables[req.request_id])
        max_blocks = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int32)
        q_len_t = torch.tensor(q_lens)
        seq_of_token = torch.repeat_interleave(torch.arange(len(batch)), q_len_t)
        offsets = torch.cumsum(q_len_t, 0) - q_len_t
        positions = torch.tensor(starts)[seq_of_token] + (
            torch.arange(len(tokens)) - offsets[seq_of_token]
        )
        slots = table[seq_of_token, positions // bs].long() * bs + positions % bs

        seq_len_t = torch.tensor(seq_lens, dtype=torch.int32)
        nd = num_decodes
        num_decode_tokens = nd  # one token each
        prefill_q = q_len_t[nd:]
        qsl = torch.zeros(len(prefill_q) + 1, dtype=torch.int32)
        qsl[1:] = torch.cumsum(prefill_q, 0)
        dev = self.device
        meta = AttentionMetadata(
            block_size=bs,
            slot_mapping=slots.to(dev),
            num_decode_tokens=num_decode_tokens,
            decode_seq_lens=seq_len_t[:nd].to(dev),
            decode_block_tables=table[:nd].to(dev),
            num_prefill_tokens=len(tokens) - num_decode_tokens,
            prefill_query_start_loc=qsl.to(dev),
            prefill_seq_lens=seq_len_t[nd:].to(dev),
            prefill_block_tables=table[nd:].to(dev),
            decode_max_seq_len=max(seq_lens[:nd], default=0),
            prefill_max_seq_len=max(seq_lens[nd:], default=0),
            prefill_max_query_len=max(q_lens[nd:], default=0),
            prefill_has_context=any(s > 0 for s in starts[nd:]),
        )
        input_ids = torch.tensor(tokens, dtype=torch.long, device=dev)
        return input_ids, positions.to(dev), meta

    def _prepare_decodes(self, batch: list[ScheduledRequest], block_tables):
        """``_prepare`` for a step of decodes only (one token each), the common small-batch
        step: positions and slots come straight from Python ints, no tensor arithmetic."""
        bs = self.block_size
        tokens, positions, slots, seq_lens, tables = [], [], [], [], []
        for item in batch:
            req = item.request
            pos = req.num_computed_tokens
            table = block_tables[req.request_id]
            tokens.append(req.all_token_ids[pos])
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            seq_lens.append(pos + 1)
            tables.append(table)
        max_blocks = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int32)
        dev = self.device
        n = len(batch)
        meta = AttentionMetadata(
            block_size=bs,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            num_decode_tokens=n,
            decode_seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            decode_block_tables=table.to(dev),
            num_prefill_tokens=0,
            prefill_query_start_loc=torch.zeros(1, dtype=torch.int32, device=dev),
            prefill_seq_lens=torch.zeros(0, dtype=torch.int32, device=dev),
            prefill_block_tables=table[:0].to(dev),
            decode_max_seq_len=max(seq_lens),
            prefill_max_seq_len=0,
            prefill_max_query_len=0,
            prefill_has_context=False,
        )
        input_ids = torch.tensor(tokens, dtype=torch.long, device=dev)
        return input_ids, torch.tensor(positions, dtype=torch.long, device=dev), meta
