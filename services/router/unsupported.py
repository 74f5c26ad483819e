"""404s that say why: OpenAI (and vLLM) endpoints this router does not serve, named as such.

A client calling ``/v1/embeddings`` on a completions-only server should learn that the endpoint
is not supported here, not that it typed a wrong URL. Such paths answer 404 with
``code: "unsupported_endpoint"`` and the list of what is served; any other unknown path is a
plain ``not_found``.
"""

from __future__ import annotations

from splitserve.services.router.errors import APIError

# First path segments under /v1 of the OpenAI API (and vLLM's extras) that the router lacks.
UNSUPPORTED_V1 = frozenset({
    "assistants", "audio", "batches", "chatkit", "containers", "conversations", "edits",
    "embeddings", "evals", "files", "fine_tuning", "fine-tunes", "images", "moderations",
    "organization", "realtime", "responses", "threads", "uploads", "vector_stores", "videos",
    "score", "rerank", "classify", "pooling",
})  # fmt: skip
UNSUPPORTED_ROOT = frozenset({"/pooling", "/score", "/rerank", "/classify", "/invocations"})
SERVED = "/v1/completions, /v1/chat/completions, /v1/models, /tokenize, /detokenize"


def unsupported_endpoint(method: str, path: str) -> APIError:
    """The 404 of a path no route matched."""
    segment = path.removeprefix("/v1/").split("/", 1)[0] if path.startswith("/v1/") else None
    if segment in UNSUPPORTED_V1 or path in UNSUPPORTED_ROOT:
        shown = f"/v1/{segment}" if segment is not None else path
        return APIError(
            404,
            f"{shown} is not supported by this server (splitserve serves {SERVED})",
            code="unsupported_endpoint",
        )
    return APIError(404, f"no route {method[:10]} {path[:200]}", code="not_found")
