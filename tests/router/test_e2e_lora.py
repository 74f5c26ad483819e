"""Multi-LoRA end to end: real `splitserve serve` stacks (router + engine processes, tiny Llama,
float32) and the official `openai` client.

- P/D with adapters == colocated with adapters == the offline engine, for each adapter and base;
- `/v1/models` lists adapters with their `parent`; `model` names an adapter;
- vLLM's runtime `/v1/load_lora_adapter` / `/v1/unload_lora_adapter` through the router, while
  requests for other adapters keep running and keep their exact outputs;
- bad input: unknown adapter 404, rank above the limit / another base model / missing files 400,
  all in the OpenAI error shape, and the stack keeps serving;
- the prefix cache never crosses adapters; `vllm:lora_requests_info` on the pods.
"""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from lora_adapters import make_peft_adapter

from splitserve import LLM, LoRARequest, SamplingParams

pytestmark = pytest.mark.model  # real engine processes (on the tiny model)

PROMPTS = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,"]
MAX_TOKENS = 8
LORA_FLAGS = ["--dtype", "float32", "--block-size", "8", "--enable-lora", "--max-loras", "2"]


@pytest.fixture(scope="module")
def adapters(tiny_llama_adapters):
    return tiny_llama_adapters


@pytest.fixture(scope="module")
def expected(tiny_llama_dir, adapters):
    """Offline greedy text of each prompt under each adapter (None: base)."""
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", block_size=8, num_kv_blocks=128,
              enable_lora=True, max_loras=3)  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS)
    out = {}
    for i, name in enumerate([None, "all", "qv", "mlp"]):
        lora = None if name is None else LoRARequest(name, i, str(adapters[name]))
        outs = llm.generate(PROMPTS, params, lora_request=lora)
        out[name] = [o.outputs[0].text for o in outs]
    assert len({tuple(v) for v in out.values()}) == 4, "adapters must change the output"
    return out


def stack_args(tiny_llama_dir, adapters, *extra: str) -> list[str]:
    return [
        "--model", str(tiny_llama_dir), *LORA_FLAGS,
        "--lora-modules", f"all={adapters['all']}", f"qv={adapters['qv']}", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def disagg(serve_factory, tiny_llama_dir, adapters):
    stack = serve_factory(
        stack_args(tiny_llama_dir, adapters, "--prefill-replicas", "1", "--decode-replicas", "1")
    )
    yield stack
    assert stack.stop() == 0


@pytest.fixture(scope="module")
def colocated(serve_factory, tiny_llama_dir, adapters):
    stack = serve_factory(stack_args(tiny_llama_dir, adapters, "--colocated"))
    yield stack
    assert stack.stop() == 0


def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key="x", max_retries=0, timeout=120)


def complete(stack, model: str, prompt: str, **kw):
    return client(stack).completions.create(
        model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"min_tokens": MAX_TOKENS}, **kw,
    )  # fmt: skip


def base_name(stack) -> str:
    return next(m.id for m in client(stack).models.list().data if not _parent(m))


def _parent(card) -> str | None:
    return (card.model_extra or {}).get("parent")


@pytest.mark.parametrize("which", ["disagg", "colocated"])
def test_adapters_through_the_router_equal_the_offline_engine(which, request, expected):
    stack = request.getfixturevalue(which)
    base = base_name(stack)
    for name in (None, "all", "qv"):
        for prompt, want in zip(PROMPTS, expected[name], strict=True):
            got = complete(stack, name or base, prompt)
            assert got.choices[0].text == want, (which, name, prompt)
            assert got.model == (name or base)


def test_models_list_adapters_with_their_parent(disagg, adapters):
    cards = {m.id: m for m in client(disagg).models.list().data}
    base = base_name(disagg)
    assert _parent(cards["all"]) == base and _parent(cards["qv"]) == base
    assert (cards["all"].model_extra or {})["root"] == str(adapters["all"])
    assert _parent(cards[base]) is None
    one = httpx.get(f"{disagg.url}/v1/models/qv", timeout=10).json()
    assert one["parent"] == base


def test_prefix_cache_never_crosses_adapters(disagg):
    prompt = "Paged attention keeps the KV cache in fixed-size blocks. " * 4
    usage = lambda model: complete(disagg, model, prompt).usage.prompt_tokens_details  # noqa: E731
    assert usage("all").cached_tokens == 0
    assert usage("all").cached_tokens > 0  # same adapter again: its blocks are reused
    assert usage("qv").cached_tokens == 0  # same text, other adapter: nothing shared
    assert usage(base_name(disagg)).cached_tokens == 0


def test_unknown_adapter_is_a_404_in_openai_shape(disagg):
    with pytest.raises(openai.NotFoundError) as err:
        complete(disagg, "no-such-adapter", "hi")
    body = err.value.body
    assert body["code"] == "model_not_found" and "no-such-adapter" in body["message"]
    assert complete(disagg, "all", PROMPTS[0]).choices[0].text  # still serving


def test_bad_adapters_are_400s_naming_the_problem(
    disagg, tiny_llama_dir, default_model_dir, tmp_path_factory
):
    root = tmp_path_factory.mktemp("bad-adapters")
    big = make_peft_adapter(tiny_llama_dir, root / "big", r=32, alpha=32)
    smol = make_peft_adapter(default_model_dir, root / "smol", targets=("q_proj",), r=4)
    cases = {
        "big": (str(big), "rank 32, above this engine's max_lora_rank 16"),
        "smol": (str(smol), "does not fit this base model"),
        "gone": (str(root / "missing"), "no adapter_config.json"),
    }
    for name, (path, message) in cases.items():
        r = httpx.post(f"{disagg.url}/v1/load_lora_adapter",
                       json={"lora_name": name, "lora_path": path}, timeout=60)  # fmt: skip
        assert r.status_code == 400, r.text
        assert message in r.json()["error"]["message"]
    r = httpx.post(f"{disagg.url}/v1/load_lora_adapter",
                   json={"lora_name": "all", "lora_path": path}, timeout=60)  # fmt: skip
    assert r.status_code == 400 and "already been loaded" in r.json()["error"]["message"]
    r = httpx.post(f"{disagg.url}/v1/unload_lora_adapter", json={"lora_name": "nope"}, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(f"{disagg.url}/v1/load_lora_adapter", json={"lora_name": "x"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
    names = {m.id for m in client(disagg).models.list().data}
    assert names.isdisjoint(cases)  # nothing half-loaded anywhere
    assert complete(disagg, "qv", PROMPTS[0]).choices[0].text  # still serving


def test_load_and_unload_at_run_time_under_load(disagg, adapters, expected):
    """Requests for base and "all" run without pause while "mlp" is loaded, used and unloaded
    three times; every one of them keeps its exact output."""
    base = base_name(disagg)
    stop = threading.Event()
    failures: list[str] = []
    done = [0]

    def load_loop(model: str, key: str | None) -> None:
        i = 0
        while not stop.is_set():
            prompt = PROMPTS[i % len(PROMPTS)]
            try:
                got = complete(disagg, model, prompt).choices[0].text
                if got != expected[key][i % len(PROMPTS)]:
                    failures.append(f"{model}: {got!r}")
                done[0] += 1
            except Exception as exc:  # noqa: BLE001 - every failure is reported below
                failures.append(f"{model}: {exc!r}")
            i += 1

    threads = [threading.Thread(target=load_loop, args=a) for a in ((base, None), ("all", "all"))]
    for t in threads:
        t.start()
    try:
        for _ in range(3):
            r = httpx.post(f"{disagg.url}/v1/load_lora_adapter",
                           json={"lora_name": "mlp", "lora_path": str(adapters["mlp"])},
                           timeout=120)  # fmt: skip
            assert r.status_code == 200 and r.text.startswith("Success"), r.text
            cards = {m.id: m for m in client(disagg).models.list().data}
            assert _parent(cards["mlp"]) == base
            for prompt, want in zip(PROMPTS, expected["mlp"], strict=True):
                assert complete(disagg, "mlp", prompt).choices[0].text == want
            r = httpx.post(f"{disagg.url}/v1/unload_lora_adapter", json={"lora_name": "mlp"},
                           timeout=60)  # fmt: skip
            assert r.status_code == 200, r.text
            with pytest.raises(openai.NotFoundError):
                complete(disagg, "mlp", PROMPTS[0])
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert not failures, failures[:5]
    assert done[0] >= 6


def test_pods_report_lora_requests_info(colocated):
    """vLLM's gauge: max_lora always; the adapter in running_lora_adapters while it runs."""
    (name,) = colocated.engines
    info = lambda: [k for k in colocated.engine_metrics(name)  # noqa: E731
                    if k.startswith("vllm:lora_requests_info{")]  # fmt: skip
    assert (
        len(info()) == 1
        and 'max_lora="2"' in info()[0]
        and 'running_lora_adapters=""' in (info()[0])
    )
    long = threading.Thread(target=lambda: client(colocated).completions.create(
        model="qv", prompt=PROMPTS[0], max_tokens=1000, temperature=0,
        extra_body={"ignore_eos": True}))  # fmt: skip
    long.start()
    seen = []
    while long.is_alive():
        seen += info()
        time.sleep(0.02)
    long.join()
    assert any('running_lora_adapters="qv"' in k for k in seen), seen[-3:]
