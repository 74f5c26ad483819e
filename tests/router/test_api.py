"""The OpenAI surface against fake pods: shapes, streaming, usage, n, logprobs, auth, limits."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from splitserve.services.router.main import RouterSettings


def client(router, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key=kw.pop("api_key", "x"), **kw)


def test_completion_non_streaming_shape_and_usage(disagg, tokenizer):
    router, (prefill, decode) = disagg
    r = client(router).completions.create(model="m", prompt="Hello there", max_tokens=5)
    prompt = tokenizer.encode("Hello there")
    want = "".join(f" w{100 + (sum(prompt) + i) % 500}" for i in range(5))
    assert r.object == "text_completion"
    assert r.choices[0].text == want
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == 5
    assert r.usage.total_tokens == len(prompt) + 5
    # The request went prefill -> decode, with the same request id on both.
    assert prefill.engine.prefills[-1] == decode.engine.generates[-1]


def test_chat_streaming_with_usage(disagg):
    router, _ = disagg
    stream = client(router).chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.count(" w") == 4
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and finishes.count("length") == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4


def test_sse_wire_format_ends_with_done(disagg):
    router, _ = disagg
    body = {"model": "m", "prompt": "a b c", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", router.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_n2_is_one_prefill_and_one_hand_off(disagg, tokenizer):
    """n samples of one prompt: one prefill (n first tokens), one Generate on one decode pod."""
    router, (prefill, decode) = disagg
    before, gen_before = len(prefill.engine.prefills), len(decode.engine.generates)
    r = client(router).completions.create(model="m", prompt="x y", max_tokens=2, n=2, seed=5)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text != r.choices[1].text  # the fake's samples differ by index
    assert len(prefill.engine.prefills) - before == 1
    assert len(decode.engine.generates) - gen_before == 1
    assert prefill.engine.seeds[-1] == 5  # the engines offset sample i's seed by i
    assert r.usage.completion_tokens == 4
    # The prompt is counted once for the request, as OpenAI does.
    assert r.usage.prompt_tokens == len(tokenizer.encode("x y"))


def test_stop_string_and_echo(disagg, tokenizer):
    router, _ = disagg
    prompt = tokenizer.encode("stop here")
    first = f" w{100 + sum(prompt) % 500}"
    r = client(router).completions.create(
        model="m", prompt="stop here", max_tokens=5, stop=[first[2:4]], echo=True
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == "stop here" + first[:2]


def test_logprobs_both_formats(disagg):
    router, _ = disagg
    c = client(router)
    r = c.completions.create(model="m", prompt="p", max_tokens=3, logprobs=1)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 3 and lp.token_logprobs == [-0.5] * 3
    assert all(len(t) == 1 for t in lp.top_logprobs)
    assert lp.text_offset[0] == 0
    r = c.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "q"}], max_tokens=2,
        logprobs=True, top_logprobs=1,
    )  # fmt: skip
    content = r.choices[0].logprobs.content
    assert len(content) == 2 and content[0].logprob == -0.5 and len(content[0].top_logprobs) == 1


def test_cached_tokens_reported(disagg):
    router, _ = disagg
    prompt = "shared " * 80
    c = client(router)
    c.completions.create(model="m", prompt=prompt, max_tokens=1)
    r = c.completions.create(model="m", prompt=prompt, max_tokens=1)
    assert r.usage.prompt_tokens_details.cached_tokens >= 64
    # the router's view: the second request was routed on a predicted prefix hit
    from prometheus_client.parser import text_string_to_metric_families

    families = {
        f.name: f for f in text_string_to_metric_families(httpx.get(router.url + "/metrics").text)
    }
    decisions = {
        s.labels["prefix"]: s.value
        for s in families["splitserve_router_routing_decisions"].samples
        if s.name.endswith("_total") and s.labels["mode"] == "disaggregated"
    }
    assert decisions.get("hit", 0) >= 1
    queue = families["splitserve_router_queue_seconds"]
    assert next(s.value for s in queue.samples if s.name.endswith("_count")) >= 2
    index = {
        s.labels["kind"]: s.value for s in families["splitserve_router_prefix_index_blocks"].samples
    }
    assert index["speculative"] >= 4 and "precise" in index


def test_models_health_metrics_tokenize(disagg, tokenizer):
    router, _ = disagg
    models = client(router).models.list()
    assert [m.id for m in models.data] == ["m"]
    assert httpx.get(router.url + "/health").json()["status"] == "ok"
    metrics = httpx.get(router.url + "/metrics").text
    assert "splitserve_router_requests_total" in metrics
    r = httpx.post(router.url + "/tokenize", json={"model": "m", "prompt": "Hello world"}).json()
    assert r["tokens"] == tokenizer.encode("Hello world") and r["count"] == len(r["tokens"])
    r = httpx.post(router.url + "/detokenize", json={"model": "m", "tokens": r["tokens"]}).json()
    assert r["prompt"] == "Hello world"


BAD = [
    ("invalid json", b"{not json", 400),
    ("unknown model", {"model": "nope", "prompt": "x"}, 404),
    ("max_tokens -1", {"model": "m", "prompt": "x", "max_tokens": -1}, 400),
    ("temperature -1", {"model": "m", "prompt": "x", "temperature": -1}, 400),
    ("prompt too long", {"model": "m", "prompt": "hello " * 9000}, 400),
    ("wrong prompt type", {"model": "m", "prompt": {"a": 1}}, 400),
    ("n zero", {"model": "m", "prompt": "x", "n": 0}, 400),
    ("body not object", [1, 2], 400),
]

_USER = [{"role": "user", "content": "x"}]
BAD_CHAT = [
    ("empty messages", {"model": "m", "messages": []}, 400),
    ("content int", {"model": "m", "messages": [{"role": "user", "content": 5}]}, 400),
    (
        "image part",
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
    ),
    ("bad role", {"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("top_logprobs alone", {"model": "m", "messages": _USER, "top_logprobs": 2}, 400),
    ("max_completion_tokens 0", {"model": "m", "messages": _USER, "max_completion_tokens": 0}, 400),
]


@pytest.mark.parametrize(("name", "body", "status"), BAD, ids=[b[0] for b in BAD])
def test_bad_completion_input(disagg, name, body, status):
    _check_bad(disagg[0], "/v1/completions", body, status)


@pytest.mark.parametrize(("name", "body", "status"), BAD_CHAT, ids=[b[0] for b in BAD_CHAT])
def test_bad_chat_input(disagg, name, body, status):
    _check_bad(disagg[0], "/v1/chat/completions", body, status)


def _check_bad(router, path, body, status):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(router.url + path, timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    # The server serves correctly right after.
    ok = client(router).completions.create(model="m", prompt="fine", max_tokens=1)
    assert ok.choices[0].finish_reason == "length"


def test_sdk_raises_typed_errors(disagg):
    c = client(disagg[0])
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError) as info:
        c.completions.create(model="m", prompt="x", max_tokens=-1)
    assert "max_tokens" in str(info.value)


def test_logit_bias_and_allowed_token_ids_errors_name_the_field(disagg, tokenizer):
    c = client(disagg[0])
    vocab = 49152  # what the fake pods report in EngineInfo (the default model's)
    ok = c.completions.create(
        model="m", prompt="x", max_tokens=1, logit_bias={"5": 100, str(vocab - 1): -100},
        extra_body={"allowed_token_ids": [5, 7]},
    )  # fmt: skip
    assert ok.choices[0].finish_reason == "length"
    cases = [
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"-3": 1}}, "logit_bias"),
        ({"logit_bias": {"1.5": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 100.5}}, "logit_bias"),
        ({"logit_bias": {str(vocab): 1}}, "logit_bias"),
        ({"logit_bias": {"5": "much"}}, "logit_bias"),  # the message names the key
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"allowed_token_ids": [1, vocab]}, "allowed_token_ids"),
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            c.completions.create(model="m", prompt="x", max_tokens=1, extra_body=extra)
        assert info.value.param == param and param.split(".")[0] in info.value.message, extra
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "q"}], logit_bias={"x": 1}
        )
    assert info.value.param == "logit_bias"
    assert c.completions.create(model="m", prompt="x", max_tokens=1).choices[0].text


def test_structured_output_fields_are_checked_by_the_router(disagg):
    c = client(disagg[0])
    chat = {"model": "m", "messages": [{"role": "user", "content": "q"}], "max_tokens": 1}
    schema = {"properties": {"a": {"type": "integer"}}}
    named = {"name": "n", "schema": schema}
    accepted = [
        {"response_format": {"type": "text"}},
        {"response_format": {"type": "json_object"}},
        {"response_format": {"type": "json_schema", "json_schema": named}},
        {"response_format": {"type": "text"}, "guided_regex": "[0-9]+"},
        {"guided_json": schema},
        {"guided_json": json.dumps(schema)},
        {"guided_choice": ["x", "y"]},
        {"guided_grammar": 'root ::= "a"'},
    ]
    for extra in accepted:
        assert c.chat.completions.create(**chat, extra_body=extra).choices[0].finish_reason
    cases = [
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a"}}},
            "response_format.json_schema.schema",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}}},
            "response_format.json_schema.schema",
        ),
        ({"response_format": {"type": "json_object"}, "guided_json": schema}, "guided_json"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_json": {"required": "a"}}, "guided_json"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_regex": ""}, "guided_regex"),
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            c.chat.completions.create(**chat, extra_body=extra)
        assert info.value.param == param, (extra, info.value.message)
        with pytest.raises(openai.BadRequestError) as info:  # completions take them too
            c.completions.create(model="m", prompt="x", max_tokens=1, extra_body=extra)
        assert info.value.param == param
    assert c.completions.create(model="m", prompt="x", max_tokens=1).choices[0].text


def test_api_keys_and_body_limit(stack_factory):
    settings = RouterSettings(
        served_names=("m",), api_keys=frozenset({"k1", "k2"}), max_body_bytes=2000,
        stats_interval_s=0.1,
    )  # fmt: skip
    with stack_factory(["colocated"], settings) as (router, _):
        with pytest.raises(openai.AuthenticationError):
            client(router, api_key="wrong").completions.create(model="m", prompt="x")
        r = httpx.post(router.url + "/v1/completions", json={"model": "m", "prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        for key in ("k1", "k2"):
            out = client(router, api_key=key).completions.create(
                model="m", prompt="x", max_tokens=1
            )
            assert out.choices[0].text
        # /health and /metrics stay open.
        assert httpx.get(router.url + "/health").status_code == 200
        assert httpx.get(router.url + "/metrics").status_code == 200
        big = {"model": "m", "prompt": "x" * 5000}
        r = httpx.post(
            router.url + "/v1/completions", json=big, headers={"Authorization": "Bearer k1"}
        )
        assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"


def test_no_backend_is_503_with_retry_after(stack_factory):
    with stack_factory(["colocated"]) as (router, (pod,)):
        pod.engine.stats_fail = True
        import time

        deadline = time.monotonic() + 5
        while httpx.get(router.url + "/health").status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = httpx.post(router.url + "/v1/completions", json={"model": "m", "prompt": "x"})
        assert r.status_code == 503 and r.headers["retry-after"]
        assert r.json()["error"]["code"] == "no_backend"


def test_best_of_runs_best_of_samples_returns_n_and_checks_its_bounds(disagg):
    router, (_, decode) = disagg
    before = len(decode.engine.generates)
    r = client(router).completions.create(
        model="m", prompt=["one", "two"], n=2, best_of=3, max_tokens=2
    )
    assert len(decode.engine.generates) - before == 2  # one request of 3 samples per prompt
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert all(c.logprobs is None for c in r.choices)  # ranked by logprobs, not shown
    assert r.usage.completion_tokens == 12  # every sample is billed
    for body in (
        {"n": 2, "best_of": 1},
        {"best_of": 2, "stream": True},
        {"best_of": 0},
        {"best_of": 500},
    ):
        res = httpx.post(
            router.url + "/v1/completions",
            json={"model": "m", "prompt": "x", "max_tokens": 1, **body},
            timeout=30,
        )
        assert res.status_code == 400 and res.json()["error"]["param"] == "best_of", res.text
    streamed = client(router).completions.create(
        model="m", prompt="x", best_of=1, max_tokens=2, stream=True
    )
    assert [c.choices[0].finish_reason for c in streamed][-1] == "length"
