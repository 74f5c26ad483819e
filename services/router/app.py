"""The FastAPI application: OpenAI routes, auth, body limits, errors, health and metrics.

Bodies are read and validated here rather than by FastAPI's parameter injection so that every
failure (bad JSON, wrong types, oversize) comes back in the OpenAI error shape with the right code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from splitserve.services.router.auth import ApiKeys
from splitserve.services.router.dispatch import Dispatcher, backend_error_to_api
from splitserve.services.router.errors import APIError, BackendError, NoBackendError, error_body
from splitserve.services.router.metrics import RouterMetrics
from splitserve.services.router.model_facts import ModelFacts
from splitserve.services.router.pool import DECODE, PREFILL
from splitserve.services.router.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from splitserve.services.router.serving import OpenAIServing, Prepared

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
OPEN_PATHS = frozenset({"/health", "/metrics", "/ping"})


@dataclass(frozen=True)
class AppConfig:
    served_names: tuple[str, ...]
    api_keys: ApiKeys = field(default_factory=ApiKeys)
    max_body_bytes: int = 8 << 20
    session_header: str = "x-session-id"
    instance_id: str = ""  # reported by /health


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers or None)


def _validation_error(err: ValidationError) -> APIError:
    first = err.errors()[0] if err.errors() else {}
    loc = ".".join(str(x) for x in first.get("loc", ()))
    message = "; ".join(
        f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in err.errors()[:5]
    )
    return APIError(400, message or "invalid request", param=loc or None, code="invalid_value")


def build_app(
    config: AppConfig, serving: OpenAIServing, dispatcher: Dispatcher, metrics: RouterMetrics
) -> FastAPI:
    app = FastAPI(title="splitserve router", docs_url=None, redoc_url=None, openapi_url=None)

    app.add_middleware(GuardMiddleware, config=config, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return _error_response(err)

    @app.exception_handler(404)
    async def not_found(_: Request, __: Exception) -> JSONResponse:
        return JSONResponse(error_body("not found", "not_found_error"), status_code=404)

    @app.exception_handler(405)
    async def not_allowed(_: Request, __: Exception) -> JSONResponse:
        return JSONResponse(
            error_body("method not allowed", "invalid_request_error"), status_code=405
        )

    async def parse(request: Request, model: type[M]) -> M:
        try:
            body = await request.body()
        except ClientDisconnect:
            # The client went away while sending its body: nothing to answer, nothing to abort.
            log.info("client disconnected while sending %s", request.url.path)
            raise APIError(499, "client closed the request") from None
        if len(body) > config.max_body_bytes:
            raise _too_large(config)
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as err:
            raise APIError(400, f"invalid JSON body: {err}", code="invalid_json") from err
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        try:
            return model.model_validate(data)
        except ValidationError as err:
            raise _validation_error(err) from err

    def served_names() -> tuple[str, ...]:
        """``--served-name`` if given, else every name the engines report (and aliases)."""
        return config.served_names or serving.catalog.served_names()

    def check_model(name: str | None) -> None:
        names = served_names()
        if name is not None and name not in names:
            raise APIError(
                404,
                f"The model `{name}` does not exist. Served: {', '.join(names) or 'none yet'}",
                param="model",
                code="model_not_found",
            )

    async def run(request: Request, prepared: Prepared, stream: bool) -> Response:
        t0 = time.perf_counter()
        if stream:
            return StreamingResponse(
                _counted(metrics, serving.stream(prepared, t0)),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Request-Id": prepared.rid},
            )
        metrics.inflight.inc()
        try:
            body = await _cancel_on_disconnect(request, serving.complete(prepared), metrics)
        except BackendError as err:
            raise backend_error_to_api(err) from err
        finally:
            metrics.inflight.dec()
        return JSONResponse(body, headers={"X-Request-Id": prepared.rid})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = await parse(request, CompletionRequest)
        check_model(req.model)
        prepared = serving.prepare_completion(req, request.headers.get(config.session_header))
        return await run(request, prepared, req.stream)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = await parse(request, ChatCompletionRequest)
        check_model(req.model)
        prepared = serving.prepare_chat(req, request.headers.get(config.session_header))
        return await run(request, prepared, req.stream)

    def known_facts() -> ModelFacts:
        """The newest engine generation the router has heard of (it may not be ready)."""
        facts = serving.catalog.any()
        if facts is None:
            raise NoBackendError("no engine has reported its model yet: they are starting")
        return facts

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        facts = serving.catalog.any()
        limit = serving.max_model_len(facts) if facts is not None else None
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "splitserve",
                    "max_model_len": limit,
                }
                for name in served_names()
            ],
        }

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        check_model(name)
        return {
            "id": name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "splitserve",
        }

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        req = await parse(request, TokenizeRequest)
        check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of `prompt` and `messages`", param="prompt")
        facts = known_facts()
        if req.messages is not None:
            ids = serving.chat_prompt(facts, req.messages, None, req.add_generation_prompt)
        else:
            ids = facts.tokenizer.encode(req.prompt or "", req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": serving.max_model_len(facts)}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        req = await parse(request, DetokenizeRequest)
        check_model(req.model)
        facts = known_facts()
        if any(t < 0 or t >= facts.vocab_size for t in req.tokens):
            raise APIError(400, "token ids out of the vocabulary", param="tokens")
        return {"prompt": facts.tokenizer.decode(req.tokens, skip_special_tokens=False)}

    @app.get("/health")
    async def health() -> Response:
        """200 when some engine generation can serve a request end to end (a prefill-capable
        pod with a decode pod it pairs with), 503 otherwise; ``instance_id`` names this process
        (a launcher checks it is talking to the router it started)."""
        prefill, decode = dispatcher.pool.ready(PREFILL), dispatcher.pool.ready(DECODE)
        ok = bool(dispatcher.usable_tokenizers())
        body = {
            "status": "ok" if ok else "unavailable",
            "prefill_pods": len(prefill),
            "decode_pods": len(decode),
            "instance_id": config.instance_id,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prom() -> Response:
        metrics.ready_pods.labels(PREFILL).set(len(dispatcher.pool.ready(PREFILL)))
        metrics.ready_pods.labels(DECODE).set(len(dispatcher.pool.ready(DECODE)))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _too_large(config: AppConfig) -> APIError:
    return APIError(
        413, f"request body exceeds {config.max_body_bytes} bytes", code="request_too_large"
    )


class GuardMiddleware:
    """Auth, the body-size limit and request metrics as plain ASGI.

    Plain ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware hides client
    disconnects from the handlers (which must abort on the pods) and costs latency per request.
    """

    def __init__(self, app: ASGIApp, config: AppConfig, metrics: RouterMetrics) -> None:
        self.app = app
        self.config = config
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        t0 = time.perf_counter()
        status = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        error: APIError | None = None
        if path not in OPEN_PATHS:
            headers = {
                k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]
            }
            keys = self.config.api_keys
            if keys.enabled and not keys.check(headers.get("authorization", "")):
                error = APIError(401, "invalid or missing API key", code="invalid_api_key")
            length = headers.get("content-length", "")
            if error is None and length.isdigit() and int(length) > self.config.max_body_bytes:
                error = _too_large(self.config)
        if error is not None:
            await _error_response(error)(scope, receive, send_wrapper)
        else:
            await self.app(scope, receive, send_wrapper)
        endpoint = path if path.startswith("/v1/") or path in OPEN_PATHS else "other"
        if endpoint.startswith("/v1/models/"):
            endpoint = "/v1/models/{name}"
        self.metrics.requests.labels(endpoint, str(status[0])).inc()
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)


async def _counted(metrics: RouterMetrics, agen):
    metrics.inflight.inc()
    try:
        async for item in agen:
            yield item
    except (asyncio.CancelledError, GeneratorExit):
        metrics.aborts.inc()
        raise
    finally:
        metrics.inflight.dec()
        await agen.aclose()


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
