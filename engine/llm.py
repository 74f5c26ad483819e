"""The offline, vLLM-shaped API: ``LLM(...).generate(prompts, params)`` and ``.chat(...)``."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from splitserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from splitserve.engine.engine_core import EngineCore
from splitserve.engine.lora import LoRAConfig
from splitserve.engine.outputs import CompletionOutput, RequestOutput
from splitserve.protocol.lora import LoRARequest
from splitserve.protocol.sampling import SamplingParams

# A prompt: text, token ids, or vLLM's dict forms {"prompt": ...} / {"prompt_token_ids": [...]}.
Prompt = str | Sequence[int] | dict[str, Any]
Message = dict[str, Any]


class LLM:
    """Run a model offline over a batch of prompts with continuous batching.

    ``model=None`` loads the embedded SmolLM2-135M-Instruct. All prompts of one ``generate`` call
    run concurrently through the scheduler, exactly as server traffic would.

    ``enable_lora=True`` serves PEFT LoRA adapters (``generate(..., lora_request=...)``): up to
    ``max_loras`` different adapters in one batch, ranks up to ``max_lora_rank``, the weights of
    at most ``max_cpu_loras`` unused adapters kept in memory (None: all).
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "auto",
        quantization: str | None = None,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_memory_bytes: int = 2 << 30,
        max_num_seqs: int = 128,
        max_num_batched_tokens: int = 2048,
        enable_prefix_caching: bool = True,
        enable_chunked_prefill: bool = True,
        max_model_len: int | None = None,
        attention_backend: str = "auto",
        device: str = "cpu",
        seed: int = 0,
        enable_lora: bool = False,
        max_loras: int = 1,
        max_lora_rank: int = 16,
        max_cpu_loras: int | None = None,
    ) -> None:
        lora = LoRAConfig(max_loras, max_lora_rank, max_cpu_loras) if enable_lora else None
        config = EngineConfig(
            model=model,
            dtype=dtype,
            quantization=quantization,
            device=device,
            attention_backend=attention_backend,
            max_model_len=max_model_len,
            seed=seed,
            cache=CacheConfig(
                block_size=block_size,
                num_blocks=num_kv_blocks,
                kv_cache_memory_bytes=kv_cache_memory_bytes,
                enable_prefix_caching=enable_prefix_caching,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                enable_chunked_prefill=enable_chunked_prefill,
            ),
            lora=lora,
        )
        self.engine = EngineCore(config)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (strings or token-id lists); outputs in input order.

        ``lora_request``: one adapter for every prompt, or a list with one (or None) per prompt;
        an adapter is loaded the first time it is named (by ``lora_name``). Every prompt and
        adapter is checked before any prompt is queued, so bad input raises ``ValueError`` and
        leaves no request behind.
        """
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = [_unwrap(p) for p in prompts]  # type: ignore[union-attr]
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"got {len(params_list)} sampling_params for {len(prompts)} prompts"
                )
        loras = self._lora_names(lora_request, len(prompts))
        encoded = []
        for prompt, params in zip(prompts, params_list, strict=True):
            token_ids = self.engine.tokenize(prompt)
            self.engine.validate(token_ids, params)
            encoded.append(token_ids)
        outputs: dict[str, RequestOutput] = {}
        order = []
        for prompt, token_ids, params, lora in zip(
            prompts, encoded, params_list, loras, strict=True
        ):
            request_id = f"offline-{next(self._ids)}"
            self.engine.add_request(request_id, token_ids, params, lora_name=lora)
            outputs[request_id] = RequestOutput(
                request_id=request_id,
                prompt=prompt if isinstance(prompt, str) else None,
                prompt_token_ids=token_ids,
                outputs=[CompletionOutput(index=i) for i in range(params.n)],
            )
            order.append(request_id)
        bar = tqdm(total=len(order), desc="generate", disable=not use_tqdm)
        while self.engine.has_unfinished():
            for delta in self.engine.step():
                out = outputs[delta.request_id]
                out.apply(delta)
                if delta.finished and out.finished:
                    bar.update()
        bar.close()
        return [outputs[i] for i in order]

    def _lora_names(
        self, lora_request: LoRARequest | Sequence[LoRARequest | None] | None, count: int
    ) -> list[str | None]:
        """One adapter name (or None) per prompt, every adapter loaded."""
        if lora_request is None:
            return [None] * count
        requests = (
            [lora_request] * count if isinstance(lora_request, LoRARequest) else list(lora_request)
        )
        if len(requests) != count:
            raise ValueError(f"got {len(requests)} lora_requests for {count} prompts")
        names: list[str | None] = []
        for lora in requests:
            if lora is None:
                names.append(None)
                continue
            if not isinstance(lora, LoRARequest):
                raise ValueError(f"lora_request must be LoRARequest or None, got {type(lora)}")
            known = {a.name: a for a in self.engine.lora_adapters()}
            if lora.lora_name not in known:
                self.engine.add_lora(lora)
            elif known[lora.lora_name].path != lora.lora_path:
                raise ValueError(
                    f"LoRA adapter {lora.lora_name!r} is loaded from "
                    f"{known[lora.lora_name].path!r}, not {lora.lora_path!r}"
                )
            names.append(lora.lora_name)
        return names

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        add_generation_prompt: bool = True,
        use_tqdm: bool = False,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        if not messages:
            raise ValueError("messages must not be empty")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        prompts = [self.apply_chat_template(c, add_generation_prompt) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)

    def apply_chat_template(
        self, conversation: Sequence[Message], add_generation_prompt: bool = True
    ) -> list[int]:
        if not conversation:
            raise ValueError("messages must not be empty")
        encoded = self.tokenizer.apply_chat_template(
            list(conversation),
            add_generation_prompt=add_generation_prompt,
            tokenize=True,
            return_dict=True,
        )
        return list(encoded["input_ids"])


def _unwrap(prompt: Prompt) -> str | Sequence[int]:
    """Accept vLLM's TextPrompt / TokensPrompt dicts as well as plain text and token ids."""
    if not isinstance(prompt, dict):
        return prompt
    if "prompt_token_ids" in prompt:
        return list(prompt["prompt_token_ids"])
    if "prompt" in prompt:
        return prompt["prompt"]
    raise ValueError("a dict prompt needs 'prompt' or 'prompt_token_ids'")
