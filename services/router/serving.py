"""OpenAI completions and chat completions on top of the dispatcher.

Turns a validated request into engine requests (one per prompt: its tokens, as the newest
generation of engines that can serve tokenizes them, and validated sampling params with all n
samples), runs them through the ``Dispatcher`` and assembles either one response or a stream of
chunks. Sample i of prompt p is choice ``p * n + i``; streams of several prompts are merged as
they arrive.

Tokenization and chat templates run on the ``CPUPool`` (never on the event loop), after a
lower bound on the token count (``RouterTokenizer.min_tokens``) refused prompts that cannot fit
the context without tokenizing them. A stream answers its HTTP status only once every prompt's
first message came back from the pods (``open_stream``): a request the engines refuse (a regex
their grammar compiler rejects) is a plain 400, not a 200 with an error inside.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from splitserve.observability import logs
from splitserve.proto import splitserve_pb2 as pb
from splitserve.protocol.wire import params_to_proto
from splitserve.services.router import response_models as M
from splitserve.services.router import responses as R
from splitserve.services.router import tool_calls
from splitserve.services.router.adapters import RouterAdapters
from splitserve.services.router.cold_start import ColdStartConfig, ColdStartQueue
from splitserve.services.router.dispatch import Dispatcher, EngineRequest, backend_error_to_api
from splitserve.services.router.errors import (
    APIError,
    BackendError,
    NoBackendError,
    bad_request,
    internal_error,
    render_error,
)
from splitserve.services.router.metrics import RouterMetrics
from splitserve.services.router.model_facts import ModelCatalog, ModelFacts
from splitserve.services.router.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
)
from splitserve.services.router.tools import (
    ToolPlan,
    template_messages,
    with_tool_system_text,
)
from splitserve.services.router.workers import CPUPool

log = logging.getLogger(__name__)

_NO_HOLD = ColdStartConfig()  # no pod: 503 at once


@dataclass(frozen=True)
class Prepared:
    """An API request turned into engine samples."""

    rid: str
    created: int
    model: str
    chat: bool
    facts: ModelFacts  # the engine generation that tokenized the prompts and will serve them
    requests: list[EngineRequest]  # one per prompt, each with n samples
    n: int  # samples per prompt: choice p * n + i is sample i of prompt p
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
        catalog: ModelCatalog,
        dispatcher: Dispatcher,
        metrics: RouterMetrics,
        *,
        max_model_len: int | None = None,
        cpu: CPUPool | None = None,
        cold_start: ColdStartQueue | None = None,
        adapters: RouterAdapters | None = None,
    ) -> None:
        self.catalog = catalog
        self.dispatcher = dispatcher
        self.adapters = adapters or RouterAdapters(dispatcher)
        self.metrics = metrics
        self.max_model_len_cap = max_model_len  # the operator's limit, below the engines' own
        self.cpu = cpu or CPUPool()
        self.cold_start = cold_start or ColdStartQueue(_NO_HOLD, metrics)

    # ---- model facts ---------------------------------------------------------------------------

    def facts(self) -> ModelFacts:
        """The newest generation of engines that can serve now; 503 while none can."""
        facts = self._usable_facts()
        if facts is None:
            raise NoBackendError("no ready backend pod: the engines are starting or down")
        return facts

    def _usable_facts(self) -> ModelFacts | None:
        return self.catalog.newest(self.dispatcher.usable_tokenizers())

    async def ready_facts(self) -> ModelFacts:
        """``facts()``, or, while no generation can serve and holding is on, the first one
        that can within the cold-start timeout, or within the change-over hold while pods are
        changing over (``cold_start.py``); 503 otherwise."""
        return await self.cold_start.wait(
            self._usable_facts, "the model's engines", self.dispatcher.pool.changing_over
        )

    def max_model_len(self, facts: ModelFacts) -> int:
        cap = self.max_model_len_cap
        return facts.max_model_len if cap is None else min(cap, facts.max_model_len)

    # ---- preparing -----------------------------------------------------------------------------

    def _check_len(
        self, facts: ModelFacts, n_prompt: int, max_tokens: int | None, param: str
    ) -> int | None:
        limit = self.max_model_len(facts)
        if n_prompt == 0:
            raise bad_request("the prompt is empty", param=param)
        if n_prompt >= limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, "
                f"your prompt has {n_prompt} tokens.",
                param=param,
                code="context_length_exceeded",
            )
        if max_tokens is not None and n_prompt + max_tokens > limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, "
                f"you requested {n_prompt + max_tokens} tokens ({n_prompt} in the prompt, "
                f"{max_tokens} for the completion).",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return max_tokens

    def _check_min_len(self, facts: ModelFacts, text: str, param: str) -> None:
        """Refuse ``text`` before tokenizing it when it has at least ``max_model_len`` tokens
        for certain (a 7 MB prompt costs seconds of CPU to tokenize, for a 400)."""
        limit = self.max_model_len(facts)
        at_least = facts.tokenizer.min_tokens(text)
        if at_least >= limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, your prompt "
                f"has at least {at_least} tokens.",
                param=param,
                code="context_length_exceeded",
            )

    def encode(self, facts: ModelFacts, text: str, add_special_tokens: bool, param: str):
        """Token ids of ``text`` (checked against the context first). Runs on a worker."""
        self._check_min_len(facts, text, param)
        return facts.tokenizer.encode(text, add_special_tokens)

    def _requests(
        self, facts: ModelFacts, rid: str, prompts: list[list[int]], req: Any,
        max_tokens: int | None, logprobs: int | None, default_max: int | None,
        session_key: str | None,
    ) -> list[EngineRequest]:  # fmt: skip
        try:
            params = req.sampling_params(
                max_tokens=max_tokens, logprobs=logprobs, default_max=default_max
            )
            params.check_token_ids(facts.vocab_size)
        except ValueError as err:
            raise bad_request(str(err), param=str(err).split(" ", 1)[0]) from err
        try:
            params_to_proto(params)  # what the wire cannot carry is refused here, not mid-call
        except ValueError as err:
            raise bad_request(f"a sampling field cannot be sent to the engines: {err}") from err
        adapter = self.adapters.resolve(req.model, facts)  # None: the base model
        return [
            EngineRequest(f"{rid}-{p}", ids, params, facts.tokenizer_id, session_key, adapter)
            for p, ids in enumerate(prompts)
        ]

    def _completion_prompts(
        self, facts: ModelFacts, req: CompletionRequest
    ) -> tuple[list[list[int]], list[str]]:
        """Each prompt's token ids and (for echo) text. Runs on a worker."""
        tok = facts.tokenizer
        prompts, texts = [], []
        for prompt in req.prompts():
            if isinstance(prompt, str):
                ids = self.encode(facts, prompt, True, "prompt")
                texts.append(prompt)
            else:
                if any(t >= facts.vocab_size for t in prompt):
                    raise bad_request(
                        f"prompt token ids must be < the vocabulary size {facts.vocab_size}",
                        param="prompt",
                    )
                ids = list(prompt)
                texts.append(tok.decode(ids, skip_special_tokens=False) if req.echo else "")
            self._check_len(facts, len(ids), req.max_tokens, "prompt")
            prompts.append(ids)
        return prompts, texts

    async def prepare_completion(self, req: CompletionRequest, session_key: str | None) -> Prepared:
        rid = f"cmpl-{uuid.uuid4().hex}"
        # Cheap checks first: nothing is tokenized for a request that fails them.
        if req.suffix:  # insertion needs fill-in-the-middle models; refuse rather than ignore
            raise bad_request("suffix is not supported", param="suffix")
        try:
            req.check_fields()
        except ValueError as err:
            raise bad_request(str(err), param=str(err).split(" ", 1)[0]) from err
        try:
            per_prompt = req.samples_per_prompt()
        except ValueError as err:
            raise bad_request(str(err), param="best_of") from err
        facts = await self.ready_facts()
        prompts, texts = await self.cpu.run(self._completion_prompts, facts, req)
        keep = req.n if per_prompt > req.n else None
        # Ranking needs the sampled tokens' logprobs; the response shows them only if asked.
        logprobs = 0 if keep is not None and req.logprobs is None else req.logprobs
        fanned = req.model_copy(update={"n": per_prompt}) if keep is not None else req
        requests = self._requests(
            facts, rid, prompts, fanned, req.max_tokens, logprobs, 16, session_key
        )
        if req.echo and req.logprobs is not None:  # the echoed prompt's tokens get logprobs too
            for r in requests:
                r.params = replace(r.params, prompt_logprobs=req.logprobs)
        return Prepared(
            rid, int(time.time()), req.model, False, facts, requests, per_prompt,
            [len(p) for p in prompts], texts, req.logprobs, req.echo,
            bool(req.stream_options and req.stream_options.include_usage),
            keep=keep, continuous_usage=_continuous_usage(req),
        )  # fmt: skip

    def chat_prompt(
        self,
        facts: ModelFacts,
        messages: list[ChatMessage],
        plan: ToolPlan | None,
        add_generation_prompt: bool,
    ) -> list[int]:
        """The chat template's token ids for ``messages`` and the tools of ``plan``, refused
        early when the messages alone cannot fit the context. Runs on a worker."""
        tok = facts.tokenizer
        self._check_min_len(facts, "".join(m.text() for m in messages), "messages")
        try:
            msgs = template_messages(messages, native=tok.renders_tool_calls)
        except ValueError as err:
            raise bad_request(str(err), param=str(err).split(" ", 1)[0]) from err
        tools = None
        if plan is not None and tok.renders_tools:
            tools = plan.template_tools()
        elif plan is not None and plan.mode != "none":
            msgs = with_tool_system_text(msgs, plan)
        try:
            return tok.apply_chat_template(msgs, add_generation_prompt, tools=tools)
        except Exception as err:  # template errors (e.g. role order) are the client's input
            raise bad_request(f"chat template failed: {err}", param="messages") from err

    async def prepare_chat(self, req: ChatCompletionRequest, session_key: str | None) -> Prepared:
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            req.check_fields()
            plan = req.tool_plan()
        except ValueError as err:
            raise bad_request(str(err), param=str(err).split(" ", 1)[0]) from err
        try:
            logprobs = req.requested_logprobs()
        except ValueError as err:
            raise bad_request(str(err), param="top_logprobs") from err
        facts = await self.ready_facts()
        ids = await self.cpu.run(
            self.chat_prompt, facts, req.messages, plan, req.add_generation_prompt
        )
        max_tokens = (
            req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
        )
        self._check_len(facts, len(ids), max_tokens, "messages")
        # Chat's default is "as long as the context allows", like OpenAI / vLLM.
        requests = self._requests(facts, rid, [ids], req, max_tokens, logprobs, None, session_key)
        parsed = plan if plan is not None and plan.mode != "none" else None
        if (
            parsed is not None
            and parsed.mode == "auto"
            and facts.tokenizer.is_special("<tool_call>")
        ):
            for r in requests:  # the parser needs the tags in the text
                r.params = replace(r.params, skip_special_tokens=False)
        return Prepared(
            rid, int(time.time()), req.model, True, facts, requests, requests[0].params.n,
            [len(ids)], [""], logprobs, False,
            bool(req.stream_options and req.stream_options.include_usage), parsed,
            continuous_usage=_continuous_usage(req),
        )  # fmt: skip

    # ---- running -------------------------------------------------------------------------------

    def _account(self, p: Prepared, results: list[R.SampleResult]) -> None:
        """Token counters: each prompt once (its n samples share it), every sample's output."""
        usage = R.total_usage(results, p.prompt_lens)
        if (rec := logs.current()) is not None:  # for the access log
            rec.prompt_tokens = usage.prompt_tokens
            rec.completion_tokens = usage.completion_tokens
        m = self.metrics
        m.prompt_tokens.inc(usage.prompt_tokens)
        m.cached_tokens.inc(usage.prompt_tokens_details.cached_tokens)
        m.generation_tokens.inc(usage.completion_tokens)

    async def complete(self, p: Prepared) -> M.CompletionResponse | M.ChatCompletionResponse:
        """Run every prompt to the end (retrying failed pods) and build the response."""
        outs = await asyncio.gather(*(self.dispatcher.complete(r) for r in p.requests))
        results = [R.SampleResult(index=i) for i in range(len(p.requests) * p.n)]
        for prompt, msgs in enumerate(outs):
            for msg in msgs:
                results[prompt * p.n + msg.index].add(msg)
            lps = next((list(m.prompt_logprobs) for m in msgs if m.prompt_logprobs), [])
            for i in range(p.n):
                results[prompt * p.n + i].prompt_logprobs = lps
        self._account(p, results)
        usage = R.total_usage(results, p.prompt_lens)  # best_of: every sample is billed
        if p.keep is not None:
            results = R.most_likely(results, p.n, p.keep)
        tok = p.facts.tokenizer
        head = {"id": p.rid, "created": p.created, "model": p.model, "usage": usage}
        if p.chat:
            choices = []
            for k, r in enumerate(results):
                message, finish = tool_calls.chat_message(p.tools, r.text, r.finish_reason)
                lp = R.chat_logprobs(tok, r.logprobs) if p.logprobs is not None else None
                choices.append(
                    M.ChatChoice(
                        index=k,
                        message=M.AssistantMessage.model_validate(message),
                        logprobs=lp,
                        finish_reason=finish,
                    )
                )
            return M.ChatCompletionResponse(object="chat.completion", choices=choices, **head)
        texts = []
        for k, r in enumerate(results):  # k == r.index unless best_of dropped samples
            prefix = p.prompt_texts[r.index // p.n] if p.echo else ""
            texts.append(
                M.CompletionChoice(
                    index=k,
                    text=prefix + r.text,
                    logprobs=_completion_logprobs(p, r, r.logprobs, len(prefix)),
                    finish_reason=r.finish_reason,
                )
            )
        return M.CompletionResponse(object="text_completion", choices=texts, **head)

    async def open_stream(self, p: Prepared, t_arrival: float) -> AsyncIterator[bytes]:
        """Start the request's prompts on the pods and wait until each answered its first
        message; raises ``APIError`` (or ``BackendError``) if one failed before that, so the
        client gets a real HTTP status. Returns the SSE bytes of the whole stream."""
        run = _StreamRun(self, p, t_arrival)
        await run.start()
        return run.events()


class _StreamRun:
    """One streamed request: a pump task per prompt feeding one queue, merged into SSE."""

    def __init__(self, serving: OpenAIServing, p: Prepared, t_arrival: float) -> None:
        self.serving = serving
        self.p = p
        self.t_arrival = t_arrival
        self.queue: asyncio.Queue[tuple[int, pb.GenerateResponse | BaseException | None]] = (
            asyncio.Queue()
        )
        self.tasks: list[asyncio.Task] = []
        self.early: list[tuple[int, pb.GenerateResponse | None]] = []  # read before the 200

    async def _pump(self, prompt: int, request: EngineRequest) -> None:
        try:
            async for msg in self.serving.dispatcher.stream(request):
                await self.queue.put((prompt, msg))
            await self.queue.put((prompt, None))
        except asyncio.CancelledError:
            raise
        except BaseException as err:  # noqa: BLE001 - forwarded to the consumer
            await self.queue.put((prompt, err))

    async def start(self) -> None:
        self.tasks = [asyncio.create_task(self._pump(i, r)) for i, r in enumerate(self.p.requests)]
        waiting = set(range(len(self.tasks)))
        try:
            while waiting:
                prompt, item = await self.queue.get()
                if isinstance(item, BaseException):
                    raise item
                waiting.discard(prompt)
                self.early.append((prompt, item))
        except BaseException:
            await self._stop()
            raise

    async def _stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        # Let the cancelled prompts run their cleanup (stream cancel + Abort) before we go.
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _items(self) -> AsyncIterator[tuple[int, pb.GenerateResponse]]:
        """The pods' messages in arrival order; raises the first failure."""
        remaining = len(self.tasks)
        for prompt, item in self.early:
            if item is None:
                remaining -= 1
            else:
                yield prompt, item
        self.early = []
        while remaining:
            batch = [await self.queue.get()]
            while not self.queue.empty():  # we are behind: merge what waits (one SSE chunk)
                batch.append(self.queue.get_nowait())
            for prompt, item in _coalesce(batch):
                if item is None:
                    remaining -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                yield prompt, item

    async def events(self) -> AsyncIterator[bytes]:
        """SSE bytes: role/echo preamble, token deltas as they come, usage, ``[DONE]``.

        A prompt that fails after the 200 ends the stream with an error event, then ``[DONE]``
        (never a silent truncation); the other prompts are cancelled (and aborted on their
        pods). Only the client going away (cancellation) ends it without them.
        """
        p, metrics = self.p, self.serving.metrics
        chunks = _ChunkStream(p)
        try:
            if (pre := chunks.preamble()) is not None:
                yield pre
            async for prompt, item in self._items():
                if chunks.first_token and (item.token_ids or item.text):
                    metrics.ttft.observe(time.perf_counter() - self.t_arrival)
                for event in chunks.feed(prompt, item):
                    yield event
            self.serving._account(p, chunks.results)
            if (usage := chunks.usage_event()) is not None:
                yield usage
        except APIError as err:
            yield error_event(err)
        except BackendError as err:
            yield error_event(backend_error_to_api(err))
        except Exception:  # noqa: BLE001 - whatever broke, the client gets an event, not a cut
            log.exception("stream %s failed", p.rid)
            yield error_event(internal_error(logs.request_id() or p.rid))
        finally:
            await self._stop()
        yield R.SSE_DONE


class _ChunkStream:
    """Turns the pods' messages of one request into SSE events, choice by choice."""

    def __init__(self, p: Prepared) -> None:
        self.p = p
        self.tok = p.facts.tokenizer
        count = len(p.requests) * p.n
        self.results = [R.SampleResult(index=i) for i in range(count)]
        self.calls = [tool_calls.ToolCallStream(p.tools) for _ in range(count)] if p.tools else []
        self.offsets = [len(p.prompt_texts[i // p.n]) if p.echo else 0 for i in range(count)]
        self.echoed = [False] * count
        self.prompt_lps: dict[int, list[pb.TokenLogprobs]] = {}
        self.first_token = True

    def _event(self, choices: list[Any], usage: M.Usage | None = None) -> bytes:
        p = self.p
        head: dict[str, Any] = {"id": p.rid, "created": p.created, "model": p.model}
        if usage is not None:
            head["usage"] = usage
        if p.chat:
            chunk: Any = M.ChatCompletionChunk(
                object="chat.completion.chunk", choices=choices, **head
            )
        else:
            chunk = M.CompletionChunk(object="text_completion", choices=choices, **head)
        return R.sse(chunk)

    def preamble(self) -> bytes | None:
        """The assistant role for chat, the prompt for echo (without logprobs)."""
        p, count = self.p, len(self.results)
        if p.chat:
            content = None if p.tools is not None and p.tools.forced else ""
            delta = M.ChatDelta(role="assistant", content=content)
            return self._event([
                M.ChatChunkChoice(index=i, delta=delta, logprobs=None, finish_reason=None)
                for i in range(count)
            ])  # fmt: skip
        if p.echo and p.logprobs is None:
            return self._event([
                M.CompletionChoice(index=i, text=p.prompt_texts[i // p.n], logprobs=None,
                                   finish_reason=None)
                for i in range(count)
            ])  # fmt: skip
        return None

    def feed(self, prompt: int, msg: pb.GenerateResponse) -> list[bytes]:
        p = self.p
        if msg.prompt_logprobs:
            self.prompt_lps[prompt] = list(msg.prompt_logprobs)
        i = prompt * p.n + msg.index
        r = self.results[i]
        r.add(msg)
        r.prompt_logprobs = self.prompt_lps.get(prompt, [])
        if not msg.token_ids and not msg.text and not msg.finish_reason:
            return []
        if msg.token_ids or msg.text:
            self.first_token = False
        finish = R.FINISH_REASONS[msg.finish_reason]
        events = self._chat(i, msg, finish) if p.chat else self._completion(i, r, msg, finish)
        out = [self._event(e) for e in events[:-1]]
        if events:
            running = R.total_usage(self.results, p.prompt_lens) if p.continuous_usage else None
            out.append(self._event(events[-1], running))
        return out

    def _chat(self, i: int, msg: pb.GenerateResponse, finish: str | None) -> list[list[Any]]:
        lp = R.chat_logprobs(self.tok, list(msg.logprobs)) if self.p.logprobs is not None else None
        out: list[list[Any]] = []
        if self.calls:
            deltas, finish = self.calls[i].feed(msg.text, finish)
            if not deltas and finish is None and lp is None:
                return []
            out += [
                [M.ChatChunkChoice(index=i, delta=M.ChatDelta.model_validate(d), logprobs=None,
                                   finish_reason=None)]
                for d in deltas[:-1]
            ]  # fmt: skip
            delta = M.ChatDelta.model_validate(deltas[-1] if deltas else {})
        else:
            delta = M.ChatDelta(content=msg.text) if msg.text or not finish else M.ChatDelta()
        out.append([M.ChatChunkChoice(index=i, delta=delta, logprobs=lp, finish_reason=finish)])
        return out

    def _completion(self, i: int, r: R.SampleResult, msg, finish: str | None) -> list[list[Any]]:
        p = self.p
        out: list[list[Any]] = []
        if p.echo and p.logprobs is not None and not self.echoed[i]:
            # The echoed prompt, with its logprobs (they came with the prompt's first message).
            self.echoed[i] = True
            out.append([
                M.CompletionChoice(index=i, text=p.prompt_texts[i // p.n],
                                   logprobs=_completion_logprobs(p, r, [], 0), finish_reason=None)
            ])  # fmt: skip
        lp = None
        if p.logprobs is not None:
            lp = R.completion_logprobs(self.tok, list(msg.logprobs), self.offsets[i])
        self.offsets[i] += len(msg.text)
        out.append([M.CompletionChoice(index=i, text=msg.text, logprobs=lp, finish_reason=finish)])
        return out

    def usage_event(self) -> bytes | None:
        if not self.p.include_usage:
            return None
        return self._event([], R.total_usage(self.results, self.p.prompt_lens))


def _coalesce(
    batch: list[tuple[int, pb.GenerateResponse | BaseException | None]],
) -> list[tuple[int, pb.GenerateResponse | BaseException | None]]:
    """Merge the waiting messages of each choice into one, in order of first appearance: the
    client gets the same text, tokens and logprobs in fewer chunks. Ends of streams and errors
    stay where they are (a choice's messages after one are not merged across it)."""
    if len(batch) < 2:
        return batch
    out: list[tuple[int, pb.GenerateResponse | BaseException | None]] = []
    open_: dict[tuple[int, int], pb.GenerateResponse] = {}  # (prompt, index) -> merged message
    for prompt, item in batch:
        if not isinstance(item, pb.GenerateResponse):
            open_.clear()  # nothing merges across an end or an error
            out.append((prompt, item))
            continue
        key = (prompt, item.index)
        merged = open_.get(key)
        if merged is None or merged.finish_reason:
            merged = pb.GenerateResponse()
            merged.CopyFrom(item)
            open_[key] = merged
            out.append((prompt, merged))
            continue
        merged.token_ids.extend(item.token_ids)
        merged.text += item.text
        merged.logprobs.extend(item.logprobs)
        merged.prompt_logprobs.extend(item.prompt_logprobs)
        merged.finish_reason = item.finish_reason
        merged.stop_str = item.stop_str
        merged.error = item.error
        if item.HasField("usage"):
            merged.usage.CopyFrom(item.usage)
        if item.HasField("kv_transfer") and not merged.HasField("kv_transfer"):
            merged.kv_transfer.CopyFrom(item.kv_transfer)
    return out


def _completion_logprobs(
    p: Prepared, r: R.SampleResult, entries: list, text_offset: int
) -> M.CompletionLogprobs | None:
    """Legacy completions logprobs of ``entries``; with echo, the prompt's come first."""
    if p.logprobs is None:
        return None
    tok = p.facts.tokenizer
    if p.echo:
        prompt_ids = p.requests[r.index // p.n].prompt_token_ids
        return R.echo_logprobs(tok, prompt_ids, r.prompt_logprobs, entries)
    return R.completion_logprobs(tok, entries, text_offset)


def error_event(err: APIError) -> bytes:
    """An error after the stream started: an SSE ``error`` event (then ``[DONE]``)."""
    return R.sse(render_error(err))


def _continuous_usage(req: CompletionRequest | ChatCompletionRequest) -> bool:
    """vLLM's ``stream_options.continuous_usage_stats`` (with ``include_usage``): running usage
    on every chunk of a stream."""
    so = req.stream_options
    return bool(so and so.include_usage and so.continuous_usage_stats)
