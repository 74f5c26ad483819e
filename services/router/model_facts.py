"""What the router knows of the model: only what the engines told it in ``EngineInfo``.

The router has no model of its own. Each engine pod reports its tokenizer (files and identity),
its real ``max_model_len`` (after its own caps: pool size, sliding window), its vocabulary size
and its KV compatibility hash. Pods that report the same tokenizer form one *generation*; the
router tokenizes a request with one generation's tokenizer and routes it only to that
generation's pods. During a rollout that changes the model, old and new generations coexist and
new requests go to the newest one that can serve (a ready prefill and decode pod).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field

from splitserve.proto import splitserve_pb2 as pb
from splitserve.protocol.tokenizer_files import tokenizer_id, write_tokenizer_files
from splitserve.services.router.tokenizer import RouterTokenizer

log = logging.getLogger(__name__)

MAX_GENERATIONS = 4  # tokenizers kept loaded at once (a rollout needs two)


@dataclass
class ModelFacts:
    """One generation of engines: same tokenizer, hence same token ids for the same text."""

    tokenizer_id: str
    tokenizer: RouterTokenizer
    served_model_name: str
    aliases: tuple[str, ...]
    vocab_size: int
    max_model_len: int  # the smallest any of its pods reported
    first_seen: int  # order of discovery: the newest generation wins new requests
    pods: set[str] = field(default_factory=set)

    def check_token_ids(self, token_ids, param: str) -> None:
        """ValueError naming ``param`` if any id is not below the engines' vocabulary size."""
        if any(not 0 <= t < self.vocab_size for t in token_ids):
            raise ValueError(f"{param}: token ids must be in [0, {self.vocab_size})")


class ModelCatalog:
    """Generations by tokenizer id, built from the pods' ``EngineInfo``. One asyncio loop."""

    def __init__(self, cache_dir: str | None = None) -> None:
        self._dir = cache_dir or tempfile.mkdtemp(prefix="splitserve-router-tokenizers-")
        self.generations: dict[str, ModelFacts] = {}
        self._counter = 0

    def add_pod(self, pod_id: str, info: pb.EngineInfo) -> ModelFacts:
        """Record a pod's facts; loads its tokenizer the first time its generation is seen.

        Raises ValueError when the files do not match the id the pod claims (a broken pod).
        """
        files = [(f.name, f.content) for f in info.tokenizer_files]
        tid = tokenizer_id(files)
        if tid != info.tokenizer_id:
            raise ValueError(f"pod {pod_id}: tokenizer files do not match its tokenizer_id")
        facts = self.generations.get(tid)
        if facts is None:
            self._evict_unused()
            path = write_tokenizer_files(files, f"{self._dir}/{tid}")
            self._counter += 1
            facts = ModelFacts(
                tokenizer_id=tid,
                tokenizer=RouterTokenizer(path),
                served_model_name=info.served_model_name,
                aliases=tuple(info.served_model_aliases),
                vocab_size=info.vocab_size,
                max_model_len=info.max_model_len,
                first_seen=self._counter,
            )
            self.generations[tid] = facts
            log.info(
                "model generation %s: %s, vocab %d, max_model_len %d (from pod %s)",
                tid[:12], info.served_model_name, info.vocab_size, info.max_model_len, pod_id,
            )  # fmt: skip
        facts.pods.add(pod_id)
        facts.max_model_len = min(facts.max_model_len, info.max_model_len)
        facts.vocab_size = min(facts.vocab_size, info.vocab_size)
        return facts

    def remove_pod(self, pod_id: str) -> None:
        for facts in self.generations.values():
            facts.pods.discard(pod_id)

    def _evict_unused(self) -> None:
        while len(self.generations) >= MAX_GENERATIONS:
            unused = [f for f in self.generations.values() if not f.pods]
            if not unused:
                return
            oldest = min(unused, key=lambda f: f.first_seen)
            del self.generations[oldest.tokenizer_id]

    def newest(self, usable: set[str]) -> ModelFacts | None:
        """The newest generation among ``usable`` tokenizer ids (those with a ready pair)."""
        cands = [f for tid, f in self.generations.items() if tid in usable]
        return max(cands, key=lambda f: f.first_seen, default=None)

    def served_names(self) -> tuple[str, ...]:
        """The names (then aliases) the engines report, newest generation first."""
        names: list[str] = []
        for f in sorted(self.generations.values(), key=lambda f: -f.first_seen):
            for name in (f.served_model_name, *f.aliases):
                if name and name not in names:
                    names.append(name)
        return tuple(names)

    def any(self) -> ModelFacts | None:
        """The newest generation known at all (for tokenize endpoints and model listings)."""
        return max(self.generations.values(), key=lambda f: f.first_seen, default=None)
