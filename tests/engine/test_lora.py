"""Multi-LoRA in the engine: greedy output equals HF transformers + PEFT on the same adapters,
mixed batches equal each request run alone, the prefix cache never crosses adapters, slots are
evicted LRU, and bad adapters are refused with errors naming the problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from lora_adapters import hf_peft_model, make_peft_adapter

from splitserve import LLM, LoRARequest, SamplingParams
from splitserve.engine.lora import AdapterError, LoRAExistsError, LoRANotFoundError

PROMPTS = [[5, 17, 300, 9000, 44], list(range(100, 137)), [7] * 19, list(range(3, 90))]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, min_tokens=10)


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
            do_sample=False, pad_token_id=2,
        )  # fmt: skip
    return out[0, ids.shape[1] :].tolist()


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def tiny_lora_llm(tiny_llama_dir):
    return LLM(
        model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=256, block_size=8,
        enable_lora=True, max_loras=4, max_lora_rank=16,
    )  # fmt: skip


@pytest.fixture(scope="module")
def lora_requests(tiny_llama_adapters):
    return {
        name: LoRARequest(name, i + 1, str(path))
        for i, (name, path) in enumerate(sorted(tiny_llama_adapters.items()))
    }


@pytest.mark.parametrize("name", ["all", "qv", "mlp"])
def test_tiny_adapter_matches_hf_peft(name, tiny_lora_llm, lora_requests, tiny_llama_dir,
                                      tiny_llama_adapters):  # fmt: skip
    hf = hf_peft_model(tiny_llama_dir, tiny_llama_adapters[name])
    outs = tiny_lora_llm.generate(PROMPTS, GREEDY, lora_request=lora_requests[name])
    base = tiny_lora_llm.generate(PROMPTS, GREEDY)
    for prompt, got, plain in zip(PROMPTS, tokens(outs), tokens(base), strict=True):
        assert got == hf_greedy(hf, prompt, 10)
        assert got != plain, "the adapter must change the output, or this test proves nothing"
    tiny_lora_llm.engine.check_integrity()


def test_one_batch_mixing_three_adapters_and_base_equals_each_alone(tiny_lora_llm, lora_requests):
    names = [None, "all", "qv", "mlp"]
    alone = {
        name: tokens(
            tiny_lora_llm.generate(
                PROMPTS, GREEDY, lora_request=None if name is None else lora_requests[name]
            )
        )
        for name in names
    }
    # every prompt under every adapter, interleaved, in ONE generate call: one batch per step
    prompts = [p for p in PROMPTS for _ in names]
    loras = [None if n is None else lora_requests[n] for _ in PROMPTS for n in names]
    mixed = tokens(tiny_lora_llm.generate(prompts, GREEDY, lora_request=loras))
    for i, got in enumerate(mixed):
        assert got == alone[names[i % len(names)]][i // len(names)], (i, names[i % len(names)])
    assert len({tuple(alone[n][0]) for n in names}) == len(names), "adapters must differ"
    tiny_lora_llm.engine.check_integrity()


def test_prefix_cache_never_crosses_adapters(tiny_lora_llm, lora_requests):
    prompt = list(range(500, 548))  # 6 full blocks of 8
    params = SamplingParams(temperature=0.0, max_tokens=2)
    llm = tiny_lora_llm
    first = llm.generate([prompt], params, lora_request=lora_requests["all"])[0]
    again = llm.generate([prompt], params, lora_request=lora_requests["all"])[0]
    other = llm.generate([prompt], params, lora_request=lora_requests["qv"])[0]
    base = llm.generate([prompt], params)[0]
    base_again = llm.generate([prompt], params)[0]
    assert again.num_cached_tokens >= 40  # same adapter: the prompt's blocks are reused
    assert other.num_cached_tokens == 0  # same tokens, another adapter: nothing shared
    assert base.num_cached_tokens == 0  # nor with the base model
    assert base_again.num_cached_tokens >= 40
    assert first.outputs[0].token_ids == again.outputs[0].token_ids
    llm.engine.check_integrity()


def test_more_adapters_than_slots_evicts_lru_and_stays_exact(tiny_llama_dir, lora_requests):
    llm = LLM(
        model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=256, block_size=8,
        enable_lora=True, max_loras=2, max_lora_rank=16,
    )  # fmt: skip
    names = ["all", "qv", "mlp"]
    alone = {n: tokens(llm.generate(PROMPTS, GREEDY, lora_request=lora_requests[n])) for n in names}
    loads_before = llm.engine.lora.slots.num_loads
    prompts = [p for p in PROMPTS for _ in names]
    loras = [lora_requests[n] for _ in PROMPTS for n in names]
    engine = llm.engine
    for i, (p, lr) in enumerate(zip(prompts, loras, strict=True)):  # watch every step's batch
        if lr.lora_name not in {a.name for a in engine.lora_adapters()}:
            engine.add_lora(lr)
        engine.add_request(f"r{i}", p, GREEDY, lora_name=lr.lora_name)
    got: dict[str, list[int]] = {}
    while engine.has_unfinished():
        running = {r.lora.name for r in engine.scheduler.running if r.lora is not None}
        assert len(running) <= 2, running
        for delta in engine.step():
            got.setdefault(delta.request_id, []).extend(delta.token_ids)
    for i in range(len(prompts)):
        assert got[f"r{i}"] == alone[names[i % 3]][i // 3]
    assert engine.lora.slots.num_loads > loads_before, "a third adapter must have evicted one"
    engine.check_integrity()


def test_unload_keeps_running_requests_and_refuses_new_ones(tiny_llama_dir, lora_requests):
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=128, block_size=8,
              enable_lora=True, max_loras=2)  # fmt: skip
    engine = llm.engine
    lr = lora_requests["all"]
    expected = tokens(llm.generate(PROMPTS[:1], GREEDY, lora_request=lr))[0]
    engine.add_request("running", PROMPTS[0], GREEDY, lora_name="all")
    got = [t for d in engine.step() for t in d.token_ids]
    assert engine.remove_lora("all")
    assert "all" not in {a.name for a in engine.lora_adapters()}
    with pytest.raises(LoRANotFoundError, match="'all' is not loaded"):
        engine.add_request("late", PROMPTS[0], GREEDY, lora_name="all")
    while engine.has_unfinished():
        got += [t for d in engine.step() for t in d.token_ids]
    assert got == expected  # finished with the weights it started with
    assert not engine.remove_lora("all")
    engine.check_integrity()
    assert engine.lora.num_in_memory() == 0  # dropped after its last request


def test_host_memory_is_bounded_and_reread(tiny_llama_dir, lora_requests):
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=128, block_size=8,
              enable_lora=True, max_loras=1, max_cpu_loras=1)  # fmt: skip
    first = {n: tokens(llm.generate(PROMPTS[:2], GREEDY, lora_request=lora_requests[n]))
             for n in ("all", "qv", "mlp")}  # fmt: skip
    assert llm.engine.lora.num_in_memory() == 1
    assert len(llm.engine.lora_adapters()) == 3  # still registered: read again when named
    for name, expected in first.items():
        assert tokens(llm.generate(PROMPTS[:2], GREEDY, lora_request=lora_requests[name])) == (
            expected
        )


@pytest.mark.model
def test_default_model_adapter_matches_hf_peft(default_model_dir, tmp_path):
    adapter = make_peft_adapter(
        default_model_dir, tmp_path / "smol", targets=("q_proj", "v_proj", "o_proj", "down_proj"),
        r=8, alpha=16, seed=5, scale=0.5,
    )  # fmt: skip
    llm = LLM(dtype="float32", num_kv_blocks=256, enable_lora=True, max_loras=2)
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    params = SamplingParams(temperature=0.0, max_tokens=12, min_tokens=12)
    lr = LoRARequest("smol", 1, str(adapter))
    mixed = llm.generate(prompts * 2, params, lora_request=[lr, lr, lr, None, None, None])
    hf = hf_peft_model(default_model_dir, adapter)
    base = hf_peft_model(default_model_dir, None)
    for i, out in enumerate(mixed):
        model = hf if i < 3 else base
        assert out.outputs[0].token_ids == hf_greedy(model, out.prompt_token_ids, 12), i
    assert mixed[0].outputs[0].token_ids != mixed[3].outputs[0].token_ids
    llm.engine.check_integrity()


def test_qwen2_adapter_matches_hf_peft(tiny_qwen2_dir, tmp_path):
    adapter = make_peft_adapter(tiny_qwen2_dir, tmp_path / "q", r=8, alpha=16, seed=7)
    llm = LLM(model=str(tiny_qwen2_dir), dtype="float32", num_kv_blocks=64, block_size=8,
              enable_lora=True)  # fmt: skip
    outs = llm.generate(PROMPTS, GREEDY, lora_request=LoRARequest("q", 1, str(adapter)))
    hf = hf_peft_model(tiny_qwen2_dir, adapter)
    for prompt, got in zip(PROMPTS, tokens(outs), strict=True):
        assert got == hf_greedy(hf, prompt, 10)


# --- bad adapters --------------------------------------------------------------------------


def test_bad_adapters_are_refused_naming_the_problem(
    tiny_lora_llm, tiny_llama_dir, tiny_llama_adapters, tmp_path, default_model_dir
):
    engine = tiny_lora_llm.engine
    big = make_peft_adapter(tiny_llama_dir, tmp_path / "big", r=32, alpha=32)
    with pytest.raises(AdapterError, match="rank 32, above this engine's max_lora_rank 16"):
        engine.add_lora(LoRARequest("big", 9, str(big)))
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        engine.add_lora(LoRARequest("nowhere", 9, str(tmp_path / "missing")))
    # an adapter made for another base model (SmolLM2: hidden 576, not 64)
    smol = make_peft_adapter(default_model_dir, tmp_path / "smol", targets=("q_proj",), r=4)
    with pytest.raises(AdapterError, match="does not fit this base model.*q_proj"):
        engine.add_lora(LoRARequest("smol", 9, str(smol)))
    dora = tmp_path / "dora"
    shutil.copytree(tiny_llama_adapters["qv"], dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(AdapterError, match="DoRA"):
        engine.add_lora(LoRARequest("dora", 9, str(dora)))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_adapters["qv"], broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(AdapterError, match="cannot read adapter_model.safetensors"):
        engine.add_lora(LoRARequest("broken", 9, str(broken)))
    with pytest.raises(LoRANotFoundError):
        engine.add_request("x", [1, 2, 3], GREEDY, lora_name="never-loaded")
    assert {"big", "nowhere", "smol", "dora", "broken"}.isdisjoint(
        a.name for a in engine.lora_adapters()
    )
    engine.check_integrity()


def test_same_name_other_files_is_refused_same_files_is_idempotent(
    tiny_lora_llm, tiny_llama_adapters
):
    engine = tiny_lora_llm.engine
    first = engine.add_lora(LoRARequest("dup", 1, str(tiny_llama_adapters["qv"])))
    assert engine.add_lora(LoRARequest("dup", 1, str(tiny_llama_adapters["qv"]))) == first
    with pytest.raises(LoRAExistsError, match="already loaded"):
        engine.add_lora(LoRARequest("dup", 2, str(tiny_llama_adapters["mlp"])))
    assert engine.remove_lora("dup")


def test_lora_requests_need_enable_lora(tiny_llama_dir, tiny_llama_adapters):
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=32, block_size=8)
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        llm.generate([[1, 2, 3]], GREEDY, lora_request=LoRARequest("a", 1,
                     str(tiny_llama_adapters["qv"])))  # fmt: skip
    with pytest.raises(ValueError, match="lora_int_id must be positive"):
        LoRARequest("a", 0, "/x")
    with pytest.raises(ValueError, match="lora_name must be"):
        LoRARequest("has space", 1, "/x")
