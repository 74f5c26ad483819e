"""LoRA bookkeeping that needs no model: the router's view of which pods have which adapter,
the adapter's share of the block hashes, and the engine servers' flag and list-file parsing."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from splitserve.proto import splitserve_pb2 as pb
from splitserve.protocol.block_hash import hash_prompt_blocks
from splitserve.protocol.lora import AdapterInfo, adapter_cache_key, with_adapter_key
from splitserve.protocol.sampling import SamplingParams
from splitserve.protocol.wire import adapter_to_proto
from splitserve.services.common.lora import LoRAModule, read_modules_file
from splitserve.services.router.adapters import RouterAdapters, serves
from splitserve.services.router.dispatch import EngineRequest
from splitserve.services.router.policy import Candidate, Weights, choose

SQL = AdapterInfo("sql", "aaaa", 8, "/a/sql")
SQL_OTHER_FILES = AdapterInfo("sql", "bbbb", 8, "/b/sql")


def pod(tokenizer: str, *adapters: AdapterInfo, enabled: bool = True):
    info = pb.EngineInfo(tokenizer_id=tokenizer, lora_enabled=enabled, max_loras=2)
    info.lora_adapters.extend(adapter_to_proto(a) for a in adapters)
    return SimpleNamespace(info=info, tokenizer_id=tokenizer)


def adapters_over(*pods) -> RouterAdapters:
    pool = SimpleNamespace(pods={str(i): p for i, p in enumerate(pods)})
    return RouterAdapters(SimpleNamespace(pool=pool))


def test_a_pod_serves_an_adapter_only_with_the_same_files():
    p = pod("t", SQL)
    assert serves(p, None) and serves(p, SQL)
    assert not serves(p, SQL_OTHER_FILES)
    assert not serves(pod("t", SQL, enabled=False), SQL)


def test_views_take_the_digest_most_pods_have_within_a_generation():
    facts = SimpleNamespace(tokenizer_id="t", served_model_name="base", aliases=())
    view = adapters_over(pod("t", SQL), pod("t", SQL), pod("t", SQL_OTHER_FILES),
                         pod("other", SQL_OTHER_FILES)).views(facts)  # fmt: skip
    assert set(view) == {"sql"}
    assert view["sql"].info == SQL and view["sql"].pods == 2 and view["sql"].parent == "base"
    router = adapters_over(pod("t", SQL))
    assert router.resolve("sql", facts) == SQL
    assert router.resolve("base", facts) is None and router.resolve(None, facts) is None


def test_block_hashes_carry_the_adapter_last_as_engines_do():
    params = SamplingParams(extra_keys=("salt",))
    tokens = list(range(64))
    base = EngineRequest("r", tokens, params, "t")
    lora = EngineRequest("r", tokens, params, "t", adapter=SQL)
    assert base.block_hashes(16) == hash_prompt_blocks(tokens, 16, ("salt",))
    assert lora.block_hashes(16) == hash_prompt_blocks(
        tokens, 16, ("salt", adapter_cache_key("sql", "aaaa"))
    )
    assert set(base.block_hashes(16)).isdisjoint(lora.block_hashes(16))
    other = EngineRequest("r", tokens, params, "t", adapter=SQL_OTHER_FILES)
    assert set(lora.block_hashes(16)).isdisjoint(other.block_hashes(16))
    assert with_adapter_key(("salt",), None) == ("salt",)
    msg = lora.proto
    assert (msg.lora.name, msg.lora.digest) == ("sql", "aaaa")
    assert list(msg.extra_keys) == ["salt"]  # the engine appends the adapter's key itself
    assert not base.proto.HasField("lora")


def test_affinity_prefers_the_pod_running_the_adapter_and_avoids_full_slots():
    w = Weights()
    same = [Candidate("a", adapter_affinity=0), Candidate("b", adapter_affinity=1)]
    assert choose("prefix", same, total_blocks=4, weights=w).pod_id == "b"
    full = [Candidate("a", adapter_affinity=-1), Candidate("b", running=4)]
    assert choose("prefix", full, total_blocks=4, weights=w).pod_id == "b"


def test_lora_modules_flags_and_list_file(tmp_path):
    assert LoRAModule.parse("sql=/a/sql") == LoRAModule("sql", "/a/sql")
    assert LoRAModule.parse('{"name": "sql", "path": "/a/sql", "base_model_name": "x"}') == (
        LoRAModule("sql", "/a/sql")
    )
    with pytest.raises(ValueError, match="NAME=PATH"):
        LoRAModule.parse("sql")
    with pytest.raises(ValueError, match="lora-modules name"):
        LoRAModule.parse("bad name=/x")
    path = tmp_path / "adapters.json"
    path.write_text(json.dumps([{"name": "a", "path": "/x"}, {"name": "b", "path": "/y"}]))
    assert read_modules_file(path) == {"a": "/x", "b": "/y"}
    path.write_text(json.dumps({"name": "a"}))
    with pytest.raises(ValueError, match="JSON list"):
        read_modules_file(path)
