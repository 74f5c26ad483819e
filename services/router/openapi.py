"""``/openapi.json``: the router's API as its own request and response models define it.

The handlers read their bodies themselves (``guard.py``, ``body.py``), so FastAPI cannot see
them; this module states each operation's request body, its responses (the typed models of
``response_models.py``, the SSE stream, the OpenAI error) and the statuses it can answer. The
schemas come from the very pydantic models that validate requests and build responses, so the
document cannot drift from the code; the test suite runs schemathesis against it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from splitserve.services.router import response_models as M
from splitserve.services.router.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoRAAdapterRequest,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
)

# path -> the request model of its JSON body (POST)
REQUESTS: dict[str, type[BaseModel]] = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
    "/tokenize": TokenizeRequest,
    "/detokenize": DetokenizeRequest,
    "/v1/load_lora_adapter": LoadLoRAAdapterRequest,  # 200: vLLM's plain-text "Success: ..."
    "/v1/unload_lora_adapter": UnloadLoRAAdapterRequest,
}
JSON_ROUTES = frozenset(REQUESTS)
_RESPONSES: list[type[BaseModel]] = [
    M.CompletionResponse, M.CompletionChunk, M.ChatCompletionResponse, M.ChatCompletionChunk,
    M.ModelList, M.ModelCard, M.TokenizeResponse, M.DetokenizeResponse, M.HealthResponse,
    M.VersionResponse, M.ErrorResponse,
]  # fmt: skip
# (path, method) -> (200 body model, streams?)
_OK: dict[tuple[str, str], tuple[type[BaseModel] | None, type[BaseModel] | None]] = {
    ("/v1/completions", "post"): (M.CompletionResponse, M.CompletionChunk),
    ("/v1/chat/completions", "post"): (M.ChatCompletionResponse, M.ChatCompletionChunk),
    ("/tokenize", "post"): (M.TokenizeResponse, None),
    ("/detokenize", "post"): (M.DetokenizeResponse, None),
    ("/v1/models", "get"): (M.ModelList, None),
    ("/v1/models/{name}", "get"): (M.ModelCard, None),
    ("/health", "get"): (M.HealthResponse, None),
    ("/ping", "get"): (M.HealthResponse, None),
    ("/ping", "post"): (M.HealthResponse, None),
    ("/version", "get"): (M.VersionResponse, None),
    ("/metrics", "get"): (None, None),
}
_ERRORS = {
    400: "invalid JSON or fields (`param` names the field)",
    401: "missing or wrong API key",
    404: "unknown model, or an unsupported endpoint (`code: unsupported_endpoint`)",
    405: "method not allowed",
    413: "body over the size limit",
    414: "URI too long",
    415: "the body is not JSON",
    431: "request headers too large",
    500: "unexpected error (the body names the request id)",
    502: "the engines failed past the retry budget",
    503: "no engine can serve now (`Retry-After`)",
}
_BODYLESS_ERRORS = (401, 404, 405, 414, 431, 500, 503)


def build_openapi(app: FastAPI, max_temperature: float, auth: bool) -> dict[str, Any]:
    """The document for ``app``'s routes, with the configured temperature bound."""
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    models = [(m, "validation") for m in REQUESTS.values()]
    models += [(m, "serialization") for m in _RESPONSES]
    refs, defs = models_json_schema(models, ref_template="#/components/schemas/{model}")
    schemas: dict[str, Any] = defs.get("$defs", {})
    for model in REQUESTS.values():
        temperature = schemas[model.__name__]["properties"].get("temperature")
        if temperature is not None:
            for option in temperature.get("anyOf", [temperature]):
                if option.get("type") == "number":
                    option["maximum"] = max_temperature
    doc["components"] = {"schemas": schemas}
    if auth:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}

    def ref(model: type[BaseModel], mode: str) -> dict[str, Any]:
        return refs[(model, mode)]

    error = {"application/json": {"schema": ref(M.ErrorResponse, "serialization")}}
    for path, ops in doc.get("paths", {}).items():
        for method, op in ops.items():
            ok, chunk = _OK.get((path, method), (None, None))
            content: dict[str, Any] = {}
            if ok is not None:
                content["application/json"] = {"schema": ref(ok, "serialization")}
            else:
                content["text/plain"] = {"schema": {"type": "string"}}
            if chunk is not None:
                content["text/event-stream"] = {
                    "schema": {
                        "type": "string",
                        "description": f"with `stream: true`: `data: <{chunk.__name__}>` events, "
                        "an `error` event if it fails after the first byte, then `data: [DONE]`",
                    }
                }
            codes = _ERRORS if method == "post" and path in REQUESTS else _BODYLESS_ERRORS
            responses: dict[str, Any] = {"200": {"description": "OK", "content": content}}
            for code in codes:
                responses[str(code)] = {"description": _ERRORS[code], "content": error}
            op["responses"] = responses
            if method == "post" and path in REQUESTS:
                schema = ref(REQUESTS[path], "validation")
                op["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": schema}},
                }
            if auth and (path.startswith("/v1/") or path in REQUESTS):
                op["security"] = [{"bearer": []}]
    return doc


def install_openapi(app: FastAPI, max_temperature: float, auth: bool = False) -> None:
    """Serve ``build_openapi`` at ``/openapi.json`` (built once, on first use)."""
    cache: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if "doc" not in cache:
            cache["doc"] = build_openapi(app, max_temperature, auth)
        return cache["doc"]

    app.openapi = openapi  # type: ignore[method-assign]
