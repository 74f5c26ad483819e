"""Client input never breaks the router: every bad request gets its 4xx in the OpenAI shape (the
issue's known 500s included), streams fail with a status before the 200 or an error event after
it, an unexpected exception is a JSON 500 with a request id, and /metrics cannot be inflated."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import grpc
import httpx
import pytest

from splitserve.proto import splitserve_pb2_grpc as pb_grpc
from splitserve.services.router.main import RouterSettings, build_router, static_discovery


def _load_cases():
    path = Path(__file__).with_name("hand_cases.py")
    spec = importlib.util.spec_from_file_location("router_hand_cases", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


CASES = _load_cases()
ERROR_KEYS = {"message", "type", "param", "code"}


def _send(router, case) -> httpx.Response:
    return httpx.request(
        case.method, router.url + case.path, content=case.body, headers=case.headers, timeout=60
    )


@pytest.mark.parametrize("case", CASES.ALL, ids=[c.name for c in CASES.ALL])
def test_hand_case_gets_its_status_in_the_openai_shape(disagg, case):
    r = _send(disagg[0], case)
    assert r.status_code == case.status, r.text[:500]
    if case.status >= 400:
        assert r.headers["content-type"] == "application/json"
        err = r.json()["error"]
        assert set(err) == ERROR_KEYS and err["message"], err
        assert len(err["message"]) < 1200  # echoed input is cut short
        if case.param is not None:
            assert (err["param"] or "").startswith(case.param), err


def test_the_known_500s_are_4xx_and_the_router_keeps_serving(disagg):
    """The issue's eleven plain-text 500s (plus min_tokens on chat), in one go."""
    router, _ = disagg
    for case in CASES.KNOWN_500S:
        r = _send(router, case)
        assert 400 <= r.status_code < 500 and r.json()["error"]["message"], case.name
    ok = httpx.post(router.url + "/v1/completions", json={"model": "m", "prompt": "x",
                                                          "max_tokens": 1})  # fmt: skip
    assert ok.status_code == 200


def test_seed_out_of_range_with_stream_is_a_400_not_a_silent_cut(disagg):
    body = {"model": "m", "prompt": "x", "stream": True, "seed": 2**63}
    r = httpx.post(disagg[0].url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"


# ---- streams: errors before the first byte are statuses, after it events ----------------------


def _conftest():
    """This folder's conftest module (its fake pod classes), as pytest loaded it."""
    here = str(Path(__file__).with_name("conftest.py"))
    return next(m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == here)


@pytest.fixture(scope="module")
def refusing(grpc_loop):
    """A router over one colocated fake pod whose engine refuses regex constraints with
    INVALID_ARGUMENT (as a grammar compiler does for a pattern it cannot compile), and whose
    stream dies after 2 tokens when asked for more than 8."""
    cf = _conftest()

    class Refusing(cf.FakeServicer):
        async def Generate(self, request, context):
            sp = request.request.sampling_params
            if sp.structured_output.WhichOneof("kind") == "regex":
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "structured_output.regex: "
                                    "unbalanced parenthesis")  # fmt: skip
            self.e.fail_after_tokens = 2 if sp.max_tokens > 8 else None
            async for msg in super().Generate(request, context):
                yield msg

    async def start():
        engine = cf.FakeEngine("colocated")
        server = grpc.aio.server()
        servicer = Refusing(engine)
        pb_grpc.add_PrefillServiceServicer_to_server(cf.FakePrefillService(servicer), server)
        pb_grpc.add_DecodeServiceServicer_to_server(servicer, server)
        pb_grpc.add_EngineServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, f"127.0.0.1:{port}"

    server, address = grpc_loop.call(start())
    settings = RouterSettings(served_names=("m",), stats_interval_s=0.1)
    router = cf.RouterThread(build_router(settings, static_discovery([], [], [address])))
    try:
        router.wait_ready()
        yield router
    finally:
        router.stop()
        grpc_loop.call(server.stop(None))


def test_engine_refusal_before_the_first_token_is_an_http_400_not_a_200(refusing):
    body = {"model": "m", "prompt": "x", "stream": True, "guided_regex": "(", "max_tokens": 2}
    r = httpx.post(refusing.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/json"
    assert "regex" in r.json()["error"]["message"]
    chat = {"model": "m", "messages": [{"role": "user", "content": "q"}], "stream": True,
            "guided_regex": "(", "max_tokens": 2}  # fmt: skip
    assert httpx.post(refusing.url + "/v1/chat/completions", json=chat).status_code == 400


def test_failure_after_the_first_byte_is_an_error_event_then_done(refusing):
    body = {"model": "m", "prompt": "x", "stream": True, "max_tokens": 9}
    with httpx.stream("POST", refusing.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert set(last["error"]) == ERROR_KEYS and last["error"]["type"] == "server_error"


def test_an_unexpected_exception_is_a_json_500_with_a_request_id(disagg, monkeypatch, caplog):
    router, _ = disagg
    from splitserve.services.router import serving

    def boom(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(serving.OpenAIServing, "_check_len", boom)
    r = httpx.post(router.url + "/v1/completions", json={"model": "m", "prompt": "x"})
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert err["type"] == "server_error" and err["code"] == "internal_error"
    rid = re.search(r"req-[0-9a-f]{32}", err["message"]).group(0)
    assert r.headers["x-request-id"] == rid
    assert "a bug" not in err["message"]  # details stay in the log
    assert any(rid in rec.getMessage() and rec.exc_info for rec in caplog.records)
    # A stream whose events fail mid-way: an error event and [DONE], never a silent cut.
    monkeypatch.undo()
    monkeypatch.setattr(serving._ChunkStream, "feed", boom)
    body = {"model": "m", "prompt": "x", "max_tokens": 2, "stream": True}
    with httpx.stream("POST", router.url + "/v1/completions", json=body, timeout=30) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["type"] == "server_error"


# ---- the rest of the surface ------------------------------------------------------------------


def test_ping_version_openapi_and_unsupported_endpoints(disagg):
    router, _ = disagg
    assert httpx.get(router.url + "/ping").json()["status"] == "ok"
    assert httpx.post(router.url + "/ping").status_code == 200
    assert httpx.get(router.url + "/version").json()["version"]
    doc = httpx.get(router.url + "/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/ping", "/version"} <= set(doc["paths"])
    body = doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["$ref"].endswith("/CompletionRequest")
    for path in ("/v1/embeddings", "/v1/responses", "/v1/audio/speech", "/v1/images/x"):
        r = httpx.post(router.url + path, json={"model": "m", "input": "x"})
        err = r.json()["error"]
        assert r.status_code == 404 and err["code"] == "unsupported_endpoint", path
        assert path.split("/")[2] in err["message"] and "/v1/chat/completions" in err["message"]
    r = httpx.get(router.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def _series(router) -> int:
    text = httpx.get(router.url + "/metrics").text
    return sum(1 for line in text.splitlines() if line.startswith("splitserve_router_request"))


def test_unknown_paths_do_not_add_metric_series(stack_factory):
    """1,000 distinct unknown paths, answered 401 (no key) or 404 (with one): the number of
    /metrics series does not move."""
    settings = RouterSettings(served_names=("m",), api_keys=frozenset({"k"}), stats_interval_s=0.1)
    with stack_factory(["colocated"], settings) as (router, _):
        with httpx.Client(base_url=router.url, timeout=30) as c:
            for path in ("/v1/a", "/b"):  # one of each label/status pair first
                c.get(path)
                c.get(path, headers={"Authorization": "Bearer k"})
            _series(router)  # /metrics' own series exist from here on
            before = _series(router)
            for i in range(1000):
                headers = {"Authorization": "Bearer k"} if i % 2 else {}
                r = c.get(f"/v1/unknown-{i}/{'x' * (i % 7)}", headers=headers)
                assert r.status_code == (404 if i % 2 else 401)
        assert _series(router) == before
        text = httpx.get(router.url + "/metrics").text
        assert 'endpoint="other"' in text and "unknown-" not in text
