"""OpenAI completions and chat completions on top of the dispatcher.

Turns a validated request into engine samples (prompt tokens, validated sampling params, n samples
fanned out with seed + i), runs them through the ``Dispatcher`` and assembles either one response
or a stream of chunks. Per-sample streams of an n > 1 request are merged as they arrive.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from splitserve.proto import splitserve_pb2 as pb
from splitserve.services.router import responses as R
from splitserve.services.router import tool_calls
from splitserve.services.router.dispatch import Dispatcher, EngineRequest
from splitserve.services.router.errors import APIError, BackendError, bad_request
from splitserve.services.router.metrics import RouterMetrics
from splitserve.services.router.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
)
from splitserve.services.router.tokenizer import RouterTokenizer
from splitserve.services.router.tools import (
    ToolPlan,
    template_messages,
    with_tool_system_text,
)


@dataclass(frozen=True)
class Prepared:
    """An API request turned into engine samples."""

    rid: str
    created: int
    model: str
    chat: bool
    samples: list[EngineRequest]  # index i: prompt i // n, sample i % n
    prompt_lens: list[int]
    prompt_texts: list[str]  # for echo
    logprobs: int | None
    echo: bool
    include_usage: bool
    tools: ToolPlan | None = None  # chat with tool calls to parse ("auto", "required", named)
    keep: int | None = None  # best_of: return this many of each prompt's samples (most likely)
    continuous_usage: bool = False  # stream_options.continuous_usage_stats: usage on every chunk


class OpenAIServing:
    def __init__(
        self,
        tokenizer: RouterTokenizer,
        dispatcher: Dispatcher,
        metrics: RouterMetrics,
        *,
        max_model_len: int,
    ) -> None:
        self.tok = tokenizer
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.max_model_len = max_model_len

    # ---- preparing -----------------------------------------------------------------------------

    def _check_len(self, n_prompt: int, max_tokens: int | None, param: str) -> int | None:
        if n_prompt == 0:
            raise bad_request("the prompt is empty", param=param)
        if n_prompt >= self.max_model_len:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"your prompt has {n_prompt} tokens.",
                param=param,
                code="context_length_exceeded",
            )
        if max_tokens is not None and n_prompt + max_tokens > self.max_model_len:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {n_prompt + max_tokens} tokens ({n_prompt} in the prompt, "
                f"{max_tokens} for the completion).",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return max_tokens

    def _samples(
        self, rid: str, prompts: list[list[int]], req: Any, max_tokens: int | None,
        logprobs: int | None, default_max: int | None, session_key: str | None,
    ) -> list[EngineRequest]:  # fmt: skip
        try:
            params = req.sampling_params(
                max_tokens=max_tokens, logprobs=logprobs, default_max=default_max
            )
            params.check_token_ids(self.tok.vocab_size)
        except ValueError as err:
            raise bad_request(str(err), param=str(err).split(" ", 1)[0]) from err
        samples = []
        for p, ids in enumerate(prompts):
            for i in range(params.n):
                seed = None if params.seed is None else params.seed + i
                one = replace(params, n=1, seed=seed)
                samples.append(EngineRequest(f"{rid}-{p}-{i}", ids, one, session_key))
        return samples

    def prepare_completion(self, req: CompletionRequest, session_key: str | None) -> Prepared:
        rid = f"cmpl-{uuid.uuid4().hex}"
        prompts, texts = [], []
        for prompt in req.prompts():
            if isinstance(prompt, str):
                ids = self.tok.encode(prompt)
                texts.append(prompt)
            else:
                if any(t < 0 or t >= self.tok.vocab_size for t in prompt):
                    raise bad_request("prompt token ids out of the vocabulary", param="prompt")
                ids = list(prompt)
                texts.append(self.tok.decode(ids, skip_special_tokens=False) if req.echo else "")
            self._check_len(len(ids), req.max_tokens, "prompt")
            prompts.append(ids)
        if req.logprobs is not None and not 0 <= req.logprobs <= 20:
            raise bad_request("logprobs must be an integer in [0, 20]", param="logprobs")
        if req.suffix:  # insertion needs fill-in-the-middle models; refuse rather than ignore
            raise bad_request("suffix is not supported", param="suffix")
        try:
            per_prompt = req.samples_per_prompt()
        except ValueError as err:
            raise bad_request(str(err), param="best_of") from err
        keep = req.n if per_prompt > req.n else None
        # Ranking needs the sampled tokens' logprobs; the response shows them only if asked.
        logprobs = 0 if keep is not None and req.logprobs is None else req.logprobs
        fanned = req.model_copy(update={"n": per_prompt}) if keep is not None else req
        samples = self._samples(rid, prompts, fanned, req.max_tokens, logprobs, 16, session_key)
        if req.echo and req.logprobs is not None:  # the echoed prompt's tokens get logprobs too
            for s in samples:
                s.params = replace(s.params, prompt_logprobs=req.logprobs)
        return Prepared(
            rid, int(time.time()), req.model, False, samples, [len(p) for p in prompts], texts,
            req.logprobs, req.echo, bool(req.stream_options and req.stream_options.include_usage),
            keep=keep, continuous_usage=_continuous_usage(req),
        )  # fmt: skip

    def chat_prompt(
        self, messages: list[ChatMessage], plan: ToolPlan | None, add_generation_prompt: bool
    ) -> list[int]:
        """The chat template's token ids for ``messages`` and the tools of ``plan``."""
        try:
            msgs = template_messages(messages, native=self.tok.renders_tool_calls)
        except ValueError as err:
            raise bad_request(str(err), param=str(err).split(" ", 1)[0]) from err
        tools = None
        if plan is not None and self.tok.renders_tools:
            tools = plan.template_tools()
        elif plan is not None and plan.mode != "none":
            msgs = with_tool_system_text(msgs, plan)
        try:
            return self.tok.apply_chat_template(msgs, add_generation_prompt, tools=tools)
        except Exception as err:  # template errors (e.g. role order) are the client's input
            raise bad_request(f"chat template failed: {err}", param="messages") from err

    def prepare_chat(self, req: ChatCompletionRequest, session_key: str | None) -> Prepared:
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            plan = req.tool_plan()
        except ValueError as err:
            raise bad_request(str(err), param=str(err).split(" ", 1)[0]) from err
        ids = self.chat_prompt(req.messages, plan, req.add_generation_prompt)
        max_tokens = (
            req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
        )
        self._check_len(len(ids), max_tokens, "messages")
        try:
            logprobs = req.requested_logprobs()
        except ValueError as err:
            raise bad_request(str(err), param="top_logprobs") from err
        # Chat's default is "as long as the context allows", like OpenAI / vLLM.
        samples = self._samples(rid, [ids], req, max_tokens, logprobs, None, session_key)
        parsed = plan if plan is not None and plan.mode != "none" else None
        if parsed is not None and parsed.mode == "auto" and self.tok.is_special("<tool_call>"):
            for s in samples:  # the parser needs the tags in the text
                s.params = replace(s.params, skip_special_tokens=False)
        return Prepared(
            rid, int(time.time()), req.model, True, samples, [len(ids)], [""], logprobs,
            False, bool(req.stream_options and req.stream_options.include_usage), parsed,
            continuous_usage=_continuous_usage(req),
        )  # fmt: skip

    # ---- running -------------------------------------------------------------------------------

    def _account(self, results: list[R.SampleResult]) -> None:
        m = self.metrics
        for r in results:
            m.prompt_tokens.inc(r.prompt_tokens)
            m.cached_tokens.inc(r.cached_tokens)
            m.generation_tokens.inc(r.completion_tokens)

    async def complete(self, p: Prepared) -> dict[str, Any]:
        """Run every sample to the end (retrying failed pods) and build the response."""
        outs = await asyncio.gather(*(self.dispatcher.complete(s) for s in p.samples))
        results = []
        for i, msgs in enumerate(outs):
            r = R.SampleResult(index=i)
            for msg in msgs:
                r.add(msg)
            results.append(r)
        self._account(results)
        usage = R.total_usage(results, p.prompt_lens)  # best_of: every sample is billed
        n = len(p.samples) // len(p.prompt_lens)
        if p.keep is not None:
            results = R.most_likely(results, n, p.keep)
        choices = []
        for k, r in enumerate(results):  # k == r.index unless best_of dropped samples
            if p.chat:
                message, finish = tool_calls.chat_message(p.tools, r.text, r.finish_reason)
                choice = {
                    "index": k,
                    "message": message,
                    "logprobs": R.chat_logprobs(self.tok, r.logprobs)
                    if p.logprobs is not None
                    else None,
                    "finish_reason": finish,
                }
            else:
                prefix = p.prompt_texts[r.index // n] if p.echo else ""
                choice = {
                    "index": k,
                    "text": prefix + r.text,
                    "logprobs": self._completion_logprobs(p, r, r.logprobs, len(prefix)),
                    "finish_reason": r.finish_reason,
                }
            choices.append(choice)
        build = R.chat_response if p.chat else R.completion_response
        return build(p.rid, p.created, p.model, choices, usage)

    def _completion_logprobs(
        self, p: Prepared, r: R.SampleResult, entries: list, text_offset: int
    ) -> dict[str, Any] | None:
        """Legacy completions logprobs of ``entries``; with echo, the prompt's come first."""
        if p.logprobs is None:
            return None
        if p.echo:
            prompt_ids = p.samples[r.index].prompt_token_ids
            return R.echo_logprobs(self.tok, prompt_ids, r.prompt_logprobs, entries)
        return R.completion_logprobs(self.tok, entries, text_offset)

    async def stream(self, p: Prepared, t_arrival: float) -> AsyncIterator[bytes]:
        """SSE bytes: role/echo preamble, token deltas as they come, usage, ``[DONE]``.

        A sample that fails after it streamed tokens ends the stream with an error event (never a
        silent truncation); the other samples are cancelled (and aborted on their pods).
        """
        queue: asyncio.Queue[tuple[int, pb.GenerateResponse | BaseException | None]] = (
            asyncio.Queue()
        )

        async def pump(i: int, sample: EngineRequest) -> None:
            try:
                async for msg in self.dispatcher.stream(sample):
                    await queue.put((i, msg))
                await queue.put((i, None))
            except asyncio.CancelledError:
                raise
            except BaseException as err:  # noqa: BLE001 - forwarded to the consumer
                await queue.put((i, err))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(p.samples)]
        results = [R.SampleResult(index=i) for i in range(len(p.samples))]
        n = len(p.samples) // len(p.prompt_lens)
        chunk = R.chat_chunk if p.chat else R.completion_chunk
        calls = [tool_calls.ToolCallStream(p.tools) for _ in p.samples] if p.tools else []
        first_token = True
        try:
            # Preamble: the assistant role for chat, the prompt for echo.
            if p.chat:
                content = None if p.tools is not None and p.tools.forced else ""
                pre = [
                    {"index": i, "delta": {"role": "assistant", "content": content},
                     "logprobs": None, "finish_reason": None}
                    for i in range(len(p.samples))
                ]  # fmt: skip
                yield R.sse(chunk(p.rid, p.created, p.model, pre))
            elif p.echo and p.logprobs is None:
                pre = [
                    {"index": i, "text": p.prompt_texts[i // n], "logprobs": None,
                     "finish_reason": None}
                    for i in range(len(p.samples))
                ]  # fmt: skip
                yield R.sse(chunk(p.rid, p.created, p.model, pre))
            offsets = [len(p.prompt_texts[i // n]) if p.echo else 0 for i in range(len(results))]
            echoed = [False] * len(results)
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                r = results[i]
                r.add(item)
                if not item.token_ids and not item.text and not item.finish_reason:
                    continue
                if first_token and (item.token_ids or item.text):
                    first_token = False
                    self.metrics.ttft.observe(time.perf_counter() - t_arrival)
                finish = R.FINISH_REASONS[item.finish_reason]
                if p.chat:
                    lp = (
                        R.chat_logprobs(self.tok, list(item.logprobs))
                        if p.logprobs is not None
                        else None
                    )
                    if calls:
                        deltas, finish = calls[i].feed(item.text, finish)
                        if not deltas and finish is None and lp is None:
                            continue
                        for d in deltas[:-1]:
                            c = {"index": i, "delta": d, "logprobs": None, "finish_reason": None}
                            yield R.sse(chunk(p.rid, p.created, p.model, [c]))
                        delta = deltas[-1] if deltas else {}
                    else:
                        delta = {"content": item.text} if item.text or not finish else {}
                    c = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}
                else:
                    if p.echo and p.logprobs is not None and not echoed[i]:
                        # The echoed prompt, with its logprobs (they come with the first message).
                        echoed[i] = True
                        e = {"index": i, "text": p.prompt_texts[i // n], "finish_reason": None}
                        e["logprobs"] = self._completion_logprobs(p, r, [], 0)
                        yield R.sse(chunk(p.rid, p.created, p.model, [e]))
                    lp = None
                    if p.logprobs is not None:
                        lp = R.completion_logprobs(self.tok, list(item.logprobs), offsets[i])
                    offsets[i] += len(item.text)
                    c = {"index": i, "text": item.text, "logprobs": lp, "finish_reason": finish}
                running = R.total_usage(results, p.prompt_lens) if p.continuous_usage else None
                yield R.sse(chunk(p.rid, p.created, p.model, [c], running))
            self._account(results)
            if p.include_usage:
                usage = R.total_usage(results, p.prompt_lens)
                yield R.sse(chunk(p.rid, p.created, p.model, [], usage))
        except (BackendError, APIError) as err:
            message = str(err) if isinstance(err, BackendError) else err.message
            status = err.http_status if isinstance(err, BackendError) else err.status
            kind = "invalid_request_error" if status < 500 else "server_error"
            yield R.sse(
                {"error": {"message": message, "type": kind, "param": None, "code": status}}
            )
        finally:
            for t in tasks:
                t.cancel()
            # Let the cancelled samples run their cleanup (stream cancel + Abort) before we go.
            await asyncio.gather(*tasks, return_exceptions=True)
        yield R.SSE_DONE


def _continuous_usage(req: CompletionRequest | ChatCompletionRequest) -> bool:
    """vLLM's ``stream_options.continuous_usage_stats`` (with ``include_usage``): running usage
    on every chunk of a stream."""
    so = req.stream_options
    return bool(so and so.include_usage and so.continuous_usage_stats)
