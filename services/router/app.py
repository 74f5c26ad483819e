"""The FastAPI application: the OpenAI routes, vLLM's extras, health, metrics and errors.

Bodies are read by the guard (``guard.py``: limits, content type, auth) and parsed and validated
here rather than by FastAPI's parameter injection, so every failure (bad JSON, wrong types,
oversize) comes back in the OpenAI error shape with the right code. ``/openapi.json`` is built
from the same request and response models (``openapi.py``).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from splitserve.services.router import response_models as M
from splitserve.services.router.auth import ApiKeys
from splitserve.services.router.body import parse_json, validate
from splitserve.services.router.dispatch import Dispatcher, backend_error_to_api
from splitserve.services.router.errors import APIError, BackendError, NoBackendError, render_error
from splitserve.services.router.guard import GuardMiddleware, Limits, Routes
from splitserve.services.router.metrics import RouterMetrics
from splitserve.services.router.model_facts import ModelFacts
from splitserve.services.router.openapi import JSON_ROUTES, install_openapi
from splitserve.services.router.pool import DECODE, PREFILL
from splitserve.services.router.protocol import (
    DEFAULT_MAX_TEMPERATURE,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoRAAdapterRequest,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
)
from splitserve.services.router.responses import to_json
from splitserve.services.router.serving import OpenAIServing, Prepared
from splitserve.services.router.unsupported import unsupported_endpoint

log = logging.getLogger(__name__)

Req = TypeVar("Req", bound=BaseModel)


def _version() -> str:
    try:
        return importlib.metadata.version("splitserve")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


VERSION = _version()


@dataclass(frozen=True)
class AppConfig:
    served_names: tuple[str, ...]
    api_keys: ApiKeys = field(default_factory=ApiKeys)
    max_body_bytes: int = 8 << 20
    session_header: str = "x-session-id"
    instance_id: str = ""  # reported by /health
    max_temperature: float = DEFAULT_MAX_TEMPERATURE  # OpenAI's 2 unless widened (vLLM takes more)


def _json(model: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(to_json(model), status, headers, media_type="application/json")


def error_response(err: APIError) -> Response:
    """The HTTP response of ``err`` (``render_error`` cannot fail)."""
    return Response(render_error(err), err.status, err.headers or None, "application/json")


def build_app(
    config: AppConfig, serving: OpenAIServing, dispatcher: Dispatcher, metrics: RouterMetrics
) -> FastAPI:
    app = FastAPI(title="splitserve router", version=VERSION, docs_url=None, redoc_url=None)
    context = {"max_temperature": config.max_temperature}

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> Response:
        return error_response(err)

    @app.exception_handler(404)
    async def not_found(request: Request, _: Exception) -> Response:
        return error_response(unsupported_endpoint(request.method, request.url.path))

    @app.exception_handler(405)
    async def not_allowed(request: Request, _: Exception) -> Response:
        return error_response(
            APIError(405, f"method {request.method} is not allowed on {request.url.path[:200]}")
        )

    async def parse(request: Request, model: type[Req]) -> Req:
        # The guard read the body under the limit; this is that body, replayed.
        return validate(model, parse_json(await request.body()), context)

    def served_names() -> tuple[str, ...]:
        """``--served-name`` if given, else every name the engines report (and aliases)."""
        return config.served_names or serving.catalog.served_names()

    def adapter_views() -> dict:
        """The LoRA adapters the newest known generation of engines has loaded."""
        return serving.adapters.views(serving.catalog.any())

    def check_model(name: str | None) -> None:
        names = served_names()
        if name is not None and name not in names and name not in adapter_views():
            names = (*names, *adapter_views())
            raise APIError(
                404,
                f"The model `{name}` does not exist. Served: {', '.join(names) or 'none yet'}",
                param="model",
                code="model_not_found",
            )

    async def run(request: Request, prepared: Prepared, stream: bool) -> Response:
        t0 = time.perf_counter()
        arrival = request.scope.get("state", {}).get("arrival")  # set by the guard
        if arrival is not None:
            metrics.queue.observe(t0 - arrival)
        metrics.inflight.inc()
        try:
            if stream:
                # Every prompt's first message is in before the 200: errors are HTTP statuses.
                events = await _cancel_on_disconnect(
                    request, serving.open_stream(prepared, t0), metrics
                )
            else:
                body = await _cancel_on_disconnect(request, serving.complete(prepared), metrics)
        except BackendError as err:
            metrics.inflight.dec()
            raise backend_error_to_api(err) from err
        except BaseException:
            metrics.inflight.dec()
            raise
        if not stream:
            metrics.inflight.dec()
            return _json(body)  # X-Request-Id: the guard's, on every response
        return StreamingResponse(
            _counted(metrics, events),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = await parse(request, CompletionRequest)
        check_model(req.model)
        session = request.headers.get(config.session_header)
        # Preparing may hold the request while no pod is ready (cold start): a client that
        # leaves meanwhile frees its place.
        prepared = await _cancel_on_disconnect(
            request, serving.prepare_completion(req, session), metrics
        )
        return await run(request, prepared, req.stream)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = await parse(request, ChatCompletionRequest)
        check_model(req.model)
        session = request.headers.get(config.session_header)
        prepared = await _cancel_on_disconnect(request, serving.prepare_chat(req, session), metrics)
        return await run(request, prepared, req.stream)

    def known_facts() -> ModelFacts:
        """The newest engine generation the router has heard of (it may not be ready)."""
        facts = serving.catalog.any()
        if facts is None:
            raise NoBackendError("no engine has reported its model yet: they are starting")
        return facts

    @app.get("/v1/models")
    async def models() -> Response:
        created = int(time.time())
        facts = serving.catalog.any()
        limit = serving.max_model_len(facts) if facts is not None else None
        root = facts.served_model_name if facts is not None else None
        cards = [
            M.ModelCard(id=name, object="model", created=created, owned_by="splitserve",
                        max_model_len=limit, root=root)
            for name in served_names()
        ]  # fmt: skip
        cards += [
            M.ModelCard(id=name, object="model", created=created, owned_by="splitserve",
                        max_model_len=limit, root=view.info.path, parent=view.parent)
            for name, view in adapter_views().items()
        ]  # fmt: skip
        return _json(M.ModelList(object="list", data=cards))

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> Response:
        check_model(name)
        view = adapter_views().get(name)
        card = M.ModelCard(
            id=name, object="model", created=int(time.time()), owned_by="splitserve",
            root=view.info.path if view else None, parent=view.parent if view else None,
        )  # fmt: skip
        return _json(card)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Response:
        """vLLM's runtime load: on every engine pod of the serving generation (prefill and
        decode alike), all or nothing; pods that join later get it too."""
        req = await parse(request, LoadLoRAAdapterRequest)
        try:
            text = await serving.adapters.load(req.lora_name, req.lora_path, serving.facts())
        except BackendError as err:
            raise backend_error_to_api(err) from err
        return PlainTextResponse(text)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Response:
        req = await parse(request, UnloadLoRAAdapterRequest)
        text = await serving.adapters.unload(req.lora_name, serving.catalog.any())
        return PlainTextResponse(text)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        req = await parse(request, TokenizeRequest)
        check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of `prompt` and `messages`", param="prompt")
        facts = known_facts()
        if req.messages is not None:
            ids = await serving.cpu.run(
                serving.chat_prompt, facts, req.messages, None, req.add_generation_prompt
            )
        else:
            ids = await serving.cpu.run(
                serving.encode, facts, req.prompt or "", req.add_special_tokens, "prompt"
            )
        limit = serving.max_model_len(facts)
        return _json(M.TokenizeResponse(tokens=ids, count=len(ids), max_model_len=limit))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        req = await parse(request, DetokenizeRequest)
        check_model(req.model)
        facts = known_facts()
        if any(t >= facts.vocab_size for t in req.tokens):
            raise APIError(
                400, f"token ids must be < the vocabulary size {facts.vocab_size}", param="tokens"
            )
        text = await serving.cpu.run(facts.tokenizer.decode, req.tokens, False)
        return _json(M.DetokenizeResponse(prompt=text))

    def health_body() -> tuple[M.HealthResponse, int]:
        prefill, decode = dispatcher.pool.ready(PREFILL), dispatcher.pool.ready(DECODE)
        ok = bool(dispatcher.usable_tokenizers())
        # Holding requests for a cold start is serving them: the router stays ready (in its
        # Service) while its pools are scaled to zero, else nothing could wake them. So while
        # pods change over (a rollout, a scale-down): out of its Service, the router's hold for
        # the new pods would meet only refused connections.
        holds = serving.cold_start.enabled or (
            serving.cold_start.config.transition_s > 0 and dispatcher.pool.changing_over()
        )
        status = "ok" if ok else "idle" if holds else "unavailable"
        body = M.HealthResponse(
            status=status,
            prefill_pods=len(prefill),
            decode_pods=len(decode),
            instance_id=config.instance_id,
        )
        return body, 503 if status == "unavailable" else 200

    @app.get("/health")
    async def health() -> Response:
        """200 when some engine generation can serve a request end to end (a prefill-capable
        pod with a decode pod it pairs with), or (status ``idle``) when none can but requests
        are held until one starts (``--cold-start-timeout``); 503 otherwise. ``instance_id``
        names this process (a launcher checks it is talking to the router it started)."""
        body, status = health_body()
        return _json(body, status)

    async def ping() -> Response:
        """vLLM's (and SageMaker's) probe, GET or POST: as ``/health``."""
        body, status = health_body()
        return _json(body, status)

    app.get("/ping")(ping)
    app.post("/ping")(ping)

    @app.get("/version")
    async def version() -> Response:
        return _json(M.VersionResponse(version=VERSION))

    @app.get("/metrics")
    async def prom() -> Response:
        metrics.ready_pods.labels(PREFILL).set(len(dispatcher.pool.ready(PREFILL)))
        metrics.ready_pods.labels(DECODE).set(len(dispatcher.pool.ready(DECODE)))
        precise, speculative = dispatcher.pool.index.size()
        metrics.prefix_index_blocks.labels("precise").set(precise)
        metrics.prefix_index_blocks.labels("speculative").set(speculative)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    install_openapi(app, config.max_temperature, config.api_keys.enabled)
    paths = [getattr(r, "path", "") for r in app.routes]
    app.add_middleware(
        GuardMiddleware,
        api_keys=config.api_keys,
        limits=Limits(max_body_bytes=config.max_body_bytes),
        metrics=metrics,
        routes=Routes.from_paths([p for p in paths if p], JSON_ROUTES),
    )
    return app


async def _counted(metrics: RouterMetrics, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The stream's events; ``inflight`` (raised by ``run``) comes down when it ends."""
    try:
        async for item in events:
            yield item
    except (asyncio.CancelledError, GeneratorExit):
        metrics.aborts.inc()
        raise
    finally:
        metrics.inflight.dec()
        await events.aclose()  # type: ignore[attr-defined]


async def _cancel_on_disconnect(request: Request, coro: Awaitable[Any], metrics: RouterMetrics):
    """Run ``coro``; if the client disconnects first, cancel it (which aborts on the pods)."""
    task = asyncio.ensure_future(coro)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            return task.result()
        if await request.is_disconnected():
            metrics.aborts.inc()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise APIError(499, "client closed the request")
